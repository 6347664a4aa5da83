"""Classification datasets laid out one sub-folder per class: the mask is the whole image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lavise.datasets.base import IMAGE_EXTENSIONS, SkipLog
from lavise.errors import LaviseError


class FolderDataset:
    """``root/<class name>/<image>``; each image is labelled with its folder's name.

    Underscores in folder names become spaces ("traffic_light" -> "traffic light").
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise LaviseError(f"Reference folder '{self.root}' does not exist.")
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        if not class_dirs:
            raise LaviseError(
                f"Reference folder '{self.root}' has no sub-folders; a folder dataset holds "
                "one sub-folder of images per class."
            )
        self.concepts = [d.name.replace("_", " ") for d in class_dirs]
        self.skipped = SkipLog()
        self._items: list[tuple[Path, int]] = []
        for concept, directory in enumerate(class_dirs):
            files = sorted(p for p in directory.rglob("*") if p.is_file())
            images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            for other in set(files) - set(images):
                self.skipped.add("files that are not images", str(other.relative_to(self.root)))
            if not images:
                self.skipped.add("class folders without images", directory.name)
            self._items.extend((path, concept) for path in images)
        if not self._items:
            raise LaviseError(f"No image files under '{self.root}'.")

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"FolderDataset(root='{self.root}', images={len(self)}, concepts={len(self.concepts)})"

    def image_path(self, index: int) -> Path:
        return self._items[index][0]

    def masks(self, index: int, size: tuple[int, int]) -> tuple[list[int], np.ndarray]:
        width, height = size
        return [self._items[index][1]], np.ones((1, height, width), dtype=np.uint8)

    def identity(self) -> dict:
        from lavise.storage import files_digest

        return {
            "kind": "folder",
            "root": str(self.root.resolve()),
            "files": files_digest([p for p, _ in self._items]),
            "concepts": self.concepts,
        }
