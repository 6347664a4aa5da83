"""The `lavise` command line: help, layers, train + explain end to end, and bad input."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from lavise.cli import main


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Keep the CLI's cache in the test's folder, and undo its warning printer."""
    monkeypatch.setenv("LAVISE_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)


FAST = ["--num-workers", "0", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("train", ["--layer", "--reference", "--unseen-fraction", "(default: 0.0)", "--epochs", "--no-progress", "--checkpoint",
                   "--activation-regions", "--region-quantile"]),
        ("explain", ["RUN_DIR", "--target", "--top-images", "--method", "cosine-attention", "--vocabulary-size", "(default: 20000)"]),
    ],
)
def test_help(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, text


def test_layers(capsys):
    assert main(["layers", "resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shapes = {line.split()[0]: line.split(None, 1)[1].strip() for line in lines}
    assert shapes["layer4"] == "512 x 7 x 7"
    assert shapes["layer3"] == "256 x 14 x 14"
    assert shapes["conv1"] == "64 x 112 x 112"
    assert "fc" not in shapes
    assert list(shapes)[0] == "conv1"


def test_train_and_explain_end_to_end(tmp_path, coco, targets, capsys):
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    code = main([
        "train", "--model", "resnet18", "--layer", "layer4", "--reference", str(coco), "--out", str(run),
        "--epochs", "2", "--cache-dir", str(cache), "--batch-size", "12", *FAST,
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "Trained an explainer for resnet18 layer4 (512 filters, grid 7x7)" in out
    assert "4 seen, 0 unseen; 48 training pairs" in out
    assert f"run directory: {run}" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == {"name": "resnet18", "weights": None, "checkpoint": None}
    assert config["train"]["epochs"] == 2 and config["feature_shape"] == [512, 7, 7]
    assert list(cache.glob("reference-*"))
    assert not (tmp_path / "env-cache").exists()  # --cache-dir wins over $LAVISE_CACHE

    code = main(["explain", str(run), "--target", str(targets), "--top-images", "3", "--cache-dir", str(cache), *FAST])
    assert code == 0
    out = capsys.readouterr().out
    assert "Explained 512 filters of resnet18 layer4 with activation" in out
    assert f"Written: {run / 'explanations.json'} and {run / 'explanations.csv'}" in out
    examples = out.split("  filter  confidence  words")[1].split("  ... and the least confident")[0]
    assert len(re.findall(r"^ +\d+  \d\.\d\d  ", examples, flags=re.M)) == 8  # the most trusted few
    assert "have a confident name (confidence >= " in out
    data = json.loads((run / "explanations.json").read_text())
    assert len(data["filters"]) == 512
    assert all(len(f["top_images"]) == 3 for f in data["filters"])
    assert data["settings"]["top_images"] == 3 and data["settings"]["ranking"] == "first-choice"

    # the paper's ranking, one option away: the same counts, ordered by count alone
    code = main(["explain", str(run), "--target", str(targets), "--top-images", "3", "--ranking", "frequency",
                 "--cache-dir", str(cache), *FAST])
    assert code == 0
    by_frequency = json.loads((run / "explanations.json").read_text())
    assert by_frequency["settings"]["ranking"] == "frequency"
    for first, frequency in zip(data["filters"], by_frequency["filters"]):
        counts = [w["count"] for w in frequency["words"]]
        assert counts == sorted(counts, reverse=True)
        shared = {w["word"]: (w["count"], w["first"]) for w in first["words"]}
        assert all(shared[w["word"]] == (w["count"], w["first"]) for w in frequency["words"] if w["word"] in shared)


def test_custom_module_run_needs_the_python_api(tiny_run, targets, capsys):
    # a run of a custom module cannot be rebuilt by the CLI: a clear error, exit status 2
    code = main(["explain", str(tiny_run.path), "--target", str(targets), *FAST])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "custom module" in line


def test_cache_defaults_to_the_environment(tmp_path, capsys):
    from PIL import Image

    for name, colour in (("dog", "red"), ("hot_dog", "blue"), ("cat", "green")):
        (tmp_path / "ref" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(tmp_path / "ref" / name / f"{i}.png")
    code = main([
        "train", "--model", "squeezenet1_1", "--layer", "features.12", "--reference", str(tmp_path / "ref"),
        "--out", str(tmp_path / "run"), "--epochs", "1", *FAST,
    ])
    assert code == 0
    assert len(list((tmp_path / "env-cache").glob("reference-*"))) == 1
    assert "3 seen, 0 unseen; 6 training pairs" in capsys.readouterr().out
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["seen"] == ["cat", "dog", "hot dog"]


def test_train_with_a_built_in_word_space_and_a_loss(tmp_path, capsys):
    from PIL import Image

    for name, colour in (("dog", "red"), ("hot_dog", "blue")):
        (tmp_path / "ref" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), colour).save(tmp_path / "ref" / name / f"{i}.png")
    code = main(["train", "--model", "squeezenet1_1", "--layer", "features.12", "--reference", str(tmp_path / "ref"),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--word-vectors", "minilm-l6-v2", "--loss", "softmax",
                 "--temperature", "0.05", *FAST])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["word_vectors"], config["word_dim"]) == ("minilm-l6-v2", 384)
    assert (config["train"]["loss"], config["train"]["temperature"]) == ("softmax", 0.05)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "squeezenet1_1", "--layer", "features.12", "--reference", str(tmp_path / "ref"),
              "--out", str(tmp_path / "run2"), "--loss", "ranking", *FAST])
    assert exit_.value.code == 2 and "invalid choice: 'ranking'" in capsys.readouterr().err


def test_train_with_activation_regions(tmp_path, capsys):
    from PIL import Image

    for name, colour in (("dog", "red"), ("cat", "green")):
        (tmp_path / "ref" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(tmp_path / "ref" / name / f"{i}.png")
    args = ["train", "--model", "squeezenet1_1", "--layer", "features.12", "--reference", str(tmp_path / "ref"),
            "--out", str(tmp_path / "run"), "--epochs", "1", *FAST]
    assert main([*args, "--activation-regions", "2", "--region-quantile", "0.1"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["train"]["activation_regions"], config["train"]["region_quantile"]) == (2, 0.1)
    regional = config["training_rows"] - config["training_pairs"]
    assert config["training_pairs"] == 6 and 0 < regional <= 12
    assert f"6 training pairs and {regional} activation-region rows" in capsys.readouterr().out

    assert main([*args, "--activation-regions", "-1"]) == 2
    assert "--activation-regions must be at least 0, got -1" in _one_error_line(capsys.readouterr().err)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lavise: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_layer_exits_2_with_close_names(tmp_path, coco, capsys):
    code = main([
        "train", "--model", "resnet18", "--layer", "layer9", "--reference", str(coco),
        "--out", str(tmp_path / "run"), "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), *FAST,
    ])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "Layer 'layer9' not found" in line and "layer4" in line
    assert not (tmp_path / "run").exists()


def test_unknown_model_exits_2(tmp_path, coco, capsys):
    code = main(["train", "--model", "resnet181", "--layer", "layer4", "--reference", str(coco), "--out", str(tmp_path / "run"), *FAST])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "Unknown model 'resnet181'" in line and "resnet18" in line


def test_empty_target_folder_exits_2(tmp_path, tiny_run, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code = main(["explain", str(tiny_run.path), "--target", str(empty), *FAST])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"Target folder '{empty}' holds no image files" in line


def test_missing_run_and_reference_exit_2(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "nowhere"), "--target", str(tmp_path), *FAST]) == 2
    assert "is not a lavise run" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "ref").mkdir()
    code = main(["train", "--layer", "layer4", "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "run"), *FAST])
    assert code == 2
    assert "has no sub-folders" in _one_error_line(capsys.readouterr().err)


def test_usage_errors_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--reference", "x.json", "--out", "run"])  # no --layer
    assert exit_info.value.code == 2
    assert "--layer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "run", "--target", "t", "--method", "gradcam"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "run", "--target", "t", "--ranking", "votes"])
    assert exit_info.value.code == 2
