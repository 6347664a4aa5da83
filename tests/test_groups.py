"""compare-groups end to end on the tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from conftest import draw_disc_scene as _scene
from lavise.cli import main
from lavise.datasets import LaviseWarning
from lavise.errors import LaviseError
from lavise.features import target_features
from lavise.groups import compare_groups
from lavise.regions import quantile_thresholds
from lavise.settings import ComputeSettings, GroupSettings
from lavise.stats import benjamini_hochberg

pytestmark = pytest.mark.filterwarnings("ignore:.*reference concepts are not in the vocabulary")

# --- compare-groups end to end on the tiny model --------------------------------------------

SMALL = GroupSettings(min_group_images=10, examples=3, chart_filters=6)


def test_compare_groups_end_to_end(explained, tiny_model, grouped, compute, tmp_path):
    result = compare_groups(explained, grouped, settings=SMALL, compute=compute, model=tiny_model, cache_dir=tmp_path / "cache")
    data = json.loads((explained.path / "groups.json").read_text())
    assert result.path == explained.path / "groups.json"
    assert [g for g in data["groups"]] == [{"name": "blues", "images": 20}, {"name": "reds", "images": 20}]

    # counts from the features, by loops
    from lavise.groups import read_groups as groups_of

    features = target_features(tiny_model, "features.3", groups_of(grouped), cache_dir=tmp_path / "cache",
                               compute=ComputeSettings(num_workers=0, progress=False))
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
