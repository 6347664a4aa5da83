"""What the explainer trains on: reference features pooled under concept masks, on disk in chunks.

Two products of passes over the reference images (with their masks), both cached:

- :func:`reference_thresholds`: T_u over the reference images (for activation-region
  rows), in one streaming pass; each rank's tally is saved every half minute, so an
  interrupted pass resumes from the chunks it had counted, and the ranks' tallies merge
  exactly;
- :func:`reference_rows`: per (image, concept) pair the pooled d-vector mean(F ⊙ M) of
  the concept's mask, and with activation regions up to k more rows per pair, pooled
  over the active regions of the filters strongest inside the mask. Rows are kept in
  chunks of images (:class:`lavise.storage.ChunkStore`); training reads them from
  memory when they fit the memory budget, else from the memory-mapped chunks
  (:class:`ChunkedRows`).

Rows come image by image: an image's whole-mask rows in concept order, then its
region rows (concept, then strength), so their order does not depend on the batch size
or on the number of processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lavise.compute import resolve_device
from lavise.datasets.base import ReferenceDataset, SkipLog
from lavise.distributed import Ranks, current
from lavise.errors import LaviseError
from lavise.features import (
    Item, chunk_batches, chunk_bounds, count_problems, layer_shape, load_batches, merged_extremes, raise_no_usable,
    refined_thresholds, tally_fits,
)
from lavise.inputs import masked_mean
from lavise.models import TargetModel, layer_reader
from lavise.regions import ThresholdTally, masks_to_grid, strongest_regions
from lavise.settings import ComputeSettings, TrainSettings
from lavise.storage import ChunkStore, cache_key, cache_write, load_cached, save_tensors

ROWS_VERSION = 4  # 4: chunks, rows image by image
CHECKPOINT_SECONDS = 30.0


class _ReferencePass:
    """This rank's chunks of reference images, with their masks, as maps on the device."""

    def __init__(self, model: TargetModel, layer: str, dataset: ReferenceDataset, compute: ComputeSettings,
                 ranks: Ranks) -> None:
        self.model, self.layer, self.dataset, self.compute, self.ranks = model, layer, dataset, compute, ranks
        self.device = resolve_device(compute.device)
        self.shape = layer_shape(model, layer, self.device)
        self.bounds = chunk_bounds(len(dataset), 4 * math.prod(self.shape))
        self.mine = list(ranks.shard(len(self.bounds)))

    @property
    def positions(self) -> int:
        """Positions of all the reference images: what bounds a threshold tally."""
        return len(self.dataset) * int(self.shape[1] * self.shape[2])

    def chunks(self, chunks: list[int], description: str) -> Iterator[tuple[int, list[tuple[list[Item], torch.Tensor]], SkipLog]]:
        """Per chunk: its batches of usable items with their (n, d, h, w) maps, and what was skipped."""
        batches = chunk_batches(self.bounds, chunks, self.compute.batch_size)
        loaded = load_batches(self.dataset, self.model.preprocessing, batches, self.compute, with_masks=True,
                              description=description, progress=self.ranks.main)
        size = self.compute.batch_size
        with layer_reader(self.model.module.to(self.device), self.layer, self.model.layout) as read:
            for c in chunks:
                start, stop = self.bounds[c]
                skipped, out = SkipLog(), []
                for _ in range(math.ceil((stop - start) / size)):
                    good = []
                    for item in count_problems(next(loaded), self.dataset, skipped):
                        if item.concepts:
                            good.append(item)
                        else:
                            skipped.add("images without any annotation", str(self.dataset.image_path(item.index)))
                    if good:
                        with torch.inference_mode():
                            out.append((good, read(torch.stack([it.image for it in good]).to(self.device)).float()))
                yield c, out, skipped


# --- thresholds --------------------------------------------------------------------------


