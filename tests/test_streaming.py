"""Streaming passes: the results of chunk-by-chunk passes equal the in-memory ones, caches
survive kills and sharing, and the memory budget decides only where maps are read from."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lavise.datasets import ImageFiles, open_reference
from lavise.explain import explain, rank_words
from lavise.features import MapStream, chunk_bounds, target_features
from lavise.groups import compare_groups, group_counts
from lavise.metrics import IoUTally, masks_on_grid
from lavise.models import ModelSpec, preprocess_masks
from lavise.naming import feature_inputs, pair_words
from lavise.reference import ChunkedRows, reference_rows
from lavise.regions import peak_activations, quantile_thresholds, top_images, upsampled_regions
from lavise.runs import train
from lavise.settings import ComputeSettings, ExplainSettings, GroupSettings, TrainSettings
from lavise.storage import ChunkStore, read_safetensors

pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")

QUIET = ComputeSettings(device="cpu", batch_size=8, num_workers=0, progress=False)
TINY_BUDGET = 1e-7  # GiB: under one map, so nothing is kept and rows are read from disk
# lavise 0.4's naming (cosine over the frequent words): what is tested here is the streaming
NAMING = ExplainSettings.as_in_0_4(top_images=5, vocabulary_size=500)


class Images:
    """Counts the images a module's forward passes see (the one-image shape probe aside)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs) -> None:
        images = inputs[0]
        if not (len(images) == 1 and not images.any()):
            self.count += len(images)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


@pytest.fixture
def many(tmp_path, coco_maker) -> Path:
    """150 annotated images: three chunks of maps (64 + 64 + 22)."""
    return coco_maker(tmp_path / "many", images=150, seed=3)


def test_chunks_never_depend_on_processes_or_batches():
    bounds = chunk_bounds(150, 2048)
    assert bounds == [(0, 64), (64, 128), (128, 150)]
    assert chunk_bounds(10**6, 401_408)[0] == (0, 668)  # ResNet-50 layer4: 256 MiB of maps per chunk


def test_explain_streams_and_equals_the_in_memory_computation(tiny_run, tiny_model, many, tmp_path):
    images = ImageFiles(many.parent / "images")
    counter = Images(tiny_model.module)
    results, forwards = {}, {}
    for name, compute in {
        "kept": QUIET,
        "read again from the cache": replace(QUIET, memory_budget=TINY_BUDGET),
        "computed again": replace(QUIET, memory_budget=TINY_BUDGET, cache_maps=False),
    }.items():
        results[name] = explain(tiny_run, images, settings=NAMING, compute=compute, model=tiny_model,
                                cache_dir=tmp_path / "cache" / name, write=False)
        forwards[name] = counter.take()
    assert forwards["kept"] == forwards["read again from the cache"] == 150  # each image through the network once
    assert forwards["computed again"] > 150  # the chosen images' batches again
    assert results["kept"].extra["compute"]["naming_maps"].startswith("kept")
    assert results["computed again"].extra["compute"]["naming_maps"].startswith("read again")

    # the same computed with every map in memory at once, as lavise did before streaming
    everything = target_features(tiny_model, "features.3", images, cache_dir=None, compute=QUIET)
    maps = everything.maps
    thresholds = quantile_thresholds(maps, NAMING.quantile)
    chosen = top_images(maps, NAMING.top_images)
    d, p = chosen.shape
    vocabulary = results["kept"].extra["vocabulary"]["words"]
    from lavise.embeddings import load_word_vectors

    words = load_word_vectors().vocabulary(size=NAMING.vocabulary_size)
    assert len(words) == vocabulary
    ids, sims = pair_words(
        tiny_run.head, feature_inputs(NAMING.method, maps, thresholds, torch.device("cpu"), tiny_run.pooling),
        torch.arange(d).repeat_interleave(p), chosen.flatten(), words.unit_vectors, NAMING.words_per_image,
        device=torch.device("cpu"),
    )
    ranked = rank_words(ids.reshape(d, -1), sims.reshape(d, -1), NAMING.top_words,
                        words_per_image=NAMING.words_per_image, ranking=NAMING.ranking)
    for result in results.values():
        assert [f.threshold for f in result.filters] == thresholds.tolist()
        assert [f.top_images for f in result.filters] == [
            [str(Path(everything.paths[i]).relative_to(images.root)) for i in row] for row in chosen.tolist()]
        assert [[w["word"] for w in f.words] for f in result.filters] == [[words.words[r.word] for r in row] for row in ranked]


