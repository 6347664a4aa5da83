"""The HTML report: a static site to browse every filter with its images, words and scores.

``write_report(run_dir)`` writes ``RUN_DIR/report/``::

    index.html     the page (opens from file:// and from any static web server)
    report.js      renders the overview, one view per filter (#filter-12), and the
                   evaluation (#evaluation) and group comparison (#groups) views
    report.css
    data.js        the run's data, one JSON value assigned to a variable (file:// pages
                   cannot fetch() files)
    thumbs/        small JPEGs: NNNN/RR.jpg is filter NNNN's RR-th top image with the
                   filter's region drawn in; examples/ holds group examples;
                   manifest.json records what each was made from
    assets/        the evaluation and group plots, when those outputs exist

Every string from the data is put into the page with DOM text APIs, never parsed as
HTML, and the page's content security policy allows no inline script. Absolute paths
of data folders are shown by their last component unless ``absolute_paths`` is set.

If the target folder named in ``explanations.json`` is gone (moved, or another
machine), the report is still written, without images, and a LaviseWarning says so;
``target=`` (``--target``) points at its new place.
"""

from __future__ import annotations

import bisect
import html
import shutil
import warnings
from importlib import resources
from pathlib import Path

import torch

from lavise._version import __version__
from lavise.compute import cpu_threads
from lavise.datasets.base import ImageFiles, SkipLog
from lavise.errors import LaviseError, LaviseWarning
from lavise.distributed import Ranks
from lavise.features import MapStream
from lavise.models import Preprocessing, TargetModel
from lavise.report.gather import (
    Sources,
    check_evaluation,
    check_explanations,
    check_groups,
    page_data,
    public_path,
    read_artifact,
)
from lavise.report.thumbnails import (
    FilterImages,
    Manifest,
    ThumbnailJob,
    base_key,
    draw_example_thumbnails,
    draw_filter_thumbnails,
    example_thumbnail_name,
    filter_thumbnail_name,
    stale_filters,
)
from lavise.runs import load_run
from lavise.settings import ComputeSettings, ReportSettings
from lavise.storage import atomic_path, cache_folder, output_set

__all__ = ["ReportSettings", "write_report"]

STATIC_FILES = ("report.js", "report.css")


def write_report(
    run_dir: Path,
    *,
    out: Path | None = None,
    settings: ReportSettings = ReportSettings(),
    compute: ComputeSettings = ComputeSettings(),
    model: TargetModel | None = None,
    cache_dir: Path | None = None,
    target: Path | None = None,
    evaluation: Path | None = None,
    groups: Path | None = None,
) -> Path:
    """Write the HTML report of an explained run; return its ``index.html``.

    Args:
        run_dir: a run directory after ``lavise explain``.
        out: the report folder (default ``RUN_DIR/report``); thumbnails already there
            are reused when what they were made from is unchanged.
        settings: thumbnail size and quality, overlays, paths.
        compute: device, batch size and workers, used only if the target features are
            not cached any more.
        model: the run's model, when it was a custom module (as for ``explain``).
        cache_dir: the feature cache (default :func:`lavise.storage.default_cache_dir`).
        target: where the target images are now, if not where ``explain`` found them.
        evaluation: an ``evaluation.json`` (default: the run's, when it has one).
        groups: a ``groups.json`` (default: the run's, when it has one).

    Example:
        >>> write_report(Path("/nonexistent-run"))
        Traceback (most recent call last):
        lavise.errors.LaviseError: '/nonexistent-run/config.json' does not exist: create the run with 'lavise train'.
    """
    _check_settings(settings)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    if out.exists() and not out.is_dir():
        raise LaviseError(f"Report folder '{out}' exists and is not a folder; choose another --out.")
    sources = _read_sources(run_dir, evaluation, groups)
    return _write(run_dir, out, sources, settings, compute, model, cache_dir, target)


def _check_settings(settings: ReportSettings) -> None:
    if not 16 <= settings.thumbnail_size <= 1024:
        raise LaviseError(f"thumbnail_size must be between 16 and 1024 pixels, got {settings.thumbnail_size}.")
    if not 1 <= settings.jpeg_quality <= 95:
        raise LaviseError(f"jpeg_quality must be between 1 and 95, got {settings.jpeg_quality}.")
    if settings.examples_per_group < 0:
        raise LaviseError(f"examples_per_group must be 0 or more, got {settings.examples_per_group}.")


