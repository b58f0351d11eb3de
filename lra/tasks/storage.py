"""File helpers every task shares: atomic writes, manifests, hashes, NumPy split arrays.

A prepared task folder holds ``manifest.json`` (task, settings, counts, sha256 per file,
format version) and its data files. Writers never leave a partial file behind: each file
goes through a temporary of its own and `os.replace`. Split arrays are ``.npy`` files read
back memory-mapped, so a large split (Path-X, byte-level text) is never decoded per epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


def prepare_command(task_name: str, data_dir: str | os.PathLike, settings: Mapping | None = None) -> str:
    """The command that prepares `task_name` into `data_dir`, with `settings` as flags.

    Example: ``python -m lra.data prepare text --data_dir DIR --max_length 256``.
    """
    words = ["python -m lra.data prepare", task_name, "--data_dir", shlex.quote(str(data_dir))]
    for name, value in (settings or {}).items():
        words += [f"--{name}", shlex.quote(str(value))]
    return " ".join(words)


def replace_atomically(path: Path, write: Callable) -> None:
    """Writes `path` through a temporary file of its own, so no reader sees a partial file.

    Args:
        path: the file to (re)write.
        write: called with the open binary temporary file.
    """
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_manifest(data_dir: Path) -> dict | None:
    """The folder's ``manifest.json``, or None when it has none."""
    path = Path(data_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(data_dir: Path, manifest: Mapping) -> dict:
    """Writes ``manifest.json`` atomically (the last file a preparation writes) and returns it."""
    text = json.dumps(manifest, indent=2).encode() + b"\n"
    replace_atomically(Path(data_dir) / MANIFEST, lambda file: file.write(text))
    return dict(manifest)


def sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a file, memoised in `cache_dir` until its size or mtime changes."""
    status = path.stat()
    stamp = {"size": status.st_size, "mtime_ns": status.st_mtime_ns}
    memo = cache_dir / f"{path.name}.sha256.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        recorded = json.loads(memo.read_text())
        if {key: recorded[key] for key in stamp} == stamp:
            return recorded["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    with contextlib.suppress(OSError):  # read-only data_dir: no memo
        cache_dir.mkdir(exist_ok=True)
        record = json.dumps({**stamp, "sha256": digest.hexdigest()}).encode()
        replace_atomically(memo, lambda file: file.write(record))
    return digest.hexdigest()


def split_path(data_dir: Path, split: str, name: str) -> Path:
    """Where array `name` (inputs, lengths, targets, ...) of `split` lives: ``<split>.<name>.npy``."""
    return Path(data_dir) / f"{split}.{name}.npy"


def save_split(data_dir: Path, split: str, arrays: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Writes each array of a split atomically; returns {file name: {sha256, shape, dtype}}."""
    files = {}
    for name, array in arrays.items():
        path = split_path(data_dir, split, name)
        replace_atomically(path, lambda file, array=array: np.save(file, np.asarray(array)))
        files[path.name] = {"sha256": sha256(path, Path(data_dir) / "cache"),
                            "shape": list(np.shape(array)), "dtype": str(np.asarray(array).dtype)}
    return files


def load_split(data_dir: Path, split: str, names: Iterable[str], *,
               prepare_command: str) -> dict[str, np.ndarray]:
    """Reads the arrays of a split, memory-mapped.

    Raises:
        FileNotFoundError: an array is missing; the message gives `prepare_command`.
    """
    arrays = {}
    for name in names:
        path = split_path(data_dir, split, name)
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {data_dir}. Prepare the data with:\n  {prepare_command}")
        arrays[name] = np.load(path, mmap_mode="r")
    return arrays


def check_settings(data_dir: Path, manifest: Mapping, task_name: str, settings: Mapping,
                   format_version: int) -> None:
    """Refuses a prepared folder of another task or made with other settings.

    Raises:
        ValueError: naming each differing setting and what to do.
    """
    if manifest.get("task") not in (None, task_name):
        raise ValueError(f"{data_dir} holds data of the task {manifest.get('task')!r}, not "
                         f"{task_name!r}; use another data_dir")
    recorded = {**(manifest.get("settings") or {}), "format_version": manifest.get("format_version")}
    requested = {**settings, "format_version": format_version}
    differences = [f"{key}={recorded.get(key)!r} there, {value!r} requested"
                   for key, value in requested.items() if recorded.get(key) != value]
    if differences:
        raise ValueError(f"{data_dir} holds {task_name} prepared with other settings "
                         f"({'; '.join(differences)}). Use another data_dir, or delete {data_dir} "
                         "to prepare it again.")


def load_verified_split(data_dir: Path, split: str, names: Iterable[str], manifest: Mapping, *,
                        prepare_command: str) -> dict[str, np.ndarray]:
    """`load_split`, with every file checked against the sha256 the manifest recorded.

    Raises:
        FileNotFoundError: an array is missing.
        ValueError: a file differs from the manifest (it was modified).
    """
    arrays = load_split(data_dir, split, names, prepare_command=prepare_command)
    for name in names:
        path = split_path(data_dir, split, name)
        expected = manifest.get("files", {}).get(path.name, {}).get("sha256")
        if sha256(path, Path(data_dir) / "cache") != expected:
            raise ValueError(f"{path} differs from {Path(data_dir) / MANIFEST}: it was modified. "
                             f"Delete {data_dir} and prepare it again with:\n  {prepare_command}")
    return arrays
