"""Every product setting and choice, each default defined once; the command line derives its options from these.

One frozen dataclass per stage or command. A field's metadata holds its command-line
help and what it accepts (``bounds``, ``choices``, ``warn``), checked when the settings
are built (:mod:`lavise.checks`, docs/options.md); ``lavise.cli`` turns every field into
an option, so a default changes here and nowhere else. Settings are recorded with every run and output
(``to_dict``), so results can be traced to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lavise.checks import (  # noqa: F401  (GROUP_NAMES, parse_group_bias: part of this module's API)
    GROUP_NAMES, SEED_BOUNDS, SettingError, _check_fraction, _check_int, _check_range, check_fields, parse_group_bias,
)
from lavise.errors import LaviseError


def option(default, help: str, **extra):
    """A settings field with its command-line help and what it accepts (:mod:`lavise.checks`):
    ``bounds`` (an interval, e.g. ``"[1, )"``), ``choices``, ``warn`` ((predicate, why))."""
    return field(default=default, metadata={"help": help, **extra})


class _Settings:
    def __post_init__(self) -> None:
        check_fields(self)  # the same message from Python and the command line, before any work

    def to_dict(self) -> dict:
        return asdict(self)


SEED = {"bounds": SEED_BOUNDS}
COUNT = {"bounds": "[1, )"}  # a number of things, at least one
ANY_COUNT = {"bounds": "[0, )"}  # 0 allowed (its help says what 0 means)
# Adam moves each weight by about the learning rate at every step, whatever the gradient's
# scale; the explainer's weights are of order 0.1, so a rate of 1 already replaces them at
# every step and nothing above it can train: such a value is a typo (1e3 for 1e-3).
LEARNING_RATE = {"bounds": "[0, 1]", "warn": (lambda v: v == 0, ("Adam with learning rate 0 never moves the "
                                              "explainer from its random initialisation: nothing will be learned"))}


# --- choices ---------------------------------------------------------------------------

CALIBRATIONS = ("reference-filters", "simulated")
THRESHOLD_RULES = ("expected", "observed")
METHODS = ("activation", "attention", "cosine-attention", "original")  # explainer inputs, lavise.inputs
POOLINGS = ("region", "mean")  # how the explainer's inputs are pooled, lavise.inputs
RANKINGS = ("first-choice", "frequency")  # how a filter's words are ordered, lavise.explain.rank_words
VOCABULARIES = ("visual", "frequent")  # candidate words, lavise.vocabulary
LOSSES = ("hinge", "hardest", "softmax")  # how the explainer is trained, lavise.explainer.LOSS_FUNCTIONS
RETRIEVALS = ("aligned", "csls", "cosine")  # how an explainer output's nearest words are found, lavise.retrieval
EVALUATION_METHODS = ("original", "image", "activation", "attention", "cosine-attention", "netdissect")
REFERENCE_FORMATS = ("coco", "visual_genome", "broden", "folder", "manifest")
TESTS = ("z", "fisher")  # per-filter tests of a group comparison
THRESHOLD_SOURCES = ("groups", "run")  # where a group comparison's T_u come from
BACKGROUND_KINDS = ("plain", "texture", "photo")  # of planted-concept scenes
SCENE_POOLS = ("unicode", "wordnet")  # which emoji are concepts, lavise.synthetic.world

VOCABULARY_SIZE = 20_000  # candidate words: the most frequent clean words of the word vectors


# --- the pipeline ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings(_Settings):
    """How the explainer is trained (paper §3.1, method-notes).

    The defaults are lavise's: features pooled inside the mask, Adam at 1e-3, and three
    activation-region rows per (image, concept) pair besides the whole mask; the
    measurements that chose them are in docs/evaluation.md. ``TrainSettings.authors()``
    is the authors' set-up (global mean of F ⊙ M, Adam at 1e-4, whole masks), kept for
    comparison.
    """

    unseen_fraction: float = option(
        0.0, "share of concepts held out of training as unseen (the paper used 0.3)", bounds="[0, 1)"
    )
    seed: int = option(0, "seed for the concept split, validation split, initialisation and batches", **SEED)
    epochs: int = option(60, "passes over the pooled reference vectors", **COUNT)
    train_batch_size: int = option(128, "pooled vectors per training step", **COUNT)
    learning_rate: float = option(1e-3, "Adam learning rate (the authors used 1e-4)", **LEARNING_RATE)
    margin: float = option(1.0, "margin of the hinge rank loss", warn=(
        lambda v: v < 0, ("with a negative margin the loss is already zero while a wrong concept is nearer than the "
                          "right one (by less than the margin): every concept can be named wrong at no cost")))
    loss: str = option(
        "hinge",
        "the explainer's loss: hinge (Equation 1: the margin violations of every seen concept, summed), "
        "hardest (only the most violating concept's, VSE++) or softmax (cross-entropy over the seen concepts' "
        "cosines divided by --temperature)",
        choices=LOSSES,
    )
    temperature: float = option(0.1, "the softmax loss's temperature: smaller makes it sharper", bounds="(0, )")
    dropout: float = option(0.1, "dropout before each linear layer of the explainer", bounds="[0, 1]", warn=(
        lambda v: v == 1, "dropout 1 zeroes every input of each linear layer in training: nothing will be learned"))
    validation_fraction: float = option(
        0.1, "share of reference images held out to choose the best epoch", bounds="[0, 1]", warn=(
            lambda v: v > 0.5, ("more reference images are held out to choose the epoch than trained on "
                                "(at 1, all but one image)"))
    )
    survey_images: int = option(
        2000, "reference training images on which the run's filter survey measures each filter's IoU with the "
        "concepts, besides the held-out images it names the filters on (0: no survey; the confidence is then "
        "fitted on simulated filters)", **ANY_COUNT)
    pooling: str = option(
        "region",
        "how masked features are pooled: region (the mean inside the mask, so inputs do not "
        "shrink with the region's area) or mean (over the whole grid, the authors' code); "
        "explain follows the run",
        choices=POOLINGS,
    )
    activation_regions: int = option(
        3,
        "also train on the features inside activation regions, as explain's activation masking "
        "gives them: for each (image, concept) pair, the regions {F_u > T_u} inside the mask of "
        "the N filters most active there (0: whole masks only, as the paper)", **ANY_COUNT,
    )
    region_quantile: float = option(
        0.005, "T_u of those regions: the top-quantile level over the reference images (explain's --quantile)",
        bounds="(0, 1)",
    )

    @classmethod
    def authors(cls, **changes) -> TrainSettings:
        """The authors' set-up: the paper's code pools over the whole grid, Adam at 1e-4, whole masks."""
        return cls(**{"pooling": "mean", "learning_rate": 1e-4, "activation_regions": 0, **changes})


@dataclass(frozen=True)
class ExplainSettings(_Settings):
    """How filters are named (paper §3.2 and the word selection of method-notes)."""

    method: str = option(
        "activation",
        "explainer input per filter: activation (activation masking), attention (the paper's "
        "spatial filter attention), cosine-attention (the paper's scalar equation), original (no mask)",
        choices=METHODS,
    )
    top_images: int = option(25, "p: most activated target images per filter", **COUNT)
    words_per_image: int = option(5, "s: nearest words taken for each image", **COUNT)
    ranking: str = option(
        "first-choice",
        "how a filter's collected words are ordered: first-choice (by how many top images have "
        "the word as their nearest, then by frequency) or frequency (by how often among each "
        "image's s nearest words, the paper)",
        choices=RANKINGS,
    )
    top_words: int = option(10, "x: words reported per filter", **COUNT)
    quantile: float = option(0.005, "a filter's region is where it exceeds its top-quantile level T_u", bounds="(0, 1)")
    firing_images_only: bool = option(
        True, "a filter's words come only from those of its p top images where it fires (its peak exceeds T_u, so its "
        "region is not empty); off: from all p, firing or not, as lavise 0.4 and 0.5 named")
    vocabulary: str = option(
        "visual",
        "candidate words: visual (nouns of things one can see, colours and textures, shipped with "
        "lavise) or frequent (the most frequent clean words of the word vectors, lavise 0.4)", choices=VOCABULARIES)
    vocabulary_size: int = option(VOCABULARY_SIZE, "keep the first N words of the vocabulary, most frequent first (0: every word)",
                                  **ANY_COUNT)
    vocabulary_file: str | None = option(None, "a file of candidate words or phrases, one per line (overrides --vocabulary and its size)")
    concept_names: bool = option(True, "the reference data's concept names are candidates too, multi-word ones as phrases")
    retrieval: str = option(
        "aligned",
        "nearest words by aligned (the words mapped into the explainer's output space by a ridge "
        "regression fitted on the seen concepts' reference outputs), csls (cross-domain similarity local "
        "scaling: a word near many reference outputs is penalised) or cosine (the paper)",
        choices=RETRIEVALS,
    )
    alignment_ridge: float = option(1.0, "lambda of aligned retrieval: how strongly the map is pulled towards the identity",
                                    bounds="(0, )")
    hub_neighbours: int = option(10, "k of csls: a word's hubness is its mean similarity to its k nearest reference outputs",
                                 **COUNT)
    seen_penalty: float = option(
        0.0, "calibrated stacking (Chao et al., 2016): subtract this from the score of every candidate that is a "
        "seen concept's name, so words the explainer was not trained on can rank above them (0: none)", bounds="[0, 2]")
    abstain_precision: float = option(0.9, "report a filter as having no confident name below the confidence at which the "
                                      "filters the confidence is fitted on are named this precisely (0: name every filter)",
                                      bounds="[0, 1)")
    threshold_rule: str = option(
        "expected", "how that confidence is found: expected (the filters named at or above it average this confidence) or "
        "observed (they were right this often: lavise 0.5's first rule)", choices=THRESHOLD_RULES)
    label_first: int = option(
        3, "when the reference annotations' label of a filter (its concept of highest IoU on the reference training "
        "images, from the run's survey) is among its first N words, it goes first (0: the words alone decide)",
        **ANY_COUNT)
    label_iou: float = option(0.04, "a filter's label is its concept of highest IoU on the reference training images when above this",
                              bounds="[0, 1)")
    calibration: str = option(
        "reference-filters", "what the confidence is fitted on: reference-filters (the run's own filters named on held-out "
        "reference images, with what the annotations say of each; simulated filters when the run has no survey) or "
        "simulated (simulated filters of reference outputs, lavise 0.5's first confidence)", choices=CALIBRATIONS)
    calibration_seed: int = option(0, "seed of the simulated filters the confidence is calibrated on", **SEED)

    @classmethod
    def as_in_0_4(cls, **changes) -> ExplainSettings:
        """lavise 0.4's naming: the 20,000 most frequent words, cosine, no concept names added, every top image votes."""
        return cls(**{"vocabulary": "frequent", "concept_names": False, "retrieval": "cosine",
                      "firing_images_only": False, "label_first": 0, **changes})


