"""What the report shows, read from a run's files and shaped for the page.

Reads ``config.json``, ``split.json``, ``explanations.json`` and, when present, the
outputs of ``lavise evaluate`` (``evaluation.json``) and ``lavise compare-groups``
(``groups.json``); checks what it uses and says which file is wrong when it is not.
The result is one JSON-able dict, the page's data. Maps keyed by data (group names,
method names) become lists of records, so no name can collide with anything in the
browser. Absolute paths of the user's machine are shown as their last component unless
asked for.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from lavise.confidence import threshold_text
from lavise.errors import LaviseError
from lavise.storage import read_json

RECALL_KEYS = ("recall@5", "recall@10", "recall@20", "precision@1")
QUOTED_PATH = re.compile(r"""(['"])((?:/|[A-Za-z]:\\)[^'"]*)\1""")


# --- reading -------------------------------------------------------------------------------


def read_artifact(path: Path, what: str, how: str) -> dict:
    """A JSON object from a run's file, or a LaviseError naming the file and the fix."""
    if not path.is_file():
        raise LaviseError(f"'{path}' does not exist: {how}.")
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LaviseError(f"'{path}' is not readable JSON ({error}); {how} again.") from None
    if not isinstance(data, dict):
        raise LaviseError(f"'{path}' holds {type(data).__name__}, not the JSON object of {what}; {how} again.")
    return data


def check_explanations(data: dict, path: Path) -> None:
    """The fields of ``explanations.json`` the report uses, with the right types."""
    for key in ("model", "layer", "method", "filters"):
        if key not in data:
            raise LaviseError(f"'{path}' has no '{key}': is it from 'lavise explain'?")
    if not isinstance(data["filters"], list) or not data["filters"]:
        raise LaviseError(f"'{path}' lists no filters: run 'lavise explain' again.")
    for i, entry in enumerate(data["filters"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("filter"), int):
            raise LaviseError(f"'{path}': filters[{i}] has no integer 'filter'.")
        if not isinstance(entry.get("words", []), list) or not isinstance(entry.get("top_images", []), list):
            raise LaviseError(f"'{path}': filters[{i}] ('filter' {entry['filter']}) has malformed 'words' or 'top_images'.")


def check_evaluation(data: dict, path: Path, layer: str) -> None:
    """The fields of ``evaluation.json`` the report uses (the format of ``lavise evaluate``)."""
    how = "is it from 'lavise evaluate'?"
    if not isinstance(data.get("methods"), dict) or not data["methods"]:
        raise LaviseError(f"'{path}' has no 'methods' table: {how}")
    if not isinstance(data.get("filters"), list):
        raise LaviseError(f"'{path}' has no 'filters' list: {how}")
    if data.get("layer") not in (None, layer):
        raise LaviseError(f"'{path}' evaluates layer '{data['layer']}' but the run explains '{layer}'.")
    for i, entry in enumerate(data["filters"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("filter"), int):
            raise LaviseError(f"'{path}': filters[{i}] has no integer 'filter'.")


def check_groups(data: dict, path: Path) -> None:
    """The fields of ``groups.json`` the report uses (the format of ``lavise compare-groups``)."""
    how = "is it from 'lavise compare-groups'?"
    if not isinstance(data.get("groups"), list) or not all(isinstance(g, dict) and "name" in g for g in data["groups"]):
        raise LaviseError(f"'{path}' has no 'groups' list of {{'name', 'images'}}: {how}")
    if not isinstance(data.get("filters"), list):
        raise LaviseError(f"'{path}' has no 'filters' list: {how}")
    for i, entry in enumerate(data["filters"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("filter"), int):
            raise LaviseError(f"'{path}': filters[{i}] has no integer 'filter'.")


# --- paths ---------------------------------------------------------------------------------


def public_path(value: str | None, *, absolute: bool) -> str | None:
    """A path as the report may show it: its last component unless ``absolute``.

    Example:
        >>> public_path("/home/ada/photos/beach", absolute=False)
        'beach'
        >>> public_path("images/a.png", absolute=False)
        'images/a.png'
    """
    if value is None or absolute:
        return value
    for flavour in (PurePosixPath, PureWindowsPath):
        path = flavour(value)
        if path.is_absolute() or (flavour is PureWindowsPath and path.drive):
            return path.name or value
    return value


def hide_paths(text: str, *, absolute: bool) -> str:
    """Replace every quoted absolute path in ``text`` (a repr) with its last component.

    Example:
        >>> hide_paths("CocoDataset(root='/data/coco/images', images=3)", absolute=False)
        "CocoDataset(root='images', images=3)"
    """
    if absolute:
        return text
    return QUOTED_PATH.sub(lambda m: f"{m[1]}{public_path(m[2], absolute=False)}{m[1]}", text)


def settings_text(settings: dict, *, absolute: bool) -> str:
    """``key=value`` pairs, any path among the values shortened."""
    parts = []
    for key, value in settings.items():
        if isinstance(value, str):
            value = public_path(value, absolute=absolute)
        parts.append(f"{key}={value}")
    return ", ".join(parts)


# --- shaping -------------------------------------------------------------------------------


@dataclass
class Sources:
    """The run's files as read, and where the optional ones came from."""

    config: dict
    split: dict
    explanations: dict
    evaluation: dict | None = None
    evaluation_plot: str | None = None  # relative to the report folder
    groups: dict | None = None
    groups_plot: str | None = None


def about_rows(sources: Sources, *, absolute: bool) -> list[list[str]]:
    """The overview's description of the run: (label, text) rows."""
    config, explanations, split = sources.config, sources.explanations, sources.split
    model = config.get("model", {})
    if model.get("custom"):
        weights = "custom module"
    elif model.get("checkpoint"):
        weights = f"checkpoint {public_path(model['checkpoint'], absolute=absolute)}"
    else:
        weights = f"weights {model.get('weights') or 'none (random initialisation)'}"
    shape = config.get("feature_shape") or [len(explanations["filters"])]
    grid = f", grid {shape[1]}×{shape[2]}" if len(shape) == 3 else ""
    target = explanations.get("target", {})
    skipped = sum(int(e.get("count", 0)) for e in (target.get("skipped") or {}).values())
    rows = [
        ["Model", f"{model.get('name', explanations['model'])} ({weights})"],
        ["Layer", f"{explanations['layer']}: {shape[0]} filters{grid}"],
        ["Reference data", hide_paths(str(config.get("reference", {}).get("description", "unknown")), absolute=absolute)],
        ["Concepts", f"{len(split.get('seen', []))} seen, {len(split.get('unseen', []))} unseen (held out of training)"],
        ["Target data", f"{public_path(target.get('root'), absolute=absolute) or 'unknown'}: "
                        f"{target.get('images', '?')} images" + (f", {skipped} skipped" if skipped else "")],
        ["Word vectors", f"{public_path(str(config.get('word_vectors', 'unknown')), absolute=absolute)}, "
                         f"{explanations.get('vocabulary', {}).get('words', '?')} candidate words "
                         f"({explanations.get('vocabulary', {}).get('kind', 'frequent')} vocabulary, "
                         f"{(explanations.get('naming') or {}).get('retrieval', 'cosine')} retrieval)"],
        ["Method", str(explanations["method"])],
        ["Explanation settings", settings_text(explanations.get("settings", {}), absolute=absolute)],
        ["Training settings", settings_text(config.get("train", {}), absolute=absolute)
         + (f"; best epoch {config['best_epoch']}" if "best_epoch" in config else "")],
    ]
    calibration = (explanations.get("naming") or {}).get("calibration")
    if calibration:
        named = sum(1 for f in explanations["filters"] if f.get("named", True) and f.get("words"))
        rows.append(["Confidence", f"{named} filters have a confident name: confidence at least "
                                   f"{calibration['threshold']:.2f}, {threshold_text(calibration)}"])
    if "lavise_version" in config:
        rows.append(["lavise", str(config["lavise_version"])])
    return rows


def _shown(value: object, *, absolute: bool) -> str:
    """A value of an output's description as text, paths shortened."""
    if isinstance(value, str):
        return hide_paths(public_path(value, absolute=absolute) or "", absolute=absolute)
    return hide_paths(json.dumps(value, sort_keys=True), absolute=absolute)


def score_method(evaluation: dict, method: str) -> str:
    """The evaluation's method that scores the filters: the run's own, else the first."""
    return method if method in evaluation["methods"] else next(iter(evaluation["methods"]))


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) else None


def evaluation_entry(entry: dict) -> dict:
    """One filter's evaluation, as the filter page shows it."""
    netdissect = entry.get("netdissect")
    return {
        "netdissect": {"concept": str(netdissect.get("concept")), "iou": _number(netdissect.get("iou"))}
        if isinstance(netdissect, dict) else None,
        "ground_truth": [
            {"concept": str(g.get("concept")), "iou": _number(g.get("iou"))}
            for g in entry.get("ground_truth") or [] if isinstance(g, dict)
        ],
        "methods": [
            {"method": str(name), "words": [str(w) for w in (result.get("words") or [])],
             **{key: _number(result.get(key)) for key in RECALL_KEYS}}
            for name, result in (entry.get("methods") or {}).items() if isinstance(result, dict)
        ],
    }


def groups_entry(entry: dict, rank: int, examples: dict[str, str | None], *, per_group: int, absolute: bool) -> dict:
    """One filter's group comparison, as the filter page shows it."""
    qualified, share = entry.get("qualified") or {}, entry.get("share") or {}
    names = list(dict.fromkeys([*qualified, *share, *(entry.get("examples") or {})]))
    ci = entry.get("ci")
    return {
        "rank": rank,
        "words": [str(w) for w in entry.get("words") or []],
        "difference": _number(entry.get("difference")),
        "ci": [_number(v) for v in ci] if isinstance(ci, list) and len(ci) == 2 else None,
        "p_value": _number(entry.get("p_value")),
        "q_value": _number(entry.get("q_value")),
        "groups": [
            {
                "group": str(name),
                "qualified": qualified.get(name),
                "share": _number(share.get(name)),
                "examples": [
                    {"name": public_path(str(image), absolute=absolute), "src": examples.get(str(image))}
                    for image in ((entry.get("examples") or {}).get(name) or [])[:per_group]
                ],
            }
            for name in names
        ],
    }


def evaluation_page(evaluation: dict, plot: str | None, method: str, *, absolute: bool) -> dict:
    """The evaluation page: the methods' table and the plot."""
    dataset = evaluation.get("dataset")
    return {
        "score_method": method,
        "plot": plot,
        "dataset": [[str(key), _shown(value, absolute=absolute)] for key, value in dataset.items()]
        if isinstance(dataset, dict) else [],
        "methods": [
            {
                "method": str(name),
                **{key: _number(result.get(key)) for key in RECALL_KEYS},
                "filters": result.get("filters"),
                **{f"{part} recall@5": _number((result.get(part) or {}).get("recall@5"))
                   for part in ("seen", "unseen", "lenient")},
                "seen precision@1": _number((result.get("seen") or {}).get("precision@1")),
                "unseen only": _number((result.get("unseen_only") or {}).get("share")),
                "f1@5": _number(result.get("f1@5")),
                "confidence auroc": _number((result.get("confidence") or {}).get("auroc")),
                "named": _number((result.get("confidence") or {}).get("named")),
                "precision@1 named": _number((result.get("confidence") or {}).get("precision@1_named")),
            }
            for name, result in evaluation["methods"].items() if isinstance(result, dict)
        ],
    }


def groups_page(groups: dict, plot: str | None) -> dict:
    """The group comparison page: groups, the chart, the ranking and the concepts."""
    return {
        "plot": plot,
        "groups": [{"name": str(g["name"]), "images": g.get("images")} for g in groups["groups"]],
        "ranking": [entry["filter"] for entry in groups["filters"]],
        "concepts": [
            {"word": str(c.get("word")), "filters": [f for f in c.get("filters") or [] if isinstance(f, int)],
             "score": _number(c.get("score")), "direction": str(c.get("direction", ""))}
            for c in groups.get("concepts") or [] if isinstance(c, dict)
        ],
    }


def page_data(
    sources: Sources,
    images: dict[int, list[dict]],
    examples: dict[str, str | None],
    *,
    absolute: bool,
    examples_per_group: int,
    version: str,
) -> dict:
    """Everything the page shows, as one JSON-able dict.

    ``images`` maps each filter to its top images ``[{"name", "src"}]`` (``src`` is the
    thumbnail relative to the report, or None); ``examples`` maps a group example image
    to its thumbnail.
    """
    explanations = sources.explanations
    method = str(explanations["method"])
    evaluation, groups = sources.evaluation, sources.groups
    by_filter_eval = {e["filter"]: e for e in evaluation["filters"]} if evaluation else {}
    scored = score_method(evaluation, method) if evaluation else None
    by_filter_groups = {e["filter"]: (rank, e) for rank, e in enumerate(groups["filters"], 1)} if groups else {}
    filters = []
    for entry in explanations["filters"]:
        u = entry["filter"]
        evaluated = by_filter_eval.get(u)
        score = None
        if evaluated is not None:
            score = _number(((evaluated.get("methods") or {}).get(scored) or {}).get("recall@5"))
        grouped = by_filter_groups.get(u)
        filters.append({
            "filter": u,
            "active": bool(entry.get("active", True)),
            "threshold": _number(entry.get("threshold")),
            # "first" (images whose nearest word it is) is absent from explanations before 0.3.
            "words": [{"word": str(w.get("word")), "count": int(w.get("count", 0)),
                       "first": int(w["first"]) if "first" in w else None} for w in entry.get("words", [])],
            "images": images.get(u, []),
            # "confidence" and "named" are absent from explanations before 0.5: every filter named
            "confidence": _number(entry.get("confidence")),
            "named": bool(entry.get("named", True)),
            # absent from explanations made before only firing images voted
            "firing_images": int(entry["firing_images"]) if entry.get("firing_images") is not None else None,
            "top_image_count": len(entry.get("top_images", [])),
            # absent from runs trained without a survey: the reference concept its regions overlap most
            "label": str(entry["label"]) if entry.get("label") is not None else None,
            "label_iou": _number(entry.get("label_iou")),
            "score": score,
            "evaluation": evaluation_entry(evaluated) if evaluated is not None else None,
            "groups": groups_entry(grouped[1], grouped[0], examples, per_group=examples_per_group, absolute=absolute) if grouped else None,
        })
    return {
        "lavise_version": version,
        "title": f"{explanations['model']} {explanations['layer']}",
        "model": str(explanations["model"]),
        "layer": str(explanations["layer"]),
        "method": method,
        "about": about_rows(sources, absolute=absolute),
        "score_name": f"recall@5 ({scored})" if scored else None,
        "filters": filters,
        "evaluation": evaluation_page(evaluation, sources.evaluation_plot, scored, absolute=absolute) if evaluation else None,
        "groups": groups_page(groups, sources.groups_plot) if groups else None,
    }
