"""Issue 20's levers on the 558-concept world: word spaces, losses, hubness-corrected retrieval,
calibrated stacking and the number of seen concepts, each scored with the paper's unseen protocol (docs/unseen.md).

    python experiments/unseen_levers.py --work /tmp/levers --seed 0            # development
    python experiments/unseen_levers.py --work /tmp/levers --seed 31 --seed 32  # the fresh report

For each seed: the world (``lavise synth --pool wordnet --all-concepts``, 70/30 split, 1,500
reference and 600 evaluation scenes by default), one explainer per training variant on
EfficientNet-Lite0 ``blocks.5.0.bn1`` (ImageNet weights), each evaluated with activation
masking once per naming (retrieval, seen penalty), and the annotated-fraction sweep of the default run and
of the softmax run (fractions 0.13, 0.26, 0.51, 1: about 50, 100, 200 and all 390 seen concepts). Everything is resumable:
a finished run or evaluation is read from WORK/seed-S, not made again, and the features are
cached in WORK/seed-S/cache. Prints one table of the variants and one of the sweep per seed,
and their means over the seeds given.

Seeds 0 (development) and 31, 32 (fresh, chosen before any of them was run; docs/unseen.md)
are the ones the docs quote.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lavise.cli import main as lavise

MODEL = ["--model", "efficientnet_lite0", "--weights", "IMAGENET", "--layer", "blocks.5.0.bn1"]
# how a run is named: label -> extra evaluate options
ALIGNED, CSLS, COSINE = [], ["--retrieval", "csls"], ["--retrieval", "cosine"]
STACKED = {"aligned, seen penalty 0.1": ["--seen-penalty", "0.1"], "aligned, seen penalty 0.2": ["--seen-penalty", "0.2"]}
# training variant -> (extra train options, its namings)
VARIANTS = {
    "glove-hinge": ([], {"aligned": ALIGNED, "csls": CSLS, "cosine": COSINE, **STACKED}),
    "minilm-hinge": (["--word-vectors", "minilm-l6-v2"], {"aligned": ALIGNED, "csls": CSLS}),
    "glove-hardest": (["--loss", "hardest", "--margin", "0.2"], {"aligned": ALIGNED}),
    "glove-softmax": (["--loss", "softmax", "--temperature", "0.1"], {"aligned": ALIGNED, "csls": CSLS, **STACKED}),
    "minilm-softmax": (["--word-vectors", "minilm-l6-v2", "--loss", "softmax", "--temperature", "0.1"],
                       {"aligned": ALIGNED, "csls": CSLS}),
}
FRACTIONS = ("0.13", "0.26", "0.51", "1.0")
SWEEPS = ("glove-hinge", "glove-softmax")  # the variants whose number of seen concepts is swept
BANDS = ("1-2", "3-4", "farther")


def run_seed(work: Path, seed: int, reference: int, evaluation: int, variants: list[str], sweep: bool) -> dict:
    out = work / f"seed-{seed}"
    for part, count in (("reference", reference), ("evaluation", evaluation)):
        _lavise(["synth", "--out", str(out / part), "--part", part, "--pool", "wordnet", "--all-concepts",
                 "--vocabulary-size", "0", "--unseen-fraction", "0.3", "--seed", str(seed), "--num-images", str(count)])
    common = ["--cache-dir", str(out / "cache"), "--no-progress"]
    # measured before only firing top images voted (docs/evaluation.md): keep naming as then
    as_measured = ["--no-firing-images-only"]
    results = {}
    for name in variants:
        options, namings = VARIANTS[name]
        run = out / "runs" / name
        if not (run / "explainer.safetensors").is_file():
            _lavise(["train", *MODEL, "--seed", str(seed), "--reference", str(out / "reference" / "annotations.json"),
                     "--out", str(run), *options, *common])
        for label, naming in namings.items():
            saved = out / "results" / f"{name}-{label.replace(', ', '-').replace(' ', '-')}.json"
            if not saved.is_file():
                _lavise(["evaluate", str(run), "--dataset", str(out / "evaluation" / "annotations.json"),
                         "--methods", "activation", *naming, *as_measured, *common])
                saved.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run / "evaluation.json", saved)
            results[f"{name} / {label}"] = _row(json.loads(saved.read_text()))
    sweeps = {}
    for name in SWEEPS if sweep else ():
        run = out / "runs" / f"{name}-sweep"
        saved = out / "results" / ("sweep.json" if name == "glove-hinge" else f"sweep-{name}.json")
        if not saved.is_file():
            if run.exists():
                shutil.rmtree(run)
            shutil.copytree(out / "runs" / name, run)
            _lavise(["evaluate", str(run), "--dataset", str(out / "evaluation" / "annotations.json"), "--methods",
                     "activation", "--annotated-fractions", *FRACTIONS,
                     "--sweep-reference", str(out / "reference" / "annotations.json"), *as_measured, *common])
            shutil.copyfile(run / "sweep.json", saved)
        sweeps[name] = json.loads(saved.read_text())["rows"]
    return {"variants": results, "sweeps": sweeps}


def _lavise(arguments: list[str]) -> None:
    print("$ lavise " + " ".join(arguments), flush=True)
    code = lavise(arguments)
    if code:
        raise SystemExit(f"lavise {arguments[0]} failed ({code})")


def _row(evaluation: dict) -> dict:
    """The figures of one evaluation's activation masking that the tables show."""
    summary = evaluation["methods"]["activation"]
    protocol = summary["unseen_protocol"]
    row = {"P@1": summary["precision@1"], "R@5": summary["recall@5"], "seen R@5": (summary["seen"] or {}).get("recall@5")}
    for space in ("open", "entities"):
        scores = protocol[space]
        row[f"{space} candidates"] = scores["candidates"]
        for key in ("recall@20", "recall@20_x_chance", "named@20", "named@20_x_chance"):
            row[f"{space} {key}"] = scores[key]
        for band in BANDS:
            scores_band = scores["bands"].get(band) or {}
            row[f"{space} named@20 {band}"] = scores_band.get("named@20")
            row[f"concepts {band}"] = scores_band.get("concepts")
    row["unseen concepts"] = protocol["entities"]["concepts"]
    return row


