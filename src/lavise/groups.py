"""Which concepts tell groups of images apart (paper §4.6, ``lavise compare-groups``), without labels.

With statistics the paper does not give (:mod:`lavise.stats`). Each image of
each group goes through the run's model once; filter u *qualifies* an image when its
maximum activation on that image exceeds T_u. For every filter, the share of each
group's images it qualifies is compared across groups:

- difference: share of the group where the filter qualifies most images ("higher")
  minus that of the group where it qualifies fewest ("lower"), so always >= 0;
- a confidence interval on that difference (Newcombe's hybrid score interval, built
  from the two groups' Wilson intervals: sound for shares near 0 or 1 and small groups);
- a test of "the share is the same in every group": the two-proportion z-test (two
  groups) or Pearson's chi-square test of homogeneity (more groups; for two groups its
  p-value equals the z-test's), or Fisher's exact test (two groups);
- Benjamini–Hochberg q-values across the filters: a filter is significant when its q
  is below the chosen false discovery rate.

Filters are ranked by difference, each with its words (from the run's
``explanations.json``) and example qualified images of each group. The concept summary
adds the evidence up by word: each filter's adjusted residual for group g (for two
groups: the z statistic, signed) is standardised against all named filters of the
layer, and a word's score for g is the sum over the filters whose first words include
it, divided by the square root of their number (Stouffer's combination); its direction
is the group of highest score. Standardising removes shifts common to the whole layer
and keeps a word that names nearly every filter near 0. Filters that see the same thing
are correlated, so a score ranks concepts; it is not a calibrated test statistic.

Outputs (written atomically): ``groups.json``, ``groups.csv`` and ``groups.png``, by
default into the run directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lavise.compute import cpu_threads
from lavise.datasets.base import SkipLog, relative_name
from lavise.datasets.groups import read_groups
from lavise.distributed import current
from lavise.errors import LaviseError
from lavise.explain import read_explanations
from lavise.features import MapStream
from lavise.models import TargetModel
from lavise.naming import stream_thresholds
from lavise.regions import RunningTopK, peak_activations
from lavise.runs import Run, as_run
from lavise.settings import TESTS, THRESHOLD_SOURCES, ComputeSettings, GroupSettings
from lavise.stats import benjamini_hochberg, concept_evidence, fisher_exact_test, homogeneity_test, newcombe_interval
from lavise.storage import atomic_path, cache_folder, load_tensors, output_set, write_csv, write_json


def group_counts(qualified: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """How many images of each group each filter qualifies.

    (N, d) bool, (N,) group index -> (G, d) int64
    """
    one_hot = F.one_hot(groups.long(), num_groups).T.double()  # (G, N)
    return (one_hot @ qualified.double()).round().long()


# --- compare-groups ----------------------------------------------------------------------


@dataclass
class FilterDifference:
    """How differently one filter qualifies the images of each group."""

    filter: int
    words: list[str]
    qualified: dict[str, int]
    share: dict[str, float]
    higher: str
    lower: str
    difference: float
    ci: list[float]
    statistic: float
    p_value: float
    q_value: float
    significant: bool
    threshold: float
    examples: dict[str, list[str]]


@dataclass
class ConceptEvidence:
    """The evidence of all filters named by one word, added up."""

    word: str
    filters: list[int]
    score: float
    direction: str
    evidence: dict[str, float]
    significant_filters: int
    mean_difference: float


@dataclass
class GroupComparison:
    """The result of :func:`compare_groups`; ``filters`` ranked, most different first."""

    run: Path
    groups: dict[str, int]
    filters: list[FilterDifference]
    concepts: list[ConceptEvidence]
    path: Path | None = None

    @classmethod
    def from_dict(cls, data: dict) -> GroupComparison:
        """The comparison :meth:`to_dict` (and a ``path``) describes."""
        path = data.get("path")
        return cls(Path(data["run"]), {g["name"]: g["images"] for g in data["groups"]},
                   [FilterDifference(**f) for f in data["filters"]], [ConceptEvidence(**c) for c in data["concepts"]],
                   Path(path) if path not in (None, "None") else None)

    def to_dict(self, extra: dict | None = None) -> dict:
        return {
            "run": str(self.run),
            **(extra or {}),
            "groups": [{"name": n, "images": c} for n, c in self.groups.items()],
            "filters": [asdict(f) for f in self.filters],
            "concepts": [asdict(c) for c in self.concepts],
            "chart": "groups.png",
        }


def compare_groups(
    run: Path | Run,
    target: Path,
    groups: Path | Mapping[str, Sequence[str | Path]] | None = None,
    *,
    settings: GroupSettings = GroupSettings(),
    compute: ComputeSettings = ComputeSettings(),
    model: TargetModel | None = None,
    cache_dir: Path | None = None,
    out: Path | None = None,
    write: bool = True,
) -> GroupComparison:
    """Find the filters, and the concepts naming them, that tell groups of images apart.

    Args:
        run: an explained run (``lavise train`` then ``lavise explain``).
        target: the folder holding the images of every group.
        groups: a CSV of ``image,group`` rows, a mapping group -> image paths, or None
            for one sub-folder of ``target`` per group (see :func:`read_groups`).
        settings: tests, thresholds and output sizes; ``compute``: device and batches.
        model: the run's model again, when it was trained on a custom module.
        cache_dir: the feature cache (default :func:`lavise.storage.default_cache_dir`).
        out: where ``groups.json``, ``groups.csv`` and ``groups.png`` go (default: the run).
        write: write nothing when false.

    Example:
        >>> compare_groups("runs/r18", "photos/", "photos/groups.csv")  # doctest: +SKIP
    """
    _check_settings(settings)
    ranks = current()
    with cpu_threads(compute):
        with ranks.together("opening the run and the groups"):
            run = as_run(run)
            explanations = read_explanations(run.path)
            images = read_groups(Path(target), groups)
            if settings.test == "fisher" and len(images.names) != 2:
                raise LaviseError(
                    f"test='fisher' compares two groups; there are {len(images.names)} "
                    f"({', '.join(images.names)}). Use test='z' (chi-square across all groups)."
                )
            _check_sizes(images.names, np.bincount(images.groups, minlength=len(images.names)), settings.min_group_images)
            if len(explanations["filters"]) != run.filters:
                raise LaviseError(
                    f"'{run.path / 'explanations.json'}' names {len(explanations['filters'])} filters but the run "
                    f"has {run.filters}: explain the run again."
                )
            stream = MapStream(run.target_model(model), run.layer, images, cache_dir=cache_folder(cache_dir),
                               compute=compute, ranks=ranks)
            run.check_filters(stream.filters, "the group images")
        ranks.agree({"run": run.config, "groups": images.identity(), "labels": images.groups,
                     "settings": settings.to_dict()}, "compare-groups jobs")
        if ranks.main:
            images.skipped.warn(f"groups from {images.source}")
        thresholds, threshold_info = _thresholds(run, explanations, stream, settings, compute, ranks)
        counted = _count(stream, thresholds, torch.tensor(images.groups), len(images.names), settings.examples, ranks)
        comparison = None
        with ranks.together("comparing the groups"):
            if ranks.main:
                comparison = _comparison(run, explanations, images, counted, thresholds, threshold_info, settings, out, write)
        shared = ranks.gather(comparison.to_dict() | {"path": str(comparison.path)} if ranks.main else None)[0]
        return comparison if ranks.main else GroupComparison.from_dict(shared)


@dataclass
class _Counted:
    """What the counting pass found: qualified images per group and filter, and examples."""

    counts: torch.Tensor  # (G, d)
    sizes: torch.Tensor  # (G,) usable images
    examples: list[torch.Tensor]  # G × (d, k) dataset indices, −1: none
    skipped: SkipLog


def _count(stream: MapStream, thresholds: torch.Tensor, labels: torch.Tensor, num_groups: int, examples: int,
           ranks) -> _Counted:
    """One pass: how many images of each group each filter qualifies, and its best qualified examples."""
    counts = torch.zeros(num_groups, stream.filters, dtype=torch.int64)
    sizes = torch.zeros(num_groups, dtype=torch.int64)
    best = [RunningTopK(stream.filters, examples) for _ in range(num_groups)]
    skipped = SkipLog()
    with ranks.together("counting qualified images"):
        for chunk in stream.chunks("group features"):
            skipped.merge(chunk.skipped)
            if not len(chunk.rows):
                continue
            peaks = peak_activations(chunk.maps.to(stream.device)).cpu()  # (n, d)
            qualified = peaks > thresholds
            group = labels[chunk.rows]
            counts += group_counts(qualified, group, num_groups)
            sizes += torch.bincount(group, minlength=num_groups)
            for g in range(num_groups):
                eligible = qualified & (group == g).unsqueeze(1)
                best[g].add(torch.where(eligible, peaks, torch.tensor(-float("inf"))), chunk.rows)
    merged = [RunningTopK(stream.filters, examples) for _ in range(num_groups)]
    for state in ranks.from_each({f"{k}{g}": v for g, b in enumerate(best) for k, v in b.state().items()}):
        for g in range(num_groups):
            merged[g].merge({"values": state[f"values{g}"], "indices": state[f"indices{g}"]})
    every = SkipLog()
    for log in ranks.gather(skipped.to_dict()):
        every.merge(SkipLog.from_dict(log))
    chosen = [torch.where(torch.isfinite(m.values), m.indices, torch.tensor(-1)) for m in merged]
    return _Counted(ranks.sum(counts), ranks.sum(sizes), chosen, every)


def _comparison(run, explanations, images, counted: _Counted, thresholds, threshold_info, settings, out, write) -> GroupComparison:
    """The statistics, the ranking and the outputs (rank 0)."""
    counted.skipped.warn(f"target {images.root}")
    _check_sizes(images.names, counted.sizes.numpy(), settings.min_group_images)
    filter_words = [[w["word"] for w in f["words"]] for f in explanations["filters"]]
    result = _compare(counted.counts.numpy(), counted.sizes.numpy(), images.names, filter_words, settings)
    for entry in result.filters:
        entry.threshold = float(thresholds[entry.filter])
        entry.examples = {
            name: [relative_name(images.image_path(i), images.root) for i in counted.examples[g][entry.filter].tolist() if i >= 0]
            for g, name in enumerate(images.names)
        }
    comparison = GroupComparison(run.path, dict(zip(images.names, counted.sizes.tolist())), result.filters, result.concepts)
    if write:
        out_dir = Path(out) if out is not None else run.path
        extra = {
            "run_id": run.config.get("run_id"),
            "explanation_id": explanations.get("explanation_id"),  # whose words and thresholds these are
            "model": run.config["model"]["name"],
            "layer": run.layer,
            "target": {
                "root": str(images.root.resolve()),
                "groups_from": images.source,
                "images": int(counted.sizes.sum()),
                "skipped": {**images.skipped.to_dict(), **counted.skipped.to_dict()},
                "explained_on": explanations.get("target", {}).get("root"),
            },
            "settings": settings.to_dict(),
            "thresholds": threshold_info,
        }
        _write_outputs(out_dir, comparison, extra, settings, f"{run.config['model']['name']} {run.layer}")
        comparison.path = out_dir / "groups.json"
    return comparison


@dataclass
class _Compared:
    filters: list[FilterDifference]
    concepts: list[ConceptEvidence]


def _compare(
    counts: np.ndarray, sizes: np.ndarray, names: list[str], filter_words: list[list[str]], settings: GroupSettings
) -> _Compared:
    """Statistics and ranking from the (G, d) qualified counts and (G,) group sizes."""
    shares = counts / sizes[:, None]  # (G, d)
    d = counts.shape[1]
    columns = np.arange(d)
    higher, lower = shares.argmax(axis=0), shares.argmin(axis=0)  # (d,)
    difference = shares[higher, columns] - shares[lower, columns]
    low, high = newcombe_interval(
        counts[higher, columns], sizes[higher], counts[lower, columns], sizes[lower], settings.confidence
    )
    statistic, p_values, residuals = homogeneity_test(counts, sizes)
    if len(names) == 2:
        statistic = residuals[0]  # the z statistic, signed towards the first group
        if settings.test == "fisher":
            p_values = fisher_exact_test(counts[0], int(sizes[0]), counts[1], int(sizes[1]))
    q_values = benjamini_hochberg(p_values)
    significant = q_values < settings.fdr
    order = np.lexsort((columns, p_values, -np.round(difference, 12)))  # last key first
    filters = [
        FilterDifference(
            filter=int(u),
            words=filter_words[u],
            qualified={n: int(counts[g, u]) for g, n in enumerate(names)},
            share={n: float(shares[g, u]) for g, n in enumerate(names)},
            higher=names[higher[u]],
            lower=names[lower[u]],
            difference=float(difference[u]),
            ci=[float(low[u]), float(high[u])],
            statistic=float(statistic[u]),
            p_value=float(p_values[u]),
            q_value=float(q_values[u]),
            significant=bool(significant[u]),
            threshold=float("nan"),
            examples={},
        )
        for u in order
    ]
    named = np.array([bool(w) for w in filter_words])
    words, members, evidence = concept_evidence([w[: settings.concept_words] for w in filter_words], residuals, named)
    concepts = []
    for w, word in enumerate(words):
        direction = int(evidence[w].argmax())
        mine = np.asarray(members[w])
        others = np.delete(shares[:, mine], direction, axis=0).mean(axis=0)
        concepts.append(
            ConceptEvidence(
                word=word,
                filters=members[w],
                score=float(evidence[w, direction]),
                direction=names[direction],
                evidence={n: float(evidence[w, g]) for g, n in enumerate(names)},
                significant_filters=int(np.sum(significant[mine] & (higher[mine] == direction))),
                mean_difference=float(np.mean(shares[direction, mine] - others)),
            )
        )
    concepts.sort(key=lambda c: (-c.score, c.word))
    return _Compared(filters, concepts)


def _thresholds(run: Run, explanations: dict, stream: MapStream, settings: GroupSettings, compute, ranks) -> tuple[torch.Tensor, dict]:
    """T_u per filter, and a record of where it came from."""
    quantile = float(explanations.get("settings", {}).get("quantile", 0.005))
    if settings.thresholds == "run":
        path = run.path / "thresholds.safetensors"
        if not path.is_file():
            raise LaviseError(f"'{path}' does not exist: run 'lavise explain' first, or use --thresholds groups.")
        thresholds = load_tensors(path)["thresholds"]
        if thresholds.shape != (stream.filters,):
            raise LaviseError(f"'{path}' holds {tuple(thresholds.shape)} thresholds for {stream.filters} filters: explain the run again.")
        root = explanations.get("target", {}).get("root")
        return thresholds.float(), {"source": "run", "quantile": quantile, "computed_on": root}
    thresholds, usable = stream_thresholds(stream, quantile, ranks, compute, description="group thresholds")
    return thresholds, {"source": "groups", "quantile": quantile, "computed_on": f"the {usable} group images"}


def _check_sizes(names: list[str], sizes: np.ndarray, minimum: int) -> None:
    small = [f"'{n}' ({int(c)})" for n, c in zip(names, sizes) if c < minimum]
    if small:
        raise LaviseError(
            f"Groups with fewer usable images than min_group_images={minimum}: {', '.join(small)}. "
            "Shares of so few images are too noisy to compare; add images or lower --min-group-images."
        )


def _check_settings(settings: GroupSettings) -> None:
    if settings.test not in TESTS:
        raise LaviseError(f"Unknown test '{settings.test}'; valid: {', '.join(TESTS)}.")
    if settings.thresholds not in THRESHOLD_SOURCES:
        raise LaviseError(f"Unknown thresholds source '{settings.thresholds}'; valid: {', '.join(THRESHOLD_SOURCES)}.")
    for name in ("fdr", "confidence"):
        if not 0 < getattr(settings, name) < 1:
            raise LaviseError(f"{name} must be in (0, 1), got {getattr(settings, name)}.")
    for name in ("min_group_images", "concept_words"):
        if getattr(settings, name) < 1:
            raise LaviseError(f"{name} must be at least 1, got {getattr(settings, name)}.")
    for name in ("examples", "chart_filters"):
        if getattr(settings, name) < 0:
            raise LaviseError(f"{name} must be at least 0, got {getattr(settings, name)}.")


def _write_outputs(out_dir: Path, comparison: GroupComparison, extra: dict, settings: GroupSettings, title: str) -> None:
    names = list(comparison.groups)
    header = ["rank", "filter", "words", "higher", "lower", "difference", "ci_low", "ci_high", "statistic",
              "p_value", "q_value", "significant", *[f"qualified_{n}" for n in names], *[f"share_{n}" for n in names]]
    rows = [
        [rank, f.filter, " ".join(f.words[: settings.concept_words]), f.higher, f.lower, f.difference, *f.ci,
         f.statistic, f.p_value, f.q_value, int(f.significant), *[f.qualified[n] for n in names],
         *[f.share[n] for n in names]]
        for rank, f in enumerate(comparison.filters, start=1)
    ]
    with output_set(out_dir, last="groups.json") as outputs:  # groups.json last: it marks a complete output
        write_csv(outputs.path("groups.csv"), header, rows)
        draw_chart(
            outputs.path("groups.png"), comparison, title=title, filters=settings.chart_filters,
            words=settings.concept_words, confidence=settings.confidence,
        )
        write_json(outputs.path("groups.json"), comparison.to_dict(extra))


def draw_chart(
    path: Path, comparison: GroupComparison, *, title: str = "", filters: int = 20, words: int = 3, confidence: float = 0.95
) -> None:
    """A horizontal bar per top filter: its difference with the confidence interval, labelled with its words.

    With two groups the bars are signed (right: more qualified images in the first
    group); with more, each bar is higher − lower, coloured by the higher group.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = list(comparison.groups)
    shown = comparison.filters[:filters]
    figure = Figure(figsize=(8, 1.2 + 0.32 * max(len(shown), 1)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = {n: f"C{i}" for i, n in enumerate(names)}
    values, errors, labels = [], [[], []], []
    for f in shown:
        sign = -1.0 if len(names) == 2 and f.higher != names[0] else 1.0
        value = sign * f.difference
        low, high = (f.ci if sign > 0 else [-f.ci[1], -f.ci[0]])
        values.append(value)
        errors[0].append(max(value - low, 0.0))
        errors[1].append(max(high - value, 0.0))
        mark = "*" if f.significant else ""
        labels.append(f"{f.filter}{mark}: {', '.join(f.words[:words]) or '(no words)'}")
    positions = np.arange(len(shown))[::-1]
    axes.barh(positions, values, xerr=errors, color=[colours[f.higher] for f in shown], capsize=2)
    axes.set_yticks(positions, labels, fontsize=8)
    axes.axvline(0, color="black", linewidth=0.8)
    if len(names) == 2:
        axes.set_xlabel(f"share of qualified images: {names[0]} − {names[1]} (whiskers: {confidence:.0%} interval)")
    else:
        axes.set_xlabel(f"share of qualified images: highest − lowest group (whiskers: {confidence:.0%} interval)")
    axes.legend(handles=[Patch(color=colours[n], label=f"more in {n}") for n in names], fontsize=8, loc="best")
    axes.set_title(f"{title}: filters that differ most between groups (* significant)" if title else
                   "Filters that differ most between groups (* significant)", fontsize=10)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def format_comparison(comparison: GroupComparison, *, rows: int = 8) -> str:
    """The top filters and concepts of a group comparison as a plain-text table."""
    sizes = ", ".join(f"{n}: {c} images" for n, c in comparison.groups.items())
    lines = [f"Filters that differ most between the groups ({sizes})",
             f"{'rank':>4} {'filter':>6}  {'more in':10} {'difference (CI)':>22} {'q':>8}  words"]
    for rank, f in enumerate(comparison.filters[:rows], start=1):
        interval = f"{f.difference:+.2f} ({f.ci[0]:+.2f}, {f.ci[1]:+.2f})"
        lines.append(f"{rank:>4} {f.filter:>6}  {f.higher:10} {interval:>22} {f.q_value:8.1e}  {', '.join(f.words[:5])}")
    lines += ["", "Concepts by the evidence of the filters they name"]
    for rank, c in enumerate(comparison.concepts[:rows], start=1):
        lines.append(f"{rank:>4}  {c.word:16} more in {c.direction:10} score {c.score:6.1f}  over {len(c.filters)} filters")
    return "\n".join(lines)
