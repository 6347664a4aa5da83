"""Several processes: torchrun -m lavise on Gloo gives a single process's outputs; a failing
rank stops the others with its message; ranks given different work are refused."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import draw_disc_scene, launch_ranks
from lavise.cli import main
from lavise.distributed import Ranks
from lavise.regions import RunningTopK, ThresholdTally, peak_activations, quantile_thresholds, top_images

pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")


def test_shards_are_contiguous_and_cover_everything_once():
    for count in (0, 1, 7, 64, 1000):
        for world in (1, 2, 3, 8):
            shards = [list(Ranks(r, world).shard(count)) for r in range(world)]
            assert sum(shards, []) == list(range(count))


def test_partial_statistics_merge_exactly():
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(40, 5, 3, 3, generator=generator).clamp_min(0).round()  # many ties
    parts = [maps[:13], maps[13:14], maps[14:]]
    tallies, tops = [], []
    for start, part in zip((0, 13, 14), parts):
        tally, top = ThresholdTally(0.05, 40 * 9), RunningTopK(5, 6)
        for batch in part.split(4):
            tally.add(batch)
        top.add(peak_activations(part), torch.arange(start, start + len(part)))
        tallies.append(tally.state())
        tops.append(top.state())
    merged_tally, merged_top = ThresholdTally(0.05, 40 * 9), RunningTopK(5, 6)
    for state in reversed(tallies):  # any order
        merged_tally.merge(state)
    for state in tops:
        merged_top.merge(state)
    assert torch.equal(merged_tally.thresholds(), quantile_thresholds(maps, 0.05))
    assert torch.equal(merged_top.result(), top_images(maps, 6))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A scene-CNN checkpoint (so every process builds the model from its spec), 150 annotated
    images (three chunks) and two groups of 70 images."""
    from conftest import make_coco
    from lavise.demos.scene_training import _save_backbone
    from lavise.models.scene_cnn import SceneCNN

    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    _save_backbone(SceneCNN(4), root / "scene.pt")
    coco = make_coco(root / "coco", images=150, seed=2)
    rng = np.random.default_rng(5)
    for group, colour in (("reds", (230, 30, 30)), ("blues", (30, 40, 230))):
        for i in range(70):
            draw_disc_scene(root / "groups" / group / f"{i:02d}.png", rng, colour if i < 50 else (120, 120, 120))
    (root / "groups" / "reds" / "99-broken.png").write_bytes(b"not an image")  # skipped and counted by its rank
    return root, coco


def _commands(root: Path, coco: Path, out: Path) -> list[list[str]]:
    # one thread per process on both sides, so that floats add up in the same order
    common = ["--cache-dir", str(out / "cache"), "--num-workers", "0", "--batch-size", "16", "--threads", "1", "--no-progress"]
    run = str(out / "run")
    return [
        ["train", "--model", "scene_cnn", "--checkpoint", str(root / "scene.pt"), "--layer", "features.11",
         "--reference", str(coco), "--out", run, "--epochs", "3", "--activation-regions", "2", *common],
        ["explain", run, "--target", str(coco.parent / "images"), "--top-images", "5", "--vocabulary-size", "500", *common],
        ["evaluate", run, "--dataset", str(coco), "--methods", "activation", "image", "netdissect", "--top-images", "5",
         "--vocabulary-size", "500", "--no-lenient", *common],
        ["explain", run, "--target", str(root / "groups"), "--top-images", "5", "--vocabulary-size", "500", *common],
        ["compare-groups", run, "--target", str(root / "groups"), "--min-group-images", "10", *common],
    ]


def _outputs(out: Path) -> dict:
    run = out / "run"
    config = json.loads((run / "config.json").read_text())
    explanations = json.loads((run / "explanations.json").read_text())
    evaluation = json.loads((run / "evaluation.json").read_text())
    groups = json.loads((run / "groups.json").read_text())
    return {
        "rows": (config["training_pairs"], config["training_rows"], config["best_epoch"]),
        "head": load_file(str(run / "explainer.safetensors")),
        "filters": explanations["filters"],
        "evaluation": (evaluation["methods"], evaluation["filters"]),
        "groups": (groups["filters"], groups["concepts"]),
        "processes": explanations["compute"]["processes"],
        "skipped": (explanations["target"]["skipped"], groups["target"]["skipped"]),
    }


def test_torchrun_on_two_processes_gives_one_process_outputs(data, tmp_path):
    root, coco = data
    for command in _commands(root, coco, tmp_path / "one"):
        assert main(command) == 0
    for command in _commands(root, coco, tmp_path / "two"):
        result = launch_torchrun(command)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["rows"] == two["rows"]
    assert all(torch.equal(one["head"][k], two["head"][k]) for k in one["head"])
    assert [f["words"] for f in one["filters"]] == [f["words"] for f in two["filters"]]
    assert [f["top_images"] for f in one["filters"]] == [f["top_images"] for f in two["filters"]]
    np.testing.assert_allclose([f["threshold"] for f in one["filters"]], [f["threshold"] for f in two["filters"]], rtol=1e-6)
    # words and scores are identical; confidences are floats of sums made in another order
    confidences = [_pop_confidences(one["evaluation"]), _pop_confidences(two["evaluation"])]
    assert one["evaluation"] == two["evaluation"]
    np.testing.assert_allclose(*confidences, rtol=1e-6)
    assert one["groups"] == two["groups"]
    assert one["skipped"] == two["skipped"] and one["skipped"][0]["unreadable images"]["count"] == 1


