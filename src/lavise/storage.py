"""Writing outputs atomically, digests of files, and caching tensors under a key of everything that made them.

No output is ever half-written: each file is written to a temporary name in the same
folder and renamed into place. Every cached stage goes through :func:`cached`: its
products are safetensors files (no pickle) whose metadata holds the full key; a file
whose key differs, or that cannot be read, is recomputed, never trusted.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        save_file(contiguous, str(tmp), metadata=metadata)


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
    load, save = _FORMATS[suffix]
    key = cache_key(parts)
    path = Path(cache_dir) / f"{name}-{key[:24]}{suffix}"
    if path.is_file() and (hit := load(path, key)) is not None:
        return hit
    arrays, facts = build()
    save(path, key, arrays, facts)
    return arrays, facts


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


def files_digest(paths: list[Path]) -> str:
    """One digest over the fingerprints of many files (order matters)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = Path(path).stat()
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
