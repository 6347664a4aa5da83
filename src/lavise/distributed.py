"""Running a stage over several processes: a contiguous shard of the data per rank,
partial statistics merged with ``torch.distributed`` collectives, rank 0 writing.

Under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) the command line calls
:func:`init_from_environment`; from Python, initialise the process group yourself
(``torch.distributed.init_process_group("nccl")`` or ``"gloo"``) and call the same
function on every rank. Every stage asks :func:`current` for its :class:`Ranks`; with
no process group it is the single process, and every method below is a no-op.

A failing rank does not leave the others waiting in a collective: the work between
two collectives runs under :meth:`Ranks.together`, which tells every rank whether any
failed and raises the failure's message everywhere.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lavise.errors import LaviseError
from lavise.storage import Product, cache_hit, cache_save, cached

class OtherRankFailed(LaviseError):
    """Another rank failed; its message is in this one's, and that rank reports it."""


_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8, torch.float16]


def init_from_environment(device: str = "auto") -> bool:
    """Join the process group a launcher described in the environment; True if one was joined.

    NCCL when the rank has a GPU (and ``device`` allows it), else Gloo. Each rank takes
    the GPU of its ``LOCAL_RANK``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    return True


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a stage (rank 0 of 1 without a process group)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes outputs and shows progress."""
        return self.rank == 0

    @property
    def local_world(self) -> int:
        """Ranks on this machine (they share its cores)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world)) if self.world > 1 else 1

    def shard(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items: no padding, no duplicates.

        Example:
            >>> [list(Ranks(r, 3).shard(7)) for r in range(3)]
            [[0, 1], [2, 3], [4, 5, 6]]
        """
        return range(count * self.rank // self.world, count * (self.rank + 1) // self.world)

    def device(self) -> torch.device:
        """Where tensors must be for collectives: the rank's GPU under NCCL, else the CPU."""
        if self.world > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # --- control ---------------------------------------------------------------------

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[None]:
        """Run a block on every rank; if it fails on any, raise on all.

        The failing rank re-raises its own error; the others raise a LaviseError naming
        the rank and its message, so no rank is left waiting in the next collective.
        """
        error = None
        try:
            yield
        except Exception as caught:  # noqa: BLE001 - re-raised below, on every rank
            error = caught
        if self.world > 1:
            messages = self.gather(None if error is None else f"{type(error).__name__}: {error}")
            failed = [(r, m) for r, m in enumerate(messages) if m is not None]
            if error is None and failed:
                rank, message = failed[0]
                raise OtherRankFailed(f"rank {rank} of {self.world} stopped while {what}: {message}")
        if error is not None:
            raise error

    def agree(self, description: dict, what: str) -> None:
        """Refuse to go on when the ranks were not given the same work.

        ``description`` holds what must be equal on every rank (model and its weights,
        layer, data, settings); a rank with another description is named.
        """
        if self.world == 1:
            return
        texts = self.gather(json.dumps(description, sort_keys=True, default=str))
        different = [r for r, text in enumerate(texts) if text != texts[0]]
        if different:
            ours, theirs = json.loads(texts[0]), json.loads(texts[different[0]])
            keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise LaviseError(
                f"The ranks were given different {what}: rank {different[0]} differs from rank 0 in "
                f"{', '.join(keys)}. Start every rank with the same command and files."
            )

    def cached(self, cache_dir: Path | None, name: str, parts: dict, build: Callable[[], Product]) -> Product:
        """:func:`lavise.storage.cached`, taken the same way by every rank.

        The product is read only when every rank finds it; otherwise every rank takes
        part in ``build()`` (which may merge statistics over the ranks) and saves the
        result in its cache (the same bytes, written atomically, where caches are shared).
        """
        if self.world == 1:
            return cached(cache_dir, name, parts, build)
        hit = cache_hit(cache_dir, name, parts)
        if all(self.gather(hit is not None)):
            return hit
        product = build()
        cache_save(cache_dir, name, parts, product)
        return product

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # --- data ------------------------------------------------------------------------

    def gather(self, value: object) -> list:
        """Every rank's small JSON-able value, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (exact for integers and for float64 sums of counts)."""
        if self.world == 1:
            return tensor
        moved = tensor.to(self.device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def from_each(self, tensors: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Each rank's tensors in turn (rank 0 first), on every rank, on the CPU.

        Shapes may differ between ranks. One rank's tensors are in memory at a time, so
        merging partial statistics this way needs twice one rank's state, not all of them.
        """
        for source in range(self.world):
            yield self.from_rank(source, tensors)

    def from_rank(self, source: int, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Rank ``source``'s tensors on every rank (the others pass None or anything with the same names)."""
        if self.world == 1:
            return tensors
        device = self.device()
        names = self.gather(sorted(tensors) if self.rank == source else None)[source]
        received = {}
        for name in names:
            mine = tensors[name] if self.rank == source else None
            header = torch.zeros(10, dtype=torch.int64, device=device)
            if self.rank == source:
                header[0], header[1] = mine.dim(), _DTYPES.index(mine.dtype)
                header[2 : 2 + mine.dim()] = torch.tensor(mine.shape, dtype=torch.int64)
            dist.broadcast(header, source)
            shape = tuple(header[2 : 2 + int(header[0])].tolist())
            dtype = _DTYPES[int(header[1])]
            sent = torch.uint8 if dtype == torch.bool else dtype  # collectives carry bytes, not bools
            buffer = (mine.to(device, sent).contiguous() if self.rank == source
                      else torch.empty(shape, dtype=sent, device=device))
            dist.broadcast(buffer, source)
            received[name] = buffer.cpu().to(dtype)
        return received

    def send(self, tensors: dict[str, torch.Tensor], facts: dict, *, to: int) -> None:
        """Send named tensors and a JSON-able dict to one rank, which calls :meth:`receive`."""
        device = self.device()
        names = sorted(tensors)
        text = torch.frombuffer(bytearray(json.dumps({"names": names, "facts": facts}).encode()), dtype=torch.uint8)
        for tensor in [text, *(tensors[n] for n in names)]:
            sent = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
            header = torch.zeros(10, dtype=torch.int64)
            header[0], header[1] = sent.dim(), _DTYPES.index(tensor.dtype)
            header[2 : 2 + sent.dim()] = torch.tensor(sent.shape, dtype=torch.int64)
            dist.send(header.to(device), to)
            dist.send(sent.to(device).contiguous(), to)


    def receive(self, *, source: int) -> tuple[dict[str, torch.Tensor], dict]:
        device = self.device()

        def one() -> torch.Tensor:
            header = torch.zeros(10, dtype=torch.int64, device=device)
            dist.recv(header, source)
            dtype = _DTYPES[int(header[1])]
            buffer = torch.empty(tuple(header[2 : 2 + int(header[0])].tolist()),
                                 dtype=torch.uint8 if dtype == torch.bool else dtype, device=device)
            dist.recv(buffer, source)
            return buffer.cpu().to(dtype)

        described = json.loads(bytes(one().numpy()).decode())
        return {name: one() for name in described["names"]}, described["facts"]


def current() -> Ranks:
    """The ranks of the initialised process group, or the single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()