def reference_thresholds(
    model: TargetModel,
    layer: str,
    dataset: ReferenceDataset,
    quantile: float,
    *,
    cache_dir: Path | None,
    compute: ComputeSettings = ComputeSettings(),
    ranks: Ranks | None = None,
) -> torch.Tensor:
    """(d,) T_u over the usable reference images, as explain takes them over its targets (cached).

    One streaming pass (:class:`lavise.regions.ThresholdTally`); the images counted are
    those :func:`reference_rows` pools.
    """
    ranks = ranks or current()
    parts = {"product": "reference-thresholds", **model.identity(), "layer": layer, "data": dataset.identity(),
             "quantile": quantile}

    def build():
        work = _ReferencePass(model, layer, dataset, compute, ranks)
        if not tally_fits(quantile, work.positions, work.shape[0], compute.memory_budget):
            return {"thresholds": _refined(work, quantile, compute, ranks)}, {}
        with ranks.together("counting the reference thresholds"):
            tally, skipped = _resumable_tally(work, quantile, parts, cache_dir)
        merged = ThresholdTally(quantile, work.positions)
        for state in ranks.from_each(tally.state()):
            merged.merge(state)
        if merged.top is None:
            every = SkipLog()
            every.merge(dataset.skipped)
            for log in ranks.gather(skipped.to_dict()):
                every.merge(SkipLog.from_dict(log))
            raise_no_usable("reference", dataset, every)
        return {"thresholds": merged.thresholds().cpu()}, {}

    return ranks.cached(cache_dir, "thresholds", parts, build)[0]["thresholds"]


def _refined(work: _ReferencePass, quantile: float, compute: ComputeSettings, ranks: Ranks) -> torch.Tensor:
    """T_u in passes that fit the memory budget (a reference set too large for one tally)."""

    def pass_maps():
        for _, batches, _ in work.chunks(work.mine, "reference thresholds"):
            for _, maps in batches:
                yield maps

    minimum = torch.full((work.shape[0],), float("inf"))
    maximum = torch.full((work.shape[0],), -float("inf"))
    count = 0
    with ranks.together("reading the reference extremes"):
        for maps in pass_maps():
            values = maps.transpose(0, 1).flatten(1)
            minimum = torch.minimum(minimum, values.amin(dim=1).cpu())
            maximum = torch.maximum(maximum, values.amax(dim=1).cpu())
            count += values.shape[1]
    minimum, maximum = merged_extremes(minimum, maximum, ranks)
    count = int(ranks.sum(torch.tensor([count]))[0])
    if count == 0:
        raise LaviseError(f"No usable reference image in '{work.dataset.root}'.")
    return refined_thresholds(pass_maps, quantile, minimum, maximum, count, compute.memory_budget, ranks)


def _resumable_tally(work: _ReferencePass, quantile: float, parts: dict, cache_dir: Path | None) -> tuple[ThresholdTally, SkipLog]:
    """This rank's tally (and what it skipped), saved every :data:`CHECKPOINT_SECONDS` and resumed from where it was."""
    tally = ThresholdTally(quantile, work.positions)
    chunks = list(work.mine)
    checkpoint = key = None
    if cache_dir is not None and chunks:
        key = cache_key({**parts, "product": "reference-thresholds-partial", "chunks": [chunks[0], chunks[-1]]})
        checkpoint = Path(cache_dir) / f"thresholds-partial-{key[:24]}.safetensors"
        if (hit := load_cached(checkpoint, key)) is not None:
            tensors, metadata = hit
            tally.merge(tensors)
            chunks = chunks[int(metadata["done"]):]
    done, last = len(work.mine) - len(chunks), time.monotonic()
    skipped = SkipLog()
    for _, batches, chunk_skipped in work.chunks(chunks, "reference thresholds"):
        skipped.merge(chunk_skipped)
        for _, maps in batches:
            tally.add(maps)
        done += 1
        if checkpoint is not None and time.monotonic() - last >= CHECKPOINT_SECONDS:
            state = tally.state()
            cache_write(cache_dir, lambda: save_tensors(checkpoint, state, {"key": key, "done": str(done)}))
            last = time.monotonic()
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return tally, skipped


