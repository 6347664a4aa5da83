"""Folder datasets named by WordNet id: mapping files and torchvision's ImageNet class names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.models import ResNet50_Weights

from lavise.cli import main
from lavise.datasets import FolderDataset, open_reference
from lavise.datasets.folder import read_class_names
from lavise.errors import LaviseError
from lavise.settings import ReferenceSettings

WNIDS = {"n01440764": "tench", "n02084071": "dog", "n04037443": "racer"}


def write_folders(root: Path, wnids=tuple(WNIDS), *, images_per_class: int = 2) -> Path:
    for k, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        for i in range(images_per_class):
            Image.new("RGB", (12 + i, 10), (k * 60 % 255, 80, 40)).save(root / wnid / f"{wnid}_{i}.JPEG")
    return root


@pytest.mark.parametrize("kind", ["loc_synset_mapping", "words_tsv", "csv", "json", "keras_json"])
def test_mapping_files_in_the_usual_shapes(tmp_path, kind):
    root = write_folders(tmp_path / "train")
    extra = {"n01440764": "tench, Tinca tinca", "n02084071": "dog, domestic dog, Canis familiaris", "n04037443": "racer, race car, racing car"}
    if kind == "loc_synset_mapping":
        path = tmp_path / "LOC_synset_mapping.txt"
        path.write_text("".join(f"{w} {n}\n" for w, n in extra.items()))
    elif kind == "words_tsv":
        path = tmp_path / "words.txt"
        path.write_text("# wnid\tnames\n" + "".join(f"{w}\t{n}\n" for w, n in extra.items()) + "n00001740\tentity\n")
    elif kind == "csv":
        path = tmp_path / "names.csv"
        path.write_text("".join(f"{w},{n}\n" for w, n in WNIDS.items()))
    elif kind == "json":
        path = tmp_path / "names.json"
        path.write_text(json.dumps(WNIDS))
    else:
        path = tmp_path / "imagenet_class_index.json"
        path.write_text(json.dumps({str(i): [w, n.replace(" ", "_")] for i, (w, n) in enumerate(WNIDS.items())}))
    dataset = FolderDataset(root, class_names=path)
    assert dataset.concepts == ["tench", "dog", "racer"]
    assert len(dataset) == 6 and not dataset.skipped
    assert dataset.masks(3, (13, 10))[0] == [1]  # n02084071/..._1.JPEG
    assert dataset.image_path(3).relative_to(root).as_posix() == "n02084071/n02084071_1.JPEG"
    concepts, masks = dataset.masks(5, (13, 10))
    assert concepts == [2] and masks.shape == (1, 10, 13) and masks.all()


def test_unnamed_folders_are_counted_and_clashing_names_kept_apart(tmp_path):
    root = write_folders(tmp_path / "train", ("n02012849", "n03126707", "n09999999"))
    mapping = tmp_path / "map.txt"
    mapping.write_text("n02012849\tcrane\nn03126707\tcrane\n")
    dataset = FolderDataset(root, class_names=mapping)
    assert dataset.concepts == ["crane", "crane (n03126707)"]  # the bird and the machine
    assert len(dataset) == 4
    assert dataset.skipped.counts == {"class folders not named in the class-name file": 1}
    assert dataset.skipped.examples["class folders not named in the class-name file"] == ["n09999999"]
    assert dataset.identity()["concepts"] == dataset.concepts


def test_bad_mapping_files_are_refused(tmp_path):
    root = write_folders(tmp_path / "train")
    other = tmp_path / "other.txt"
    other.write_text("n00000001 thing\n")
    with pytest.raises(LaviseError, match=r"None of the 3 class folders .* is named in '.*other.txt'"):
        FolderDataset(root, class_names=other)
    twice = tmp_path / "twice.txt"
    twice.write_text("n01440764 tench\nn02084071 dog\nn01440764 carp\n")
    with pytest.raises(LaviseError, match=r"names 'n01440764' twice \(lines 1 and 3\)"):
        read_class_names(twice)
    nameless = tmp_path / "nameless.txt"
    nameless.write_text("n01440764\n")
    with pytest.raises(LaviseError, match="line 1: 'n01440764' has a folder name but no class name"):
        read_class_names(nameless)
    with pytest.raises(LaviseError, match="does not exist"):
        FolderDataset(root, class_names=tmp_path / "missing.txt")


def test_imagenet_names_follow_the_sorted_wordnet_ids(tmp_path):
    names = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    rng = np.random.default_rng(0)
    wnids = sorted({f"n{v:08d}" for v in rng.choice(10**8, size=1200, replace=False)})[:1000]
    root = tmp_path / "imagenet"
    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
    for k in (0, 1, 999):  # a few classes with an image are enough
        Image.new("RGB", (8, 8)).save(root / wnids[k] / "a.JPEG")
    dataset = open_reference(root, settings=ReferenceSettings(class_names="imagenet"))
    assert dataset.concepts == list(names)  # index order = sorted WordNet ids
    assert dataset.concepts[0] == "tench" and dataset.concepts[999] == names[999]
    assert [dataset.masks(i, (8, 8))[0] for i in range(3)] == [[0], [1], [999]]
    assert dataset.skipped.counts["class folders without images"] == 997

    (root / wnids[0]).rename(root / "extra_folder")
    with pytest.raises(LaviseError, match="has 1000 sub-folders, 999 of them WordNet ids.*pass a mapping file"):
        FolderDataset(root, class_names="imagenet")


def test_cli_takes_the_reference_options(tmp_path, capsys):
    root = write_folders(tmp_path / "train")
    out = tmp_path / "run"
    code = main(["train", "--layer", "layer4", "--reference", str(root), "--reference-format", "folder",
                 "--categories", "object", "--out", str(out)])
    assert code == 2 and "--categories does not apply to the folder format (only to: broden)" in capsys.readouterr().err
    code = main(["train", "--layer", "layer4", "--reference", str(root), "--class-names", str(tmp_path / "none.txt"),
                 "--out", str(out)])
    assert code == 2 and "Class-name file" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["train", "--layer", "layer4", "--reference", str(root), "--reference-format", "voc", "--out", str(out)])
    assert "choose from 'coco', 'visual_genome', 'broden', 'folder', 'manifest'" in capsys.readouterr().err
