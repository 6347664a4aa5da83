"""From target maps to words: the streaming pass over the images, then words for (filter, image) pairs.

:func:`scan_filters` makes one pass over the target maps (:class:`MapStream`): each
filter's threshold T_u (:class:`ThresholdTally`), its p most activated images
(:class:`RunningTopK`) and whether it is ever active, merged exactly over the ranks. It
keeps the maps of the images that some filter may choose while they fit the memory
budget; those are at most d·p images whatever the number of images.

:func:`name_pairs` then names every (filter, top image) pair: the explainer input
for the filter on the image (:mod:`lavise.inputs`), the explainer's output
(:func:`explainer_outputs`), its nearest words (:func:`nearest_words`). Each rank names
the pairs whose image is in its shard, from the maps it kept or read again, and rank 0
receives the words of all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from lavise.datasets.base import SkipLog
from lavise.distributed import Ranks
from lavise.errors import LaviseError
from lavise.features import MapStream, merged_extremes, refined_thresholds, tally_fits
from lavise.inputs import explainer_inputs
from lavise.regions import RunningTopK, ThresholdTally, peak_activations
from lavise.retrieval import csls_scores
from lavise.settings import ComputeSettings

PairInputs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FilterScan:
    """What one pass over the target maps found.

    Attributes:
        thresholds: (d,) T_u.
        chosen: (d, p) dataset indices of each filter's top images, most activated first.
        peaks: (d, p) the filter's peak activation on each of them.
        active: (d,) whether the filter is ever above its lowest value.
        images: usable images over every rank.
        skipped: the images that could not be used, every rank's.
        kept: this rank's maps of images some filter chose, by dataset index; None when
            they did not fit the memory budget (they are read again).
    """

    thresholds: torch.Tensor
    chosen: torch.Tensor
    peaks: torch.Tensor
    active: torch.Tensor
    images: int
    skipped: SkipLog
    kept: dict[int, torch.Tensor] | None

    def firing(self, filters: torch.Tensor) -> torch.Tensor:
        """(f,) filters -> (f, p) whether each top image is one where the filter fires:
        its peak exceeds T_u, so its region {F_u > T_u} is not empty.

        A filter that covers much of an image (a background colour, say) spends its 0.5 %
        of positions on few images, and the rest of its p top images have no region at
        all: activation masking gives the explainer a zero input there, whose output is
        the same for every such image and filter (on the demo's scene CNN, a held-out
        concept named 99 of 204 filters from those images).
        """
        return self.peaks[filters] > self.thresholds[filters].unsqueeze(1)

    @property
    def naming_maps(self) -> str:
        """How the naming step gets the chosen images' maps, for the summary."""
        return "kept from the pass over the images" if self.kept is not None else "read again (over the memory budget)"


