"""lavise: explain in words what each filter of a trained vision network has learned.

Example:
    >>> import lavise
    >>> sorted(lavise.METHODS)
    ['activation', 'attention', 'cosine-attention', 'original']
"""

from lavise._version import __version__
from lavise.compare_models import compare_models
from lavise.datasets import (
    BrodenDataset, CocoDataset, FolderDataset, ImageFiles, ManifestDataset, VisualGenomeDataset, open_reference,
)
from lavise.embeddings import WordVectors, load_word_vectors
from lavise.errors import LaviseError, LaviseWarning
from lavise.evaluate import Evaluation, evaluate
from lavise.explain import Explanations, FilterExplanation, explain
from lavise.groups import compare_groups
from lavise.models import ModelSpec, Preprocessing, TargetModel, load_target_model
from lavise.report import write_report
from lavise.runs import Run, add_survey, load_run, train
from lavise.settings import (
    METHODS, ComputeSettings, EvaluateSettings, ExplainSettings, GroupSettings, ModelComparisonSettings,
    ReferenceSettings, ReportSettings, TrainSettings,
)

__all__ = [
    "METHODS",
    "BrodenDataset",
    "CocoDataset",
    "ComputeSettings",
    "EvaluateSettings",
    "Evaluation",
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
    "__version__",
    "add_survey",
    "compare_groups",
    "compare_models",
    "evaluate",
    "explain",
    "load_run",
    "load_target_model",
    "load_word_vectors",
    "open_reference",
    "train",
    "write_report",
]