def _read_sources(run_dir: Path, evaluation: Path | None, groups: Path | None) -> Sources:
    train = "create the run with 'lavise train'"
    config = read_artifact(run_dir / "config.json", "a run's configuration", train)
    split = read_artifact(run_dir / "split.json", "a run's concept split", train)
    explanations_path = run_dir / "explanations.json"
    explanations = read_artifact(
        explanations_path, "a run's explanations", f"name the filters first with 'lavise explain {run_dir} --target FOLDER'"
    )
    check_explanations(explanations, explanations_path)
    if explanations.get("run_id") != config.get("run_id"):
        raise LaviseError(
            f"'{explanations_path}' was made with another training of the run in '{run_dir}': name the "
            f"filters again with 'lavise explain {run_dir} --target FOLDER'."
        )
    sources = Sources(config=config, split=split, explanations=explanations)

    evaluation_path = Path(evaluation) if evaluation is not None else run_dir / "evaluation.json"
    if evaluation is not None or evaluation_path.is_file():
        found = read_artifact(evaluation_path, "an evaluation", f"run 'lavise evaluate {run_dir}'")
        check_evaluation(found, evaluation_path, explanations["layer"])
        if _made_from(found, evaluation_path, {"run_id": config.get("run_id")}, f"lavise evaluate {run_dir}"):
            sources.evaluation = found
            sources.evaluation_plot = _plot_source(evaluation_path.with_suffix(".png"))
    groups_path = Path(groups) if groups is not None else run_dir / "groups.json"
    if groups is not None or groups_path.is_file():
        found = read_artifact(groups_path, "a group comparison", f"run 'lavise compare-groups {run_dir}'")
        check_groups(found, groups_path)
        made_of = {"run_id": config.get("run_id"), "explanation_id": explanations.get("explanation_id")}
        if _made_from(found, groups_path, made_of, f"lavise compare-groups {run_dir}"):
            sources.groups = found
            chart = found.get("chart")
            chart_path = groups_path.parent / chart if isinstance(chart, str) and chart else groups_path.with_suffix(".png")
            sources.groups_plot = _plot_source(chart_path)
    return sources


def _made_from(output: dict, path: Path, identity: dict, again: str) -> bool:
    """Whether an output was made from this training (``run_id``) and these explanations
    (``explanation_id``); one made from others is left out of the report, with a warning,
    rather than shown as this explainer's."""
    differ = [name for name, value in identity.items() if output.get(name) != value]
    if differ:
        what = "training of the run" if "run_id" in differ else "explanation of the filters"
        warnings.warn(
            f"'{path}' was made from another {what} and is left out of the report; run '{again}' again "
            "to include it.",
            LaviseWarning,
            stacklevel=4,
        )
    return not differ


def _plot_source(path: Path) -> str | None:
    """The plot's file while reading (a str path), or None when there is none."""
    return str(path) if path.is_file() else None


def _write(
    run_dir: Path,
    out: Path,
    sources: Sources,
    settings: ReportSettings,
    compute: ComputeSettings,
    model: TargetModel | None,
    cache_dir: Path | None,
    target: Path | None,
) -> Path:
    explanations, config = sources.explanations, sources.config
    skipped = SkipLog()
    root = _target_root(target, explanations, run_dir)
    preprocessing = model.preprocessing if model is not None else _preprocessing(config, run_dir)
    identity = model.identity() if model is not None else {"model": config.get("model"), "preprocessing": preprocessing.to_dict()}
    folder = out / "thumbs"
    manifest = Manifest.load(folder / "manifest.json")
    key = base_key(identity, explanations["layer"], size=settings.thumbnail_size, quality=settings.jpeg_quality)

    items = [
        FilterImages(f["filter"], [str(name) for name in f.get("top_images", [])], float(f.get("threshold") or 0.0))
        for f in explanations["filters"]
    ]
    images: dict[int, list[dict]] = {}
    if root is not None:
        job = ThumbnailJob(root, folder, preprocessing, settings.thumbnail_size, settings.jpeg_quality, key)
        stale = stale_filters(job, items, manifest, settings.overlays)
        if stale:
            maps, rows = _target_maps(run_dir, root, explanations, model, cache_dir, compute) if settings.overlays else (None, None)
            draw_filter_thumbnails(job, stale, manifest, skipped, maps=maps, rows=rows, progress=compute.progress)
        for item in items:
            absent = set(manifest.filters[str(item.filter)]["missing"])
            images[item.filter] = [
                {"name": public_path(name, absolute=settings.absolute_paths),
                 "src": None if r in absent else f"thumbs/{filter_thumbnail_name(item.filter, r)}"}
                for r, name in enumerate(item.names)
            ]
    else:
        images = {
            item.filter: [{"name": public_path(n, absolute=settings.absolute_paths), "src": None} for n in item.names]
            for item in items
        }

    examples = _group_examples(sources, root, folder, manifest, preprocessing, key, settings, skipped)
    sources.evaluation_plot = _copy_plot(sources.evaluation_plot, out / "assets" / "evaluation.png")
    sources.groups_plot = _copy_plot(sources.groups_plot, out / "assets" / "groups.png")
    skipped.warn(f"report {out}")

    data = page_data(
        sources, images, examples, absolute=settings.absolute_paths,
        examples_per_group=settings.examples_per_group, version=__version__,
    )
    _write_site(out, data)
    return out / "index.html"


