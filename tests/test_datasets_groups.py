"""Which images are in which group: group CSVs, mappings and sub-folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lavise.datasets import read_groups
from lavise.errors import LaviseError

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
