"""Groups of images under one target folder, for comparing groups (``lavise compare-groups``).

Groups come from a CSV of ``image,group`` rows, a mapping from group name to image
paths, or one sub-folder of the target folder per group. Every listed path must lie
inside the target folder (symbolic links resolved); one outside it refuses the whole
list before anything is read.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lavise.datasets.base import (
    IMAGE_EXTENSIONS, SkipLog, image_files, image_files_identity, printable, require_folder, resolve_inside,
)
from lavise.errors import LaviseError


@dataclass
class GroupImages:
    """The images of every group, under one target folder.

    Acts as the target dataset of :func:`lavise.features.target_features`; its identity
    is that of :class:`ImageFiles` over the same files (:func:`image_files_identity`),
    so features cached by ``explain`` on the same folder are reused.

    Attributes:
        root: the target folder; every image lies inside it.
        names: the group names, sorted.
        paths: the images, sorted as ImageFiles sorts them.
        groups: the group index of each image.
        source: where the groups came from (a CSV file, or "sub-folders").
        skipped: listed entries that could not be used, by reason.
    """

    root: Path
    names: list[str]
    paths: list[Path]
    groups: list[int]
    source: str
    skipped: SkipLog

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {c}" for n, c in zip(self.names, np.bincount(self.groups, minlength=len(self.names))))
        return f"GroupImages(root='{self.root}', groups={{{sizes}}})"

    def image_path(self, index: int) -> Path:
        return self.paths[index]

    def identity(self) -> dict:
        return image_files_identity(self.root, self.paths)


def read_groups(target: Path, groups: Path | Mapping[str, Sequence[str | Path]] | None = None) -> GroupImages:
    """The groups of images under ``target``.

    Args:
        target: the folder holding every image.
        groups: a CSV file of ``image,group`` rows (an optional header row ``image,group``;
            image paths relative to ``target`` or absolute inside it); a mapping from group
            name to such paths; or None: one sub-folder of ``target`` per group.

    Raises:
        LaviseError: the folder or CSV is missing or malformed, fewer than two groups,
            an image listed in two groups, or paths outside ``target`` (those are not read).
    """
    root = Path(target)
    require_folder(root, "Target folder")
    if groups is None:
        return _group_folders(root)
    if isinstance(groups, Mapping):
        rows = [(str(path), str(name), f"group '{name}'") for name, paths in groups.items() for path in paths]
        return _listed_groups(root, rows, "mapping")
    return _listed_groups(root, _csv_rows(Path(groups)), str(groups))


def _csv_rows(path: Path) -> list[tuple[str, str, str]]:
    """(image, group, where) of each data row of a group CSV."""
    if not path.is_file():
        raise LaviseError(f"Group file '{path}' does not exist; give a CSV of image,group rows.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            lines = [(n, row) for n, row in enumerate(csv.reader(handle), start=1) if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csv.Error) as error:
        raise LaviseError(f"Group file '{path}' is not a readable CSV: {error}.") from None
    if lines and [c.strip().lower() for c in lines[0][1][:2]] in (["image", "group"], ["path", "group"]):
        lines = lines[1:]
    rows = []
    for number, row in lines:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise LaviseError(
                f"Group file '{path}', line {number}: expected 'image,group', got {','.join(row)!r}."
            )
        rows.append((row[0].strip(), row[1].strip(), f"{path.name}:{number}"))
    return rows


def _listed_groups(root: Path, rows: list[tuple[str, str, str]], source: str) -> GroupImages:
    resolved_root = root.resolve()
    outside, located = [], []
    for image, name, where in rows:
        resolved = resolve_inside(root, image)  # the one path rule of every reader; no file is opened
        if resolved is None:
            outside.append(printable(f"{image} ({where})"))
        else:
            located.append((root / resolved.relative_to(resolved_root), name, image))
    if outside:
        raise LaviseError(
            f"{source} lists {len(outside)} images outside the target folder '{root}' "
            f"(e.g. {', '.join(outside[:5])}); list paths relative to it or inside it. "
            "Nothing was read."
        )
    skipped = SkipLog(examples_kept=20)
    group_of: dict[Path, str] = {}
    conflicts = []
    for path, name, image in located:
        if path in group_of:
            if group_of[path] != name:
                conflicts.append(f"{image} ({group_of[path]}, {name})")
            else:
                skipped.add("images listed twice", image)
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.add("listed files that are not images by their extension", image)
        elif not path.is_file():
            skipped.add("listed images that do not exist", image)
        else:
            group_of[path] = name
    if conflicts:
        raise LaviseError(
            f"{source} puts {len(conflicts)} images in two groups (e.g. {', '.join(conflicts[:5])}); "
            "groups must not overlap."
        )
    return _assemble(root, group_of, source, skipped)


def _group_folders(root: Path) -> GroupImages:
    skipped = SkipLog()
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    group_of: dict[Path, str] = {}
    for folder in folders:
        for path in image_files(folder, skipped, root):  # broken symbolic links are counted
            group_of[path] = folder.name
    for path in root.iterdir():
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            skipped.add("images outside any group sub-folder", path.name)
    missing = [f.name for f in folders if f.name not in set(group_of.values())]
    for name in missing:
        skipped.add("group sub-folders without images", name)
    return _assemble(root, group_of, "sub-folders", skipped)


def _assemble(root: Path, group_of: dict[Path, str], source: str, skipped: SkipLog) -> GroupImages:
    names = sorted(set(group_of.values()))
    if len(names) < 2:
        how = "sub-folders of images" if source == "sub-folders" else "groups among the listed existing images"
        raise LaviseError(
            f"Comparing groups needs at least two groups; '{root}' gives {len(names)} "
            f"({', '.join(names) or 'none'}) from {source}. Give two or more {how}."
        )
    paths = sorted(group_of)
    index = {name: i for i, name in enumerate(names)}
    return GroupImages(root, names, paths, [index[group_of[p]] for p in paths], source, skipped)