# --- rows --------------------------------------------------------------------------------


class ChunkedRows:
    """Rows of a chunked product, gathered by row number from memory-mapped chunks.

    Acts like a (N, d) tensor for indexing with a tensor of row numbers; ``scale``
    divides each row by a number of its own (the mask's area, for region pooling).
    """

    def __init__(self, store: ChunkStore, chunks: list[int], counts: list[int], width: int,
                 scale: torch.Tensor | None = None) -> None:
        self.store, self.chunks, self.width, self.scale = store, chunks, width, scale
        self.offsets = torch.tensor([0, *counts]).cumsum(0)
        self._open: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.width)

    def scaled(self, scale: torch.Tensor) -> ChunkedRows:
        return ChunkedRows(self.store, self.chunks, (self.offsets[1:] - self.offsets[:-1]).tolist(), self.width, scale)

    def _vectors(self, position: int) -> torch.Tensor:
        if position not in self._open:
            if len(self._open) >= 256:
                self._open.clear()
            loaded = self.store.load(self.chunks[position])
            if loaded is None:
                raise LaviseError(f"A chunk of pooled reference rows in '{self.store.folder}' went missing; train again.")
            self._open[position] = loaded[0]["vectors"]
        return self._open[position]

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.int64).flatten()
        out = torch.empty(len(rows), self.width)
        position = torch.searchsorted(self.offsets, rows, right=True) - 1
        for p in torch.unique(position).tolist():
            chosen = position == p
            out[chosen] = self._vectors(p)[(rows[chosen] - self.offsets[p]).numpy()]
        if self.scale is not None:
            out /= self.scale[rows].clamp_min(1e-12).unsqueeze(1)
        return out


class SelectedRows:
    """Some rows of a row source (``source[index[i]]``), without copying them."""

    def __init__(self, source: ChunkedRows, index: torch.Tensor) -> None:
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.index), self.source.width)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.source[self.index[torch.as_tensor(rows, dtype=torch.int64)]]


@dataclass
class ReferenceRows:
    """Pooled masked features of a reference dataset, the explainer's training rows.

    Attributes:
        vectors: (N, d) mean(F ⊙ M) over the whole grid, one row per (image, concept)
            pair and, with activation regions, rows pooled over such regions too; a
            tensor when they fit the memory budget, else :class:`ChunkedRows`.
        areas: (N,) the mask's share of the feature grid, Σ M / hw; vectors / areas is
            the mean of F inside the mask.
        concepts: (N,) index into ``concept_names``.
        images: (N,) index of the image in the dataset.
        concept_names: every concept of the dataset.
        grid: (h, w) of the layer's feature map.
        skipped: what could not be used, by reason.
        regional: (N,) True for a row pooled over a filter's activation region inside
            the mask (:func:`lavise.regions.strongest_regions`), False for a whole mask.
    """

    vectors: torch.Tensor | ChunkedRows
    concepts: torch.Tensor
    images: torch.Tensor
    concept_names: list[str]
    grid: tuple[int, int]
    skipped: SkipLog
    areas: torch.Tensor
    regional: torch.Tensor

    @property
    def pairs(self) -> int:
        """How many (image, concept) pairs: the rows of whole masks."""
        return int((~self.regional).sum())

    @property
    def in_memory(self) -> bool:
        return isinstance(self.vectors, torch.Tensor)

    def pooled(self, pooling: str, rows: torch.Tensor | None = None) -> torch.Tensor | ChunkedRows | SelectedRows:
        """(N, d) explainer inputs, or those of the ``rows`` (a boolean mask): ``mean`` over the
        grid (as stored) or ``region``, over the mask. A tensor when the rows are in memory."""
        if self.in_memory:
            vectors = self.vectors if pooling == "mean" else self.vectors / self.areas.clamp_min(1e-12).unsqueeze(1)
            return vectors if rows is None else vectors[rows]
        source = self.vectors if pooling == "mean" else self.vectors.scaled(self.areas)
        return source if rows is None else SelectedRows(source, rows.nonzero().flatten())


