"""How a layer's output is read as a spatial map (batch, filters, h, w).

Convolutional layers give ``(N, C, h, w)`` (``nchw``). Many networks published since
2021 do not: a vision transformer's block gives a token sequence ``(N, P + h·w, C)``
whose first P tokens are prefix tokens (a class token, a distillation token, register
tokens) and the rest a grid of patches (``tokens``); Swin and the channels-last blocks
of timm give ``(N, h, w, C)`` (``nhwc``). A "filter" of such a layer is one channel.

A :class:`Layout` says which; :func:`resolve_layout` finds it for one layer's output
from what the model tells (timm's ``num_prefix_tokens``, its patch grid, its
``feature_info`` channels and ``output_fmt``) and from the shape, or checks the one the
user gave (``--layout``). :func:`as_feature_map` is the pure conversion.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from lavise.errors import LaviseError

LAYOUTS = ("auto", "nchw", "nhwc", "tokens")
LAYOUT_HELP = (
    "how the layer's output is a map: auto (from the model and the shape), nchw (convolutions), "
    "nhwc (channels last: Swin, timm's ConvNeXt blocks), tokens (a transformer's (N, P + h*w, C): "
    "P prefix tokens from the model), tokens:P (P prefix tokens), tokens:P:HxW (and the patch grid)"
)


@dataclass(frozen=True)
class Layout:
    """One layer's output layout: ``kind`` nchw, nhwc or tokens; for tokens, how many
    prefix tokens come first and the (h, w) grid of the patch tokens."""

    kind: str
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "prefix_tokens": self.prefix_tokens, "grid": list(self.grid) if self.grid else None}

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        grid = data.get("grid")
        return cls(str(data["kind"]), int(data.get("prefix_tokens") or 0), tuple(grid) if grid else None)

    def describe(self) -> str:
        """A phrase for summaries: what was read and what was dropped."""
        if self.kind == "tokens":
            grid = f"{self.grid[0]}x{self.grid[1]}" if self.grid else "?"
            dropped = f", {self.prefix_tokens} prefix token{'s' * (self.prefix_tokens != 1)} dropped" if self.prefix_tokens else ""
            return f"tokens ({grid} patch grid{dropped})"
        return {"nchw": "channels first (N, C, h, w)", "nhwc": "channels last (N, h, w, C)"}[self.kind]


def parse_layout(text: str) -> tuple[str, int | None, tuple[int, int] | None]:
    """A ``--layout`` value as (kind, prefix tokens or None, grid or None).

    Example:
        >>> parse_layout("tokens:1:14x14"), parse_layout("nhwc"), parse_layout("tokens")
        (('tokens', 1, (14, 14)), ('nhwc', None, None), ('tokens', None, None))
    """
    match = re.fullmatch(r"(auto|nchw|nhwc|tokens)(?::(\d+)(?::(\d+)x(\d+))?)?", str(text).strip())
    if match is None or (match.group(2) is not None and match.group(1) != "tokens"):
        raise LaviseError(
            f"--layout {text!r} is not a layout; use one of {', '.join(LAYOUTS)}, tokens:P or tokens:P:HxW "
            "(P prefix tokens, an H by W patch grid)."
        )
    kind, prefix, h, w = match.groups()
    return kind, None if prefix is None else int(prefix), None if h is None else (int(h), int(w))


def as_feature_map(output: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(N, C, h, w) from a layer's output in ``layout``.

    Example:
        >>> tokens = torch.arange(2 * 5 * 3.).reshape(2, 5, 3)  # 1 class token + a 2x2 grid, 3 channels
        >>> as_feature_map(tokens, Layout("tokens", 1, (2, 2)))[0, :, 0, 1].tolist()  # patch 2, all channels
        [6.0, 7.0, 8.0]
    """
    if layout.kind == "nchw":
        return output
    if layout.kind == "nhwc":
        return output.permute(0, 3, 1, 2)
    h, w = layout.grid
    patches = output[:, layout.prefix_tokens:, :]
    return patches.reshape(output.shape[0], h, w, output.shape[2]).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class ModelHints:
    """What a model says about its layers' layouts (all optional)."""

    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None
    channels: dict[str, int] | None = None  # feature_info: module -> channels of its output
    channels_last: bool = False  # the model's output_fmt is NHWC

    @classmethod
    def of(cls, module: nn.Module) -> ModelHints:
        """Read timm's attributes (and look alike ones of other libraries) from ``module``."""
        prefix = getattr(module, "num_prefix_tokens", None)
        grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
        info = getattr(module, "feature_info", None)
        channels = None
        if isinstance(info, (list, tuple)) or hasattr(info, "info"):
            entries = info.info if hasattr(info, "info") else info
            channels = {e["module"]: int(e["num_chs"]) for e in entries if isinstance(e, dict) and "module" in e and "num_chs" in e}
        fmt = str(getattr(module, "output_fmt", "") or "")
        return cls(
            prefix_tokens=int(prefix) if isinstance(prefix, int) else None,
            grid=tuple(int(g) for g in grid) if isinstance(grid, (tuple, list)) and len(grid) == 2 else None,
            channels=channels or None,
            channels_last=fmt.upper().endswith("NHWC"),
        )

    def channels_of(self, layer: str) -> int | None:
        """The channels timm's feature_info gives the layer or the stage it is in."""
        if not self.channels:
            return None
        owners = [name for name in self.channels if layer == name or layer.startswith(name + ".")]
        return self.channels[max(owners, key=len)] if owners else None