@dataclass(frozen=True)
class ComputeSettings(_Settings):
    """Where and how fast; these never change results."""

    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
    batch_size: int = option(32, "images per forward pass", **COUNT)
    num_workers: int = option(2, "processes decoding images (0: decode in this process)", **ANY_COUNT)
    threads: int = option(
        0, "torch CPU threads; 0: the cores left after the decoding workers, at least 1 "
        "(oversubscribed cores made a 2-core machine 2-600x slower, see README)", **ANY_COUNT
    )
    progress: bool = option(True, "show progress bars")
    memory_budget: float = option(
        2.0, "GiB that a stage may hold of what grows with the data: the feature maps of the images "
        "it names from, the pooled reference rows it trains on; beyond it they are read again from disk", **ANY_COUNT
    )
    cache_maps: bool = option(
        True, "keep the target images' feature maps in the cache, in chunks (4·d·h·w bytes per image); "
        "without, every pass over the images runs the network again and an interrupted pass starts over"
    )


@dataclass(frozen=True)
class EvaluateSettings(_Settings):
    """How explanations are scored against annotated data (paper §4.5, NetDissect's protocol)."""

    methods: tuple[str, ...] = option(
        EVALUATION_METHODS,
        "methods compared: the four explainer inputs, image (image masking: the image masked "
        "to the filter's region and run again) and netdissect (highest-IoU concepts)",
        choices=EVALUATION_METHODS,
    )
    iou_threshold: float = option(0.04, "a concept is a filter's ground truth when their IoU exceeds this", bounds="[0, 1)")
    iou_size: int = option(
        112, "side of the grid where activation regions meet masks (Broden's 112 for 224-pixel images)", **COUNT
    )
    labelling_fraction: float = option(
        0.5, "share of images on which NetDissect picks labels; ground truth comes from the rest (0: no NetDissect)",
        bounds="[0, 1)",
    )
    split_seed: int = option(0, "seed of the labelling/scoring split of the evaluation images", **SEED)
    lenient: bool = option(True, "also report lenient recall (WordNet plurals and synonyms count)")
    unseen_protocol: bool = option(
        True, "also score unseen concepts the paper's way: each filter's words ranked within an entity list too (the "
        "authors' code ranks within 1,203 Visual Genome names), unseen recall@k and named@k in both lists as multiples "
        "of chance, split by WordNet hops to the nearest seen concept (docs/unseen.md)",
    )
    entity_file: str | None = option(
        None, "the entity list: a file of names, one per line (default: every concept name of the reference and evaluation data)"
    )


