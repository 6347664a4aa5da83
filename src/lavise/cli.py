"""The `lavise` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from lavise.errors import LaviseError
from lavise.demo import DemoSettings
from lavise.settings import ComputeSettings, ExplainSettings, TrainSettings
from lavise.synthetic import SceneSettings


def _add_settings(parser: argparse.ArgumentParser, settings_type, title: str, exclude: tuple[str, ...] = ()) -> None:
    """One option per settings field; defaults and help come from the dataclass."""
    group = parser.add_argument_group(title)
    for f in fields(settings_type):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        elif isinstance(default, tuple):
            nargs = "+" if isinstance(default[0], str) else len(default)
            group.add_argument(flag, dest=f.name, type=type(default[0]), nargs=nargs, default=default,
                               choices=f.metadata.get("choices"), help=help_text)
        else:
            kind = type(default) if default is not None else str
            group.add_argument(flag, dest=f.name, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text)


def _add_compute(parser: argparse.ArgumentParser) -> None:
    """The compute options, and where features are cached."""
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: $LAVISE_CACHE or ~/.cache/lavise)")
    _add_settings(parser, ComputeSettings, "compute")


def _settings(args: argparse.Namespace, settings_type):
    values = {f.name: getattr(args, f.name) for f in fields(settings_type) if hasattr(args, f.name)}
    return settings_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavise",
        description="Explain in words what each filter of a CNN layer has learned (LaViSE).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train an explainer for one layer on reference data")
    train.add_argument("--model", default="resnet18", help="torchvision model name, or efficientnet_lite0 (default: resnet18)")
    train.add_argument("--weights", default=None, help="weight name, e.g. IMAGENET1K_V1 (default: random initialisation)")
    train.add_argument("--checkpoint", default=None, help="local state_dict file to load into the model")
    train.add_argument("--layer", required=True, help="dotted path of the layer, e.g. layer4 or features.28")
    from lavise.datasets import REFERENCE_FORMATS, ReferenceSettings

    train.add_argument("--reference", required=True, type=Path,
                       help="COCO instances JSON, Visual Genome or Broden folder, manifest (.csv/.jsonl), "
                            "or a folder with one sub-folder per class (see docs/datasets.md)")
    train.add_argument("--reference-images", type=Path, default=None,
                       help="image folder of a COCO (default: 'images' beside the JSON), Visual Genome "
                            "(holding VG_100K/; default: the dataset folder) or manifest reference")
    train.add_argument("--reference-format", choices=REFERENCE_FORMATS, default=None, help="default: guessed from --reference")
    _add_settings(train, ReferenceSettings, "reference data")
    train.add_argument("--word-vectors", default="glove-6b-50d", help="glove-6b-50d (built in) or a GloVe/word2vec text file")
    train.add_argument("--out", required=True, type=Path, help="run directory to write")
    _add_settings(train, TrainSettings, "training")
    _add_compute(train)

    explain = commands.add_parser("explain", help="name every filter of a trained run from unlabelled images")
    explain.add_argument("run", type=Path, metavar="RUN_DIR", help="a directory written by 'lavise train'")
    explain.add_argument("--target", required=True, type=Path, help="folder of target images (searched recursively)")
    _add_settings(explain, ExplainSettings, "explanation")
    _add_compute(explain)

    demo = commands.add_parser("demo", help="the built-in demo: planted-concept scenes, two real targets, offline")
    demo.add_argument("--out", type=Path, default=Path("lavise-demo"), help="output folder (default: lavise-demo)")
    _add_settings(demo, DemoSettings, "demo")
    _add_settings(demo, ComputeSettings, "compute")

    synth = commands.add_parser("synth", help="generate planted-concept scenes in COCO format")
    synth.add_argument("--out", type=Path, required=True, help="output folder (images/, annotations.json, split.json)")
    synth.add_argument("--part", choices=("reference", "evaluation"), default="reference",
                       help="reference: seen concepts only (for training); evaluation: all concepts")
    synth.add_argument("--vocabulary-size", type=int, default=20_000,
                       help="only concepts among the N most frequent clean GloVe words (0: any; default: 20000)")
    _add_settings(synth, SceneSettings, "scenes")

    layers = commands.add_parser("layers", help="list a model's layers with their output shapes")
    layers.add_argument("model", help="torchvision model name, or efficientnet_lite0")

    for name, handler in (("train", _train), ("explain", _explain), ("demo", _demo), ("synth", _synth), ("layers", _layers)):
        commands.choices[name].set_defaults(handler=handler)
    # Commands of the analysis modules: each adds its parser and sets its own handler.
    _add_groups_commands(commands)
    _add_report_commands(commands)
    _add_evaluate_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.handler(args)
    except LaviseError as error:
        print(f"lavise: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lavise: interrupted", file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lavise: warning: {message}", file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    from lavise.datasets import ReferenceSettings, open_reference
    from lavise.models import ModelSpec
    from lavise.runs import train

    reference = open_reference(
        args.reference, images=args.reference_images, format=args.reference_format,
        settings=_settings(args, ReferenceSettings), cache_dir=args.cache_dir,
    )
    run = train(
        ModelSpec(args.model, args.weights, str(args.checkpoint) if args.checkpoint else None),
        args.layer,
        reference,
        args.out,
        word_vectors=args.word_vectors,
        settings=_settings(args, TrainSettings),
        compute=_settings(args, ComputeSettings),
        cache_dir=args.cache_dir,
    )
    config = run.config
    print(f"\nTrained an explainer for {config['model']['name']} {config['layer']} "
          f"({config['feature_shape'][0]} filters, grid {config['feature_shape'][1]}x{config['feature_shape'][2]})")
    print(f"  reference: {repr(reference)}")
    regional = config["training_rows"] - config["training_pairs"]
    rows = f" and {regional} activation-region rows" if regional else ""
    print(f"  concepts: {len(run.split['seen'])} seen, {len(run.split['unseen'])} unseen; "
          f"{config['training_pairs']} training pairs{rows}; best epoch {config['best_epoch']}")
    print(f"  run directory: {run.path}")
    print(f"Next: lavise explain {run.path} --target IMAGE_FOLDER")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from lavise.explain import explain

    explanations = explain(
        args.run, args.target, settings=_settings(args, ExplainSettings),
        compute=_settings(args, ComputeSettings), cache_dir=args.cache_dir,
    )
    print_summary(explanations)
    return 0


def print_summary(explanations, examples: int = 8) -> None:
    """Where the outputs are, how many filters, and the most consistent explanations."""
    from lavise.explain import consistency

    filters = explanations.filters
    active = [f for f in filters if f.active]
    print(f"\nExplained {len(filters)} filters of {explanations.model} {explanations.layer} "
          f"with {explanations.method} ({len(filters) - len(active)} never active)")
    ranked = sorted(active, key=lambda f: (-consistency(f.words), f.filter))
    print("  (word (n/m): the nearest word on n of the filter's top images, among the nearest on m)")
    for f in ranked[:examples]:
        words = ", ".join(f"{w['word']} ({w['first']}/{w['count']})" for w in f.words[:5])
        print(f"  filter {f.filter:4d}: {words}")
    if explanations.path is not None:
        print(f"Written: {explanations.path} and {explanations.path.with_suffix('.csv')}")


def _demo(args: argparse.Namespace) -> int:
    from lavise.demo import run_demo

    run_demo(args.out, _settings(args, DemoSettings), _settings(args, ComputeSettings))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from lavise.embeddings import load_word_vectors
    from lavise.synthetic import generate_scenes

    allowed = load_word_vectors().vocabulary(size=args.vocabulary_size).words if args.vocabulary_size else None
    out = generate_scenes(args.out, _settings(args, SceneSettings), part=args.part, allowed_words=allowed)
    print(f"Scenes written to {out} (annotations.json, images/, split.json)")
    return 0


def _layers(args: argparse.Namespace) -> int:
    from lavise.models import ModelSpec, layer_shapes, load_target_model

    model = load_target_model(ModelSpec(args.model))  # shapes do not depend on weights
    for name, shape in layer_shapes(model.module, model.preprocessing.crop_size):
        print(f"{name:40s} {' x '.join(str(s) for s in shape)}")
    return 0


def _add_evaluate_commands(commands) -> None:
    from lavise.datasets import REFERENCE_FORMATS, ReferenceSettings
    from lavise.settings import EvaluateSettings

    evaluate = commands.add_parser(
        "evaluate", help="score explanations against annotated images: IoU ground truth, recall@k, baselines, NetDissect"
    )
    evaluate.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="trained runs (several layers at once)")
    evaluate.add_argument("--dataset", required=True, type=Path, help="annotated evaluation images: COCO JSON or any reference format")
    evaluate.add_argument("--dataset-images", type=Path, default=None, help="image folder of a COCO dataset (default: 'images' beside the JSON)")
    evaluate.add_argument("--dataset-format", choices=REFERENCE_FORMATS, default=None, help="default: guessed from --dataset")
    evaluate.add_argument("--out", type=Path, default=None, help="also save the combined Markdown table of all runs here")
    evaluate.add_argument("--annotated-fractions", type=float, nargs="+", default=None, metavar="F",
                          help="Figure 7: retrain with these shares of reference concepts annotated and score unseen concepts")
    evaluate.add_argument("--sweep-reference", type=Path, default=None, help="reference data to retrain on for the sweep")
    evaluate.add_argument("--sweep-reference-images", type=Path, default=None, help="image folder of a COCO sweep reference")
    _add_settings(evaluate, ReferenceSettings, "evaluation data (format options, as for train)")
    _add_settings(evaluate, EvaluateSettings, "evaluation")
    _add_settings(evaluate, ExplainSettings, "explanation", exclude=("method",))
    _add_compute(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from lavise.datasets import ReferenceSettings, open_reference
    from lavise.evaluate import annotated_fraction_sweep, evaluate, markdown_table
    from lavise.settings import EvaluateSettings
    from lavise.storage import atomic_path

    if args.annotated_fractions and args.sweep_reference is None:
        raise LaviseError("--annotated-fractions retrains the explainer: pass its reference data with --sweep-reference.")
    reference_settings = _settings(args, ReferenceSettings)
    dataset = open_reference(args.dataset, images=args.dataset_images, format=args.dataset_format,
                             settings=reference_settings, cache_dir=args.cache_dir)
    settings, explain_settings = _settings(args, EvaluateSettings), _settings(args, ExplainSettings)
    compute = _settings(args, ComputeSettings)
    evaluations = evaluate(
        args.runs, dataset, settings=settings, explain_settings=explain_settings, compute=compute, cache_dir=args.cache_dir
    )
    table = markdown_table(evaluations)
    print("\nExact-match recall over filters with ground truth (IoU > "
          f"{settings.iou_threshold}); lenient accepts WordNet plurals and synonyms.\n")
    print(table)
    for evaluation in evaluations:
        print(f"Written: {evaluation.path} (and evaluation.md, evaluation.png)")
    if args.out is not None:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table)
        print(f"Written: {args.out}")
    if args.annotated_fractions:
        reference = open_reference(args.sweep_reference, images=args.sweep_reference_images,
                                   settings=reference_settings, cache_dir=args.cache_dir)
        for run_dir in args.runs:
            annotated_fraction_sweep(
                run_dir, reference, dataset, args.annotated_fractions, settings=settings,
                explain_settings=explain_settings, compute=compute, cache_dir=args.cache_dir,
            )
            print(f"\nAnnotated-fraction sweep of {run_dir}:\n")
            print((Path(run_dir) / "sweep.md").read_text())
    return 0


def _add_report_commands(commands) -> None:
    from lavise.report import ReportSettings

    report = commands.add_parser("report", help="write an HTML report to browse every filter with its images, words and scores")
    report.add_argument("run", type=Path, metavar="RUN_DIR", help="a run directory after 'lavise explain'")
    report.add_argument("--out", type=Path, default=None, help="report folder (default: RUN_DIR/report)")
    report.add_argument("--target", type=Path, default=None,
                        help="where the target images are now, if they moved since 'explain' (default: the folder it used)")
    report.add_argument("--evaluation", type=Path, default=None, help="an evaluation.json (default: the run's, if any)")
    report.add_argument("--groups", type=Path, default=None, help="a groups.json (default: the run's, if any)")
    _add_settings(report, ReportSettings, "report")
    _add_compute(report)
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from lavise.report import ReportSettings, write_report

    index = write_report(
        args.run, out=args.out, settings=_settings(args, ReportSettings), compute=_settings(args, ComputeSettings),
        cache_dir=args.cache_dir, target=args.target, evaluation=args.evaluation, groups=args.groups,
    )
    print(f"Report written: {index}")
    print(f"Open it in a browser: {index.resolve().as_uri()}")
    return 0


def _add_groups_commands(commands) -> None:
    from lavise.bias_demo import BiasDemoSettings
    from lavise.groups import GroupSettings, ModelComparisonSettings

    groups = commands.add_parser("compare-groups", help="find the filters and concepts that tell groups of images apart")
    groups.add_argument("run", type=Path, metavar="RUN_DIR", help="a run directory after 'lavise explain'")
    groups.add_argument("--target", required=True, type=Path, help="folder holding the images of every group")
    groups.add_argument("--groups", type=Path, default=None,
                        help="CSV of image,group rows, paths relative to --target (default: one sub-folder of --target per group)")
    groups.add_argument("--out", type=Path, default=None, help="folder for groups.json/.csv/.png (default: RUN_DIR)")
    _add_settings(groups, GroupSettings, "group comparison")
    _add_compute(groups)
    groups.set_defaults(handler=_compare_groups)

    models = commands.add_parser("compare-models", help="compare the concepts two explained runs' filters are named by")
    models.add_argument("runs", type=Path, nargs=2, metavar="RUN_DIR", help="two run directories after 'lavise explain'")
    models.add_argument("--out", required=True, type=Path, help="folder for models.json and models.csv")
    models.add_argument("--target", type=Path, default=None,
                        help="images to match filters on by peak-activation correlation (default: match by words)")
    _add_settings(models, ModelComparisonSettings, "model comparison")
    _add_compute(models)
    models.set_defaults(handler=_compare_models)

    demo = commands.add_parser("demo-bias", help="plant a bias in two groups of scenes and find it without labels")
    demo.add_argument("--out", type=Path, default=Path("lavise-bias-demo"), help="output folder (default: lavise-bias-demo)")
    _add_settings(demo, BiasDemoSettings, "planted-bias demo")
    _add_settings(demo, ComputeSettings, "compute")
    demo.set_defaults(handler=_demo_bias)


def _compare_groups(args: argparse.Namespace) -> int:
    from lavise.groups import GroupSettings, compare_groups, format_comparison

    comparison = compare_groups(
        args.run, args.target, args.groups, settings=_settings(args, GroupSettings),
        compute=_settings(args, ComputeSettings), cache_dir=args.cache_dir, out=args.out,
    )
    print("\n" + format_comparison(comparison))
    print(f"\nWritten: {comparison.path} (and groups.csv, groups.png)")
    return 0


def _compare_models(args: argparse.Namespace) -> int:
    from lavise.groups import ModelComparisonSettings, compare_models

    comparison = compare_models(
        *args.runs, settings=_settings(args, ModelComparisonSettings), target=args.target,
        compute=_settings(args, ComputeSettings), cache_dir=args.cache_dir, out=args.out,
    )
    for key, run in zip(("a", "b"), args.runs):
        unique = comparison.unique[key]
        print(f"{key}: {run}: {len(comparison.concepts[key])} distinct concepts, {len(unique)} only here: "
              f"{', '.join(unique[:15])}{' ...' if len(unique) > 15 else ''}")
    print(f"shared: {len(comparison.shared)} concepts: {', '.join(comparison.shared[:15])}")
    print(f"best-matching filters (by {comparison.matched_by}):")
    for match in comparison.matches[:10]:
        print(f"  a {match.a:4d} <-> b {match.b:4d}  similarity {match.similarity:.2f}"
              + ("" if match.correlation is None else f", correlation {match.correlation:.2f}")
              + f"  {', '.join(match.words_a[:3])} | {', '.join(match.words_b[:3])}")
    print(f"Written: {comparison.path} and {comparison.path.with_suffix('.csv')}")
    return 0


def _demo_bias(args: argparse.Namespace) -> int:
    from lavise.bias_demo import BiasDemoSettings, run_bias_demo

    run_bias_demo(args.out, _settings(args, BiasDemoSettings), _settings(args, ComputeSettings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