def _target_root(target: Path | None, explanations: dict, run_dir: Path) -> Path | None:
    """The folder of the target images, or None (with a warning) when it is gone."""
    if target is not None:
        root = Path(target)
        if not root.is_dir():
            raise LaviseError(f"Target folder '{root}' (given as target) does not exist.")
        return root
    recorded = (explanations.get("target") or {}).get("root")
    if not recorded:
        warnings.warn(
            f"'{run_dir / 'explanations.json'}' names no target folder: the report has no images; "
            "pass target= (--target) to show them.",
            LaviseWarning,
            stacklevel=4,
        )
        return None
    root = Path(recorded)
    if not root.is_dir():
        warnings.warn(
            f"Target folder '{root}' named in '{run_dir / 'explanations.json'}' does not exist any more: the "
            f"report shows no images for its {len(explanations['filters'])} filters; pass target= (--target) "
            "with the folder's new place to show them.",
            LaviseWarning,
            stacklevel=4,
        )
        return None
    return root


def _preprocessing(config: dict, run_dir: Path) -> Preprocessing:
    try:
        return Preprocessing.from_dict(config["preprocessing"])
    except (KeyError, TypeError, ValueError):
        raise LaviseError(f"'{run_dir / 'config.json'}' has no valid 'preprocessing': create the run again with 'lavise train'.") from None


def _target_maps(run_dir, root, explanations, model, cache_dir, compute):
    """Each filter's own map on each of its top images, and the images that have maps.

    Only the top images are read, from the feature cache that ``explain`` left (or
    through the network again), in groups that fit the memory budget.
    """
    run = load_run(run_dir)
    try:
        target_model = run.target_model(model)
    except LaviseError as error:
        raise LaviseError(f"{error} Or build the report without regions: overlays=False (--no-overlays).") from None
    images = ImageFiles(root)
    wanted = {}  # dataset index -> (name, the filters that show it)
    for entry in explanations["filters"]:
        for name in entry.get("top_images", []):
            index = bisect.bisect_left(images.paths, Path(root) / name)
            if index < len(images.paths) and images.paths[index] == Path(root) / name:
                wanted.setdefault(index, (str(name), []))[1].append(int(entry["filter"]))
    with cpu_threads(compute):
        stream = MapStream(target_model, run.layer, images, cache_dir=cache_folder(cache_dir), compute=compute, ranks=Ranks())
        run.check_filters(stream.filters, "the target images")
        group = max(1, int(compute.memory_budget * 2**30 // (4 * stream.filters * stream.positions)))
        indices = sorted(wanted)
        maps: dict[tuple[str, int], torch.Tensor] = {}
        for start in range(0, len(indices), group):
            part = indices[start : start + group]
            part_maps, found = stream.maps_of(part)
            for index, image_maps, has in zip(part, part_maps, found.tolist()):
                name, filters = wanted[index]
                if not has:
                    continue
                for u in filters:
                    maps[(name, u)] = image_maps[u].clone()
    return maps, {name for name, _ in maps}


def _group_examples(
    sources: Sources,
    root: Path | None,
    folder: Path,
    manifest: Manifest,
    preprocessing: Preprocessing,
    key: str,
    settings: ReportSettings,
    skipped: SkipLog,
) -> dict[str, str | None]:
    """Thumbnails of the group comparison's example images: name -> src (or None)."""
    if sources.groups is None or settings.examples_per_group == 0:
        return {}
    names = [
        str(name)
        for entry in sources.groups["filters"]
        for listed in (entry.get("examples") or {}).values() if isinstance(listed, list)
        for name in listed[: settings.examples_per_group]
    ]
    if not names:
        return {}
    target = sources.groups.get("target")
    recorded = target.get("root") if isinstance(target, dict) else None
    examples_root = Path(recorded) if recorded else root  # compare-groups records its own folder
    if examples_root is None or not examples_root.is_dir():
        warnings.warn(
            f"The group comparison's target folder '{recorded or 'unknown'}' does not exist: its example "
            "images are shown by name only.",
            LaviseWarning,
            stacklevel=4,
        )
        return {}
    job = ThumbnailJob(examples_root, folder, preprocessing, settings.thumbnail_size, settings.jpeg_quality, key)
    made = draw_example_thumbnails(job, names, manifest, skipped)
    return {name: f"thumbs/{example_thumbnail_name(name)}" if name in made else None for name in set(names)}


def _copy_plot(source: str | None, destination: Path) -> str | None:
    """Copy a plot into the report; its path relative to the report, or None."""
    if source is None:
        return None
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
    return destination.relative_to(destination.parent.parent).as_posix()


def _write_site(out: Path, data: dict) -> None:
    """data.js, the static files and, last, index.html."""
    import json

    static = resources.files("lavise.report") / "static"
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    script = f"window.LAVISE_REPORT = JSON.parse({json.dumps(text)});\n"
    page = (static / "index.html").read_text(encoding="utf-8").replace("{{title}}", html.escape(data["title"]))
    with output_set(out, last="index.html") as site:  # the page never meets another report's data
        site.path("data.js").write_text(script, encoding="utf-8")
        for name in STATIC_FILES:
            site.path(name).write_bytes((static / name).read_bytes())
        site.path("index.html").write_text(page, encoding="utf-8")
