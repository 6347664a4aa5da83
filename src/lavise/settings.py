"""Every tunable default, defined once. The command-line options are derived from these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def option(default, help: str, **extra):
    """A settings field with its command-line help (and extra metadata such as ``choices``)."""
    return field(default=default, metadata={"help": help, **extra})


RANKINGS = ("first-choice", "frequency")  # ExplainSettings.ranking; lavise.explain.rank_words


@dataclass(frozen=True)
class TrainSettings:
    """How the explainer is trained (paper §3.1, method-notes).

    The defaults are lavise's: features pooled inside the mask, Adam at 1e-3, and three
    activation-region rows per (image, concept) pair besides the whole mask. With
    activation masking and first-choice ranking they named seen concepts better than the
    authors' set-up at every fresh seed on all four demo layers (docs/evaluation.md,
    protocol 3). ``TrainSettings.authors()`` is the authors' set-up (global mean of
    F ⊙ M, Adam at 1e-4, whole masks), kept for comparison.
    """

    unseen_fraction: float = option(
        0.0, "share of concepts held out of training as unseen (the paper used 0.3)"
    )
    seed: int = option(0, "seed for the concept split, validation split, initialisation and batches")
    epochs: int = option(60, "passes over the pooled reference vectors")
    train_batch_size: int = option(128, "pooled vectors per training step")
    learning_rate: float = option(1e-3, "Adam learning rate (the authors used 1e-4, which had not converged in 60 epochs)")
    margin: float = option(1.0, "margin of the hinge rank loss")
    dropout: float = option(0.1, "dropout before each linear layer of the explainer")
    validation_fraction: float = option(
        0.1, "share of reference images held out to choose the best epoch"
    )
    pooling: str = option(
        "region",
        "how masked features are pooled: region (the mean inside the mask, so inputs do not "
        "shrink with the region's area) or mean (over the whole grid, the authors' code); "
        "explain follows the run",
        choices=("region", "mean"),
    )
    activation_regions: int = option(
        3,
        "also train on the features inside an activation region, as explain's activation masking "
        "gives them: for each (image, concept) pair, the regions {F_u > T_u} inside the mask of "
        "the N filters most active there (0: whole masks only, the paper; 3 since lavise 0.4, "
        "docs/evaluation.md protocols 3 and 4)",
    )
    region_quantile: float = option(
        0.005, "T_u of those regions: the top-quantile level over the reference images (explain's --quantile)"
    )

    @classmethod
    def authors(cls, **changes) -> "TrainSettings":
        """The authors' set-up: the paper's code pools over the whole grid, Adam at 1e-4, whole masks."""
        return cls(**{"pooling": "mean", "learning_rate": 1e-4, "activation_regions": 0, **changes})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExplainSettings:
    """How filters are named (paper §3.2 and the word selection of method-notes)."""

    method: str = option(
        "activation",
        "explainer input per filter: activation (activation masking, the best on most demo layers, "
        "docs/evaluation.md), attention (the paper's spatial filter attention), "
        "cosine-attention (the paper's scalar equation), original (no mask)",
        choices=("activation", "attention", "cosine-attention", "original"),
    )
    top_images: int = option(25, "p: most activated target images per filter")
    words_per_image: int = option(5, "s: nearest words taken for each image")
    ranking: str = option(
        "first-choice",
        "how a filter's collected words are ordered: first-choice (by how many top images have "
        "the word as their nearest, then by frequency; lavise's default, docs/evaluation.md) or "
        "frequency (by how often among each image's s nearest words; the paper)",
        choices=RANKINGS,
    )
    top_words: int = option(10, "x: words reported per filter")
    quantile: float = option(0.005, "a filter's region is where it exceeds its top-quantile level T_u")
    vocabulary_size: int = option(
        20_000, "name filters from the N most frequent clean words (0: every word)"
    )
    vocabulary_file: str | None = option(None, "a file of candidate words, one per line (overrides the size)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ComputeSettings:
    """Where and how fast; these never change results."""

    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
    batch_size: int = option(32, "images per forward pass")
    num_workers: int = option(2, "processes decoding images")
    threads: int = option(
        0, "torch CPU threads; 0: the cores left after the decoding workers, at least 1 "
        "(oversubscribed cores made a 2-core machine 2-600x slower, see README)"
    )
    progress: bool = option(True, "show progress bars")

    def to_dict(self) -> dict:
        return asdict(self)


EVALUATION_METHODS = ("original", "image", "activation", "attention", "cosine-attention", "netdissect")


@dataclass(frozen=True)
class EvaluateSettings:
    """How explanations are scored against annotated data (paper §4.5, NetDissect's protocol)."""

    methods: tuple[str, ...] = option(
        EVALUATION_METHODS,
        "methods compared: the four explainer inputs, image (image masking: the image masked "
        "to the filter's region and run again) and netdissect (highest-IoU concepts)",
        choices=EVALUATION_METHODS,
    )
    iou_threshold: float = option(0.04, "a concept is a filter's ground truth when their IoU exceeds this")
    iou_size: int = option(
        112, "side of the grid where activation regions meet masks (Broden's 112 for 224-pixel images)"
    )
    labelling_fraction: float = option(
        0.5, "share of images on which NetDissect picks labels; ground truth comes from the rest (0: no NetDissect)"
    )
    split_seed: int = option(0, "seed of the labelling/scoring split of the evaluation images")
    lenient: bool = option(True, "also report lenient recall (WordNet plurals and synonyms count)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReferenceSettings:
    """Format-specific options of the reference readers (see docs/datasets.md)."""

    min_images: int = option(
        100, "Visual Genome: drop categories present in fewer images (the paper's 100)"
    )
    categories: str | None = option(
        None, "Broden: comma-separated categories to read, e.g. object,part,material; None: all"
    )
    split: str | None = option(None, "Broden: only images of this split of index.csv, e.g. train; None: all")
    class_names: str | None = option(
        None, "folder: a file mapping folder names (e.g. WordNet ids) to words, or 'imagenet' "
        "for torchvision's ImageNet class names (folders: the 1000 WordNet ids); None: folder names"
    )

    def to_dict(self) -> dict:
        return asdict(self)


def option_fields(settings_type) -> list:
    """The dataclass fields that become command-line options."""
    return list(fields(settings_type))
