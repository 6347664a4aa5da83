"""Where and how fast the work runs: the torch device, and torch's CPU threads.

These never change a result; they are kept apart from the stages so that each stage
asks for them in one line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from lavise.settings import ComputeSettings


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def cpu_threads(compute: ComputeSettings, *, workers: int | None = None) -> Iterator[None]:
    """Set torch's CPU threads for a block.

    ``compute.threads`` = 0 means this process's share of the cores (all of them, or
    1/k of them beside k-1 other ranks on the machine) less the image-decoding workers,
    at least one: on a 2-core machine, two torch threads beside two decoding workers
    made small operations hundreds of times slower. ``workers`` overrides
    ``compute.num_workers`` for work with no decoding workers running (``workers=0``).
    """
    busy = compute.num_workers if workers is None else workers
    share = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    count = compute.threads or max(1, share - busy)
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
