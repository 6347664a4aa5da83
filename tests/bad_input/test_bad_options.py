"""Bad option values, devices and paths: refused by name before any work, never a traceback.

Every field of every settings class is tried with values of the wrong type and just
outside its bounds (read from the field's metadata, so a new field is covered the day it
is added), from Python and from the command line; legal values that are almost surely
mistakes warn; devices this machine lacks and paths of the wrong kind name themselves.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from lavise import compute as compute_module
from lavise.checks import SettingError, SettingWarning, describe_bounds, parse_bounds, within
from lavise.cli import COMMANDS, _parser, main
from lavise.errors import LaviseError, LaviseWarning
from lavise.settings import (
    BiasDemoSettings, ComputeSettings, DemoSettings, EvaluateSettings, ExplainSettings, GroupSettings,
    ModelComparisonSettings, ReferenceSettings, ReportSettings, SceneSettings, TrainSettings,
)

CHECKED = (TrainSettings, ExplainSettings, ComputeSettings, EvaluateSettings, GroupSettings, ModelComparisonSettings,
           ReportSettings, DemoSettings, BiasDemoSettings)
ALL = (*CHECKED, ReferenceSettings, SceneSettings)
# numeric fields with no bounds, and why: any finite margin trains (a negative one warns)
UNBOUNDED = {("TrainSettings", "margin")}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """The CLI's cache in the test's folder; its warning printer undone."""
    monkeypatch.setenv("LAVISE_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)


def _bad_values(field: dataclasses.Field) -> list:
    """Values a field must refuse: wrong types, non-finite numbers, just outside each bound."""
    kind = str(field.type).removesuffix(" | None")
    bounds, choices = field.metadata.get("bounds"), field.metadata.get("choices")
    bad: list = []
    if kind in ("int", "float"):
        bad += [True, "3", None] if "None" not in str(field.type) else [True, "3"]
        bad += [2.5] if kind == "int" else [math.nan, math.inf, -math.inf]
        if bounds:
            low, high, closed_low, closed_high = parse_bounds(bounds)
            step = 1 if kind == "int" else 1e-9
            if low is not None:
                bad.append(type(1 if kind == "int" else 1.0)(low - step if closed_low else low))
            if high is not None:
                bad.append(type(1 if kind == "int" else 1.0)(high + step if closed_high else high))
    elif kind == "bool":
        bad += [1, "yes", None]
    elif kind == "str":
        bad += [3] + (["nonsense"] if choices else [])
    elif kind == "tuple[str, ...]":
        bad += [(), "plain", (3,)] + ([("nonsense",), (choices[0], choices[0])] if choices else [])
    elif kind in ("tuple[int, int]", "tuple[float, float]"):
        bad += [(3, 1), (1,), ("a", "b"), (math.nan, 2)]
        if bounds and parse_bounds(bounds)[0] is not None:
            bad.append((parse_bounds(bounds)[0] - 1, 5))
    return bad


CASES = [pytest.param(cls, f.name, value, id=f"{cls.__name__}.{f.name}={value!r}")
         for cls in CHECKED for f in dataclasses.fields(cls) for value in _bad_values(f)]


def test_the_corpus_covers_every_field():
    covered = {(c.values[0].__name__, c.values[1]) for c in CASES}
    every = {(cls.__name__, f.name) for cls in CHECKED for f in dataclasses.fields(cls)}
    assert every == covered
    assert len(CASES) > 250


@pytest.mark.parametrize(("cls", "name", "value"), CASES)
def test_a_bad_value_is_refused_by_name(cls, name, value):
    with pytest.raises(SettingError) as error:
        cls(**{name: value})
    assert str(error.value).startswith(f"{cls.__name__}: ") and name in str(error.value)
    flag = "--" + name.replace("_", "-")
    assert flag in error.value.option and isinstance(error.value, LaviseError)


@pytest.mark.parametrize("cls", ALL)
def test_every_number_has_bounds(cls):
    """A numeric field without bounds would take -1 or 10**9 silently; the few that may are listed."""
    for f in dataclasses.fields(cls):
        numeric = str(f.type).removesuffix(" | None") in ("int", "float", "tuple[int, int]", "tuple[float, float]")
        if cls in CHECKED and numeric and (cls.__name__, f.name) not in UNBOUNDED:
            assert f.metadata.get("bounds"), f"{cls.__name__}.{f.name} has no bounds"


@pytest.mark.parametrize("cls", ALL)
def test_defaults_and_bounds_themselves_are_accepted_without_warnings(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls()
        for f in dataclasses.fields(cls):
            bounds = f.metadata.get("bounds")
            kind = str(f.type)
            if bounds and kind in ("int", "float"):
                low, high, closed_low, closed_high = parse_bounds(bounds)
                for edge, closed in ((low, closed_low), (high, closed_high)):
                    if edge is not None and closed:
                        value = int(edge) if kind == "int" else float(edge)
                        if (cls.__name__, f.name, value) not in LEGAL_BUT_WARNED:
                            assert getattr(cls(**{f.name: value}), f.name) == value


LEGAL_BUT_WARNED = {("TrainSettings", "learning_rate", 0.0), ("TrainSettings", "dropout", 1.0),
                    ("TrainSettings", "validation_fraction", 1.0), ("DemoSettings", "explainer_learning_rate", 0.0),
                    ("BiasDemoSettings", "explainer_learning_rate", 0.0)}


def test_numbers_are_normalised_to_python_types():
    import numpy as np

    settings = TrainSettings(epochs=np.int64(3), learning_rate=np.float32(0.5), dropout=0)
    assert type(settings.epochs) is int and type(settings.learning_rate) is float and type(settings.dropout) is float
    assert EvaluateSettings(methods=["original"]).methods == ("original",)
    assert ExplainSettings(vocabulary_file=Path("words.txt")).vocabulary_file == "words.txt"
    assert TrainSettings(epochs=3) == TrainSettings(epochs=np.int64(3))


@pytest.mark.parametrize(
    ("cls", "name", "value", "says"),
    [
        (TrainSettings, "learning_rate", 0, "nothing will be learned"),
        (TrainSettings, "dropout", 1, "nothing will be learned"),
        (TrainSettings, "margin", -1, "negative margin"),
        (TrainSettings, "validation_fraction", 1, "all but one image"),
        (TrainSettings, "validation_fraction", 0.75, "more reference images are held out"),
        (DemoSettings, "explainer_learning_rate", 0, "nothing will be learned"),
        (BiasDemoSettings, "explainer_learning_rate", 0.0, "nothing will be learned"),
    ],
)
def test_legal_mistakes_warn(cls, name, value, says):
    with pytest.warns(SettingWarning, match=says) as caught:
        cls(**{name: value})
    assert f"{name}=" in str(caught[0].message) and issubclass(caught[0].category, LaviseWarning)
    assert caught[0].message.option.startswith("--" + name.replace("_", "-"))


def test_learning_rates_above_one_are_refused_as_typos():
    for value in (1.5, 10, 1e3):
        with pytest.raises(SettingError, match=r"learning_rate must be in \[0, 1\]"):
            TrainSettings(learning_rate=value)
    assert TrainSettings(learning_rate=1).learning_rate == 1.0


def test_intervals_read_and_say_what_they_mean():
    assert [within(v, "(0, 1]") for v in (0, 0.5, 1, 1.5)] == [False, True, True, False]
    assert within(-5, "(, 0]") and not within(1, "(, 0]")
    assert describe_bounds("(0, )", False) == "greater than 0"
    assert describe_bounds("[16, 1024]", True) == "between 16 and 1024"
    assert describe_bounds("[0, 1)", False) == "in [0, 1)"
    with pytest.raises(ValueError):
        parse_bounds("0..1")


# --- the command line ------------------------------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lavise: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def places(tmp_path) -> dict:
    """An empty run folder, target folder and reference folder: enough to reach the checks."""
    for name in ("run", "target", "reference"):
        (tmp_path / name).mkdir()
    return {name: str(tmp_path / name) for name in ("run", "target", "reference")}


def _command(name: str, places: dict, tmp_path: Path) -> list[str]:
    out = str(tmp_path / "out")
    return {
        "train": ["train", "--layer", "layer4", "--reference", places["reference"], "--out", out],
        "explain": ["explain", places["run"], "--target", places["target"]],
        "evaluate": ["evaluate", places["run"], "--dataset", places["reference"]],
        "report": ["report", places["run"]],
        "compare-groups": ["compare-groups", places["run"], "--target", places["target"]],
        "compare-models": ["compare-models", places["run"], places["run"], "--out", out],
        "demo": ["demo", "--out", out],
        "demo-bias": ["demo-bias", "--out", out],
        "synth": ["synth", "--out", out],
    }[name]


OPTION_CASES = [
    ("train", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("train", ["--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
    ("train", ["--threads", "-1"], "--threads must be at least 0, got -1"),
    ("train", ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("train", ["--train-batch-size", "0"], "--train-batch-size must be at least 1"),
    ("train", ["--learning-rate", "-0.001"], r"--learning-rate must be in \[0, 1\], got -0.001"),
    ("train", ["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
    ("train", ["--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
    ("train", ["--learning-rate", "1000"], r"--learning-rate must be in \[0, 1\], got 1000.0"),
    ("train", ["--dropout", "1.5"], r"--dropout must be in \[0, 1\], got 1.5"),
    ("train", ["--dropout", "nan"], "--dropout must be a finite number"),
    ("train", ["--margin", "nan"], "--margin must be a finite number"),
    ("train", ["--unseen-fraction", "1"], r"--unseen-fraction must be in \[0, 1\)"),
    ("train", ["--validation-fraction", "-0.1"], "--validation-fraction must be in"),
    ("train", ["--seed", "-1"], "--seed must be between 0 and 4294967295"),
    ("train", ["--activation-regions", "-2"], "--activation-regions must be at least 0"),
    ("train", ["--region-quantile", "0"], r"--region-quantile must be in \(0, 1\)"),
    ("train", ["--memory-budget", "nan"], "--memory-budget must be a finite number"),
    ("train", ["--memory-budget", "-1"], "--memory-budget must be at least 0"),
    ("explain", ["--top-images", "0"], "--top-images must be at least 1"),
    ("explain", ["--words-per-image", "0"], "--words-per-image must be at least 1"),
    ("explain", ["--top-words", "0"], "--top-words must be at least 1"),
    ("explain", ["--quantile", "1"], r"--quantile must be in \(0, 1\)"),
    ("explain", ["--quantile", "nan"], "--quantile must be a finite number"),
    ("explain", ["--vocabulary-size", "-1"], "--vocabulary-size must be at least 0"),
    ("explain", ["--alignment-ridge", "0"], "--alignment-ridge must be greater than 0"),
    ("explain", ["--hub-neighbours", "0"], "--hub-neighbours must be at least 1"),
    ("explain", ["--abstain-precision", "1"], r"--abstain-precision must be in \[0, 1\)"),
    ("explain", ["--calibration-seed", "-3"], "--calibration-seed must be between 0"),
    ("explain", ["--batch-size", "-4"], "--batch-size must be at least 1"),
    ("evaluate", ["--iou-threshold", "1"], r"--iou-threshold must be in \[0, 1\)"),
    ("evaluate", ["--iou-size", "0"], "--iou-size must be at least 1"),
    ("evaluate", ["--labelling-fraction", "1"], r"--labelling-fraction must be in \[0, 1\)"),
    ("evaluate", ["--split-seed", "-1"], "--split-seed must be between 0"),
    ("evaluate", ["--annotated-fractions", "0.5", "0"], r"--annotated-fractions must be in \(0, 1\], got 0.0"),
    ("evaluate", ["--annotated-fractions", "nan"], "--annotated-fractions must be a finite number"),
    ("evaluate", ["--top-images", "0"], "--top-images must be at least 1"),
    ("report", ["--thumbnail-size", "8"], "--thumbnail-size must be between 16 and 1024, got 8"),
    ("report", ["--jpeg-quality", "100"], "--jpeg-quality must be between 1 and 95, got 100"),
    ("report", ["--examples-per-group", "-1"], "--examples-per-group must be at least 0"),
    ("compare-groups", ["--fdr", "0"], r"--fdr must be in \(0, 1\)"),
    ("compare-groups", ["--confidence", "1"], r"--confidence must be in \(0, 1\)"),
    ("compare-groups", ["--min-group-images", "0"], "--min-group-images must be at least 1"),
    ("compare-groups", ["--concept-words", "0"], "--concept-words must be at least 1"),
    ("compare-groups", ["--examples", "-1"], "--examples must be at least 0"),
    ("compare-groups", ["--chart-filters", "-1"], "--chart-filters must be at least 0"),
    ("compare-models", ["--words-per-filter", "0"], "--words-per-filter must be at least 1"),
    ("compare-models", ["--matches", "0"], "--matches must be at least 1"),
    ("demo", ["--reference-images", "0"], "--reference-images must be at least 1"),
    ("demo", ["--scene-cnn-epochs", "0"], "--scene-cnn-epochs must be at least 1"),
    ("demo", ["--explainer-learning-rate", "nan"], "--explainer-learning-rate must be a finite number"),
    ("demo", ["--unseen-fraction", "1"], r"--unseen-fraction must be in \[0, 1\)"),
    ("demo-bias", ["--classifier-batch-size", "1"], "--classifier-batch-size must be at least 2"),
    ("demo-bias", ["--target-images", "1"], "--target-images must be at least 2"),
    ("demo-bias", ["--concepts-per-image", "3", "1"], "--concepts-per-image must be a pair"),
    ("demo-bias", ["--planted", "dog"], "--planted: group_bias item 'dog' has no '='"),
    ("demo-bias", ["--pretrain-epochs", "-1"], "--pretrain-epochs must be at least 0"),
    ("synth", ["--vocabulary-size", "-1"], "--vocabulary-size must be at least 0"),
    ("synth", ["--image-size", "16"], "--image-size must be an integer of at least 32"),
    ("synth", ["--min-visible-fraction", "nan"], r"--min-visible-fraction must be a number in \[0, 1\]"),
    ("synth", ["--group-bias", "dog=2:0"], "--group-bias: group_bias probabilities of 'dog' must lie in"),
]


@pytest.mark.parametrize(("command", "option", "message"), OPTION_CASES, ids=[f"{c} {' '.join(o)}" for c, o, _ in OPTION_CASES])
def test_a_bad_option_is_one_error_line_naming_it(command, option, message, places, tmp_path, capsys):
    assert main([*_command(command, places, tmp_path), *option, "--device", "cpu"] if command in ("train", "explain", "evaluate")
                else [*_command(command, places, tmp_path), *option]) == 2
    line = _error_line(capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "env-cache").exists()  # refused before any work


def _subparsers() -> dict:
    return next(a for a in _parser()._actions if a.dest == "command").choices


def _outside(f: dataclasses.Field) -> str:
    """A value just below a field's lower bound, as typed on the command line."""
    low, _, closed_low, _ = parse_bounds(f.metadata["bounds"])
    if str(f.type) == "int":
        return str(int(low) - 1 if closed_low else int(low))
    return str(low - 0.5 if closed_low else low)