def resolve_layout(requested: str, shape: tuple[int, ...], hints: ModelHints = ModelHints(), *, layer: str = "") -> Layout:
    """The layout of a layer output of ``shape`` (batch first), as requested or detected.

    Detection: 3-D outputs are tokens, with the model's prefix tokens and patch grid
    when the length fits them, else the fewest prefix tokens (at most 16) that leave a
    square grid. 4-D outputs are channels first unless the channels the model gives
    for the layer, or the shape (h equals w in a square crop), say channels last; a
    shape that fits both is read as the model's ``output_fmt`` says, else channels first.
    A requested layout that does not fit the shape is refused with the shape in the message.
    """
    kind, prefix, grid = parse_layout(requested)
    where = f"Layer '{layer}'" if layer else "The layer"
    if len(shape) not in (3, 4):
        raise LaviseError(
            f"{where} outputs {tuple(shape)}, which is not a map: lavise reads (N, C, h, w), (N, h, w, C) or "
            f"token sequences (N, P + h*w, C). Choose another layer (--layout values: {', '.join(LAYOUTS)}, tokens:P)."
        )
    if kind == "auto":
        kind = "tokens" if len(shape) == 3 else _four_d_kind(shape, hints, layer)
    if kind in ("nchw", "nhwc"):
        if len(shape) != 4:
            raise LaviseError(f"{where} outputs {tuple(shape)}, a token sequence, not a {kind} map: use --layout tokens.")
        return Layout(kind)
    if len(shape) != 3:
        raise LaviseError(f"{where} outputs {tuple(shape)}, a 4-D map, not tokens (N, P + h*w, C): use --layout nchw or nhwc.")
    return Layout("tokens", *_token_grid(shape[1], prefix, grid, hints, where, shape))


def _four_d_kind(shape: tuple[int, ...], hints: ModelHints, layer: str) -> str:
    _, a, b, c = shape
    channels = hints.channels_of(layer)
    if channels is not None and (a == channels) != (c == channels):
        return "nhwc" if c == channels else "nchw"
    first, last = b == c and a != b, a == b and b != c  # a square crop has h == w
    if first != last:
        return "nhwc" if last else "nchw"
    return "nhwc" if hints.channels_last else "nchw"


def _token_grid(length: int, prefix: int | None, grid: tuple[int, int] | None, hints: ModelHints, where: str,
                shape: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
    if prefix is not None:
        patches = length - prefix
        grid = grid or _square(patches)
        if grid is None or patches != grid[0] * grid[1]:
            raise LaviseError(
                f"{where} outputs {tuple(shape)}: {length} tokens do not split into {prefix} prefix tokens and "
                f"{'a ' + 'x'.join(map(str, grid)) + ' grid' if grid else 'a square grid'}; give --layout tokens:P:HxW."
            )
        return prefix, grid
    model_grid = hints.grid
    if model_grid is not None:
        count = model_grid[0] * model_grid[1]
        for candidate in (hints.prefix_tokens or 0, 0):
            if length == candidate + count:
                return candidate, model_grid
    for candidate in range(17):
        if (square := _square(length - candidate)) is not None:
            return candidate, square
    raise LaviseError(
        f"{where} outputs {tuple(shape)}: no number of prefix tokens up to 16 leaves a square grid of patches; "
        "give it with --layout tokens:P:HxW."
    )


def _square(count: int) -> tuple[int, int] | None:
    side = math.isqrt(max(count, 0))
    return (side, side) if count > 0 and side * side == count else None
