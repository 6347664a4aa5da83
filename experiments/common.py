"""What the experiment scripts read from a ``lavise demo`` folder: its data, runs and cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lavise.datasets.coco import CocoDataset
from lavise.runs import Run, load_run


@dataclass(frozen=True)
class DemoFolder:
    path: Path

    @property
    def cache(self) -> Path:
        return self.path / "cache"

    @property
    def reference(self) -> CocoDataset:
        """The reference scenes the demo's explainers learn from."""
        return CocoDataset(self.path / "data/reference/annotations.json", self.path / "data/reference/images")

    @property
    def evaluation(self) -> CocoDataset:
        """The annotated evaluation scenes, held-out concepts included."""
        return CocoDataset(self.path / "data/evaluation/annotations.json", self.path / "data/evaluation/images")

    def run(self, target: str) -> Run:
        """The demo's run of ``efficientnet_lite0`` or ``scene_cnn``."""
        return load_run(self.path / "runs" / target)