GENERIC = [pytest.param(name, f, id=f"{name} --{f.name.replace('_', '-')}")
           for name, parser in _subparsers().items() for cls in parser.get_default("settings_types") or ()
           for f in dataclasses.fields(cls)
           if str(f.type) in ("int", "float") and f.metadata.get("bounds") and parse_bounds(f.metadata["bounds"])[0] is not None]


def test_every_command_with_settings_is_in_the_corpus():
    with_settings = {name for name, parser in _subparsers().items() if parser.get_default("settings_types")}
    assert with_settings == {name for name, *_ in COMMANDS} - {"layers"}
    assert {c for c, _, _ in OPTION_CASES} == with_settings
    # synth's SceneSettings checks its fields itself (OPTION_CASES and test_synthetic try them)
    assert {p.values[0] for p in GENERIC} == with_settings - {"synth"} and len(GENERIC) > 90


@pytest.mark.parametrize(("command", "f"), GENERIC)
def test_every_bounded_option_of_every_command_is_refused_below_its_bound(command, f, places, tmp_path, capsys):
    flag = "--" + f.name.replace("_", "-")
    args = [*_command(command, places, tmp_path), flag, _outside(f)]
    assert main(args) == 2
    line = _error_line(capsys)
    assert f"error: {flag} must be" in line and "SettingError" not in line, line