def scan_filters(stream: MapStream, *, quantile: float, top: int, compute: ComputeSettings, ranks: Ranks,
                 description: str = "target features") -> FilterScan:
    """One pass over the target maps: T_u, top images, activity; the chosen images' maps kept.

    When the threshold tally would not fit the memory budget, the pass finds each
    filter's extremes instead and T_u comes from further passes (exact either way).
    """
    positions = len(stream.images) * stream.positions
    tally = ThresholdTally(quantile, positions) if tally_fits(quantile, positions, stream.filters, compute.memory_budget) else None
    best = RunningTopK(stream.filters, top)
    minimum = torch.full((stream.filters,), float("inf"))
    maximum = torch.full((stream.filters,), -float("inf"))
    kept: dict[int, torch.Tensor] | None = {}
    budget = compute.memory_budget * 2**30
    per_map = 4 * stream.filters * stream.positions
    skipped, usable = SkipLog(), 0
    device = stream.device
    with ranks.together("reading the target images"):
        for chunk in stream.chunks(description):
            skipped.merge(chunk.skipped)
            usable += len(chunk.rows)
            if not len(chunk.rows):
                continue
            maps = chunk.maps.to(device)
            if tally is not None:
                tally.add(maps)
            values = maps.transpose(0, 1).flatten(1)
            minimum = torch.minimum(minimum, values.amin(dim=1).cpu())
            maximum = torch.maximum(maximum, values.amax(dim=1).cpu())
            best.add(peak_activations(maps).cpu(), chunk.rows)
            if kept is not None:
                members = best.members()
                kept = {r: m for r, m in kept.items() if r in members}
                kept.update({r: chunk.maps[i].clone() for i, r in enumerate(chunk.rows.tolist()) if r in members})
                if len(kept) * per_map > budget:
                    kept = None
    chosen = RunningTopK(stream.filters, top)
    for state in ranks.from_each(best.state()):
        chosen.merge(state)
    usable = int(ranks.sum(torch.tensor([usable]))[0])
    minimum, maximum = merged_extremes(minimum, maximum, ranks)
    every = SkipLog()
    for log in ranks.gather(skipped.to_dict()):
        every.merge(SkipLog.from_dict(log))
    if usable == 0:
        thresholds = torch.zeros(stream.filters)
    elif tally is not None:
        merged = ThresholdTally(quantile, positions)
        for state in ranks.from_each(_on_cpu(tally.state())):
            merged.merge(state)
        thresholds = merged.thresholds().cpu()
    else:
        thresholds = refined_thresholds(lambda: (c.maps for c in stream.chunks("refining thresholds") if len(c.rows)),
                                        quantile, minimum, maximum, usable * stream.positions, compute.memory_budget, ranks)
    active = maximum > minimum
    final = set(chosen.result().flatten().tolist())
    if kept is not None:
        kept = {r: m for r, m in kept.items() if r in final}
    return FilterScan(thresholds, chosen.result(), chosen.values.clone(), active, usable, every, kept)


def stream_thresholds(stream: MapStream, quantile: float, ranks: Ranks, compute: ComputeSettings, *,
                      description: str = "target features") -> tuple[torch.Tensor, int]:
    """(d,) T_u over every rank's images, and how many images were usable."""
    scan = scan_filters(stream, quantile=quantile, top=1, compute=compute, ranks=ranks, description=description)
    return scan.thresholds, scan.images


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.cpu() for name, tensor in tensors.items()}


