"""Which concepts tell groups of images apart, and how two models' concepts differ.

Group comparison (paper §4.6, with statistics the paper does not give). Each image of
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

Model comparison (paper §4.5.5): two explained runs of the same kind of layer, counted
by the distinct words their filters are named by, the words only one of them has, and
the filters that correspond best (mutual best matches, by the correlation of their peak
activations on shared target images when those are given, else by the cosine of their
word-count profiles).

Outputs (written atomically): ``groups.json``, ``groups.csv`` and ``groups.png`` (by
default into the run directory); ``models.json`` and ``models.csv``.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lavise.datasets.base import IMAGE_EXTENSIONS, LaviseWarning, SkipLog
from lavise.errors import LaviseError
from lavise.explain import quantile_thresholds
from lavise.features import cpu_threads, target_features
from lavise.models import TargetModel
from lavise.runs import Run, load_run
from lavise.settings import ComputeSettings, option
from lavise.storage import atomic_path, default_cache_dir, files_digest, load_tensors, read_json, write_csv, write_json

TESTS = ("z", "fisher")
THRESHOLD_SOURCES = ("groups", "run")


@dataclass(frozen=True)
class GroupSettings:
    """How groups of images are compared (``lavise compare-groups``)."""

    test: str = option(
        "z",
        "per-filter test: z (two-proportion z-test; Pearson chi-square for more than two "
        "groups) or fisher (Fisher's exact test, two groups)",
        choices=TESTS,
    )
    fdr: float = option(0.05, "false discovery rate: filters with a Benjamini-Hochberg q-value below it are significant")
    confidence: float = option(0.95, "level of the confidence interval on each difference")
    thresholds: str = option(
        "groups",
        "T_u: groups (recomputed on the group images at the quantile the run was explained "
        "with) or run (the thresholds.safetensors of the run's last explain)",
        choices=THRESHOLD_SOURCES,
    )
    min_group_images: int = option(20, "refuse a group with fewer usable images than this")
    concept_words: int = option(3, "first words of each filter's explanation that count as its concepts")
    examples: int = option(4, "qualified example images listed per group and filter (most activated first)")
    chart_filters: int = option(20, "filters shown in groups.png")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelComparisonSettings:
    """How two explained runs are compared (``lavise compare-models``)."""

    words_per_filter: int = option(1, "first words of each filter's explanation counted as the concepts it learned")
    matches: int = option(20, "best-matching filter pairs reported")

    def to_dict(self) -> dict:
        return asdict(self)


# --- the mathematics: small pure functions ---------------------------------------------


def peak_activations(maps: torch.Tensor) -> torch.Tensor:
    """Each filter's maximum over the positions of each image.

    (N, d, h, w) -> (N, d)
    """
    return maps.flatten(2).amax(dim=2)


def group_counts(qualified: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """How many images of each group each filter qualifies.

    (N, d) bool, (N,) group index -> (G, d) int64
    """
    one_hot = F.one_hot(groups.long(), num_groups).T.double()  # (G, N)
    return (one_hot @ qualified.double()).round().long()


def wilson_interval(k: np.ndarray, n: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion k/n, elementwise.

    (...), (...) -> (...) low, (...) high

    Example:
        >>> low, high = wilson_interval(np.array([0]), np.array([10]))
        >>> float(low[0]), round(float(high[0]), 4)
        (0.0, 0.2775)
    """
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    z = _normal_quantile(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def newcombe_interval(
    k1: np.ndarray, n1: np.ndarray, k2: np.ndarray, n2: np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval for p1 - p2 (his method 10), elementwise.

    (...) ×4 -> (...) low, (...) high
    """
    p1, p2 = np.asarray(k1, np.float64) / n1, np.asarray(k2, np.float64) / n2
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    difference = p1 - p2
    low = difference - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = difference + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return low, high


def homogeneity_test(counts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pearson's chi-square test that every group has the same share, per filter.

    Also returns the adjusted residual of each group, (k_g − E_g) / sqrt(E_g (1 − n_g/N)
    (1 − K/N)): for two groups, the first group's is the two-proportion z statistic
    (p1 − p2) / sqrt(p̂ (1 − p̂) (1/n1 + 1/n2)), and the chi-square is its square. A
    filter that qualifies no image, or all of them, gets statistic 0 and p-value 1.

    (G, d) qualified counts, (G,) group sizes -> (d,) statistic, (d,) p-value, (G, d) residuals
    """
    from scipy import stats

    counts = np.asarray(counts, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)[:, None]  # (G, 1)
    total = sizes.sum()
    pooled = counts.sum(axis=0, keepdims=True) / total  # (1, d)
    expected = sizes * pooled  # (G, d)
    variance = expected * (1 - sizes / total) * (1 - pooled)  # (G, d)
    degenerate = (pooled <= 0) | (pooled >= 1)  # (1, d)
    safe = np.where(degenerate, 1.0, variance)
    residuals = np.where(degenerate, 0.0, (counts - expected) / np.sqrt(safe))
    # Σ over both columns (qualified, not) of (O − E)² / E = Σ_g (k_g − E_g)² / (E_g (1 − p̂))
    cell = np.where(degenerate, 1.0, expected * (1 - pooled))
    statistic = np.where(degenerate, 0.0, ((counts - expected) ** 2 / cell)).sum(axis=0)
    p_value = stats.chi2.sf(statistic, df=counts.shape[0] - 1)
    return statistic, np.where(degenerate[0], 1.0, p_value), residuals


def fisher_exact_test(k1: np.ndarray, n1: int, k2: np.ndarray, n2: int, *, chunk: int = 256) -> np.ndarray:
    """Two-sided Fisher's exact test of the 2×2 tables [[k1, n1 − k1], [k2, n2 − k2]].

    The p-value sums the hypergeometric probabilities of every table with the same
    margins that is no more likely than the observed one (relative tolerance 1e-7, as
    scipy.stats.fisher_exact), for all filters at once.

    (d,), (d,) -> (d,)
    """
    from scipy import stats

    k1, k2 = np.asarray(k1, dtype=np.int64), np.asarray(k2, dtype=np.int64)
    total = n1 + n2
    support = np.arange(n1 + 1)[None, :]  # (1, n1 + 1)
    p_values = np.empty(len(k1), dtype=np.float64)
    for start in range(0, len(k1), chunk):  # chunks of filters bound the (chunk, n1 + 1) table
        qualified = (k1[start : start + chunk] + k2[start : start + chunk])[:, None]  # (c, 1)
        pmf = stats.hypergeom.pmf(support, total, qualified, n1)  # (c, n1 + 1)
        observed = np.take_along_axis(pmf, k1[start : start + chunk, None], axis=1)  # (c, 1)
        p_values[start : start + chunk] = np.where(pmf <= observed * (1 + 1e-7), pmf, 0.0).sum(axis=1)
    return np.minimum(p_values, 1.0)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of independent or positively dependent tests.

    (d,) -> (d,)
    """
    from scipy import stats

    p_values = np.asarray(p_values, dtype=np.float64)
    return stats.false_discovery_control(p_values, method="bh") if len(p_values) else p_values


def concept_evidence(
    filter_words: Sequence[Sequence[str]], residuals: np.ndarray, background: np.ndarray | None = None
) -> tuple[list[str], list[list[int]], np.ndarray]:
    """How much more the filters named by each word differ between groups than filters in general.

    Per word and group: the residuals of the word's m filters, standardised by the mean
    and standard deviation of the residuals over the ``background`` filters, summed and
    divided by √m (Stouffer's combination). A shift that moves every filter (one group's
    images are busier or brighter) cancels out, and a word that names many filters
    because it names nearly any filter scores about 0.

    Args:
        filter_words: for each of the d filters, the words that count as its concepts.
        residuals: (G, d) adjusted residual of each group for each filter.
        background: (d,) bool, the filters the standardisation is over (default: all).

    Returns:
        (words in first-seen order, the filters of each word, (W, G) evidence).
    """
    index: dict[str, int] = {}
    rows, columns = [], []
    for u, words in enumerate(filter_words):
        for word in dict.fromkeys(words):  # a word counts once per filter
            rows.append(index.setdefault(word, len(index)))
            columns.append(u)
    words = list(index)
    incidence = np.zeros((len(words), len(filter_words)), dtype=np.float64)  # (W, d)
    incidence[rows, columns] = 1.0
    members = incidence.sum(axis=1, keepdims=True)  # (W, 1)
    residuals = np.asarray(residuals, dtype=np.float64)  # (G, d)
    chosen = residuals if background is None else residuals[:, np.asarray(background, dtype=bool)]
    if chosen.shape[1] == 0:
        chosen = residuals
    mean, spread = chosen.mean(axis=1), chosen.std(axis=1)  # (G,)
    standardised = (residuals - mean[:, None]) / np.where(spread > 0, spread, 1.0)[:, None]  # (G, d)
    evidence = incidence @ standardised.T / np.sqrt(np.maximum(members, 1))  # (W, G)
    filters = [np.flatnonzero(row).tolist() for row in incidence]
    return words, filters, evidence


def _normal_quantile(confidence: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(0.5 + confidence / 2))


# --- which images belong to which group --------------------------------------------------


@dataclass
class GroupImages:
    """The images of every group, under one target folder.

    Acts as the target dataset of :func:`lavise.features.target_features`; its identity
    equals that of :class:`lavise.ImageFiles` over the same files, so features cached by
    ``explain`` on the same folder are reused.

    Attributes:
        root: the target folder; every image lies inside it.
        names: the group names, sorted.
        paths: the images, sorted as ImageFiles sorts them.
        groups: the group index of each image.
        source: where the groups came from (a CSV file, or "sub-folders").
        skipped: listed entries that could not be used, by reason.
    """

    root: Path
    names: list[str]
    paths: list[Path]
    groups: list[int]
    source: str
    skipped: SkipLog

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {c}" for n, c in zip(self.names, np.bincount(self.groups, minlength=len(self.names))))
        return f"GroupImages(root='{self.root}', groups={{{sizes}}})"

    def image_path(self, index: int) -> Path:
        return self.paths[index]

    def identity(self) -> dict:
        return {"kind": "images", "root": str(self.root.resolve()), "files": files_digest(self.paths)}


def read_groups(target: Path, groups: Path | Mapping[str, Sequence[str | Path]] | None = None) -> GroupImages:
    """The groups of images under ``target``.

    Args:
        target: the folder holding every image.
        groups: a CSV file of ``image,group`` rows (an optional header row ``image,group``;
            image paths relative to ``target`` or absolute inside it); a mapping from group
            name to such paths; or None: one sub-folder of ``target`` per group.

    Raises:
        LaviseError: the folder or CSV is missing or malformed, fewer than two groups,
            an image listed in two groups, or paths outside ``target`` (those are not read).
    """
    root = Path(target)
    if not root.is_dir():
        raise LaviseError(f"Target folder '{root}' does not exist.")
    if groups is None:
        return _group_folders(root)
    if isinstance(groups, Mapping):
        rows = [(str(path), str(name), f"group '{name}'") for name, paths in groups.items() for path in paths]
        return _listed_groups(root, rows, "mapping")
    return _listed_groups(root, _csv_rows(Path(groups)), str(groups))


def _csv_rows(path: Path) -> list[tuple[str, str, str]]:
    """(image, group, where) of each data row of a group CSV."""
    if not path.is_file():
        raise LaviseError(f"Group file '{path}' does not exist; give a CSV of image,group rows.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            lines = [(n, row) for n, row in enumerate(csv.reader(handle), start=1) if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csv.Error) as error:
        raise LaviseError(f"Group file '{path}' is not a readable CSV: {error}.") from None
    if lines and [c.strip().lower() for c in lines[0][1][:2]] in (["image", "group"], ["path", "group"]):
        lines = lines[1:]
    rows = []
    for number, row in lines:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise LaviseError(
                f"Group file '{path}', line {number}: expected 'image,group', got {','.join(row)!r}."
            )
        rows.append((row[0].strip(), row[1].strip(), f"{path.name}:{number}"))
    return rows


def _listed_groups(root: Path, rows: list[tuple[str, str, str]], source: str) -> GroupImages:
    resolved_root = root.resolve()
    outside, located = [], []
    for image, name, where in rows:
        candidate = Path(image) if Path(image).is_absolute() else resolved_root / image
        resolved = candidate.resolve()  # resolves the name only; the file is not opened
        if not resolved.is_relative_to(resolved_root):
            outside.append(f"{image} ({where})")
        else:
            located.append((root / resolved.relative_to(resolved_root), name, image))
    if outside:
        raise LaviseError(
            f"{source} lists {len(outside)} images outside the target folder '{root}' "
            f"(e.g. {', '.join(outside[:5])}); list paths relative to it or inside it. "
            "Nothing was read."
        )
    skipped = SkipLog(examples_kept=20)
    group_of: dict[Path, str] = {}
    conflicts = []
    for path, name, image in located:
        if path in group_of:
            if group_of[path] != name:
                conflicts.append(f"{image} ({group_of[path]}, {name})")
            else:
                skipped.add("images listed twice", image)
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.add("listed files that are not images by their extension", image)
        elif not path.is_file():
            skipped.add("listed images that do not exist", image)
        else:
            group_of[path] = name
    if conflicts:
        raise LaviseError(
            f"{source} puts {len(conflicts)} images in two groups (e.g. {', '.join(conflicts[:5])}); "
            "groups must not overlap."
        )
    return _assemble(root, group_of, source, skipped)


def _group_folders(root: Path) -> GroupImages:
    skipped = SkipLog()
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    group_of: dict[Path, str] = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                group_of[path] = folder.name
    for path in root.iterdir():
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            skipped.add("images outside any group sub-folder", path.name)
    missing = [f.name for f in folders if f.name not in set(group_of.values())]
    for name in missing:
        skipped.add("group sub-folders without images", name)
    return _assemble(root, group_of, "sub-folders", skipped)


def _assemble(root: Path, group_of: dict[Path, str], source: str, skipped: SkipLog) -> GroupImages:
    names = sorted(set(group_of.values()))
    if len(names) < 2:
        how = "sub-folders of images" if source == "sub-folders" else "groups among the listed existing images"
        raise LaviseError(
            f"Comparing groups needs at least two groups; '{root}' gives {len(names)} "
            f"({', '.join(names) or 'none'}) from {source}. Give two or more {how}."
        )
    paths = sorted(group_of)
    index = {name: i for i, name in enumerate(names)}
    return GroupImages(root, names, paths, [index[group_of[p]] for p in paths], source, skipped)


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
    with cpu_threads(compute.threads, compute.num_workers):
        run = run if isinstance(run, Run) else load_run(run)
        explanations = _read_explanations(run.path)
        images = read_groups(Path(target), groups)
        images.skipped.warn(f"groups from {images.source}")
        if settings.test == "fisher" and len(images.names) != 2:
            raise LaviseError(
                f"test='fisher' compares two groups; there are {len(images.names)} "
                f"({', '.join(images.names)}). Use test='z' (chi-square across all groups)."
            )
        _check_sizes(images.names, np.bincount(images.groups, minlength=len(images.names)), settings.min_group_images)
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        features = target_features(
            run.target_model(model), run.layer, images, cache_dir=cache_dir, batch_size=compute.batch_size,
            num_workers=compute.num_workers, device=compute.device, progress=compute.progress,
        )
        features.skipped.warn(f"target {images.root}")
        maps = features.maps  # (N, d, h, w)
        if maps.shape[1] != len(explanations["filters"]):
            raise LaviseError(
                f"Layer '{run.layer}' gives {maps.shape[1]} filters but '{run.path / 'explanations.json'}' "
                f"names {len(explanations['filters'])}: explain the run again."
            )
        group_of = dict(zip(map(str, images.paths), images.groups))
        labels = torch.tensor([group_of[p] for p in features.paths], dtype=torch.long)  # (N,)
        sizes = torch.bincount(labels, minlength=len(images.names))  # (G,), after unreadable images
        _check_sizes(images.names, sizes.numpy(), settings.min_group_images)
        thresholds, threshold_info = _thresholds(run, explanations, maps, settings)
        peaks = peak_activations(maps)  # (N, d)
        qualified = peaks > thresholds  # (N, d)
        counts = group_counts(qualified, labels, len(images.names))  # (G, d)
        examples = _examples(peaks, qualified, labels, len(images.names), settings.examples)  # G × (d, k)

        filter_words = [[w["word"] for w in f["words"]] for f in explanations["filters"]]
        result = _compare(counts.numpy(), sizes.numpy(), images.names, filter_words, settings)
        relative = [_relative(p, images.root) for p in features.paths]
        for entry in result.filters:
            entry.threshold = float(thresholds[entry.filter])
            entry.examples = {
                name: [relative[i] for i in examples[g][entry.filter].tolist() if i >= 0]
                for g, name in enumerate(images.names)
            }
        comparison = GroupComparison(run.path, dict(zip(images.names, sizes.tolist())), result.filters, result.concepts)
        if write:
            out_dir = Path(out) if out is not None else run.path
            extra = {
                "model": run.config["model"]["name"],
                "layer": run.layer,
                "target": {
                    "root": str(images.root.resolve()),
                    "groups_from": images.source,
                    "images": len(features.paths),
                    "skipped": {**images.skipped.to_dict(), **features.skipped.to_dict()},
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


def _examples(
    peaks: torch.Tensor, qualified: torch.Tensor, labels: torch.Tensor, num_groups: int, count: int
) -> list[torch.Tensor]:
    """Per group, each filter's most activated qualified images of that group (−1: none).

    (N, d), (N, d) bool, (N,) -> G × (d, count) image indices
    """
    result = []
    k = min(count, peaks.shape[0])
    for g in range(num_groups):  # one batched top-k per group, over every filter
        eligible = qualified & (labels == g).unsqueeze(1)  # (N, d)
        scores = torch.where(eligible, peaks, torch.tensor(float("-inf"), dtype=peaks.dtype))
        top = torch.topk(scores.T, k, dim=1)  # (d, k)
        result.append(torch.where(torch.isfinite(top.values), top.indices, torch.tensor(-1)))
    return result


def _thresholds(run: Run, explanations: dict, maps: torch.Tensor, settings: GroupSettings) -> tuple[torch.Tensor, dict]:
    """T_u per filter, and a record of where it came from."""
    quantile = float(explanations.get("settings", {}).get("quantile", 0.005))
    if settings.thresholds == "run":
        path = run.path / "thresholds.safetensors"
        if not path.is_file():
            raise LaviseError(f"'{path}' does not exist: run 'lavise explain' first, or use --thresholds groups.")
        thresholds = load_tensors(path)["thresholds"]
        if thresholds.shape != (maps.shape[1],):
            raise LaviseError(f"'{path}' holds {tuple(thresholds.shape)} thresholds for {maps.shape[1]} filters: explain the run again.")
        root = explanations.get("target", {}).get("root")
        return thresholds.to(maps.dtype), {"source": "run", "quantile": quantile, "computed_on": root}
    thresholds = quantile_thresholds(maps, quantile)
    return thresholds, {"source": "groups", "quantile": quantile, "computed_on": f"the {len(maps)} group images"}


def _read_explanations(run_path: Path) -> dict:
    path = run_path / "explanations.json"
    if not path.is_file():
        raise LaviseError(
            f"'{run_path}' has no explanations.json: name its filters first with "
            f"'lavise explain {run_path} --target FOLDER'."
        )
    return read_json(path)


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


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


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
    write_csv(out_dir / "groups.csv", header, rows)
    draw_chart(
        out_dir / "groups.png", comparison, title=title, filters=settings.chart_filters,
        words=settings.concept_words, confidence=settings.confidence,
    )
    write_json(out_dir / "groups.json", comparison.to_dict(extra))  # last: its presence marks a complete output


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


# --- compare-models ----------------------------------------------------------------------


def word_profiles(filter_words: Sequence[Sequence[dict]]) -> tuple[list[str], torch.Tensor]:
    """Each filter's word counts as a row over the words of all filters.

    d filters' [{"word", "count"}, ...] -> (words, (d, V) float64 counts)
    """
    index: dict[str, int] = {}
    rows, columns, values = [], [], []
    for u, words in enumerate(filter_words):
        for entry in words:
            rows.append(u)
            columns.append(index.setdefault(entry["word"], len(index)))
            values.append(float(entry["count"]))
    profiles = torch.zeros(len(filter_words), len(index), dtype=torch.float64)
    profiles[rows, columns] = torch.tensor(values, dtype=torch.float64)
    return list(index), profiles


def profile_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of rows (0 for an empty row).

    (dA, V), (dB, V) -> (dA, dB)
    """
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def peak_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over images of every pair of filters' peak activations (0 for a constant filter).

    (N, dA), (N, dB) -> (dA, dB)
    """
    a, b = a.double() - a.double().mean(dim=0), b.double() - b.double().mean(dim=0)
    return F.normalize(a, dim=0).T @ F.normalize(b, dim=0)


def mutual_best_matches(similarity: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (i, j) where j is i's most similar column and i is j's most similar row.

    (dA, dB) -> pairs sorted by similarity, highest first
    """
    best_column = similarity.argmax(dim=1)  # (dA,)
    best_row = similarity.argmax(dim=0)  # (dB,)
    rows = torch.arange(similarity.shape[0])
    mutual = rows[best_row[best_column] == rows]
    pairs = [(int(i), int(best_column[i])) for i in mutual]
    return sorted(pairs, key=lambda p: (-float(similarity[p]), p))


@dataclass
class FilterMatch:
    """A filter of run A and the filter of run B that corresponds best to it."""

    a: int
    b: int
    similarity: float
    correlation: float | None
    words_a: list[str]
    words_b: list[str]
    shared_words: list[str]


@dataclass
class ModelComparison:
    """The result of :func:`compare_models`."""

    concepts: dict[str, dict[str, list[int]]]  # per run ("a", "b"): word -> its filters
    shared: list[str]
    unique: dict[str, list[str]]
    matches: list[FilterMatch]
    matched_by: str
    path: Path | None = None


def compare_models(
    run_a: Path | Run,
    run_b: Path | Run,
    *,
    settings: ModelComparisonSettings = ModelComparisonSettings(),
    target: Path | None = None,
    compute: ComputeSettings = ComputeSettings(),
    model_a: TargetModel | None = None,
    model_b: TargetModel | None = None,
    cache_dir: Path | None = None,
    out: Path | None = None,
) -> ModelComparison:
    """Compare the concepts two explained runs' filters are named by (paper §4.5.5).

    Args:
        run_a, run_b: explained runs, e.g. the same layer of a network pretrained on
            ImageNet and of one trained from scratch.
        settings: how many words count per filter, how many matches to report.
        target: images to match filters on by the correlation of their peak activations;
            None matches them by their word-count profiles.
        compute: device and batches; ``model_a``/``model_b``: the runs' custom modules.
        cache_dir: the feature cache (default :func:`lavise.storage.default_cache_dir`).
        out: folder for ``models.json`` and ``models.csv``; None writes nothing.

    Example:
        >>> compare_models("runs/pretrained", "runs/scratch", out="compare/")  # doctest: +SKIP
    """
    for name in ("words_per_filter", "matches"):
        if getattr(settings, name) < 1:
            raise LaviseError(f"{name} must be at least 1, got {getattr(settings, name)}.")
    runs = {"a": run_a if isinstance(run_a, Run) else load_run(run_a), "b": run_b if isinstance(run_b, Run) else load_run(run_b)}
    explained = {key: _read_explanations(run.path) for key, run in runs.items()}
    _warn_if_unlike(explained, runs)
    filters = {key: data["filters"] for key, data in explained.items()}
    concepts = {key: _concepts_of(filters[key], settings.words_per_filter) for key in runs}
    shared = sorted(set(concepts["a"]) & set(concepts["b"]), key=lambda w: (-len(concepts["a"][w]) - len(concepts["b"][w]), w))
    unique = {
        key: sorted(set(concepts[key]) - set(concepts[other]), key=lambda w: (-len(concepts[key][w]), w))
        for key, other in (("a", "b"), ("b", "a"))
    }

    d_a = len(filters["a"])
    _, profiles = word_profiles([f["words"] for f in filters["a"] + filters["b"]])  # one word axis for both
    similarity = profile_similarity(profiles[:d_a], profiles[d_a:])  # (dA, dB)
    correlation = None
    if target is not None:
        correlation = _peak_correlation_on(runs, target, compute, (model_a, model_b), cache_dir)
    ranking = correlation if correlation is not None else similarity
    pairs = mutual_best_matches(ranking)[: settings.matches]
    matches = []
    for u, v in pairs:
        words_a = [w["word"] for w in filters["a"][u]["words"]]
        words_b = [w["word"] for w in filters["b"][v]["words"]]
        matches.append(FilterMatch(
            a=u, b=v, similarity=float(similarity[u, v]),
            correlation=None if correlation is None else float(correlation[u, v]),
            words_a=words_a, words_b=words_b, shared_words=[w for w in words_a if w in set(words_b)],
        ))
    comparison = ModelComparison(
        concepts, shared, unique, matches,
        "peak-activation correlation" if correlation is not None else "word-profile cosine",
    )
    if out is not None:
        out = Path(out)
        record = {
            "runs": {
                key: {
                    "path": str(run.path),
                    "model": run.config["model"],
                    "layer": run.layer,
                    "method": explained[key].get("method"),
                    "explained_on": explained[key].get("target", {}).get("root"),
                    "filters": len(filters[key]),
                    "active": sum(1 for f in filters[key] if f.get("active", True)),
                    "concepts": len(concepts[key]),
                    "unique": [{"word": w, "filters": concepts[key][w]} for w in unique[key]],
                }
                for key, run in runs.items()
            },
            "settings": settings.to_dict(),
            "target": None if target is None else str(Path(target).resolve()),
            "matched_by": comparison.matched_by,
            "shared": [{"word": w, "filters_a": concepts["a"][w], "filters_b": concepts["b"][w]} for w in shared],
            "matches": [asdict(m) for m in matches],
        }
        write_csv(
            out / "models.csv",
            ["rank", "filter_a", "filter_b", "similarity", "correlation", "words_a", "words_b"],
            [[r, m.a, m.b, m.similarity, "" if m.correlation is None else m.correlation,
              " ".join(m.words_a[:3]), " ".join(m.words_b[:3])] for r, m in enumerate(matches, start=1)],
        )
        write_json(out / "models.json", record)
        comparison.path = out / "models.json"
    return comparison


def _concepts_of(filters: list[dict], count: int) -> dict[str, list[int]]:
    """word -> the active filters whose first ``count`` words include it."""
    concepts: dict[str, list[int]] = {}
    for f in filters:
        for entry in f["words"][:count]:
            concepts.setdefault(entry["word"], []).append(int(f["filter"]))
    return concepts


def _warn_if_unlike(explained: dict[str, dict], runs: dict[str, Run]) -> None:
    """Counts of words compare fairly only under the same naming; say what differs."""
    differences = []
    for label, get in (
        ("method", lambda d: d.get("method")),
        ("vocabulary", lambda d: d.get("vocabulary")),
        ("target images", lambda d: d.get("target", {}).get("root")),
        ("naming settings", lambda d: {k: v for k, v in d.get("settings", {}).items() if k != "method"}),
    ):
        if get(explained["a"]) != get(explained["b"]):
            differences.append(label)
    if runs["a"].config["feature_shape"][0] != runs["b"].config["feature_shape"][0]:
        differences.append("number of filters")
    if differences:
        warnings.warn(
            f"'{runs['a'].path}' and '{runs['b'].path}' were explained with different "
            f"{', '.join(differences)}; their concepts are not directly comparable.",
            LaviseWarning,
            stacklevel=3,
        )


def _peak_correlation_on(
    runs: dict[str, Run], target: Path, compute: ComputeSettings, models: tuple, cache_dir: Path | None
) -> torch.Tensor:
    """(dA, dB) correlation of the two runs' filters' peak activations on the target images."""
    from lavise.datasets.base import ImageFiles

    images = ImageFiles(Path(target))
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    peaks = {}
    with cpu_threads(compute.threads, compute.num_workers):
        for (key, run), model in zip(runs.items(), models):
            features = target_features(
                run.target_model(model), run.layer, images, cache_dir=cache_dir, batch_size=compute.batch_size,
                num_workers=compute.num_workers, device=compute.device, progress=compute.progress,
            )
            features.skipped.warn(f"target {images.root}")
            peaks[key] = (features.paths, peak_activations(features.maps))
    (paths_a, peaks_a), (paths_b, peaks_b) = peaks["a"], peaks["b"]
    if paths_a != paths_b:  # an image unreadable for one model's preprocessing only
        common = sorted(set(paths_a) & set(paths_b))
        row_a, row_b = {p: i for i, p in enumerate(paths_a)}, {p: i for i, p in enumerate(paths_b)}
        peaks_a = peaks_a[[row_a[p] for p in common]]
        peaks_b = peaks_b[[row_b[p] for p in common]]
    return peak_correlation(peaks_a, peaks_b)