@dataclass(frozen=True)
class ReferenceSettings(_Settings):
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
    allow_outside_root: bool = option(
        False, "every format: read image, mask and label-map paths that lead outside the dataset's image "
        "folder (.., absolute paths, symbolic links out); by default such a dataset is refused"
    )


# --- analyses and the report -----------------------------------------------------------


@dataclass(frozen=True)
class GroupSettings(_Settings):
    """How groups of images are compared (``lavise compare-groups``)."""

    test: str = option(
        "z",
        "per-filter test: z (two-proportion z-test; Pearson chi-square for more than two "
        "groups) or fisher (Fisher's exact test, two groups)",
        choices=TESTS,
    )
    fdr: float = option(0.05, "false discovery rate: filters with a Benjamini-Hochberg q-value below it are significant",
                        bounds="(0, 1)")
    confidence: float = option(0.95, "level of the confidence interval on each difference", bounds="(0, 1)")
    thresholds: str = option(
        "groups",
        "T_u: groups (recomputed on the group images at the quantile the run was explained "
        "with) or run (the thresholds.safetensors of the run's last explain)",
        choices=THRESHOLD_SOURCES,
    )
    min_group_images: int = option(20, "refuse a group with fewer usable images than this", **COUNT)
    concept_words: int = option(3, "first words of each filter's explanation that count as its concepts", **COUNT)
    examples: int = option(4, "qualified example images listed per group and filter (most activated first)", **ANY_COUNT)
    chart_filters: int = option(20, "filters shown in groups.png", **ANY_COUNT)