def test_a_legal_mistake_warns_naming_the_option(places, tmp_path, capsys):
    code = main([*_command("train", places, tmp_path), "--learning-rate", "0", "--dropout", "1", "--margin", "-1",
                 "--validation-fraction", "1", "--num-workers", "0", "--device", "cpu"])
    assert code == 2  # the empty reference folder, after the warnings
    err = capsys.readouterr().err
    for option in ("--learning-rate 0.0:", "--dropout 1.0:", "--margin -1.0:", "--validation-fraction 1.0:"):
        assert f"lavise: warning: {option}" in err, err
    assert "has no sub-folders" in err


# --- devices -----------------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", "mps", "xla"])
def test_a_device_this_machine_lacks_is_refused_listing_those_it_has(no_gpu, device):
    with pytest.raises(LaviseError, match=rf"Device '{device}' is not on this machine; it has cpu \("):
        compute_module.resolve_device(device)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1", "", "CPU ", "meta"])
def test_an_unknown_device_is_refused(no_gpu, device):
    with pytest.raises(LaviseError, match="(Unknown device|holds no data).*this machine has cpu"):
        compute_module.resolve_device(device)


def test_one_gpu_machine_refuses_the_fourth(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert compute_module.resolve_device("cuda:0") == torch.device("cuda:0")
    assert compute_module.resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(LaviseError, match="'cuda:3' is not on this machine; it has cpu, cuda:0"):
        compute_module.resolve_device("cuda:3")
    assert compute_module.resolve_device("auto") == torch.device("cuda")


def test_no_gpu_auto_and_cpu_work(no_gpu):
    assert compute_module.resolve_device("auto") == torch.device("cpu")
    assert compute_module.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("command", ["train", "explain", "evaluate", "report", "compare-groups", "compare-models", "demo"])
def test_the_cli_refuses_a_missing_device_first(no_gpu, command, places, tmp_path, capsys):
    assert main([*_command(command, places, tmp_path), "--device", "cuda:7"]) == 2
    line = _error_line(capsys)
    assert "Device 'cuda:7' is not on this machine; it has cpu" in line


@pytest.fixture
def opened(monkeypatch):
    """Counts the images Pillow opens."""
    count = []
    original = Image.open

    def counting(*args, **kwargs):
        count.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return count


def test_train_and_explain_refuse_a_missing_device_before_reading_an_image(no_gpu, opened, tiny_model, coco, tiny_run,
                                                                            targets, tmp_path):
    from lavise.datasets import open_reference
    from lavise.explain import explain
    from lavise.runs import train

    bad = ComputeSettings(device="cuda:1", num_workers=0, progress=False)
    opened.clear()
    with pytest.raises(LaviseError, match="'cuda:1' is not on this machine"):
        train(tiny_model, "features.3", open_reference(coco), tmp_path / "new-run", settings=TrainSettings(epochs=1),
              compute=bad, cache_dir=tmp_path / "fresh-cache")
    assert opened == []
    with pytest.raises(LaviseError, match="'cuda:1' is not on this machine"):
        explain(tiny_run, targets, compute=bad, model=tiny_model, cache_dir=tmp_path / "fresh-cache")
    assert opened == []
    explain(tiny_run, targets, settings=ExplainSettings(top_images=3), compute=dataclasses.replace(bad, device="cpu"),
            model=tiny_model, cache_dir=tmp_path / "fresh-cache")
    assert opened  # the counter counts


# --- paths -------------------------------------------------------------------------------


def test_outputs_that_are_existing_files_are_refused(places, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a user's file")
    for command in ("train", "compare-models", "demo", "demo-bias", "synth"):
        args = _command(command, places, tmp_path)
        args[args.index("--out") + 1] = str(taken)
        assert main(args) == 2
        assert f"--out '{taken}' is an existing file; give a folder" in _error_line(capsys)
    for command in ("report", "compare-groups"):
        assert main([*_command(command, places, tmp_path), "--out", str(taken)]) == 2
        assert f"--out '{taken}' is an existing file" in _error_line(capsys)
    assert main([*_command("explain", places, tmp_path), "--cache-dir", str(taken)]) == 2
    assert f"--cache-dir '{taken}' is an existing file" in _error_line(capsys)
    assert taken.read_text() == "a user's file"


def test_an_output_file_that_is_a_folder_is_refused(places, tmp_path, capsys):
    assert main([*_command("evaluate", places, tmp_path), "--out", places["target"]]) == 2
    assert f"--out '{places['target']}' is a folder; give the file to write" in _error_line(capsys)


@pytest.mark.parametrize(
    ("command", "option", "kind", "message"),
    [
        ("explain", "--target", "missing", "--target '{}' does not exist"),
        ("explain", "--target", "file", "--target '{}' is a file, not a folder"),
        ("explain", "RUN_DIR", "file", "RUN_DIR '{}' is a file, not a run directory"),
        ("evaluate", "RUN_DIR", "file", "RUN_DIR '{}' is a file, not a run directory"),
        ("evaluate", "--dataset", "missing", "--dataset '{}' does not exist"),
        ("evaluate", "--dataset-images", "file", "--dataset-images '{}' is a file, not a folder"),
        ("evaluate", "--sweep-reference", "missing", "--sweep-reference '{}' does not exist"),
        ("train", "--reference", "missing", "--reference '{}' does not exist"),
        ("train", "--reference-images", "missing", "--reference-images '{}' does not exist"),
        ("train", "--checkpoint", "missing", "--checkpoint '{}' does not exist"),
        ("train", "--checkpoint", "folder", "--checkpoint '{}' is a folder, not a file"),
        ("train", "--word-vectors", "missing", "--word-vectors '{}' does not exist"),
        ("train", "--word-vectors", "folder", "--word-vectors '{}' is a folder, not a file"),
        ("report", "--evaluation", "folder", "--evaluation '{}' is a folder, not a file"),
        ("report", "--groups", "missing", "--groups '{}' does not exist"),
        ("report", "--target", "file", "--target '{}' is a file, not a folder"),
        ("compare-groups", "--groups", "folder", "--groups '{}' is a folder, not a file"),
        ("compare-groups", "--target", "missing", "--target '{}' does not exist"),
        ("compare-models", "--target", "file", "--target '{}' is a file, not a folder"),
        ("explain", "--vocabulary-file", "folder", "--vocabulary-file '{}' is a folder, not a file"),
        ("explain", "--vocabulary-file", "missing", "--vocabulary-file '{}' does not exist"),
    ],
)
def test_input_paths_of_the_wrong_kind_name_the_argument(command, option, kind, message, places, tmp_path, capsys):
    path = {"missing": tmp_path / "nowhere", "file": tmp_path / "a-file", "folder": tmp_path / "a-folder"}[kind]
    path.write_text("x") if kind == "file" else path.mkdir() if kind == "folder" else None
    args = _command(command, places, tmp_path)
    if option == "RUN_DIR":
        args[1] = str(path)
    elif option in args:
        args[args.index(option) + 1] = str(path)
    else:
        args += [option, str(path)]
    assert main(args) == 2
    assert message.format(path) in _error_line(capsys)


def test_evaluate_names_its_own_image_options(coco, places, tmp_path, capsys):
    """The readers speak of train's --reference-images; evaluate's options are --dataset-images and friends."""
    lonely = tmp_path / "lonely" / "instances.json"
    lonely.parent.mkdir()
    lonely.write_bytes(Path(coco).read_bytes())  # no images folder beside it
    assert main(["evaluate", places["run"], "--dataset", str(lonely), "--device", "cpu"]) == 2
    line = _error_line(capsys)
    assert "pass --dataset-images" in line and "--reference-images" not in line
    (tmp_path / "classes" / "dog").mkdir(parents=True)
    assert main(["evaluate", places["run"], "--dataset", str(tmp_path / "classes"), "--dataset-format", "folder",
                 "--dataset-images", places["target"], "--device", "cpu"]) == 2
    line = _error_line(capsys)
    assert "--dataset-images is not used by the folder format" in line


def _mentioned_options() -> dict[str, str]:
    """Every --option that a string of lavise's source mentions, with the file saying it."""
    import ast
    import re

    import lavise

    found = {}
    for path in Path(lavise.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "pip install" not in node.value:
                for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", node.value):
                    found.setdefault(option, path.name)
    return found


def test_every_option_a_message_names_exists():
    known = {o for parser in _subparsers().values() for o in parser._option_string_actions}
    known |= {o.replace("--no-", "--") for o in known}
    mentioned = _mentioned_options()
    assert len(mentioned) >= 10  # the scan finds them (e.g. --min-group-images, --dataset-images)
    assert {o: where for o, where in mentioned.items() if o not in known} == {}
