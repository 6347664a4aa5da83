"""Writing outputs atomically, digests of files, and caching tensors under a key of everything that made them.

No output is ever half-written: each file is written to a temporary name in the same
folder and renamed into place, with the permissions the user's umask gives. The files
one command writes together (a run, an explanation, an evaluation) are staged and
renamed into place together by :func:`output_set`, so a failure (a full disk, a kill)
leaves the previous outputs as they were, never a mix.

Every cached stage goes through :func:`cached`: its products are safetensors files (no
pickle) whose metadata holds the full key; a file whose key differs, or that cannot be
read, is recomputed, never trusted. A cache that cannot be written (a full disk, a
read-only folder) is warned about once and the work goes on without it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lavise.errors import LaviseError, LaviseWarning

CACHE_FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.is_file():  # mkstemp makes files private (0600); outputs get the umask's permissions
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputSet:
    """The files one command writes into a folder, staged until they are all written.

    Made by :func:`output_set`; write each file at ``outputs.path(name)`` (with the
    writers of this module, or anything that writes a file there).
    """

    def __init__(self, folder: Path, staging: Path) -> None:
        self.folder, self.staging = folder, staging

    def path(self, name: str) -> Path:
        """Where to write output ``name`` (a file name in the folder, no sub-folders)."""
        if Path(name).name != name:
            raise ValueError(f"an output set holds file names, not paths: {name!r}")
        return self.staging / name

    def names(self) -> list[str]:
        return sorted(p.name for p in self.staging.iterdir() if not p.name.endswith(".tmp"))


@contextlib.contextmanager
def output_set(folder: Path, *, last: str, replaces: Iterable[str] = ()) -> Iterator[OutputSet]:
    """Write several outputs of one command so that they change together or not at all.

    Every file is written into a staging folder inside ``folder`` (same file system, so
    the final renames need no space). When the block ends without an error, the old
    ``last`` file (the one whose presence marks the outputs complete, such as a run's
    ``config.json``) is moved aside first, then the files matching ``replaces`` (glob
    patterns: outputs made from what is being replaced), then each new file is renamed
    into place, ``last`` at the very end. If the block fails (a full disk, an error, a
    kill), nothing in ``folder`` has changed. Other files in ``folder`` are never touched.

    A failure to write the staged files (an OSError) becomes a LaviseError that says the
    previous outputs are intact.

    Example:
        >>> folder = Path(tempfile.mkdtemp())
        >>> with output_set(folder, last="b.json") as outputs:
        ...     write_json(outputs.path("a.json"), 1)
        ...     write_json(outputs.path("b.json"), 2)
        >>> sorted(p.name for p in folder.iterdir())
        ['a.json', 'b.json']
    """
    folder = Path(folder)
    _remove_abandoned(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=folder))
    except OSError as error:
        raise LaviseError(f"Cannot write into '{folder}' ({error.strerror or error}).") from None
    try:
        outputs = OutputSet(folder, staging)
        try:
            yield outputs
        except OSError as error:
            raise LaviseError(
                f"Cannot write the outputs into '{folder}' ({error.strerror or error}); nothing there was "
                "changed, the previous outputs are as they were."
            ) from None
        names = outputs.names()
        if last not in names:
            raise ValueError(f"the output set of '{folder}' has no {last!r}")
        aside = staging / ".replaced"
        aside.mkdir()
        if (folder / last).exists():
            os.replace(folder / last, aside / last)  # from here on the outputs do not look complete
        for pattern in replaces:
            for old in folder.glob(pattern):
                if old.is_file() and old.name not in names:
                    os.replace(old, aside / old.name)
        for name in [n for n in names if n != last] + [last]:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_abandoned(folder: Path) -> None:
    """Staging folders left by killed processes of this machine (their pid is gone)."""
    for staging in folder.glob(".staging-*-*") if folder.is_dir() else ():
        try:
            os.kill(int(staging.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            pass  # not ours to judge


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, data: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata=metadata)
        except SafetensorError as error:  # its I/O errors (a full disk) are OSErrors like any other write's
            code = re.search(r"os error (\d+)", str(error))
            raise OSError(int(code.group(1)) if code else None, f"cannot write '{path}': {error}") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def cache_key(parts: dict) -> str:
    """A stable digest of a JSON-able description of everything a result depends on."""
    text = json.dumps({"format": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def default_cache_dir() -> Path:
    """$LAVISE_CACHE, else $XDG_CACHE_HOME/lavise, else ~/.cache/lavise."""
    if "LAVISE_CACHE" in os.environ:
        return Path(os.environ["LAVISE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lavise"


def cache_folder(cache_dir: Path | str | None) -> Path:
    """The cache folder a stage uses: the one given, else :func:`default_cache_dir`."""
    return Path(cache_dir) if cache_dir else default_cache_dir()


Product = tuple[dict, dict]


def cached(
    cache_dir: Path | None, name: str, parts: dict, build: Callable[[], Product], *, suffix: str = ".safetensors"
) -> Product:
    """A product of arrays and facts, made once per key.

    The key is :func:`cache_key` of ``parts``, which must describe everything the
    product depends on (model, weights, preprocessing, layer, data, settings, a version
    of the product's format). The product lives in ``cache_dir/NAME-KEY.SUFFIX`` with
    the key and the facts inside; it is loaded when its key matches, otherwise
    ``build()`` makes it and it is saved atomically. A file that cannot be read is
    rebuilt. ``cache_dir`` None builds every time and saves nothing.

    Args:
        build: returns (arrays, facts): named tensors (``.safetensors``) or NumPy arrays
            (``.npz``, which also holds strings), and a JSON-able dict.
        suffix: ``.safetensors`` or ``.npz``; neither is read with pickle.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> make = lambda: ({"x": torch.arange(3)}, {"made": True})
        >>> cached(folder, "demo", {"product": "demo"}, make)[1]
        {'made': True}
        >>> cached(folder, "demo", {"product": "demo"}, lambda: 1 / 0)[0]["x"].tolist()
        [0, 1, 2]
    """
    if cache_dir is None:
        return build()
    if (hit := cache_hit(cache_dir, name, parts, suffix=suffix)) is not None:
        return hit
    product = build()
    cache_save(cache_dir, name, parts, product, suffix=suffix)
    return product


def cache_hit(cache_dir: Path | None, name: str, parts: dict, *, suffix: str = ".safetensors") -> Product | None:
    """The product :func:`cached` would load, or None when it has to be built."""
    if cache_dir is None:
        return None
    key = cache_key(parts)
    path = Path(cache_dir) / f"{name}-{key[:24]}{suffix}"
    return _FORMATS[suffix][0](path, key) if path.is_file() else None


def cache_save(cache_dir: Path | None, name: str, parts: dict, product: Product, *, suffix: str = ".safetensors") -> bool:
    """Save a product where :func:`cached` finds it; False when nothing was saved (no
    cache folder, or one that cannot be written: see :func:`cache_write`)."""
    if cache_dir is None:
        return False
    key = cache_key(parts)
    return cache_write(cache_dir, lambda: _FORMATS[suffix][1](Path(cache_dir) / f"{name}-{key[:24]}{suffix}", key, *product))


# Cache folders that could not be written in this process: warned about once, then left alone.
_UNWRITABLE_CACHES: set[str] = set()


def cache_write(cache_dir: Path, write: Callable[[], None]) -> bool:
    """Run ``write`` (which writes into the cache folder); on an OSError (a full disk, a
    read-only or vanished folder) warn once per folder and return False, so the caller
    keeps its product in memory and the work goes on uncached."""
    folder = str(Path(cache_dir).absolute())
    if folder in _UNWRITABLE_CACHES:
        return False
    try:
        write()
        return True
    except OSError as error:
        _UNWRITABLE_CACHES.add(folder)
        warnings.warn(
            f"Cannot write to the cache folder '{cache_dir}' ({error.strerror or error}): going on without "
            "caching, so this work is not kept for the next run. Free some space or choose another "
            "folder with --cache-dir or $LAVISE_CACHE.",
            LaviseWarning,
            stacklevel=3,
        )
        return False


def load_cached(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors and metadata of a safetensors file at ``path`` if it exists and was made under ``key``."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("key") != key:
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception:  # a damaged cache file is recomputed, not fatal
        return None
    return tensors, metadata


def _load_safetensors(path: Path, key: str) -> Product | None:
    hit = load_cached(path, key)
    if hit is None:
        return None
    tensors, metadata = hit
    return tensors, json.loads(metadata.get("info", "{}"))


def _save_safetensors(path: Path, key: str, tensors: dict, facts: dict) -> None:
    save_tensors(path, tensors, {"key": key, "info": json.dumps(facts)})


def _load_npz(path: Path, key: str) -> Product | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            arrays = {name: stored[name] for name in stored.files if name not in ("key", "info")}
            return arrays, json.loads(str(stored["info"]))
    except (OSError, ValueError, KeyError):  # a damaged cache file is recomputed, not fatal
        return None


def _save_npz(path: Path, key: str, arrays: dict, facts: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, key=np.array(key), info=np.array(json.dumps(facts)), **arrays)


_FORMATS = {".safetensors": (_load_safetensors, _save_safetensors), ".npz": (_load_npz, _save_npz)}


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors of a safetensors file, memory-mapped, and its metadata; None if the file
    is damaged or (when ``key`` is given) was made under another key.

    The tensors are views of the file (copy-on-write): nothing is read until it is used,
    so a chunk of feature maps larger than memory can be sliced without loading it.
    """
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size > Path(path).stat().st_size:
                return None
            header = json.loads(handle.read(size))
        metadata = header.pop("__metadata__", {}) or {}
        if key is not None and metadata.get("key") != key:
            return None
        start, total = 8 + size, Path(path).stat().st_size
        tensors = {}
        for name, entry in header.items():
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if start + end > total or end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                return None
            if end == begin:
                tensors[name] = torch.from_numpy(np.zeros(shape, dtype=dtype))
            else:
                array = np.memmap(path, dtype=dtype, mode="c", offset=start + begin, shape=shape)
                tensors[name] = torch.from_numpy(array)
        return tensors, metadata
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


class ChunkStore:
    """A cached product in chunks: one safetensors file per chunk, each carrying the key.

    Large products (the feature maps of a dataset, the pooled rows of a reference set)
    are made chunk by chunk, so a pass that is interrupted keeps every chunk it
    finished and the next one makes only the rest; chunks are written atomically, so
    two processes sharing the store can make the same chunk without harm. Chunks are
    read memory-mapped (:func:`read_safetensors`).

    ``cache_dir`` None: a store that keeps nothing (every chunk is made again).
    """

    def __init__(self, cache_dir: Path | None, name: str, parts: dict) -> None:
        self.key = cache_key(parts)
        self.folder = None if cache_dir is None else Path(cache_dir) / f"{name}-{self.key[:24]}"

    def path(self, chunk: int) -> Path:
        return self.folder / f"{chunk:06d}.safetensors"

    def load(self, chunk: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Chunk ``chunk``'s tensors (memory-mapped) and facts, or None when it is not made."""
        if self.folder is None or not self.path(chunk).is_file():
            return None
        hit = read_safetensors(self.path(chunk), self.key)
        if hit is None:
            return None
        tensors, metadata = hit
        return tensors, json.loads(metadata.get("info", "{}"))

    def save(self, chunk: int, tensors: dict[str, torch.Tensor], facts: dict) -> bool:
        """Keep a chunk; False when it was not kept (no folder, or one that cannot be
        written): the caller then holds it in memory."""
        if self.folder is None:
            return False
        metadata = {"key": self.key, "info": json.dumps(facts)}
        return cache_write(self.folder.parent, lambda: save_tensors(self.path(chunk), tensors, metadata))

    def done(self, chunks) -> set[int]:
        """Which of ``chunks`` are made (their file exists; damaged ones are found when loaded)."""
        if self.folder is None or not self.folder.is_dir():
            return set()
        return {c for c in chunks if self.path(c).is_file()}


def tensors_digest(*tensors: torch.Tensor) -> str:
    """A digest of tensors' values (in order), for cache keys of results computed from them."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def files_digest(paths: list[Path]) -> str:
    """One digest over the fingerprints of many files (order matters).

    A name is hashed as the file system's bytes (``os.fsencode``): a name that is not
    valid UTF-8 digests like any other, and a valid one as it always did.
    """
    digest = hashlib.sha256()
    for path in paths:
        name = os.fsencode(path)
        try:
            stat = Path(path).stat()
            digest.update(name + f"|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(name + b"|missing\n")
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