def _pop_confidences(evaluation) -> list[float]:
    """Remove (and return, in order) the per-filter confidences of an evaluation's methods."""
    _, filters = evaluation
    return [f["methods"][m].pop("confidence") or 0.0 for f in filters for m in sorted(f["methods"])
            if "confidence" in f["methods"][m]]


def launch_torchrun(command: list[str]):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lavise", *command],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )


WORKER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import TinyNet
import lavise
from lavise.models import Preprocessing, TargetModel

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
net = TinyNet()
{setup}
model = TargetModel.from_module(net, Preprocessing(resize_size=64, crop_size=64), name="tiny")
try:
    lavise.explain({run!r}, {target!r}, model=model, cache_dir={cache!r} + str(rank), write=False,
                   compute=lavise.ComputeSettings(num_workers=0, progress=False, batch_size=4), settings={settings})
except Exception as error:
    print(f"rank {{rank}}: {{type(error).__name__}}: {{error}}", file=sys.stderr)
    dist.destroy_process_group()
    sys.exit(3)
print(f"rank {{rank}}: done")
dist.destroy_process_group()
"""


def _worker(tmp_path: Path, run: Path, target: Path, *, setup: str = "", settings: str = "lavise.ExplainSettings(top_images=3)") -> Path:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), run=str(run), target=str(target),
                                    cache=str(tmp_path / "cache"), setup=textwrap.dedent(setup), settings=settings))
    return script


def test_a_failing_rank_stops_the_others_with_its_message(tiny_run, targets, tmp_path):
    setup = """
    original = net.forward
    def forward(x):
        if rank == 1 and x.any():
            raise RuntimeError("out of memory on rank one")
        return original(x)
    net.forward = forward
    """
    script = _worker(tmp_path, tiny_run.path, targets, setup=setup)
    results = launch_ranks([str(script)], timeout=120)
    assert [r.returncode for r in results] == [3, 3]
    assert "rank 1: RuntimeError: out of memory on rank one" in results[1].stderr
    assert "rank 0: OtherRankFailed: rank 1 of 2 stopped while reading the target images" in results[0].stderr
    assert "out of memory on rank one" in results[0].stderr


def test_ranks_given_different_work_are_refused(tiny_run, targets, tmp_path):
    script = _worker(tmp_path, tiny_run.path, targets, settings="lavise.ExplainSettings(top_images=3 + rank)")
    results = launch_ranks([str(script)], timeout=120)
    assert [r.returncode for r in results] == [3, 3], [r.stderr[-1500:] for r in results]
    for result in results:
        assert "The ranks were given different explain jobs: rank 1 differs from rank 0 in settings" in result.stderr


TRAINER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import TinyNet
import lavise
from lavise.models import Preprocessing, TargetModel
from lavise.storage import save_tensors

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = TargetModel.from_module(TinyNet(), Preprocessing(resize_size=64, crop_size=64), name="tiny")
run = lavise.train(model, "features.3", lavise.open_reference({coco!r}), {out!r} + str(rank),
                   settings=lavise.TrainSettings(epochs=2, activation_regions=2), cache_dir={cache!r} + str(rank),
                   compute=lavise.ComputeSettings(num_workers=0, progress=False, batch_size=8, threads=1))
save_tensors({heads!r} + str(rank) + ".safetensors", run.head.state_dict())
dist.destroy_process_group()
"""


def test_training_on_ranks_without_a_shared_disk(tmp_path, coco_maker, tiny_model):
    """Each rank has its own cache: rank 0 receives the rows the other ranks pooled."""
    from lavise.datasets import open_reference
    from lavise.runs import train
    from lavise.settings import ComputeSettings, TrainSettings

    coco = coco_maker(tmp_path / "coco", images=150, seed=7)
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER.format(tests=str(Path(__file__).parent), coco=str(coco), out=str(tmp_path / "run"),
                                     cache=str(tmp_path / "cache"), heads=str(tmp_path / "head")))
    results = launch_ranks([str(script)], timeout=180)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    assert not (tmp_path / "run1").exists()  # rank 0 writes the run
    assert len(list((tmp_path / "cache0").glob("reference-*/*.safetensors"))) == 3  # 64 + 64 + 22 images
    assert len(list((tmp_path / "cache1").glob("reference-*/*.safetensors"))) == 2  # rank 1's chunks only
    single = train(tiny_model, "features.3", open_reference(coco), tmp_path / "single",
                   settings=TrainSettings(epochs=2, activation_regions=2), cache_dir=tmp_path / "single-cache",
                   compute=ComputeSettings(num_workers=0, progress=False, batch_size=8, threads=1))
    for rank in (0, 1):  # every rank returns rank 0's explainer
        head = load_file(str(tmp_path / f"head{rank}.safetensors"))
        assert all(torch.equal(head[k], v) for k, v in single.head.state_dict().items())
