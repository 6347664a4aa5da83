"""Feature maps of a layer, streamed: images through the backbone in batches, chunk by chunk.

No stage holds the maps of a whole dataset. A dataset's images are cut into chunks of
consecutive images (:func:`chunk_bounds`: at most about 64 MB of maps, and at least 64
chunks when there are that many images), and batches never cross a chunk, so every
image's maps come out of the same batch whatever the number of processes. A pass is
one sweep over this rank's chunks (:class:`MapStream`); the target maps are cached in
chunks (:class:`lavise.storage.ChunkStore`), so a later pass, or a run after a crash,
reads what was made and runs the network only on what is missing.

The pooled reference rows the explainer trains on are made the same way, in
:mod:`lavise.reference`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lavise.compute import resolve_device
from lavise.datasets.base import BadImage, ImageFiles, SkipLog, load_rgb
from lavise.distributed import Ranks, current
from lavise.errors import LaviseError
from lavise.models import Preprocessing, TargetModel, layer_reader, preprocess_image, preprocess_masks
from lavise.models.layouts import Layout
from lavise.regions import QuantileRefiner
from lavise.settings import ComputeSettings
from lavise.storage import ChunkStore

CHUNK_BYTES = 256 * 2**20  # a chunk of maps is at most about this large ...
MIN_CHUNKS = 64  # ... there are this many chunks when the images allow ...
MIN_CHUNK_IMAGES = 64  # ... but a chunk holds at least this many images, for full batches (when they fit)
MAPS_VERSION = 2  # 2: chunks; batches never cross a chunk


def chunk_bounds(count: int, item_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of ``count`` items: :data:`MIN_CHUNKS` of them, but
    each of at least :data:`MIN_CHUNK_IMAGES` items and at most about :data:`CHUNK_BYTES`.

    They depend on the data and the layer only, never on the number of processes or the
    batch size, so a cache made by one process serves many, and the other way round.

    Example:
        >>> chunk_bounds(100, 1000)
        [(0, 64), (64, 100)]
        >>> len(chunk_bounds(10_000, 1000)), chunk_bounds(10_000, 1000)[0]
        (64, (0, 157))
        >>> chunk_bounds(3, 10**9)
        [(0, 1), (1, 2), (2, 3)]
    """
    size = max(1, min(max(math.ceil(count / MIN_CHUNKS), MIN_CHUNK_IMAGES), CHUNK_BYTES // max(item_bytes, 1)))
    return [(start, min(start + size, count)) for start in range(0, count, size)]


@dataclass
class Item:
    """One loaded image (and its masks), or why it could not be used."""

    index: int
    image: torch.Tensor | None = None
    concepts: list[int] | None = None
    masks: torch.Tensor | None = None
    problem: tuple[str, str] | None = None  # (reason counted, detail for the example)


class _Images(Dataset):
    """Loads and preprocesses one image (and its masks); failures become items, not errors."""

    def __init__(self, dataset, preprocessing: Preprocessing, with_masks: bool) -> None:
        self.dataset = dataset
        self.preprocessing = preprocessing
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        try:
            image = load_rgb(self.dataset.image_path(index))
        except BadImage as error:
            return Item(index, problem=("unreadable images", str(error)))
        item = Item(index, image=preprocess_image(image, self.preprocessing))
        if self.with_masks:
            try:
                concepts, masks = self.dataset.masks(index, image.size)
            except ValueError as error:
                return Item(index, problem=("images whose annotations do not fit", str(error)))
            item.concepts = concepts
            item.masks = preprocess_masks(masks, self.preprocessing)
        return item


def chunk_batches(bounds: Sequence[tuple[int, int]], chunks: Sequence[int], batch_size: int) -> list[list[int]]:
    """The image indices of each batch of the given chunks: batches never cross a chunk.

    Example:
        >>> chunk_batches([(0, 3), (3, 5)], [0, 1], 2)
        [[0, 1], [2], [3, 4]]
    """
    batches = []
    for c in chunks:
        start, stop = bounds[c]
        batches.extend(list(range(s, min(s + batch_size, stop))) for s in range(start, stop, batch_size))
    return batches


def load_batches(dataset, preprocessing: Preprocessing, batches: list[list[int]], compute: ComputeSettings, *,
                 with_masks: bool = False, description: str = "", progress: bool = True) -> Iterator[list[Item]]:
    """The loaded items of each batch, decoded by ``compute.num_workers`` processes, with a progress bar."""
    loader = DataLoader(
        _Images(dataset, preprocessing, with_masks), batch_sampler=batches, num_workers=compute.num_workers,
        collate_fn=list, persistent_workers=False,
    )
    total = sum(len(b) for b in batches)
    with tqdm(total=total, desc=description, unit="img", disable=not (progress and compute.progress)) as bar:
        for items in loader:
            yield items
            bar.update(len(items))


def count_problems(items: list[Item], dataset, skipped: SkipLog) -> list[Item]:
    """The items with an image; the others are counted in ``skipped`` by reason."""
    good = []
    for item in items:
        if item.problem:
            skipped.add(item.problem[0], f"{dataset.image_path(item.index)} ({item.problem[1]})")
        else:
            good.append(item)
    return good


def layer_shape(model: TargetModel, layer: str, device: torch.device) -> tuple[int, ...]:
    """The shape of one image's map of ``layer``: (d, h, w), from one blank image."""
    return layer_probe(model, layer, device)[0]


def layer_probe(model: TargetModel, layer: str, device: torch.device) -> tuple[tuple[int, ...], Layout]:
    """One image's map shape (d, h, w) of ``layer`` and the layout its output was read in."""
    size = model.preprocessing.crop_size
    with layer_reader(model.module.to(device), layer, model.layout) as read, torch.inference_mode():
        shape = tuple(read(torch.zeros(1, 3, size, size, device=device)).shape[1:])
    return shape, read.layout


@dataclass
class MapChunk:
    """The maps of the usable images of one chunk.

    Attributes:
        index: the chunk's number.
        rows: (n,) the dataset index of each usable image, increasing.
        maps: (n, d, h, w) float32 on the CPU (memory-mapped when read from the cache).
        skipped: the chunk's images that could not be used, by reason.
    """

    index: int
    rows: torch.Tensor
    maps: torch.Tensor
    skipped: SkipLog
    partial: bool = False  # only some batches of the chunk


class MapStream:
    """The feature maps of one layer on a set of images, pass after pass, chunk by chunk.

    Each rank streams its contiguous share of the chunks (:meth:`Ranks.shard`). With a
    cache, a chunk's maps are computed once and read from disk by every later pass;
    ``forwards`` counts the images this stream ran through the network.

    Args:
        model: the target model; ``layer``: the dotted path of the layer.
        images: a target dataset (``len``, ``image_path``, ``identity``).
        cache_dir: where the chunks are kept (None, or ``compute.cache_maps`` false: nowhere).
        compute: device, batches, workers, progress.
        ranks: the processes sharing the work (default: :func:`lavise.distributed.current`).
    """

    def __init__(self, model: TargetModel, layer: str, images, *, cache_dir: Path | None,
                 compute: ComputeSettings = ComputeSettings(), ranks: Ranks | None = None) -> None:
        self.model, self.layer, self.images, self.compute = model, layer, images, compute
        self.ranks = ranks or current()
        self.device = resolve_device(compute.device)
        self.shape = layer_shape(model, layer, self.device)
        if len(self.shape) != 3:
            raise LaviseError(f"Layer '{layer}' gives maps of shape {self.shape} per image, not (filters, h, w).")
        self.bounds = chunk_bounds(len(images), 4 * math.prod(self.shape))
        parts = {"product": "target-maps", "version": MAPS_VERSION, **model.identity(), "layer": layer,
                 "data": images.identity(), "chunk": self.bounds[0][1] if self.bounds else 0}
        self.store = ChunkStore(cache_dir if compute.cache_maps else None, "target", parts)
        self.forwards = 0

    @property
    def filters(self) -> int:
        return int(self.shape[0])

    @property
    def positions(self) -> int:
        """h·w positions per image."""
        return int(self.shape[1] * self.shape[2])

    @property
    def mine(self) -> range:
        """This rank's chunks."""
        return self.ranks.shard(len(self.bounds))

    @property
    def image_range(self) -> tuple[int, int]:
        """[start, stop) of the dataset indices in this rank's chunks."""
        mine = self.mine
        return (self.bounds[mine.start][0], self.bounds[mine.stop - 1][1]) if len(mine) else (0, 0)

    def chunks(self, description: str = "target features") -> Iterator[MapChunk]:
        """One pass over this rank's chunks, in order: read when cached, else computed (and cached)."""
        cached = {c for c in self.store.done(self.mine) if self.store.load(c) is not None}
        missing = [c for c in self.mine if c not in cached]
        computed = self._compute(missing, description)
        for c in self.mine:
            if c in cached:
                tensors, facts = self.store.load(c)
                yield MapChunk(c, tensors["rows"], tensors["maps"], SkipLog.from_dict(facts["skipped"]))
            else:
                chunk = next(computed)
                self.store.save(c, {"rows": chunk.rows, "maps": chunk.maps}, {"skipped": chunk.skipped.to_dict()})
                yield chunk

    def _compute(self, chunks: list[int], description: str) -> Iterator[MapChunk]:
        """The chunks' maps from the network, one chunk at a time."""
        if not chunks:
            return
        batches = chunk_batches(self.bounds, chunks, self.compute.batch_size)
        loaded = load_batches(self.images, self.model.preprocessing, batches, self.compute,
                              description=description, progress=self.ranks.main)
        module = self.model.module.to(self.device)
        with layer_reader(module, self.layer, self.model.layout) as read:
            for c in chunks:
                start, stop = self.bounds[c]
                skipped, rows, maps = SkipLog(), [], []
                for _ in range(math.ceil((stop - start) / self.compute.batch_size)):
                    good = count_problems(next(loaded), self.images, skipped)
                    if good:
                        with torch.inference_mode():
                            out = read(torch.stack([it.image for it in good]).to(self.device)).float().cpu()
                        maps.append(out)
                        rows.extend(it.index for it in good)
                        self.forwards += len(good)
                yield MapChunk(c, torch.tensor(rows, dtype=torch.int64),
                               torch.cat(maps) if maps else torch.zeros(0, *self.shape), skipped)

    def maps_of(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(rows), d, h, w) the maps of the given images, in that order, and (len(rows),)
        whether each has maps (an unreadable image has none: its maps are zeros).

        From the cache when their chunks are there; otherwise their chunks' batches run
        through the network again (whole batches, so the maps are the very numbers a
        pass computed).
        """
        rows = torch.as_tensor(list(rows), dtype=torch.int64)
        out = torch.zeros(len(rows), *self.shape)
        found = torch.zeros(len(rows), dtype=torch.bool)
        starts = torch.tensor([b[0] for b in self.bounds])
        owner = torch.searchsorted(starts, rows, right=True) - 1
        wanted = sorted(set(owner.tolist()))
        cached = sorted(c for c in self.store.done(wanted) if self.store.load(c) is not None)
        computed = self._compute_rows(rows, owner, sorted(set(wanted) - set(cached)))
        for chunk in itertools.chain((self._cached(c) for c in cached), computed):
            position = {int(r): i for i, r in enumerate(chunk.rows.tolist())}
            for i in torch.nonzero(owner == chunk.index).flatten().tolist():
                if int(rows[i]) in position:
                    out[i] = chunk.maps[position[int(rows[i])]]
                    found[i] = True
        return out, found

    def _cached(self, c: int) -> MapChunk:
        tensors, facts = self.store.load(c)
        return MapChunk(c, tensors["rows"], tensors["maps"], SkipLog.from_dict(facts["skipped"]))

    def _compute_rows(self, rows: torch.Tensor, owner: torch.Tensor, chunks: list[int]) -> Iterator[MapChunk]:
        """Chunks holding only the batches that contain ``rows``, computed again."""
        size = self.compute.batch_size
        wanted = {(int(o), (int(r) - self.bounds[int(o)][0]) // size) for r, o in zip(rows, owner) if int(o) in chunks}
        batches = [list(range(self.bounds[c][0] + b * size, min(self.bounds[c][0] + (b + 1) * size, self.bounds[c][1])))
                   for c, b in sorted(wanted)]
        loaded = load_batches(self.images, self.model.preprocessing, batches, self.compute, progress=False)
        module = self.model.module.to(self.device)
        with layer_reader(module, self.layer, self.model.layout) as read:
            for (c, _), items in zip(sorted(wanted), loaded):
                good = count_problems(items, self.images, SkipLog())
                maps = torch.zeros(0, *self.shape)
                if good:
                    with torch.inference_mode():
                        maps = read(torch.stack([it.image for it in good]).to(self.device)).float().cpu()
                    self.forwards += len(good)
                yield MapChunk(c, torch.tensor([it.index for it in good], dtype=torch.int64), maps, SkipLog(), partial=True)


def tally_fits(quantile: float, positions: int, filters: int, budget: float) -> bool:
    """Whether a :class:`ThresholdTally` of this size, merged, stays within ``budget`` GiB.

    It keeps 0.5 % (the quantile) of every position of every image per filter: for
    ResNet-50 layer4 about 2 KB per image, so past about half a million images at 2 GiB
    the thresholds are found in passes instead (:func:`refined_thresholds`).
    """
    keep = math.ceil(quantile * positions) + 2
    return 2 * 4 * keep * filters <= budget * 2**30


def refined_thresholds(pass_maps, quantile: float, minimum: torch.Tensor, maximum: torch.Tensor, count: int,
                       budget: float, ranks: Ranks) -> torch.Tensor:
    """(d,) T_u, exactly, over passes that each hold at most ``budget`` GiB (:class:`QuantileRefiner`).

    ``pass_maps()`` yields one pass over this rank's maps, batch by batch; ``minimum``,
    ``maximum`` and ``count`` are every rank's (merged).
    """
    refiner = QuantileRefiner(quantile, minimum, maximum, count, budget_values=int(budget * 2**30 // 32))
    while True:
        with ranks.together("refining the thresholds"):
            for maps in pass_maps():
                refiner.add(maps)
        states = list(ranks.from_each(refiner.state()))
        refiner._reset()
        for state in states:
            refiner.merge(state)
        if not refiner.next_pass():
            return refiner.thresholds()


def merged_extremes(minimum: torch.Tensor, maximum: torch.Tensor, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """Each filter's smallest and largest value over every rank (+inf/−inf where a rank saw nothing)."""
    low, high = minimum.clone(), maximum.clone()
    for state in ranks.from_each({"minimum": minimum, "maximum": maximum}):
        low, high = torch.minimum(low, state["minimum"]), torch.maximum(high, state["maximum"])
    return low, high


@dataclass
class TargetFeatures:
    """Feature maps of target images, all in memory: for small sets, tests and experiments.

    Attributes:
        maps: (N, d, h, w) the layer's output for each usable image.
        paths: the N image files, in the same order.
        skipped: images that could not be used.
    """

    maps: torch.Tensor
    paths: list[str]
    skipped: SkipLog


def target_features(model: TargetModel, layer: str, images: ImageFiles, *, cache_dir: Path | None,
                    compute: ComputeSettings = ComputeSettings()) -> TargetFeatures:
    """Every target image's maps in one tensor (through the chunked cache). The stages never
    call this: they stream (:class:`MapStream`); it is for sets that fit in memory."""
    stream = MapStream(model, layer, images, cache_dir=cache_dir, compute=compute, ranks=Ranks())
    skipped, maps, rows = SkipLog(), [], []
    for chunk in stream.chunks():
        skipped.merge(chunk.skipped)
        maps.append(chunk.maps.clone())
        rows.extend(chunk.rows.tolist())
    if not rows:
        raise_no_usable("target", images, skipped)
    return TargetFeatures(torch.cat(maps), [str(images.image_path(r)) for r in rows], skipped)


def raise_no_usable(kind: str, dataset, skipped: SkipLog) -> None:
    reasons = "; ".join(skipped.lines()) or "no images"
    raise LaviseError(f"No usable {kind} image in '{dataset.root}': {reasons}.")