def _cell(value, digits: int = 3) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def variant_table(rows: dict[str, dict]) -> str:
    header = ["variant / retrieval", "P@1", "seen R@5", "open unseen R@20", "× chance", "entity named@20", "× chance",
              "entity named@20 1-2 / 3-4 / farther", "unseen concepts (1-2 / 3-4 / farther)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        bands = " / ".join(_cell(r[f"entities named@20 {b}"], 2) for b in BANDS)
        counts = f"{r['unseen concepts']} ({' / '.join(_cell(r[f'concepts {b}']) for b in BANDS)})"
        lines.append("| " + " | ".join([name, _cell(r["P@1"]), _cell(r["seen R@5"]), _cell(r["open recall@20"]),
                                         _cell(r["open recall@20_x_chance"], 1), _cell(r["entities named@20"]),
                                         _cell(r["entities named@20_x_chance"], 1), bands, counts]) + " |")
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    header = ["annotated", "seen concepts", "seen R@5", "unseen concepts", "open unseen R@20", "entity named@20",
              "× chance", "entity named@20 1-2 hops", "concepts 1-2 hops"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([f"{r['annotated_fraction']:.2f}", str(r["seen_concepts"]), _cell(r["seen_recall@5"]),
                                         str(r["unseen_concepts"]), _cell(r["unseen_recall@20"]),
                                         _cell(r["entity_unseen_named@20"]), _cell(r["entity_unseen_named@20_x_chance"], 1),
                                         _cell(r["entity_unseen_named@20_1-2"], 2), _cell(r["unseen_concepts_1-2"])]) + " |")
    return "\n".join(lines)


def mean_rows(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Each figure's mean over the seeds (counts summed); None where a seed has none."""
    means = {}
    for name in per_seed[0]:
        rows = [seed[name] for seed in per_seed if name in seed]
        merged = {}
        for key in rows[0]:
            values = [r[key] for r in rows if r[key] is not None]
            if key.startswith(("concepts", "unseen concepts", "open candidates", "entities candidates")):
                merged[key] = sum(values) if values else None
            else:
                merged[key] = sum(values) / len(values) if values else None
        means[name] = merged
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seed", type=int, action="append", required=True, help="a seed (repeat for more)")
    parser.add_argument("--reference-images", type=int, default=1500)
    parser.add_argument("--evaluation-images", type=int, default=600)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-sweep", action="store_true", help="skip the annotated-fraction sweep")
    args = parser.parse_args()
    results = {seed: run_seed(args.work, seed, args.reference_images, args.evaluation_images, args.variants,
                              not args.no_sweep) for seed in args.seed}
    for seed, result in results.items():
        print(f"\n## Seed {seed}: the variants (activation masking)\n\n{variant_table(result['variants'])}")
        for name, rows in result["sweeps"].items():
            print(f"\n## Seed {seed}: the number of seen concepts ({name} / aligned)\n\n{sweep_table(rows)}")
    if len(results) > 1:
        means = mean_rows([r["variants"] for r in results.values()])
        print(f"\n## Mean over seeds {', '.join(map(str, results))} (concept counts summed)\n\n{variant_table(means)}")


if __name__ == "__main__":
    main()