def reference_rows(
    model: TargetModel,
    layer: str,
    dataset: ReferenceDataset,
    *,
    cache_dir: Path | None,
    compute: ComputeSettings = ComputeSettings(),
    activation_regions: int = TrainSettings.activation_regions,
    quantile: float = TrainSettings.region_quantile,
    ranks: Ranks | None = None,
) -> ReferenceRows:
    """Pool the layer's features under each concept mask of each reference image (cached, in chunks).

    With ``activation_regions`` = k > 0, each (image, concept) pair also gives up to k
    rows pooled over the activation regions of the k filters most active inside its
    mask (:func:`lavise.regions.strongest_regions`, with T_u at ``quantile`` over the
    reference images; empty regions give no row). That costs a pass over the images
    before, for the thresholds. k = 0 pools whole masks only, as the paper.

    Every rank pools its own chunks; the rows end up on rank 0, which trains.
    """
    if activation_regions < 0:
        raise LaviseError(f"activation_regions must be 0 or more, got {activation_regions}.")
    ranks = ranks or current()
    thresholds = None
    if activation_regions:
        thresholds = reference_thresholds(model, layer, dataset, quantile, cache_dir=cache_dir, compute=compute, ranks=ranks)
    regions = {"activation_regions": activation_regions, "quantile": quantile} if activation_regions else {}
    work = _ReferencePass(model, layer, dataset, compute, ranks)
    parts = {"product": "reference-pooled", "version": ROWS_VERSION, **model.identity(), "layer": layer,
             "data": dataset.identity(), "chunk": work.bounds[0][1] if work.bounds else 0, **regions}
    store = ChunkStore(cache_dir, "reference", parts)
    with ranks.together("pooling the reference rows"):
        held = _pool_chunks(work, store, thresholds, activation_regions)
    chunks = _collected(ranks, store, work, held)
    if not ranks.main:
        return None
    return _assemble(store, chunks, held, dataset, compute)


def _pool_chunks(work: _ReferencePass, store: ChunkStore, thresholds, k: int) -> dict[int, tuple[dict, dict]]:
    """Make this rank's missing chunks; without a cache, the chunks themselves (else {})."""
    missing = [c for c in work.mine if store.load(c) is None]
    held = {}
    device = work.device
    for c, batches, skipped in work.chunks(missing, "reference features"):
        parts = [_pool_batch(items, maps, work.dataset, skipped, thresholds, k, device) for items, maps in batches]
        tensors = {name: torch.cat([p[name] for p in parts]) if parts else _EMPTY[name](work.shape[0])
                   for name in ("vectors", "areas", "concepts", "images", "regional")}
        facts = {"skipped": skipped.to_dict(), "grid": list(work.shape[1:])}
        if not store.save(c, tensors, facts):  # no cache, or one that cannot be written
            held[c] = (tensors, facts)
    return held


_EMPTY = {
    "vectors": lambda d: torch.zeros(0, d), "areas": lambda d: torch.zeros(0), "concepts": lambda d: torch.zeros(0, dtype=torch.int32),
    "images": lambda d: torch.zeros(0, dtype=torch.int32), "regional": lambda d: torch.zeros(0, dtype=torch.bool),
}


