"""Where and how fast the work runs: the torch device, and torch's CPU threads.

These never change a result; they are kept apart from the stages so that each stage
asks for them in one line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from lavise.errors import LaviseError
from lavise.settings import ComputeSettings


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; any other device must exist on this machine.

    An unknown device name, or one this machine lacks (``cuda`` without a GPU, ``cuda:3``
    beside one GPU, ``mps`` off a Mac), is a :class:`LaviseError` that lists the devices
    there are; stages resolve their device before they read any image.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = ", ".join(available_devices())
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LaviseError(f"Unknown device {device!r}: give auto, cpu, cuda, cuda:N or mps; this machine has {here}.") from None
    if chosen.type == "meta":
        raise LaviseError(f"Device {device!r} holds no data and cannot run lavise; this machine has {here}.")
    if not _present(chosen):
        raise LaviseError(f"Device {device!r} is not on this machine; it has {here} (--device auto picks a GPU when there is one).")
    return chosen


def available_devices() -> list[str]:
    """The devices of this machine, as --device names them: cpu, cuda:0, ..., mps."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    return found


def _present(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type in ("cuda", "xpu"):
        backend = getattr(torch, device.type, None)
        count = backend.device_count() if backend is not None and backend.is_available() else 0
        return count > 0 and (device.index is None or device.index < count)
    if device.type == "mps":
        return device.index in (None, 0) and "mps" in available_devices()
    try:  # another backend: it is there when a tensor can be made on it
        torch.empty(1, device=device)
    except Exception:  # noqa: BLE001 (backends fail in their own ways: a missing module, no driver)
        return False
    return True


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