def test_ties_go_to_the_earlier_image_whatever_the_batches():
    maps = torch.zeros(10, 2, 2, 2)
    maps[[1, 4, 7], 0, 0, 0] = 3.0  # three images tie for filter 0
    assert top_images(maps, 2)[0].tolist() == [1, 4]
    assert top_images(maps, 4)[1].tolist() == [0, 1, 2, 3]  # an all-zero filter: the first images


def test_evaluate_streams_and_its_tallies_equal_the_literal_sums(tiny_run, tiny_model, many, tmp_path):
    from lavise.evaluate import evaluate
    from lavise.settings import EvaluateSettings

    dataset = open_reference(many)
    settings = EvaluateSettings(methods=("activation", "netdissect"), lenient=False)
    outcomes = [
        evaluate([tiny_run], dataset, settings=settings, explain_settings=NAMING, compute=compute, model=tiny_model,
                 cache_dir=tmp_path / f"cache-{i}", write=False)[0]
        for i, compute in enumerate([QUIET, replace(QUIET, memory_budget=TINY_BUDGET, cache_maps=False)])
    ]
    assert outcomes[0].methods == outcomes[1].methods and outcomes[0].filters == outcomes[1].filters

    # the tallies of the chunked pass against literal sums over every image's maps and masks
    from PIL import Image

    from lavise.distributed import Ranks
    from lavise.metrics import labelling_split
    from lavise.tallies import tally_dataset

    everything = target_features(tiny_model, "features.3", dataset, cache_dir=None, compute=QUIET)
    thresholds = quantile_thresholds(everything.maps, NAMING.quantile)
    labelling = labelling_split(len(dataset), 0.5, 0)
    stream = MapStream(tiny_model, "features.3", dataset, cache_dir=None, compute=QUIET, ranks=Ranks())
    streamed = tally_dataset(stream, dataset, thresholds, labelling, size=56, compute=QUIET, ranks=Ranks())
    literal = (IoUTally.zeros(8, len(dataset.concepts)), IoUTally.zeros(8, len(dataset.concepts)))
    index_of = {str(dataset.image_path(i)): i for i in range(len(dataset))}
    for row, path in enumerate(everything.paths):
        index = index_of[path]
        with Image.open(path) as image:
            concepts, masks = dataset.masks(index, image.size)
        grid = masks_on_grid(preprocess_masks(masks, tiny_model.preprocessing), 56)
        regions = upsampled_regions(everything.maps[row : row + 1], thresholds, (56, 56)).flatten(2)
        literal[0 if labelling[index] else 1].add(regions, grid.unsqueeze(0), torch.tensor([concepts]))
    for got, expected in zip(streamed[:2], literal):
        assert got.images == expected.images and got.images > 50
        for name in ("intersection", "region_area", "mask_area"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_group_counts_stream_and_equal_the_in_memory_counts(tiny_run, tiny_model, tmp_path):
    from conftest import draw_disc_scene

    rng = np.random.default_rng(5)
    root = tmp_path / "groups"
    for group, colour in (("reds", (230, 30, 30)), ("blues", (30, 40, 230))):
        for i in range(70):
            draw_disc_scene(root / group / f"{i:02d}.png", rng, colour if i < 50 else (120, 120, 120))
    explain(tiny_run, root, settings=NAMING, compute=QUIET, model=tiny_model, cache_dir=tmp_path / "cache")
    settings = GroupSettings(min_group_images=10, examples=3)
    comparisons = [
        compare_groups(tiny_run, root, settings=settings, compute=compute, model=tiny_model,
                       cache_dir=tmp_path / f"groups-{i}", write=False)
        for i, compute in enumerate([QUIET, replace(QUIET, cache_maps=False)])
    ]
    assert [vars(f) for f in comparisons[0].filters] == [vars(f) for f in comparisons[1].filters]
    everything = target_features(tiny_model, "features.3", ImageFiles(root), cache_dir=None, compute=QUIET)
    peaks = peak_activations(everything.maps)
    thresholds = quantile_thresholds(everything.maps, NAMING.quantile)
    labels = torch.tensor([0 if "/blues/" in p else 1 for p in everything.paths])
    counts = group_counts(peaks > thresholds, labels, 2)
    for f in comparisons[0].filters:
        assert f.qualified == {"blues": int(counts[0, f.filter]), "reds": int(counts[1, f.filter])}


def test_training_rows_read_from_disk_give_the_same_explainer(tmp_path, tiny_model, many):
    reference = open_reference(many)
    settings = TrainSettings(epochs=3, activation_regions=2)
    budgets = {"memory": QUIET, "disk": replace(QUIET, memory_budget=TINY_BUDGET)}
    rows = {name: reference_rows(tiny_model, "features.3", reference, cache_dir=tmp_path / "cache", compute=compute,
                                 activation_regions=2) for name, compute in budgets.items()}
    assert rows["memory"].in_memory and isinstance(rows["disk"].vectors, ChunkedRows)
    picked = torch.tensor([5, 0, 300, 17, 299])
    torch.testing.assert_close(rows["disk"].pooled("region")[picked], rows["memory"].pooled("region")[picked], rtol=0, atol=0)
    runs = {name: train(tiny_model, "features.3", reference, tmp_path / name, settings=settings, compute=compute,
                        cache_dir=tmp_path / "cache") for name, compute in budgets.items()}
    for a, b in zip(runs["memory"].head.state_dict().values(), runs["disk"].head.state_dict().values()):
        assert torch.equal(a, b)
    assert runs["memory"].config["best_epoch"] == runs["disk"].config["best_epoch"]


def test_rows_come_image_by_image(tmp_path, tiny_model, many):
    rows = reference_rows(tiny_model, "features.3", open_reference(many), cache_dir=None, compute=QUIET,
                          activation_regions=2)
    images = rows.images.tolist()
    assert images == sorted(images)
    for image in set(images[:40]):
        regional = rows.regional[rows.images == image].tolist()
        assert regional == sorted(regional)  # whole masks first, then regions


def test_chunk_store_reads_memory_mapped_and_refuses_other_keys(tmp_path):
    store = ChunkStore(tmp_path, "x", {"what": 1})
    store.save(3, {"m": torch.arange(12.0).reshape(3, 4), "empty": torch.zeros(0, 2)}, {"n": 3})
    tensors, facts = store.load(3)
    assert facts == {"n": 3} and tensors["m"][1].tolist() == [4.0, 5.0, 6.0, 7.0] and tensors["empty"].shape == (0, 2)
    tensors["m"][0, 0] = 99.0  # copy on write: the file keeps its value
    assert store.load(3)[0]["m"][0, 0] == 0
    assert ChunkStore(tmp_path, "x", {"what": 2}).load(3) is None and store.done(range(5)) == {3}
    assert read_safetensors(store.path(3), key="another") is None
    store.path(3).write_bytes(b"\xff" * 16)
    assert store.load(3) is None  # damaged: made again, not fatal


# --- faults --------------------------------------------------------------------------------


@pytest.fixture
def rebuildable_run(tmp_path, coco):
    """A run of a model a subprocess can build from its spec: the scene CNN from a checkpoint."""
    from lavise.demos.scene_training import _save_backbone
    from lavise.models.scene_cnn import SceneCNN

    torch.manual_seed(0)
    checkpoint = tmp_path / "scene.pt"
    _save_backbone(SceneCNN(4), checkpoint)
    spec = ModelSpec("scene_cnn", None, str(checkpoint))
    return train(spec, "features.11", open_reference(coco), tmp_path / "run", settings=TrainSettings(epochs=1),
                 compute=QUIET, cache_dir=tmp_path / "cache")


def _explain_command(run: Path, target: Path, cache: Path, batch: int = 1) -> list[str]:
    return [sys.executable, "-m", "lavise", "explain", str(run), "--target", str(target), "--cache-dir", str(cache),
            "--batch-size", str(batch), "--num-workers", "0", "--no-progress", "--top-images", "5", "--vocabulary-size", "500",
            "--vocabulary", "frequent", "--retrieval", "cosine", "--no-concept-names"]  # NAMING


def test_a_killed_pass_resumes_from_its_chunks(tmp_path, coco_maker, rebuildable_run):
    coco_maker(tmp_path / "targets", images=640, seed=4)
    target = tmp_path / "targets" / "images"
    cache = tmp_path / "kill-cache"
    process = subprocess.Popen(_explain_command(rebuildable_run.path, target, cache), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and len(list(cache.glob("target-*/*.safetensors"))) < 2:
        time.sleep(0.01)
    assert process.poll() is None, "the pass finished before it could be killed"
    process.kill()
    process.wait()
    made = len(list(cache.glob("target-*/*.safetensors")))
    assert 2 <= made < 10  # 640 images: ten chunks of 64
    assert not list(cache.glob("**/*.tmp"))  # nothing half-written is left where it would be read

    model = rebuildable_run.target_model()
    counter = Images(model.module)
    resumed = explain(rebuildable_run, target, settings=NAMING, compute=QUIET, model=model, cache_dir=cache, write=False)
    assert 0 < counter.take() <= 640 - 64 * made
    fresh = explain(rebuildable_run, target, settings=NAMING, compute=QUIET, model=model, cache_dir=tmp_path / "fresh",
                    write=False)
    assert [(f.words, f.top_images, f.threshold) for f in resumed.filters] == [
        (f.words, f.top_images, f.threshold) for f in fresh.filters]


def test_two_processes_share_a_cache(tmp_path, coco_maker, rebuildable_run):
    coco_maker(tmp_path / "targets", images=200, seed=6)
    target = tmp_path / "targets" / "images"
    cache = tmp_path / "shared-cache"
    runs = []
    for name in ("a", "b"):
        copy = tmp_path / f"run-{name}"
        copy.mkdir()
        for file in rebuildable_run.path.iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
        runs.append(copy)
    processes = [subprocess.Popen(_explain_command(run, target, cache, batch=8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for run in runs]
    for process in processes:
        assert process.wait(timeout=240) == 0, process.stderr.read()
    first, second = (json.loads((run / "explanations.json").read_text()) for run in runs)
    assert first["filters"] == second["filters"]
    model = rebuildable_run.target_model()
    counter = Images(model.module)
    again = explain(rebuildable_run, target, settings=NAMING, compute=QUIET, model=model, cache_dir=cache, write=False)
    assert counter.take() == 0  # every chunk is whole and readable
    assert [f.words for f in again.filters] == [f["words"] for f in first["filters"]]
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


def test_an_interrupted_threshold_pass_resumes_from_its_checkpoint(tmp_path, tiny_net_type, many, monkeypatch):
    import lavise.reference
    from lavise.models import Preprocessing, TargetModel
    from lavise.reference import reference_thresholds

    monkeypatch.setattr(lavise.reference, "CHECKPOINT_SECONDS", 0.0)  # save after every chunk
    torch.manual_seed(0)
    net = tiny_net_type()
    dataset = open_reference(many)

    class Failing(torch.nn.Module):
        """The tiny network, failing on its third batch of real images."""

        def __init__(self) -> None:
            super().__init__()
            self.features, self.head, self.calls = net.features, net.head, 0

        def forward(self, x):
            if x.any():
                self.calls += 1
                if self.calls == 10:
                    raise RuntimeError("the machine went away")
            return self.head(self.features(x))

    failing = TargetModel.from_module(Failing(), Preprocessing(resize_size=64, crop_size=64), name="tiny")
    with pytest.raises(RuntimeError, match="went away"):
        reference_thresholds(failing, "features.3", dataset, 0.005, cache_dir=tmp_path / "cache", compute=QUIET)
    assert len(list((tmp_path / "cache").glob("thresholds-partial-*"))) == 1  # 8 batches: the first chunk counted
    model = TargetModel.from_module(net, Preprocessing(resize_size=64, crop_size=64), name="tiny")
    assert model.identity() == failing.identity()  # the same weights: the same cached products
    counter = Images(net)
    resumed = reference_thresholds(model, "features.3", dataset, 0.005, cache_dir=tmp_path / "cache", compute=QUIET)
    assert counter.take() == 150 - 64
    whole = reference_thresholds(model, "features.3", dataset, 0.005, cache_dir=None, compute=QUIET)
    assert torch.equal(resumed, whole)
    assert not list((tmp_path / "cache").glob("thresholds-partial-*"))



def test_several_word_spaces_share_one_pass_of_explainer_outputs():
    """pair_words_in matches each output against every space, as one pair_words call per space would."""
    from lavise.naming import WordSpace, pair_words_in

    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    table = torch.randn(6, 5, 4)  # an input per (filter, image)

    def pair_inputs(filters, rows):
        return table[filters, rows]

    filters, rows = torch.tensor([0, 2, 5, 5, 1]), torch.tensor([4, 0, 1, 3, 3])
    spaces = [WordSpace(torch.nn.functional.normalize(torch.randn(9, 3), dim=1), 4),
              WordSpace(torch.nn.functional.normalize(torch.randn(7, 3), dim=1), 2, torch.rand(7))]
    together = pair_words_in(head, pair_inputs, filters, rows, spaces, device=torch.device("cpu"), chunk=2)
    for space, (ids, sims) in zip(spaces, together):
        alone = pair_words(head, pair_inputs, filters, rows, space.vectors, space.words_per_image,
                           device=torch.device("cpu"), penalty=space.penalty, chunk=3)
        assert torch.equal(ids, alone[0]) and torch.allclose(sims, alone[1])
        assert ids.shape == (5, space.words_per_image)
