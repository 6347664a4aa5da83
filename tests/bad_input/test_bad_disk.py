"""Bad input: full disks and unwritable folders — the work goes on without a cache, and a run is never left mixed."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import lavise.storage
from lavise.datasets import open_reference
from lavise.errors import LaviseError, LaviseWarning
from lavise.evaluate import _COLUMNS, Evaluation, write_evaluation
from lavise.metrics import RECALL_KS
from lavise.explain import explain
from lavise.groups import compare_groups
from lavise.runs import load_run, train
from lavise.settings import ExplainSettings, GroupSettings, TrainSettings
from lavise.storage import ChunkStore, cached, output_set, save_tensors, write_json

FEW_WORDS = ExplainSettings(top_images=5, vocabulary_size=500)
pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")


@pytest.fixture(autouse=True)
def _fresh_cache_state(monkeypatch):
    """Which caches failed is remembered per process; each test starts with none."""
    monkeypatch.setattr(lavise.storage, "_UNWRITABLE_CACHES", set())


def fill_disk(monkeypatch, folder: Path) -> list[str]:
    """Make every new file under ``folder`` fail as on a full disk (ENOSPC); returns the refused names."""
    real = tempfile.mkstemp
    refused = []

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(Path(folder).resolve()):
            refused.append(str(dir))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(lavise.storage.tempfile, "mkstemp", mkstemp)
    return refused


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _words(explanations) -> list[list[str]]:
    return [[w["word"] for w in f.words] for f in explanations.filters]


# --- a cache on a full disk -------------------------------------------------------------------


def test_explain_with_a_full_cache_warns_once_and_gives_the_same_words(tmp_path, tiny_run, tiny_model, targets, compute, monkeypatch):
    expected = explain(tiny_run, targets, settings=FEW_WORDS, compute=compute, model=tiny_model,
                       cache_dir=tmp_path / "good-cache", write=False)
    full = tmp_path / "full-cache"
    refused = fill_disk(monkeypatch, full)
    with pytest.warns(LaviseWarning) as record:
        result = explain(tiny_run, targets, settings=FEW_WORDS, compute=compute, model=tiny_model, cache_dir=full)
    cache_warnings = [str(w.message) for w in record if "Cannot write to the cache folder" in str(w.message)]
    assert len(cache_warnings) == 1 and "No space left on device" in cache_warnings[0]
    assert f"'{full}'" in cache_warnings[0] and "--cache-dir" in cache_warnings[0]
    assert refused and _words(result) == _words(expected)
    assert not [p for p in full.rglob("*") if p.is_file()]  # nothing half-written
    assert (tiny_run.path / "explanations.json").is_file()


def test_train_with_a_full_cache_trains_in_memory(tmp_path, coco, tiny_model, compute, monkeypatch):
    reference_run = train(tiny_model, "features.3", open_reference(coco), tmp_path / "a", settings=TrainSettings(epochs=1),
                          compute=compute, cache_dir=tmp_path / "good-cache")
    fill_disk(monkeypatch, tmp_path / "full-cache")
    with pytest.warns(LaviseWarning, match="Cannot write to the cache folder"):
        run = train(tiny_model, "features.3", open_reference(coco), tmp_path / "b", settings=TrainSettings(epochs=1),
                    compute=compute, cache_dir=tmp_path / "full-cache")
    assert run.config["training_rows"] == reference_run.config["training_rows"]
    for name, tensor in reference_run.head.state_dict().items():
        assert torch.allclose(tensor, run.head.state_dict()[name]), name


def test_a_chunk_store_that_cannot_write_says_so(tmp_path, monkeypatch):
    fill_disk(monkeypatch, tmp_path)
    store = ChunkStore(tmp_path, "demo", {"product": "demo"})
    with pytest.warns(LaviseWarning, match="going on without caching"):
        assert store.save(0, {"x": torch.ones(2)}, {}) is False
    assert store.save(1, {"x": torch.ones(2)}, {}) is False  # warned once per folder
    assert cached(tmp_path, "other", {"product": "other"}, lambda: ({"y": torch.zeros(1)}, {"made": 1}))[1] == {"made": 1}


def test_a_read_only_cache_is_a_warning_not_an_error(tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(folder):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(lavise.storage.tempfile, "mkstemp", mkstemp)
    with pytest.warns(LaviseWarning, match=r"Permission denied"):
        assert cached(folder, "x", {"p": 1}, lambda: ({"t": torch.ones(1)}, {}))[0]["t"].item() == 1


# --- a run directory on a full disk -----------------------------------------------------------


def test_retraining_on_a_full_disk_keeps_the_working_run(tmp_path, tiny_run, coco, tiny_model, compute, monkeypatch):
    before = _contents(tiny_run.path)
    fill_disk(monkeypatch, tiny_run.path)
    with pytest.raises(LaviseError, match=r"Cannot write the outputs into .*No space left on device.*previous outputs are as they were"):
        train(tiny_model, "features.3", open_reference(coco), tiny_run.path, settings=TrainSettings(epochs=3),
              compute=compute, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    assert _contents(tiny_run.path) == before
    assert [p.name for p in tiny_run.path.iterdir() if p.name.startswith(".")] == []
    assert load_run(tiny_run.path).config["train"]["epochs"] == 2


def test_explain_on_a_full_run_directory_leaves_the_old_explanation_whole(tmp_path, explained, tiny_model, targets, compute, monkeypatch):
    before = _contents(explained.path)
    fill_disk(monkeypatch, explained.path)
    with pytest.warns(LaviseWarning, match="Cannot write to the cache folder"):  # its hubness and confidence caches
        with pytest.raises(LaviseError, match="nothing there was changed"):
            explain(explained, targets, settings=ExplainSettings(top_images=3, vocabulary_size=300), compute=compute,
                    model=tiny_model, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    after = _contents(explained.path)
    assert {k: v for k, v in after.items() if k in ("thresholds.safetensors", "explanations.json", "explanations.csv")} == \
        {k: v for k, v in before.items() if k in ("thresholds.safetensors", "explanations.json", "explanations.csv")}
    assert after == before


def test_compare_groups_on_a_full_disk_keeps_the_old_comparison(tmp_path, explained, tiny_model, grouped, compute, monkeypatch):
    settings = GroupSettings(min_group_images=10, examples=2, chart_filters=4)
    compare_groups(explained, grouped, settings=settings, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache",
                   out=tmp_path / "groups")
    before = _contents(tmp_path / "groups")
    fill_disk(monkeypatch, tmp_path / "groups")
    with pytest.raises(LaviseError, match="previous outputs are as they were"):
        compare_groups(explained, grouped, settings=GroupSettings(min_group_images=10, examples=1, chart_filters=2),
                       compute=compute, model=tiny_model, cache_dir=tmp_path / "cache", out=tmp_path / "groups")
    monkeypatch.undo()
    assert _contents(tmp_path / "groups") == before and set(before) == {"groups.csv", "groups.json", "groups.png"}


def test_an_evaluation_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    summary = {"filters": 3, "seen": None, "unseen": None, **{key: 0.5 for key, _ in _COLUMNS},
               **{f"recall@{k}": 0.5 for k in RECALL_KS}}
    evaluation = Evaluation("tiny", "features.3", {"original": summary}, [], {})
    write_evaluation(evaluation, tmp_path)
    before = _contents(tmp_path)
    fill_disk(monkeypatch, tmp_path)
    with pytest.raises(LaviseError, match="previous outputs are as they were"):
        write_evaluation(evaluation, tmp_path)
    monkeypatch.undo()
    assert _contents(tmp_path) == before and {"evaluation.json", "evaluation.md", "evaluation.png"} <= set(before)


# --- the output set itself --------------------------------------------------------------------


def test_an_output_set_that_fails_changes_nothing(tmp_path):
    write_json(tmp_path / "a.json", 1)
    (tmp_path / "mine.txt").write_text("user")
    with pytest.raises(RuntimeError, match="boom"):
        with output_set(tmp_path, last="a.json", replaces=["*.txt"]) as outputs:
            write_json(outputs.path("a.json"), 2)
            raise RuntimeError("boom")
    assert json.loads((tmp_path / "a.json").read_text()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "mine.txt"]


def test_an_output_set_replaces_derived_files_and_keeps_others(tmp_path):
    for name in ("config.json", "old-derived.json", "keep.txt"):
        (tmp_path / name).write_text(name)
    with output_set(tmp_path, last="config.json", replaces=["*-derived.json"]) as outputs:
        outputs.path("config.json").write_text("new")
        outputs.path("explainer.bin").write_bytes(b"new")
    assert _contents(tmp_path) == {"config.json": b"new", "explainer.bin": b"new", "keep.txt": b"keep.txt"}


def test_an_output_set_without_its_last_file_is_a_bug_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="has no 'config.json'"):
        with output_set(tmp_path, last="config.json") as outputs:
            outputs.path("split.json").write_text("{}")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="file names, not paths"):
        with output_set(tmp_path, last="x") as outputs:
            outputs.path("../escape.json")


def test_staging_left_by_a_killed_process_is_cleaned_up(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".staging-{int(dead.stdout)}-abc"
    abandoned.mkdir()
    (abandoned / "config.json").write_text("half")
    alive = tmp_path / f".staging-{os.getpid()}-xyz"  # a process of ours still writing
    alive.mkdir()
    with output_set(tmp_path, last="a.json") as outputs:
        write_json(outputs.path("a.json"), 1)
    assert not abandoned.exists() and alive.exists()


def test_a_real_file_size_limit_is_an_os_error_and_leaves_no_temporary_file(tmp_path):
    """The kernel's own refusal (RLIMIT_FSIZE: EFBIG), through safetensors and through the cache."""
    script = textwrap.dedent(f"""
        import resource, signal, warnings, torch
        from pathlib import Path
        from lavise.storage import save_tensors, cached
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        folder = Path({str(tmp_path)!r})
        try:
            save_tensors(folder / "big.safetensors", {{"x": torch.zeros(100_000)}})
        except OSError as error:
            print("oserror", error.errno)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            product = cached(folder / "cache", "big", {{"p": 1}}, lambda: ({{"x": torch.ones(100_000)}}, {{}}))
        print("cached", int(product[0]["x"].sum()), len(caught), "File too large" in str(caught[0].message))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["oserror", str(errno.EFBIG), "cached", "100000", "1", "True"]
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_saving_to_a_missing_device_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        save_tensors(Path("/proc/lavise-cannot-write/x.safetensors"), {"x": torch.ones(1)})
