"""lavise: explain in words what each filter of a convolutional network has learned.

Example:
    >>> import lavise
    >>> sorted(lavise.METHODS)
    ['activation', 'attention', 'cosine-attention', 'original']
"""

__version__ = "0.4.0"  # before the imports: lavise.runs records it

from lavise.attention import METHODS
from lavise.datasets import (
    BrodenDataset, CocoDataset, FolderDataset, ImageFiles, LaviseWarning, ManifestDataset, ReferenceSettings,
    VisualGenomeDataset, open_reference,
)
from lavise.embeddings import WordVectors, load_word_vectors
from lavise.errors import LaviseError
from lavise.explain import Explanations, FilterExplanation, explain
from lavise.groups import GroupSettings, ModelComparisonSettings, compare_groups, compare_models
from lavise.models import ModelSpec, Preprocessing, TargetModel, load_target_model
from lavise.report import ReportSettings, write_report
from lavise.runs import Run, load_run, train
from lavise.settings import ComputeSettings, ExplainSettings, TrainSettings

__all__ = [
    "METHODS",
    "BrodenDataset",
    "CocoDataset",
    "ComputeSettings",
    "ExplainSettings",
    "Explanations",
    "FilterExplanation",
    "FolderDataset",
    "GroupSettings",
    "ImageFiles",
    "LaviseError",
    "LaviseWarning",
    "ManifestDataset",
    "ModelComparisonSettings",
    "ModelSpec",
    "Preprocessing",
    "ReferenceSettings",
    "ReportSettings",
    "Run",
    "TargetModel",
    "TrainSettings",
    "VisualGenomeDataset",
    "WordVectors",
    "compare_groups",
    "compare_models",
    "explain",
    "load_run",
    "load_target_model",
    "load_word_vectors",
    "open_reference",
    "train",
    "write_report",
]
