"""timm models by name: ``--model timm/NAME``, with the preprocessing of their pretrained configuration.

``timm/convnext_tiny`` builds timm's ConvNeXt-T with seeded random weights;
``--weights fb_in22k`` asks timm for that pretrained tag (``convnext_tiny.fb_in22k``),
which it downloads from the Hugging Face hub; ``--checkpoint FILE`` loads local weights
instead (``--weights`` then only chooses the tag's preprocessing). Preprocessing —
input size, mean and std, interpolation, crop share — comes from timm's pretrained
configuration of the model (``timm.data.resolve_data_config``) and is recorded in the
run like torchvision's.
"""

from __future__ import annotations

import difflib
import math
import warnings

from torch import nn

from lavise.errors import LaviseError, LaviseWarning
from lavise.models.preprocessing import Preprocessing

TIMM_PREFIX = "timm/"


def check_timm_name(name: str) -> None:
    """Refuse a name timm does not build, listing the closest ones."""
    import timm

    architecture = name.split(".", 1)[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=6, cutoff=0.5)
        raise LaviseError(
            f"Unknown timm model '{architecture}'. Closest timm names: {', '.join(close) or 'none'}. "
            "Use --model timm/NAME with a name from timm.list_models()."
        )


def timm_model(name: str, weights: str | None, *, local: bool) -> tuple[nn.Module, Preprocessing]:
    """Build timm model ``name`` (random weights, or the pretrained tag ``weights``) and its preprocessing.

    ``local``: the weights come from a checkpoint, so nothing is downloaded even when a
    tag is named (the tag still decides the preprocessing).
    """
    import timm

    architecture = name.split(".", 1)[0]
    tag = weights or (name.split(".", 1)[1] if "." in name else None)
    full = f"{architecture}.{tag}" if tag else architecture
    if tag is not None:
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{architecture}.*")]
        if tag not in tags:
            raise LaviseError(
                f"timm has no pretrained tag '{tag}' for '{architecture}'; its tags: {', '.join(tags) or 'none'}. "
                "Leave --weights out for random initialisation."
            )
    if tag is not None and not local:
        try:
            module = timm.create_model(full, pretrained=True)
        except Exception as error:  # hub and network failures come in many types
            raise LaviseError(
                f"Could not load the timm weights '{full}' ({type(error).__name__}: {str(error).splitlines()[0][:160]}). "
                "timm downloads them from the Hugging Face hub; on a machine without internet, save the model's "
                "state_dict where you can reach the hub (torch.save(timm.create_model(NAME, pretrained=True)."
                f"state_dict(), FILE)) and pass it with --checkpoint FILE (keep --weights {tag} for its preprocessing)."
            ) from None
    else:
        module = timm.create_model(full, pretrained=False)
    return module, timm_preprocessing(module, full)


def timm_preprocessing(module: nn.Module, name: str) -> Preprocessing:
    """The preprocessing of a timm model's pretrained configuration, as lavise applies it:
    resize the shorter side to floor(size / crop_pct) (timm's rule), centre-crop ``size``."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=module)
    _, height, width = config["input_size"]
    if height != width:
        raise LaviseError(
            f"timm model '{name}' takes {height}x{width} inputs; lavise centre-crops square images. "
            "Wrap the model with TargetModel.from_module and a square Preprocessing to explain it."
        )
    if config.get("crop_mode", "center") != "center":
        warnings.warn(
            f"timm model '{name}' is configured with crop mode '{config['crop_mode']}'; lavise centre-crops.",
            LaviseWarning,
            stacklevel=4,
        )
    interpolation = config.get("interpolation", "bilinear")
    if interpolation not in ("nearest", "bilinear", "bicubic"):
        interpolation = "bilinear"  # timm's 'random' is a training-time augmentation
    crop_pct = float(config.get("crop_pct") or 1.0)
    return Preprocessing(
        resize_size=math.floor(height / crop_pct),
        crop_size=int(height),
        mean=tuple(float(m) for m in config["mean"]),
        std=tuple(float(s) for s in config["std"]),
        interpolation=interpolation,
    )
