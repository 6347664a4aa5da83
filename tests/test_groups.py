"""Group comparison and model comparison: the statistics, the group inputs, end to end."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch import nn

from lavise.cli import main
from lavise.datasets import LaviseWarning
from lavise.errors import LaviseError
from lavise.explain import explain, quantile_thresholds
from lavise.features import target_features
from lavise.groups import (
    GroupSettings,
    ModelComparisonSettings,
    benjamini_hochberg,
    compare_groups,
    compare_models,
    concept_evidence,
    fisher_exact_test,
    group_counts,
    homogeneity_test,
    mutual_best_matches,
    newcombe_interval,
    peak_activations,
    peak_correlation,
    profile_similarity,
    read_groups,
    wilson_interval,
    word_profiles,
)
from lavise.models import Preprocessing, TargetModel
from lavise.settings import ExplainSettings

pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")

# --- the mathematics, checked against loops and scipy -------------------------------------


def test_peaks_and_group_counts_equal_loops():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(9, 5, 3, 4, generator=generator)
    peaks = peak_activations(maps)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    thresholds = torch.rand(5, generator=generator)
    counts = group_counts(peaks > thresholds, labels, 3)
    for n in range(9):
        for u in range(5):
            assert peaks[n, u] == max(float(v) for v in maps[n, u].flatten())
    for g in range(3):
        for u in range(5):
            expected = sum(1 for n in range(9) if labels[n] == g and float(maps[n, u].max()) > float(thresholds[u]))
            assert counts[g, u] == expected


def test_wilson_interval_equals_scipy():
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 40), (1, 1), (250, 1000)]:
        for confidence in (0.9, 0.95, 0.99):
            low, high = wilson_interval(np.array([k]), np.array([n]), confidence)
            expected = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
            assert low[0] == pytest.approx(expected.low, abs=1e-12)
            assert high[0] == pytest.approx(expected.high, abs=1e-12)


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 − 48/80, method 10.
    low, high = newcombe_interval(np.array([56]), np.array([70]), np.array([48]), np.array([80]))
    assert low[0] == pytest.approx(0.0524, abs=1e-4) and high[0] == pytest.approx(0.3339, abs=1e-4)
    # it always holds the observed difference, also at the edges
    k1, k2 = np.array([0, 5, 20, 0]), np.array([0, 0, 3, 20])
    low, high = newcombe_interval(k1, np.full(4, 20), k2, np.full(4, 20))
    difference = k1 / 20 - k2 / 20
    assert np.all(low <= difference) and np.all(difference <= high) and np.all(low >= -1) and np.all(high <= 1)


def test_homogeneity_test_equals_scipy_and_the_z_test():
    counts = np.array([[12, 0, 30, 5, 40], [3, 0, 28, 15, 40], [7, 0, 10, 9, 40]])
    sizes = np.array([40, 50, 45])
    counts[1, 4], counts[2, 4] = 50, 45  # filter 4 qualifies every image
    statistic, p_values, residuals = homogeneity_test(counts, sizes)
    for u in range(5):
        table = np.stack([counts[:, u], sizes - counts[:, u]], axis=1)
        if table[:, 0].sum() in (0, sizes.sum()):
            assert statistic[u] == 0 and p_values[u] == 1 and np.all(residuals[:, u] == 0)
            continue
        chi2, p, _, expected = stats.chi2_contingency(table, correction=False)
        assert statistic[u] == pytest.approx(chi2) and p_values[u] == pytest.approx(p)
        # Haberman's adjusted residuals of the "qualified" column
        total = sizes.sum()
        adjusted = (table[:, 0] - expected[:, 0]) / np.sqrt(
            expected[:, 0] * (1 - sizes / total) * (1 - table[:, 0].sum() / total)
        )
        np.testing.assert_allclose(residuals[:, u], adjusted)
    # two groups: the first residual is the pooled two-proportion z statistic
    two = counts[:2, :4]
    _, p_two, z = homogeneity_test(two, sizes[:2])
    for u in (0, 2, 3):
        p1, p2 = two[0, u] / 40, two[1, u] / 50
        pooled = (two[0, u] + two[1, u]) / 90
        expected_z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1 / 40 + 1 / 50))
        assert z[0, u] == pytest.approx(expected_z) and z[1, u] == pytest.approx(-expected_z)
        assert p_two[u] == pytest.approx(2 * stats.norm.sf(abs(expected_z)))


def test_fisher_exact_test_equals_scipy():
    rng = np.random.default_rng(0)
    n1, n2 = 23, 31
    k1 = np.concatenate([rng.integers(0, n1 + 1, 40), [0, n1, 0, 11]])
    k2 = np.concatenate([rng.integers(0, n2 + 1, 40), [0, n2, n2, 15]])
    got = fisher_exact_test(k1, n1, k2, n2, chunk=7)
    for u in range(len(k1)):
        expected = stats.fisher_exact([[k1[u], n1 - k1[u]], [k2[u], n2 - k2[u]]]).pvalue
        assert got[u] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_benjamini_hochberg_equals_its_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.001, 0.04, 0.9])
    m = len(p)
    expected = np.empty(m)
    for i in range(m):  # q_i = min over j with p_j >= p_i of p_j · m / rank_j
        expected[i] = min(min(1.0, p[j] * m / (np.sum(p <= p[j]))) for j in range(m) if p[j] >= p[i])
    np.testing.assert_allclose(benjamini_hochberg(p), expected)


def test_concept_evidence_by_hand():
    words = [["dog", "cat"], ["dog"], ["car"], [], ["dog", "dog"]]  # a word counts once per filter
    residuals = np.array([[4.0, 2.0, -3.0, 0.0, 3.0], [-4.0, -2.0, 3.0, 0.0, -3.0]])
    named = np.array([True, True, True, False, True])
    found, members, evidence = concept_evidence(words, residuals, named)
    assert found == ["dog", "cat", "car"] and members == [[0, 1, 4], [0], [2]]
    mean, spread = residuals[0, named].mean(), residuals[0, named].std()  # 1.5, 2.693
    assert evidence[0, 0] == pytest.approx(((4 - mean) + (2 - mean) + (3 - mean)) / spread / np.sqrt(3))
    assert evidence[2, 0] == pytest.approx((-3 - mean) / spread) and evidence[2, 1] == pytest.approx(-evidence[2, 0])


def test_matching_functions_by_hand():
    words, profiles = word_profiles([[{"word": "dog", "count": 3}, {"word": "cat", "count": 4}], [], [{"word": "cat", "count": 1}]])
    assert words == ["dog", "cat"] and profiles.tolist() == [[3, 4], [0, 0], [0, 1]]
    similarity = profile_similarity(profiles, profiles)
    assert similarity[0, 2] == pytest.approx(0.8) and similarity[1].abs().sum() == 0
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(30, 4, generator=generator)
    b = torch.cat([a[:, [2, 0]] * 3 + 1, torch.ones(30, 1)], dim=1)  # b0 ~ a2, b1 ~ a0, b2 constant
    correlation = peak_correlation(a, b)
    expected = np.corrcoef(a.T.numpy(), b[:, :2].T.numpy())[:4, 4:]
    np.testing.assert_allclose(correlation[:, :2].numpy(), expected, atol=1e-12)
    assert correlation[:, 2].abs().max() < 1e-6
    assert sorted(mutual_best_matches(correlation)) == [(0, 1), (2, 0)]


# --- which images are in which group --------------------------------------------------------


def _image(path: Path, colour=(128, 128, 128)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def test_group_csv_with_header_relative_and_absolute_paths(tmp_path):
    root = tmp_path / "photos"
    for name in ("x1.png", "x2.png", "sub/y1.png", "y2.png"):
        _image(root / name)
    listing = tmp_path / "groups.csv"
    listing.write_text(f"image,group\nx1.png,men\n{root / 'x2.png'},men\nsub/y1.png,women\n./y2.png,women\n\n")
    groups = read_groups(root, listing)
    assert groups.names == ["men", "women"]
    assert [p.relative_to(root).as_posix() for p in groups.paths] == ["sub/y1.png", "x1.png", "x2.png", "y2.png"]
    assert groups.groups == [1, 0, 0, 1] and not groups.skipped
    from lavise.datasets import ImageFiles

    assert groups.identity() == ImageFiles(root).identity()  # shares explain's feature cache


def test_missing_images_are_counted_and_named(tmp_path):
    root = tmp_path / "photos"
    _image(root / "a.png")
    _image(root / "b.png")
    listing = tmp_path / "groups.csv"
    listing.write_text("a.png,one\nb.png,two\ngone.png,one\nlost/also.jpg,two\nb.png,two\nnotes.txt,one\n")
    groups = read_groups(root, listing)
    lines = groups.skipped.lines()
    assert "skipped 2 listed images that do not exist (e.g. gone.png, lost/also.jpg)" in lines
    assert any("1 images listed twice" in line for line in lines)
    assert any("1 listed files that are not images" in line for line in lines)
    assert len(groups.paths) == 2


def test_paths_outside_the_target_are_refused_before_reading(tmp_path):
    root = tmp_path / "photos"
    _image(root / "a.png")
    secret = _image(tmp_path / "elsewhere" / "secret.png")
    listing = tmp_path / "groups.csv"
    listing.write_text(f"a.png,one\n../elsewhere/secret.png,two\n{secret},two\n/etc/passwd.png,two\n")
    with pytest.raises(LaviseError, match=r"lists 3 images outside the target folder .*Nothing was read"):
        read_groups(root, listing)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png,one\na.png,two\nb.png,two\n", "puts 1 images in two groups"),
        ("a.png,one\nb.png,one\n", "needs at least two groups; .* gives 1 \\(one\\)"),
        ("a.png,one\nb.png\n", "line 2: expected 'image,group'"),
    ],
)
def test_bad_group_files_are_refused(tmp_path, text, message):
    root = tmp_path / "photos"
    _image(root / "a.png")
    _image(root / "b.png")
    listing = tmp_path / "groups.csv"
    listing.write_text(text)
    with pytest.raises(LaviseError, match=message):
        read_groups(root, listing)
    with pytest.raises(LaviseError, match="does not exist"):
        read_groups(root, tmp_path / "absent.csv")


def test_group_sub_folders(tmp_path):
    root = tmp_path / "photos"
    _image(root / "cats" / "1.png")
    _image(root / "cats" / "deep" / "2.png")
    _image(root / "dogs" / "3.png")
    _image(root / "stray.png")
    (root / "empty").mkdir()
    groups = read_groups(root)
    assert groups.names == ["cats", "dogs"] and groups.groups == [0, 0, 1] and groups.source == "sub-folders"
    lines = groups.skipped.lines()
    assert any("1 images outside any group sub-folder (e.g. stray.png)" in line for line in lines)
    assert any("group sub-folders without images (e.g. empty)" in line for line in lines)
    mapping = read_groups(root, {"x": ["cats/1.png"], "y": [root / "dogs" / "3.png"]})
    assert mapping.names == ["x", "y"] and len(mapping) == 2


# --- compare-groups end to end on the tiny model --------------------------------------------

RED, BLUE = (230, 30, 30), (30, 40, 230)


def _scene(path: Path, rng: np.random.Generator, colour) -> None:
    """A noisy grey image with a coloured disc at a random place."""
    canvas = np.full((64, 64, 3), 120, np.uint8) + rng.integers(0, 30, (64, 64, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    cx, cy = rng.integers(14, 50, size=2)
    canvas[(xx - cx) ** 2 + (yy - cy) ** 2 <= 100] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


@pytest.fixture
def grouped(tmp_path) -> Path:
    """Group 'reds': 20 images, 16 with a red disc; group 'blues': 20, 16 with a blue disc."""
    rng = np.random.default_rng(0)
    root = tmp_path / "grouped"
    for group, colour in (("reds", RED), ("blues", BLUE)):
        for i in range(20):
            _scene(root / group / f"{i:02d}.png", rng, colour if i < 16 else (120, 120, 120))
    return root


@pytest.fixture
def explained(tiny_run, tiny_model, grouped, compute, tmp_path):
    explain(tiny_run, grouped, settings=ExplainSettings(top_images=5, vocabulary_size=500), compute=compute,
            model=tiny_model, cache_dir=tmp_path / "cache")
    return tiny_run


SMALL = GroupSettings(min_group_images=10, examples=3, chart_filters=6)


def test_compare_groups_end_to_end(explained, tiny_model, grouped, compute, tmp_path):
    result = compare_groups(explained, grouped, settings=SMALL, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    data = json.loads((explained.path / "groups.json").read_text())
    assert result.path == explained.path / "groups.json"
    assert [g for g in data["groups"]] == [{"name": "blues", "images": 20}, {"name": "reds", "images": 20}]

    # counts from the features, by loops
    from lavise.groups import read_groups as groups_of

    features = target_features(tiny_model, "features.3", groups_of(grouped), cache_dir=tmp_path / "cache", num_workers=0, progress=False)
    thresholds = quantile_thresholds(features.maps, 0.005)
    for entry in data["filters"]:
        u = entry["filter"]
        for name in ("blues", "reds"):
            rows = [n for n, p in enumerate(features.paths) if f"/{name}/" in p]
            qualified = [n for n in rows if float(features.maps[n, u].max()) > float(thresholds[u])]
            assert entry["qualified"][name] == len(qualified)
            assert entry["share"][name] == pytest.approx(len(qualified) / 20)
            # examples: qualified images of this group, most activated first (equal peaks in any order)
            peak = {str(Path(features.paths[n]).relative_to(grouped)): float(features.maps[n, u].max()) for n in qualified}
            shown = [peak[example] for example in entry["examples"][name]]
            assert shown == sorted(peak.values(), reverse=True)[:3]
        shares = entry["share"]
        assert entry["difference"] == pytest.approx(abs(shares["reds"] - shares["blues"]))
        assert entry["ci"][0] <= entry["difference"] <= entry["ci"][1]
        assert entry["threshold"] == pytest.approx(float(thresholds[u]))
        assert entry["words"] == [w["word"] for w in json.loads((explained.path / "explanations.json").read_text())["filters"][u]["words"]]
    differences = [f["difference"] for f in data["filters"]]
    assert differences == sorted(differences, reverse=True) and len(differences) == 8
    # the discs differ between the groups: the tiny network's colour filters see it
    top = data["filters"][0]
    assert top["difference"] >= 0.5 and top["q_value"] < 0.01 and top["significant"]
    np.testing.assert_allclose(
        sorted(f["q_value"] for f in data["filters"]), sorted(benjamini_hochberg(np.array([f["p_value"] for f in data["filters"]])))
    )
    assert {c["word"] for c in data["concepts"]} == {w for f in data["filters"] for w in f["words"][:3]}
    assert data["thresholds"] == {"source": "groups", "quantile": 0.005, "computed_on": "the 40 group images"}
    assert data["settings"]["min_group_images"] == 10 and data["chart"] == "groups.png"
    with Image.open(explained.path / "groups.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 300
    with (explained.path / "groups.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["filter"]) for r in rows] == [f["filter"] for f in data["filters"]]
    assert rows[0]["qualified_reds"] == str(top["qualified"]["reds"])


def test_shuffled_groups_find_nothing(explained, tiny_model, grouped, compute, tmp_path):
    paths = sorted(p.relative_to(grouped) for p in grouped.rglob("*.png"))
    rng = np.random.default_rng(3)
    rng.shuffle(paths)
    mapping = {"first": paths[:20], "second": paths[20:]}
    result = compare_groups(explained, grouped, mapping, settings=SMALL, compute=compute, model=tiny_model,
                            cache_dir=tmp_path / "cache", write=False)
    real = compare_groups(explained, grouped, settings=SMALL, compute=compute, model=tiny_model,
                          cache_dir=tmp_path / "cache", write=False)
    assert not any(f.significant for f in result.filters)
    assert result.filters[0].difference < real.filters[0].difference


def test_fisher_and_run_thresholds(explained, tiny_model, grouped, compute, tmp_path):
    z = compare_groups(explained, grouped, settings=SMALL, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache", write=False)
    from dataclasses import replace

    fisher = compare_groups(explained, grouped, settings=replace(SMALL, test="fisher", thresholds="run"), compute=compute,
                            model=tiny_model, cache_dir=tmp_path / "cache", out=tmp_path / "out")
    # explained on the same folder: the run's thresholds are the recomputed ones
    assert [(f.filter, f.qualified) for f in fisher.filters] == [(f.filter, f.qualified) for f in z.filters]
    for f in fisher.filters:
        table = [[f.qualified["blues"], 20 - f.qualified["blues"]], [f.qualified["reds"], 20 - f.qualified["reds"]]]
        assert f.p_value == pytest.approx(stats.fisher_exact(table).pvalue)
    data = json.loads((tmp_path / "out" / "groups.json").read_text())
    assert data["thresholds"]["source"] == "run" and data["settings"]["test"] == "fisher"


def test_group_comparison_refuses_bad_input(explained, tiny_model, grouped, compute, tmp_path, tiny_run):
    def run(**changes):
        settings = GroupSettings(**{**SMALL.__dict__, **changes})
        return compare_groups(explained, grouped, settings=settings, compute=compute, model=tiny_model,
                              cache_dir=tmp_path / "cache", write=False)

    with pytest.raises(LaviseError, match=r"fewer usable images than min_group_images=25: 'blues' \(20\), 'reds' \(20\)"):
        run(min_group_images=25)
    with pytest.raises(LaviseError, match="Unknown test 'anova'"):
        run(test="anova")
    for name in ("fdr", "confidence"):
        with pytest.raises(LaviseError, match=f"{name} must be in"):
            run(**{name: 1.5})
    _scene(grouped / "greens" / "0.png", np.random.default_rng(1), (30, 200, 30))
    with pytest.raises(LaviseError, match="test='fisher' compares two groups; there are 3"):
        run(test="fisher")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("config.json", "split.json", "explainer.safetensors"):
        (fresh / name).write_bytes((tiny_run.path / name).read_bytes())
    with pytest.raises(LaviseError, match="has no explanations.json: name its filters first"):
        compare_groups(fresh, grouped, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")


def test_unreadable_and_missing_images_are_warned_then_refused_if_too_few(explained, tiny_model, grouped, compute, tmp_path):
    (grouped / "reds" / "broken.png").write_bytes(b"not a png")
    listing = tmp_path / "groups.csv"
    rows = [f"{p.relative_to(grouped)},{p.parent.name}" for p in sorted(grouped.rglob("*.png"))]
    listing.write_text("\n".join(rows + ["reds/missing.png,reds"]) + "\n")
    with pytest.warns(LaviseWarning) as caught:
        result = compare_groups(explained, grouped, listing, settings=SMALL, compute=compute, model=tiny_model,
                                cache_dir=tmp_path / "cache", write=False)
    messages = " | ".join(str(w.message) for w in caught)
    assert "skipped 1 listed images that do not exist (e.g. reds/missing.png)" in messages
    assert "skipped 1 unreadable images" in messages
    assert result.groups == {"blues": 20, "reds": 20}


def test_cli_compare_groups(explained, grouped, tmp_path, capsys, monkeypatch, tiny_model):
    # the CLI rebuilds models from the run; a custom module cannot be, so it says so
    code = main(["compare-groups", str(explained.path), "--target", str(grouped), "--cache-dir", str(tmp_path / "cache"),
                 "--num-workers", "0", "--no-progress", "--min-group-images", "10"])
    assert code == 2 and "custom module" in capsys.readouterr().err
    listing = tmp_path / "g.csv"
    listing.write_text("../outside.png,a\n")
    code = main(["compare-groups", str(explained.path), "--target", str(grouped), "--groups", str(listing)])
    assert code == 2 and "outside the target folder" in capsys.readouterr().err


# --- compare-models ------------------------------------------------------------------------


class _Permuted(nn.Module):
    """The tiny network with the filters of its explained layer in another order."""

    def __init__(self, net: nn.Module, order: list[int]) -> None:
        super().__init__()
        self.features = nn.Sequential(*[m for m in net.features])
        conv = self.features[2]
        with torch.no_grad():
            conv.weight.copy_(conv.weight[order].clone())
            conv.bias.copy_(conv.bias[order].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_compare_models_matches_filters_and_counts_concepts(explained, tiny_model, coco, grouped, compute, tmp_path):
    from copy import deepcopy

    from lavise.datasets import open_reference
    from lavise.runs import train
    from lavise.settings import TrainSettings

    order = [3, 7, 0, 5, 1, 6, 2, 4]
    permuted = TargetModel.from_module(_Permuted(deepcopy(tiny_model.module), order), Preprocessing(64, 64), name="tiny-permuted")
    other = train(permuted, "features.3", open_reference(coco), tmp_path / "other", settings=TrainSettings(epochs=2),
                  compute=compute, cache_dir=tmp_path / "cache")
    explain(other, grouped, settings=ExplainSettings(top_images=5, vocabulary_size=500), compute=compute, model=permuted,
            cache_dir=tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LaviseWarning)  # same naming on both sides: no warning
        result = compare_models(explained, other, target=grouped, compute=compute, model_a=tiny_model, model_b=permuted,
                                cache_dir=tmp_path / "cache", out=tmp_path / "models",
                                settings=ModelComparisonSettings(words_per_filter=2, matches=8))
    # filter b_j is filter a_order[j]: matching by activations recovers the permutation
    active = {f["filter"] for f in json.loads((explained.path / "explanations.json").read_text())["filters"] if f["active"]}
    assert {(m.a, m.b) for m in result.matches} == {(order[j], j) for j in range(8) if order[j] in active}
    assert all(m.correlation == pytest.approx(1.0) for m in result.matches)
    # concept counts, by a loop over the explanations
    for key, run in (("a", explained), ("b", other)):
        filters = json.loads((run.path / "explanations.json").read_text())["filters"]
        expected = {}
        for f in filters:
            for w in f["words"][:2]:
                expected.setdefault(w["word"], []).append(f["filter"])
        assert result.concepts[key] == expected
    assert set(result.shared) == set(result.concepts["a"]) & set(result.concepts["b"])
    assert set(result.unique["a"]) == set(result.concepts["a"]) - set(result.concepts["b"])
    data = json.loads((tmp_path / "models" / "models.json").read_text())
    assert data["runs"]["a"]["concepts"] == len(result.concepts["a"]) and data["matched_by"] == "peak-activation correlation"
    assert (tmp_path / "models" / "models.csv").read_text().startswith("rank,filter_a,filter_b")

    # a run against itself, by words: every named filter matches itself perfectly
    itself = compare_models(explained, explained)
    named = [f["filter"] for f in json.loads((explained.path / "explanations.json").read_text())["filters"] if f["words"]]
    assert result.path is not None and itself.path is None
    assert itself.unique == {"a": [], "b": []}
    assert all(m.similarity == pytest.approx(1.0) and set(m.words_a) == set(m.words_b) for m in itself.matches)
    assert {m.a for m in itself.matches} <= set(named)


def test_compare_models_warns_about_unlike_naming(explained, tiny_model, grouped, compute, tmp_path, coco):
    from lavise.datasets import open_reference
    from lavise.runs import train
    from lavise.settings import TrainSettings

    other = train(tiny_model, "features.3", open_reference(coco), tmp_path / "other", settings=TrainSettings(epochs=1, seed=4),
                  compute=compute, cache_dir=tmp_path / "cache")
    explain(other, grouped, settings=ExplainSettings(method="attention", top_images=6, vocabulary_size=500),
            compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    with pytest.warns(LaviseWarning, match="explained with different method, naming settings"):
        compare_models(explained, other)
    with pytest.raises(LaviseError, match="words_per_filter must be at least 1"):
        compare_models(explained, other, settings=ModelComparisonSettings(words_per_filter=0))