@dataclass(frozen=True)
class ModelComparisonSettings(_Settings):
    """How two explained runs are compared (``lavise compare-models``)."""

    words_per_filter: int = option(1, "first words of each filter's explanation counted as the concepts it learned", **COUNT)
    matches: int = option(20, "best-matching filter pairs reported", **COUNT)


@dataclass(frozen=True)
class ReportSettings(_Settings):
    """What the report shows and how its images are made."""

    thumbnail_size: int = option(128, "side of the square image thumbnails, in pixels, 16-1024", bounds="[16, 1024]")
    jpeg_quality: int = option(80, "JPEG quality of the thumbnails, 1-95", bounds="[1, 95]")
    overlays: bool = option(
        True, "draw each filter's region (above its threshold T_u) over its top images; needs the "
        "run's model and its target features (cached by 'explain')"
    )
    examples_per_group: int = option(6, "example images shown per group on a filter's page", **ANY_COUNT)
    absolute_paths: bool = option(False, "show data folders by their absolute paths (default: their names only)")


# --- planted-concept scenes and the demos ----------------------------------------------


@dataclass(frozen=True)
class SceneSettings(_Settings):
    """How to generate a set of planted-concept scenes (``lavise synth``, :mod:`lavise.synthetic`).

    ``group_bias`` is also accepted as a mapping ``{"dog": (0.6, 0.1), ...}`` or pairs
    ``(("dog", (0.6, 0.1)), ...)``; it is kept in that canonical form of pairs.
    """

    image_size: int = option(224, "side of the square scenes, in pixels")
    num_images: int = option(200, "number of scenes")
    concepts_per_image: tuple[int, int] = option(
        (2, 5), "(min, max) emoji per scene, both inclusive; a texture concept comes on top of these"
    )
    num_concepts: int | None = option(50, "emoji concepts drawn (from the seed) from the pool; None: the whole pool")
    pool: str = option(
        "unicode", "which emoji are concepts: unicode (the rule on their Unicode names) or wordnet (also: WordNet reads "
        "the word as a visible thing; each concept gets its family, e.g. animal, vehicle, food, in split.json)",
        choices=SCENE_POOLS,
    )
    unseen_fraction: float = option(0.2, "share of all concepts (emoji and textures) held out as unseen")
    seed: int = option(0, "the seed of every random choice")
    scale: tuple[float, float] = option((0.2, 0.6), "(min, max) of an emoji's longer side, as a share of the image")
    backgrounds: tuple[str, ...] = option(BACKGROUND_KINDS, "background kinds drawn from", choices=BACKGROUND_KINDS)
    texture_concepts: bool = option(
        True, "annotate texture patches as concepts (grass, gravel, brick); otherwise they are "
        "unannotated background, and emoji sharing a texture's word are left out"
    )
    background_concepts: bool = option(
        False, "annotate plain backgrounds as concepts, the way Broden does: the colour name nearest the "
        "background's colour (of Broden's 11), its mask the background left visible under the other layers; "
        "colours are always seen concepts, the colour is drawn among them, and emoji named by a colour are left out"
    )
    texture_area: tuple[float, float] = option((0.4, 1.0), "(min, max) share of the scene a texture patch covers")
    min_visible_area: int = option(64, "instances with fewer visible pixels are dropped")
    min_visible_fraction: float = option(0.25, "instances with less of their own area visible are dropped")
    group_bias: tuple[tuple[str, tuple[float, ...]], ...] | None = option(
        None,
        "planted bias between groups a, b, ...: per concept its probability in each group's scenes "
        "(scene i is in group i mod G), e.g. dog=0.6:0.1,car=0.1:0.6 (writes groups.csv)",
    )

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "group_bias", parse_group_bias(self.group_bias))
        except LaviseError as error:
            raise SettingError("SceneSettings", "group_bias", f"{{}}: {error}") from None
        for name in ("concepts_per_image", "scale", "texture_area", "backgrounds"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        _check_int("image_size", self.image_size, minimum=32)
        _check_int("num_images", self.num_images, minimum=1)
        _check_range("concepts_per_image", self.concepts_per_image, 1, None, integer=True)
        if self.num_concepts is not None:
            _check_int("num_concepts", self.num_concepts, minimum=1)
        _check_fraction("unseen_fraction", self.unseen_fraction, below_one=True)
        _check_int("seed", self.seed, minimum=0)
        _check_range("scale", self.scale, 0.0, 1.0)
        _check_range("texture_area", self.texture_area, 0.0, 1.0)
        _check_int("min_visible_area", self.min_visible_area, minimum=1)
        _check_fraction("min_visible_fraction", self.min_visible_fraction)
        if self.pool not in SCENE_POOLS:
            raise SettingError("SceneSettings", "pool", f"Unknown {{}} {self.pool!r}; valid: {', '.join(SCENE_POOLS)}.")
        for name in ("texture_concepts", "background_concepts"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError("SceneSettings", name, f"{{}} must be True or False, not {getattr(self, name)!r}.")
        kinds = self.backgrounds
        if (
            not isinstance(kinds, tuple)
            or not kinds
            or len(set(kinds)) != len(kinds)
            or not set(kinds) <= set(BACKGROUND_KINDS)
        ):
            raise SettingError("SceneSettings", "backgrounds", f"{{}} must be a non-empty list of distinct kinds "
                               f"among {', '.join(BACKGROUND_KINDS)}; got {kinds!r}.")
        # plain Python numbers, so that settings compare and serialise the same way
        for name in ("image_size", "num_images", "seed", "min_visible_area"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.num_concepts is not None:
            object.__setattr__(self, "num_concepts", int(self.num_concepts))
        object.__setattr__(self, "concepts_per_image", tuple(int(v) for v in self.concepts_per_image))
        for name in ("scale", "texture_area"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("unseen_fraction", "min_visible_fraction"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["group_bias"] is None:  # scenes made before group_bias keep their key
            del data["group_bias"]
        if not data["background_concepts"]:  # and those made before background concepts theirs
            del data["background_concepts"]
        if data["pool"] == "unicode":  # and those made before the WordNet pool theirs
            del data["pool"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SceneSettings:
        return cls(**data)


@dataclass(frozen=True)
class DemoSettings(_Settings):
    """The built-in demo (``lavise demo``): scenes, two targets, their explainers."""

    reference_images: int = option(800, "reference scenes the explainers learn from", **COUNT)
    evaluation_images: int = option(300, "held-out scenes among the target images", **COUNT)
    concepts: int = option(60, "emoji concepts planted in the scenes", **COUNT)
    unseen_fraction: float = option(0.3, "share of concepts kept out of the reference scenes", bounds="[0, 1)")
    seed: int = option(0, "seed for scenes, split, scene CNN and explainers", **SEED)
    scene_cnn_epochs: int = option(10, "training epochs of the small scene CNN", **COUNT)
    explainer_epochs: int = option(60, "training epochs of each explainer", **COUNT)
    explainer_pooling: str = option(
        TrainSettings.pooling, "pooling of the explainers' inputs (mean: the authors')", choices=POOLINGS
    )
    explainer_learning_rate: float = option(TrainSettings.learning_rate, "Adam learning rate of the explainers (1e-4: the authors')",
                                            **LEARNING_RATE)
    explainer_activation_regions: int = option(
        TrainSettings.activation_regions, "activation regions per (image, concept) pair the explainers also train on (0: the authors')",
        **ANY_COUNT,
    )
    vocabulary: str = option(
        "visual", "candidate words, and the words the scenes' concepts may have: visual, or frequent "
        "(lavise 0.4's naming: the most frequent words, cosine, no concept names added)",
        choices=VOCABULARIES,
    )
    vocabulary_size: int = option(VOCABULARY_SIZE, "keep the first N words of the vocabulary (0: every word)", **ANY_COUNT)
    background_concepts: bool = option(True, "plain backgrounds are concepts named by their colour, as in Broden (False: lavise 0.4's scenes)")

    @classmethod
    def as_in_0_4(cls, **changes) -> DemoSettings:
        """lavise 0.4's demo: the 20,000 most frequent words, backgrounds not annotated."""
        return cls(**{"vocabulary": "frequent", "background_concepts": False, **changes})

    def explain_settings(self) -> ExplainSettings:
        """How the demo names its filters."""
        if self.vocabulary == "frequent":
            return ExplainSettings.as_in_0_4(vocabulary_size=self.vocabulary_size)
        return ExplainSettings(vocabulary=self.vocabulary, vocabulary_size=self.vocabulary_size)


@dataclass(frozen=True)
class BiasDemoSettings(_Settings):
    """The planted-bias demo (``lavise demo-bias``): scenes, the group classifier, the explainer and the comparison."""

    planted: str = option("dog=0.6:0.1,car=0.1:0.6", "planted bias: per concept its probability in each group's scenes")
    reference_images: int = option(300, "reference scenes (with masks) the explainer learns from", **COUNT)
    target_images: int = option(400, "target scenes, alternately in group a and group b", bounds="[2, )")
    concepts: int = option(12, "emoji concepts in the scenes, the planted ones included", **COUNT)
    image_size: int = option(112, "side of the scenes in pixels (the scene CNN reads 112)", bounds="[32, )")
    backgrounds: tuple[str, ...] = option(BACKGROUND_KINDS, "background kinds of the scenes", choices=BACKGROUND_KINDS)
    concepts_per_image: tuple[int, int] = option((1, 3), "(min, max) emoji per scene besides the planted ones", **COUNT)
    seed: int = option(0, "seed of the scenes, the classifier and the explainer", **SEED)
    pretrain_epochs: int = option(
        10, "epochs of concept recognition on the reference scenes before the group task (0: from random weights)", **ANY_COUNT
    )
    classifier_epochs: int = option(5, "training epochs of the group classifier (longer fine-tuning blurs the concepts)", **COUNT)
    classifier_batch_size: int = option(16, "images per training step of the group classifier (BatchNorm needs 2)", bounds="[2, )")
    explainer_epochs: int = option(100, "training epochs of the explainer", **COUNT)
    explainer_learning_rate: float = option(1e-3, "Adam learning rate of the explainer (converges in fewer epochs than 1e-4)",
                                            **LEARNING_RATE)
    vocabulary_size: int = option(VOCABULARY_SIZE, "candidate words: the N most frequent clean GloVe words", **ANY_COUNT)
    vocabulary_file: str | None = option(None, "a file of candidate words, one per line (overrides the size)")
    words_per_image: int = option(0, "nearest words taken per image when naming filters (0: explain's default)", **ANY_COUNT)
    top_filters: int = option(5, "a planted concept is found when it is among the first 3 words of one of this many top filters",
                              **COUNT)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            parse_group_bias(self.planted)
        except LaviseError as error:
            raise SettingError(type(self).__name__, "planted", f"{{}}: {error}") from None
