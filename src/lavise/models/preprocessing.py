"""How images (and their concept masks) become the tensors a model reads.

Resize the shorter side, centre-crop, scale to [0, 1], normalise per channel. A model
choice brings its preprocessing (torchvision's weights do, and so do the built-in
architectures), and it is recorded in every run. Concept masks take the same geometry,
so they stay aligned with the image the network sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise per channel."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            resize_size=int(data["resize_size"]),
            crop_size=int(data["crop_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=str(data["interpolation"]),
        )


def preprocess_image(image, preprocessing: Preprocessing) -> torch.Tensor:
    """PIL RGB image -> normalised (3, crop, crop) float tensor."""
    tensor = TF.pil_to_tensor(image)
    tensor = TF.resize(
        tensor,
        [preprocessing.resize_size],
        interpolation=TF.InterpolationMode(preprocessing.interpolation),
        antialias=True,
    )
    tensor = TF.center_crop(tensor, [preprocessing.crop_size])
    tensor = TF.to_dtype(tensor, torch.float32, scale=True)
    return TF.normalize(tensor, list(preprocessing.mean), list(preprocessing.std))


def preprocess_masks(masks: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """(m, H, W) binary masks -> (m, crop, crop) coverage in [0, 1], aligned with the image.

    Masks take the image's resize and crop; the resize averages (antialias) rather than
    samples, so thin or small regions keep partial weight.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(masks)).float()
    tensor = TF.resize(tensor, [preprocessing.resize_size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(tensor, [preprocessing.crop_size]).clamp_(0, 1)