def _pool_batch(items, maps: torch.Tensor, dataset, skipped: SkipLog, thresholds, k: int, device) -> dict[str, torch.Tensor]:
    """The rows of one batch, image by image: whole masks in concept order, then regions."""
    grid = tuple(maps.shape[-2:])
    pairs = [(n, concept) for n, it in enumerate(items) for concept in it.concepts]
    cells = masks_to_grid(torch.cat([it.masks for it in items]).to(device), grid)  # (P, h, w)
    for row in (cells.flatten(1).sum(dim=1) <= 0).nonzero().flatten().tolist():
        n, concept = pairs[row]
        skipped.add("concept masks of zero area after resize and crop", f"{dataset.image_path(items[n].index).name}:{dataset.concepts[concept]}")
    pair_maps = maps[torch.tensor([n for n, _ in pairs], device=maps.device)]
    pair_image = torch.tensor([items[n].index for n, _ in pairs])
    pair_concept = torch.tensor([concept for _, concept in pairs])
    groups = [(cells.unsqueeze(1), False)]
    if thresholds is not None:
        groups.append((strongest_regions(pair_maps, cells, thresholds.to(maps.device), k), True))
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in ("vectors", "areas", "concepts", "images", "regional", "slot")}
    for masks, is_regional in groups:  # masks (P, m, h, w): m masks per pair
        m = masks.shape[1]
        columns["vectors"].append(masked_mean(pair_maps, masks).cpu().reshape(-1, maps.shape[1]))
        columns["areas"].append(masks.flatten(-2).mean(dim=-1).cpu().flatten())
        columns["concepts"].append(pair_concept.repeat_interleave(m))
        columns["images"].append(pair_image.repeat_interleave(m))
        columns["regional"].append(torch.full((len(pairs) * m,), is_regional))
        columns["slot"].append(torch.arange(len(pairs) * m))  # pair-major: (concept, k) within an image
    rows = {name: torch.cat(parts) for name, parts in columns.items()}
    found = rows["areas"] > 0
    rows = {name: column[found] for name, column in rows.items()}
    order = torch.from_numpy(np.lexsort((rows["slot"].numpy(), rows["regional"].numpy(), rows["images"].numpy())))
    return {"vectors": rows["vectors"][order], "areas": rows["areas"][order], "concepts": rows["concepts"][order].int(),
            "images": rows["images"][order].int(), "regional": rows["regional"][order]}


def _collected(ranks: Ranks, store: ChunkStore, work: _ReferencePass, held: dict) -> list[int]:
    """Every chunk's rows on rank 0: read from a shared cache, else sent by the rank that made them."""
    chunks = list(range(len(work.bounds)))
    if ranks.world == 1:
        return chunks
    lacking = ranks.gather(sorted(set(chunks) - store.done(chunks)) if ranks.main else [])[0]
    owner_of = {c: r for r in range(ranks.world) for c in Ranks(r, ranks.world).shard(len(chunks))}
    for c in lacking:
        owner = owner_of[c]
        if ranks.rank == owner:
            tensors, facts = held[c] if c in held else store.load(c)
            ranks.send(tensors, facts, to=0)
        elif ranks.main:
            tensors, facts = ranks.receive(source=owner)
            if not store.save(c, tensors, facts):
                held[c] = (tensors, facts)
    return chunks


def _assemble(store: ChunkStore, chunks: list[int], held: dict, dataset, compute: ComputeSettings) -> ReferenceRows:
    """The rows of every chunk: metadata in memory, vectors in memory when they fit the budget."""
    loaded = [held[c] if c in held else store.load(c) for c in chunks]
    skipped = SkipLog()
    skipped.merge(dataset.skipped)
    for _, facts in loaded:
        skipped.merge(SkipLog.from_dict(facts["skipped"]))
    counts = [len(t["areas"]) for t, _ in loaded]
    if sum(counts) == 0:
        raise_no_usable("reference", dataset, skipped)
    width = int(loaded[0][0]["vectors"].shape[1])
    meta = {name: torch.cat([t[name] for t, _ in loaded]) for name in ("areas", "concepts", "images", "regional")}
    if held or store.folder is None or 4 * width * sum(counts) <= compute.memory_budget * 2**30:
        vectors = torch.cat([t["vectors"] for t, _ in loaded])
    else:
        vectors = ChunkedRows(store, chunks, counts, width)
    return ReferenceRows(vectors, meta["concepts"].long(), meta["images"].long(), list(dataset.concepts),
                         tuple(loaded[0][1]["grid"]), skipped, meta["areas"], meta["regional"])
