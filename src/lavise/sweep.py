"""Figure 7 of the paper: how many unseen concepts are found as the annotated share of concepts grows.

For each annotated fraction f, the run's explainer is trained again with 1 − f of the
reference concepts held out, then evaluated with the feature-space methods; the rows go
to ``RUN/sweep.json`` and ``RUN/sweep.md``, each retrained run to ``RUN/sweep/``. With the
unseen protocol (``EvaluateSettings.unseen_protocol``) each row also has the entity
list's unseen named@k, its multiple of chance and its 1–2-hop band (docs/unseen.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from lavise.datasets.base import ReferenceDataset
from lavise.errors import LaviseError
from lavise.evaluate import evaluate, markdown_cell
from lavise.metrics import RECALL_KS
from lavise.runs import Run, as_run, train
from lavise.settings import METHODS, ComputeSettings, EvaluateSettings, ExplainSettings
from lavise.storage import atomic_path, output_set, write_json


def annotated_fraction_sweep(
    run: Path | Run,
    reference: ReferenceDataset,
    dataset: ReferenceDataset,
    fractions: Sequence[float],
    *,
    settings: EvaluateSettings = EvaluateSettings(),
    explain_settings: ExplainSettings = ExplainSettings(),
    compute: ComputeSettings = ComputeSettings(),
    cache_dir: Path | None = None,
) -> list[dict]:
    """Retrain the run's explainer with a share of the reference concepts annotated, and score each.

    For each fraction f, ``1 − f`` of the reference concepts are held out of training
    (seeded by the run's seed); the explainer is evaluated with the feature-space methods
    among ``settings.methods``. Runs go to ``RUN/sweep/annotated-F``; the rows are also
    written to ``RUN/sweep.json`` and ``RUN/sweep.md``.
    """
    run = as_run(run)
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise LaviseError(f"annotated fractions must be in (0, 1], got {bad}.")
    if run.config["model"].get("custom"):
        raise LaviseError("The sweep retrains the explainer and needs a run of a named model, not a custom module.")
    methods = tuple(m for m in settings.methods if m in METHODS)
    if not methods:
        raise LaviseError(f"The sweep scores feature-space methods only ({', '.join(METHODS)}); none was selected.")
    rows = []
    for fraction in fractions:
        swept = train(
            run.model_spec, run.layer, reference,
            run.path / "sweep" / f"annotated-{fraction:.2f}", word_vectors=run.config["word_vectors"],
            settings=replace(run.train_settings, unseen_fraction=round(1 - fraction, 6)), compute=compute, cache_dir=cache_dir,
        )
        (evaluation,) = evaluate(
            [swept], dataset, settings=replace(settings, methods=methods, labelling_fraction=0.0),
            explain_settings=explain_settings, compute=compute, cache_dir=cache_dir,
        )
        for method, summary in evaluation.methods.items():
            unseen = summary["unseen"] or {}
            rows.append({
                "annotated_fraction": fraction, "method": method, "seen_concepts": len(swept.split["seen"]),
                "seen_recall@5": (summary["seen"] or {}).get("recall@5"),
                **{f"unseen_recall@{k}": unseen.get(f"recall@{k}") for k in RECALL_KS},
                **{f"unseen_named@{k}": summary[f"unseen_named@{k}"] for k in RECALL_KS},
                "unseen_concepts": summary["unseen_concepts"],
                **_entity_columns(summary),
            })
    header = ["annotated", "method", "seen concepts", "seen R@5", "unseen R@20", "unseen named@5", "unseen named@20", "unseen concepts",
              "entity named@20", "× chance", "entity named@20 1-2 hops", "concepts 1-2 hops"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([f"{r['annotated_fraction']:.2f}", r["method"], str(r["seen_concepts"]),
                                          markdown_cell(r["seen_recall@5"]), markdown_cell(r["unseen_recall@20"]),
                                          markdown_cell(r["unseen_named@5"]), markdown_cell(r["unseen_named@20"]),
                                          str(r["unseen_concepts"]), markdown_cell(r["entity_unseen_named@20"]),
                                          markdown_cell(r["entity_unseen_named@20_x_chance"]),
                                          markdown_cell(r["entity_unseen_named@20_1-2"]), "–" if r["unseen_concepts_1-2"] is None else str(r["unseen_concepts_1-2"])]) + " |")
    with output_set(run.path, last="sweep.json") as outputs:
        with atomic_path(outputs.path("sweep.md")) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        write_json(outputs.path("sweep.json"), {"run": str(run.path), "run_id": run.config.get("run_id"), "rows": rows})
    return rows


def _entity_columns(summary: dict) -> dict:
    """A sweep row's entity-list scores (the unseen protocol, :mod:`lavise.unseen`); None without it."""
    entities = (summary.get("unseen_protocol") or {}).get("entities") or {}
    near = (entities.get("bands") or {}).get("1-2") or {}
    return {**{f"entity_unseen_named@{k}": entities.get(f"named@{k}") for k in RECALL_KS},
            "entity_unseen_named@20_x_chance": entities.get("named@20_x_chance"),
            "entity_unseen_named@20_1-2": near.get("named@20"), "unseen_concepts_1-2": near.get("concepts")}