def nearest_words(
    queries: torch.Tensor, unit_vocabulary: torch.Tensor, count: int, *, penalty: torch.Tensor | None = None,
    chunk: int = 1024, block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` words of highest score to each query: cosine similarity, less the
    word's hub ``penalty`` when one is given (CSLS, :mod:`lavise.retrieval`).

    One matrix product per chunk of queries, then a top-k in two steps: the best value
    of each block of ``block`` words, the ``count`` best blocks, and the top ``count``
    inside them. The ``count`` best words lie in the ``count`` best blocks, so the result
    is the plain top-k's (up to the order of exact ties) at a fraction of its cost over a
    large vocabulary.

    (Q, D), (V, D) unit rows, (V,) or None -> (Q, count) word indices, (Q, count) scores
    """
    vocabulary_size = unit_vocabulary.shape[0]
    indices, values = [], []
    for start in range(0, len(queries), chunk):
        scores = csls_scores(queries[start : start + chunk], unit_vocabulary, penalty)  # (q, V)
        blocks = vocabulary_size // block
        if blocks <= count or count * block * 4 > vocabulary_size:
            top = torch.topk(scores, count, dim=1)
            indices.append(top.indices)
            values.append(top.values)
            continue
        # the first blocks·block words of each row as (q, blocks, block): a view, no copy
        whole = scores.as_strided((len(scores), blocks, block), (scores.stride(0), block, 1))
        best_blocks = whole.amax(dim=2).topk(count, dim=1).indices  # (q, count)
        candidates = whole.gather(1, best_blocks.unsqueeze(2).expand(-1, -1, block)).flatten(1)  # (q, count·block)
        ids = (best_blocks.unsqueeze(2) * block + torch.arange(block, device=scores.device)).flatten(1)
        tail = scores[:, blocks * block :]
        if tail.shape[1]:
            candidates = torch.cat([candidates, tail], dim=1)
            ids = torch.cat([ids, torch.arange(blocks * block, vocabulary_size, device=scores.device).expand(len(scores), -1)], dim=1)
        top = torch.topk(candidates, count, dim=1)
        indices.append(ids.gather(1, top.indices))
        values.append(top.values)
    return torch.cat(indices), torch.cat(values)


PAIR_BYTES = 64 * 2**20  # the maps gathered for one batch of pairs


def gather_maps(maps: torch.Tensor | Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The maps of the given rows, from an (m, d, h, w) tensor or a list of (d, h, w) maps."""
    if isinstance(maps, torch.Tensor):
        return maps[rows]
    return torch.stack([maps[i] for i in rows.tolist()])


def feature_inputs(
    method: str, maps: torch.Tensor | Sequence[torch.Tensor], thresholds: torch.Tensor, device: torch.device, pooling: str
) -> PairInputs:
    """The explainer inputs of (filter, image) pairs computed from feature maps held in memory.

    ``maps``: an (m, d, h, w) tensor, or a list of m (d, h, w) maps (not copied into one).
    ``pooling`` is the run's (``Run.pooling``).

    (n,) filters, (n,) image rows of ``maps`` -> (n, d) on ``device``
    """
    thresholds = thresholds.to(device)

    def inputs(filters: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return explainer_inputs(method, gather_maps(maps, rows).to(device), filters.to(device), thresholds, pooling)

    return inputs


def _output_chunks(
    head: torch.nn.Module, pair_inputs: PairInputs, filters: torch.Tensor, rows: torch.Tensor, *,
    device: torch.device, chunk: int, progress: bool,
) -> Iterator[torch.Tensor]:
    """The explainer's outputs for the pairs (filters[i], rows[i]), ``chunk`` pairs at a time, on ``device``."""
    head = head.to(device).eval()
    for start in tqdm(range(0, len(filters), chunk), desc="naming filters", unit="batch", disable=not progress):
        yield _head_outputs(head, pair_inputs, filters[start : start + chunk], rows[start : start + chunk])


@torch.inference_mode()
def _head_outputs(head: torch.nn.Module, pair_inputs: PairInputs, filters: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return head(pair_inputs(filters, rows))


def explainer_outputs(
    head: torch.nn.Module,
    pair_inputs: PairInputs,
    filters: torch.Tensor,
    rows: torch.Tensor,
    *,
    device: torch.device = torch.device("cpu"),
    chunk: int = 2048,
    progress: bool = False,
) -> torch.Tensor:
    """The explainer's output in word space for each (filter, image) pair: the step before nearest words.

    ``pair_inputs(filters, rows)`` gives the explainer inputs of a batch of pairs
    (:func:`feature_inputs`, or image masking, which re-runs the network).

    (n,) filters, (n,) image rows -> (n, D) on the CPU, not normalised
    """
    return torch.cat([out.cpu() for out in _output_chunks(
        head, pair_inputs, filters, rows, device=device, chunk=chunk, progress=progress)])


class WordSpace(NamedTuple):
    """Candidate words to name explainer outputs with: unit vectors, how many per output, a hub penalty."""

    vectors: torch.Tensor
    words_per_image: int
    penalty: torch.Tensor | None = None


def pair_words(
    head: torch.nn.Module,
    pair_inputs: PairInputs,
    filters: torch.Tensor,
    rows: torch.Tensor,
    unit_vocabulary: torch.Tensor,
    words_per_image: int,
    *,
    device: torch.device,
    penalty: torch.Tensor | None = None,
    progress: bool = False,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest words of the explainer's output for each (filter, image) pair, in batches of pairs.

    (n,) filters, (n,) image rows -> (n, s) word indices and scores (:func:`nearest_words`)
    """
    space = WordSpace(unit_vocabulary, words_per_image, penalty)
    return pair_words_in(head, pair_inputs, filters, rows, [space], device=device, progress=progress, chunk=chunk)[0]


def pair_words_in(
    head: torch.nn.Module,
    pair_inputs: PairInputs,
    filters: torch.Tensor,
    rows: torch.Tensor,
    spaces: Sequence[WordSpace],
    *,
    device: torch.device,
    progress: bool = False,
    chunk: int = 2048,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`pair_words` in several word spaces at once: the explainer's outputs are
    computed once and matched against each space's words."""
    on_device = [(space.vectors.to(device), None if space.penalty is None else space.penalty.to(device))
                 for space in spaces]
    found: list[tuple[list, list]] = [([], []) for _ in spaces]
    for outputs in _output_chunks(head, pair_inputs, filters, rows, device=device, chunk=chunk, progress=progress):
        for space, (vocab, penalty), (ids, sims) in zip(spaces, on_device, found):
            words, values = nearest_words(outputs, vocab, space.words_per_image, penalty=penalty)
            ids.append(words.cpu())
            sims.append(values.cpu())
    return [(torch.cat(ids), torch.cat(sims)) if ids else
            (torch.zeros(0, space.words_per_image, dtype=torch.int64), torch.zeros(0, space.words_per_image))
            for space, (ids, sims) in zip(spaces, found)]


InputsFor = Callable[[torch.Tensor, list[int]], PairInputs]


def name_pairs(
    stream: MapStream,
    scan: FilterScan,
    filters: torch.Tensor,
    inputs_for: InputsFor,
    head: torch.nn.Module,
    unit_vocabulary: torch.Tensor,
    words_per_image: int,
    *,
    compute: ComputeSettings,
    ranks: Ranks,
    penalty: torch.Tensor | None = None,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Words for every (filter, top image) pair of the given filters; on rank 0, None elsewhere.

    ``inputs_for(maps, images)`` gives the pair inputs over a (m, d, h, w) tensor of maps
    of the given m dataset images (the rows of the pairs index them). Each rank names the pairs whose image is in its shard, from the
    maps kept by the scan or, in groups that fit the memory budget, read again.

    (f,) filters -> (f, p·s) word indices and scores, each filter's p images in order
    """
    named = name_pairs_in(stream, scan, filters, inputs_for, head, [WordSpace(unit_vocabulary, words_per_image, penalty)],
                          compute=compute, ranks=ranks, chunk=chunk)
    return None if named is None else named[0]


def name_pairs_in(
    stream: MapStream,
    scan: FilterScan,
    filters: torch.Tensor,
    inputs_for: InputsFor,
    head: torch.nn.Module,
    spaces: Sequence[WordSpace],
    *,
    compute: ComputeSettings,
    ranks: Ranks,
    chunk: int = 2048,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """:func:`name_pairs` in several word spaces at once (the open vocabulary and an entity
    list, say): maps are read, explainer inputs made (image masking runs the network) and
    outputs computed once, then matched against each space."""
    f, p = scan.chosen[filters].shape
    mine = _my_pairs(stream, scan, filters)
    device = torch.device(stream.device)
    ids = [torch.zeros(len(mine), space.words_per_image, dtype=torch.int64) for space in spaces]
    sims = [torch.zeros(len(mine), space.words_per_image) for space in spaces]
    with ranks.together("naming the filters"):
        for selected, pair_inputs, pair_filters, local_rows, size in _pair_groups(stream, scan, filters, mine, inputs_for,
                                                                                  compute, chunk):
            found = pair_words_in(head, pair_inputs, pair_filters, local_rows, spaces, device=device,
                                  progress=compute.progress and ranks.main, chunk=size)
            for n, (words, values) in enumerate(found):
                ids[n][selected], sims[n][selected] = words, values
    named = []
    for n, space in enumerate(spaces):
        all_ids = torch.zeros(f * p, space.words_per_image, dtype=torch.int64)
        all_sims = torch.zeros(f * p, space.words_per_image)
        for part in ranks.from_each({"pairs": mine, "ids": ids[n], "sims": sims[n]}):
            all_ids[part["pairs"]], all_sims[part["pairs"]] = part["ids"], part["sims"]
        named.append((all_ids.reshape(f, p * space.words_per_image), all_sims.reshape(f, p * space.words_per_image)))
    return named if ranks.main else None


def pair_outputs(
    stream: MapStream,
    scan: FilterScan,
    filters: torch.Tensor,
    inputs_for: InputsFor,
    head: torch.nn.Module,
    dim: int,
    *,
    compute: ComputeSettings,
    ranks: Ranks,
    chunk: int = 2048,
) -> torch.Tensor | None:
    """The explainer's outputs, not yet words, for every (filter, top image) pair: what
    :func:`name_pairs` matches against a vocabulary, kept so that any vocabulary can name
    them later (the run's filter survey, :mod:`lavise.survey`). On rank 0, None elsewhere.

    (f,) filters -> (f, p, dim), each filter's p images in order
    """
    f, p = scan.chosen[filters].shape
    mine = _my_pairs(stream, scan, filters)
    device = torch.device(stream.device)
    outputs = torch.zeros(len(mine), dim)
    with ranks.together("explaining the filters' top images"):
        for selected, pair_inputs, pair_filters, local_rows, size in _pair_groups(stream, scan, filters, mine, inputs_for,
                                                                                  compute, chunk):
            outputs[selected] = explainer_outputs(head, pair_inputs, pair_filters, local_rows, device=device,
                                                  chunk=size).float()
    every = torch.zeros(f * p, dim)
    for part in ranks.from_each({"pairs": mine, "outputs": outputs}):
        every[part["pairs"]] = part["outputs"]
    return every.reshape(f, p, dim) if ranks.main else None


def _my_pairs(stream: MapStream, scan: FilterScan, filters: torch.Tensor) -> torch.Tensor:
    """Indices into the flattened (f, p) pairs of the given filters whose image is in this rank's shard."""
    start, stop = stream.image_range
    images = scan.chosen[filters].flatten()
    return torch.nonzero((images >= start) & (images < stop)).flatten()


def _pair_groups(stream: MapStream, scan: FilterScan, filters: torch.Tensor, mine: torch.Tensor, inputs_for: InputsFor,
                 compute: ComputeSettings, chunk: int) -> Iterator[tuple[torch.Tensor, PairInputs, torch.Tensor, torch.Tensor, int]]:
    """This rank's pairs, in groups of images whose maps are in memory together: the maps
    kept by the scan or, in groups that fit the memory budget, read again.

    Yields (indices into ``mine``, the group's pair inputs, the pairs' filters, their rows
    in the group, pairs per batch).
    """
    p = scan.chosen.shape[1]
    images = scan.chosen[filters].flatten()
    rows = sorted(set(images[mine].tolist()))
    per_map = 4 * stream.filters * stream.positions
    group = len(rows) if scan.kept is not None else max(1, int(compute.memory_budget * 2**30 // per_map))
    for begin in range(0, len(rows), group):
        part = rows[begin : begin + group]
        if scan.kept is not None:
            maps = [scan.kept[r] for r in part]
        else:
            maps, found = stream.maps_of(part)
            if not found.all():
                raise LaviseError(f"Image '{stream.images.image_path(part[int((~found).nonzero()[0])])}' became "
                                  "unreadable since its maps were taken; explain again.")
        position = {r: i for i, r in enumerate(part)}
        selected = torch.tensor([i for i, pair in enumerate(mine.tolist()) if int(images[pair]) in position], dtype=torch.int64)
        if not len(selected):
            continue
        pairs = mine[selected]
        local_rows = torch.tensor([position[int(images[pair])] for pair in pairs.tolist()], dtype=torch.int64)
        yield selected, inputs_for(maps, part), filters[pairs // p], local_rows, max(1, min(chunk, PAIR_BYTES // per_map))
