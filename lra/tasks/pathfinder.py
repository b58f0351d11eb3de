"""Pathfinder and Path-X as in LRA: are the two markers connected by a contour? (2 classes)

Images come from our own offline generator (`lra.tasks.pathfinder_generator`, the
published Pathfinder parameters per resolution, "hard" level: contours of 14 paddles),
or from the LRA release (``pathfinderNN/curv_contour_length_14/{imgs,metadata}``), and are
stored once as uint8 pixel arrays: ``<split>.inputs.npy`` [N, H*W] (row-major), with
``<split>.lengths.npy`` (all H*W: every pixel is a real token, so the mask never comes from
pixel value 0) and ``<split>.targets.npy`` (1 = connected). Training reads them
memory-mapped; nothing is decoded per epoch.

``pathfinder`` is 32x32 (1024 tokens), ``pathx`` 128x128 (16,384 tokens); both take
``resolution`` 32, 64, 128 or 256. Generated splits are canonical: 160K/20K/20K by default,
each split drawn from its own streams seeded by (resolution, seed, split, shard), so a split
depends neither on the sizes of the others nor on the number of worker processes. Release
files are split in listing order (metadata files by number, lines in order) into the first
80%, the next 10% and the last 10%, as LRA's ``hard[:80%]``, ``[80%:90%]``, ``[90%:]``;
empty (0-byte) images are skipped, as LRA does. The manifest records the settings, counts,
the sha256 of every file and a hash of the split.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import tqdm

from lra.tasks import pathfinder_generator as generator
from lra.tasks import storage

SPLITS = ("train", "val", "test")
ARRAYS = ("inputs", "lengths", "targets")
LEVEL_FOLDER = "curv_contour_length_14"  # the "hard" level of the release
FORMAT_VERSION = 1
SHARD_SIZE = 1000  # images per generated shard; changing it changes the generated data


# --- generation ---------------------------------------------------------------------

def _shard_rng(resolution: int, seed: int, split: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"lra.pathfinder/{resolution}/{seed}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def generate_shard(resolution: int, seed: int, split: str, index: int, count: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Shard `index` of a split: (images [count, H*W] uint8, labels [count] int32)."""
    images, labels, _ = generator.generate(count, generator.PARAMS[resolution],
                                           _shard_rng(resolution, seed, split, index))
    return images, labels


def _ordered_map(function: Callable, jobs: list[tuple], num_workers: int) -> Iterator:
    """function(*job) for each job, in order, computed by `num_workers` processes."""
    if num_workers <= 1:
        yield from (function(*job) for job in jobs)
        return
    # Spawned, not forked: forking a process that runs JAX threads can deadlock.
    pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        queue, pending = collections.deque(jobs), collections.deque()
        while queue or pending:
            while queue and len(pending) < 2 * num_workers:
                pending.append(pool.submit(function, *queue.popleft()))
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_inputs(path: Path, shape: tuple[int, int], chunks: Iterable[np.ndarray]) -> None:
    """Streams uint8 row chunks into a .npy file of `shape` (atomically)."""

    def write(file):
        header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(file, header)
        written = 0
        for chunk in chunks:
            file.write(np.ascontiguousarray(chunk, np.uint8).tobytes())
            written += len(chunk)
        if written != shape[0]:
            raise RuntimeError(f"wrote {written} rows into {path}, expected {shape[0]}")

    storage.replace_atomically(path, write)


def _save_split(data_dir: Path, split: str, rows: Iterable[tuple[np.ndarray, np.ndarray]],
                count: int, width: int, bar: tqdm.tqdm) -> dict:
    """Writes a split's three arrays from (images, labels) chunks; returns their file records."""
    targets = []

    def chunks():
        for images, labels in rows:
            targets.append(np.asarray(labels, np.int32))
            bar.update(len(labels))
            yield images

    path = storage.split_path(data_dir, split, "inputs")
    _write_inputs(path, (count, width), chunks())
    files = {path.name: {"sha256": storage.sha256(path, data_dir / "cache"), "shape": [count, width],
                         "dtype": "uint8"}}
    arrays = {"lengths": np.full(count, width, np.int32),
              "targets": np.concatenate([np.zeros(0, np.int32), *targets])}
    files.update(storage.save_split(data_dir, split, arrays))
    return files


def _split_hash(files: dict) -> str:
    """A fingerprint of the three splits' contents (from their files' sha256)."""
    lines = [f"{split} {files[storage.split_path(Path(), split, name).name]['sha256']}"
             for split in SPLITS for name in ARRAYS]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _generate(name: str, data_dir: Path, settings: dict, num_workers: int, progress: bool) -> dict:
    resolution, seed = settings["resolution"], settings["seed"]
    counts = {split: settings[f"num_{split}"] for split in SPLITS}
    files = {}
    bar = tqdm.tqdm(total=sum(counts.values()), desc=f"{name} {resolution}x{resolution}",
                    disable=not progress, mininterval=0.1 if sys.stderr.isatty() else 30)
    jobs = {split: [(resolution, seed, split, index, min(SHARD_SIZE, counts[split] - start))
                    for index, start in enumerate(range(0, counts[split], SHARD_SIZE))] for split in SPLITS}
    shards = _ordered_map(generate_shard, [job for split in SPLITS for job in jobs[split]], num_workers)
    with bar, contextlib.closing(shards):
        for split in SPLITS:  # one pool for all splits: each takes its shards in order
            rows = itertools.islice(shards, len(jobs[split]))
            files.update(_save_split(data_dir, split, rows, counts[split], resolution**2, bar))
    manifest = {"task": name, "format_version": FORMAT_VERSION, "source": "generated", "settings": settings,
                "generator": dataclasses.asdict(generator.PARAMS[resolution]), "counts": counts,
                "split_sha256": _split_hash(files), "files": files}
    return storage.write_manifest(data_dir, manifest)


# --- the LRA release ----------------------------------------------------------------

def find_release(data_dir: str | os.PathLike, resolution: int) -> Path | None:
    """The release folder (holding ``imgs/`` and ``metadata/``) of `resolution` in or under
    `data_dir`: itself, ``curv_contour_length_14/``, ``pathfinderNN/curv_contour_length_14/``
    or ``lra_release/pathfinderNN/curv_contour_length_14/``; None when there is none."""
    data_dir = Path(data_dir)
    level = Path(f"pathfinder{resolution}") / LEVEL_FOLDER
    for folder in (data_dir, data_dir / LEVEL_FOLDER, data_dir / level, data_dir / "lra_release" / level):
        if (folder / "metadata").is_dir() and (folder / "imgs").is_dir():
            return folder
    return None


def read_release_listing(folder: Path) -> list[tuple[str, int]]:
    """(image path relative to `folder`, label) of every line of ``metadata/*.npy``, in order.

    The release's metadata files are text despite their suffix: one image per line,
    space-separated ``<dir> <file> <index> <label> ...`` (e.g. ``imgs/0 sample_0.png 0 1 ...``).
    Files are taken by number (0.npy, 1.npy, ..., 10.npy, ...).

    Raises:
        ValueError: no metadata files, or a malformed line (file and line named).
    """
    paths = sorted((folder / "metadata").glob("*.npy"),
                   key=lambda path: (not path.stem.isdigit(), int(path.stem) if path.stem.isdigit() else 0,
                                     path.name))
    if not paths:
        raise ValueError(f"{folder / 'metadata'} holds no .npy metadata files")
    listing = []
    for path in paths:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4 or fields[3] not in ("0", "1"):
                raise ValueError(f"{path}, line {number}: expected '<dir> <file> <index> <label 0|1> ...', "
                                 f"got {line[:80]!r}")
            listing.append((f"{fields[0]}/{fields[1]}", int(fields[3])))
    return listing


def _release_splits(listing: list) -> dict[str, list]:
    n = len(listing)
    bounds = (0, n * 8 // 10, n * 9 // 10, n)
    return {split: listing[bounds[i]:bounds[i + 1]] for i, split in enumerate(SPLITS)}


def _decode(folder: Path, entries: list[tuple[str, int]], resolution: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from PIL import Image  # Pillow comes with matplotlib

    for start in range(0, len(entries), SHARD_SIZE):
        chunk = entries[start:start + SHARD_SIZE]
        images = np.zeros((len(chunk), resolution * resolution), np.uint8)
        for row, (relative, _) in enumerate(chunk):
            with Image.open(folder / relative) as image:
                pixels = np.asarray(image.convert("L"))
            if pixels.shape != (resolution, resolution):
                raise ValueError(f"{folder / relative} is {pixels.shape[1]}x{pixels.shape[0]}, "
                                 f"expected {resolution}x{resolution}")
            images[row] = pixels.reshape(-1)
        yield images, np.array([label for _, label in chunk], np.int32)


def _convert_release(name: str, folder: Path, data_dir: Path, resolution: int, progress: bool) -> dict:
    """Decodes the release's PNGs once into the split arrays of `data_dir`."""
    splits, skipped = _release_splits(read_release_listing(folder)), {}
    for split, entries in splits.items():
        missing = [relative for relative, _ in entries if not (folder / relative).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images listed in {folder / 'metadata'} are missing, "
                                    f"e.g. {folder / missing[0]}")
        kept = [(relative, label) for relative, label in entries if (folder / relative).stat().st_size > 0]
        skipped[split] = len(entries) - len(kept)
        splits[split] = kept
    counts = {split: len(entries) for split, entries in splits.items()}
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    with tqdm.tqdm(total=sum(counts.values()), desc=f"{name}: reading {folder}", disable=not progress) as bar:
        for split, entries in splits.items():
            rows = _decode(folder, entries, resolution)
            files.update(_save_split(data_dir, split, rows, counts[split], resolution**2, bar))
    listing_text = "".join(f"{split}\t{relative}\t{label}\n"
                           for split, entries in splits.items() for relative, label in entries)
    manifest = {"task": name, "format_version": FORMAT_VERSION, "source": "lra_release",
                "release_folder": str(folder), "settings": {"resolution": resolution}, "counts": counts,
                "skipped_empty_images": skipped,
                "split_sha256": hashlib.sha256(listing_text.encode()).hexdigest(), "files": files}
    return storage.write_manifest(data_dir, manifest)


# --- the task -----------------------------------------------------------------------

def _default_workers(total: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, 8)) if total > 2 * SHARD_SIZE else 1


@dataclasses.dataclass(frozen=True)
class Pathfinder:
    """A Pathfinder task of the registry (see `lra.tasks`) at a default resolution."""

    name: str
    resolution: int  # default of `prepare`
    num_classes: int = 2
    vocab_size: int = 256  # pixel values 0..255, all real tokens (the mask comes from lengths)
    generated: bool = True  # prepare() needs no download
    paired: bool = False
    splits: tuple[str, ...] = SPLITS

    def is_prepared(self, data_dir: str | os.PathLike) -> bool:
        """True when the split arrays are in `data_dir`."""
        return all(storage.split_path(Path(data_dir), split, name).is_file()
                   for split in SPLITS for name in ARRAYS)

    def prepare(self, data_dir: str | os.PathLike, *, num_train: int = 160_000, num_val: int = 20_000,
                num_test: int = 20_000, seed: int = 0, resolution: int | None = None,
                num_workers: int | None = None, progress: bool = True) -> dict:
        """Generates the task into `data_dir`, converts the LRA release found there, or
        accepts what is already prepared.

        A folder with a manifest of the same settings is left alone; one with the release
        (see `find_release`) and no manifest is converted once (the sizes and seed are then
        ignored: the release fixes the data); otherwise images are generated.

        Args:
            data_dir: the folder.
            num_train: training images (half of them positive).
            num_val: validation images.
            num_test: test images.
            seed: seed of the generator; the files depend only on the settings.
            resolution: 32, 64, 128 or 256; default: the task's (pathfinder 32, pathx 128).
            num_workers: processes drawing images; the files do not depend on it. Default:
                one per CPU (at most 8) above 2000 images, else 1. Above 1, scripts must call
                this under ``if __name__ == "__main__":`` (the processes are spawned).
            progress: show a progress bar.

        Returns:
            The manifest.

        Raises:
            ValueError: unknown resolution, negative counts, or a folder prepared with other
                settings or for another task.
        """
        data_dir, resolution = Path(data_dir), resolution or self.resolution
        if resolution not in generator.PARAMS:
            raise ValueError(f"{self.name}: resolution {resolution} is not one of "
                             f"{', '.join(map(str, generator.PARAMS))}")
        if min(num_train, num_val, num_test) < 0:
            raise ValueError(f"{self.name}: image counts must be >= 0, got {num_train}/{num_val}/{num_test}")
        settings = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "seed": seed,
                    "resolution": resolution}
        manifest = storage.read_manifest(data_dir)
        if manifest is not None:
            return self._check_manifest(manifest, data_dir, settings)
        release = find_release(data_dir, resolution)
        if release is not None:
            return _convert_release(self.name, release, data_dir, resolution, progress)
        data_dir.mkdir(parents=True, exist_ok=True)
        total = num_train + num_val + num_test
        workers = _default_workers(total) if num_workers is None else num_workers
        return _generate(self.name, data_dir, settings, workers, progress)

    def _check_manifest(self, manifest: dict, data_dir: Path, settings: dict) -> dict:
        if manifest.get("task") != self.name:
            raise ValueError(f"{data_dir} holds data of task {manifest.get('task')!r}, not {self.name!r}; "
                             "use another data_dir.")
        if manifest.get("source") == "lra_release":
            if manifest["settings"]["resolution"] != settings["resolution"]:
                raise ValueError(f"{data_dir} holds the {manifest['settings']['resolution']}px release, "
                                 f"not {settings['resolution']}px; use another data_dir.")
            return manifest
        storage.check_settings(data_dir, manifest, self.name, settings, FORMAT_VERSION)
        if not self.is_prepared(data_dir):
            raise ValueError(f"{data_dir} has a manifest but misses split files; delete {data_dir} and "
                             f"prepare it again: {storage.prepare_command(self.name, data_dir)}")
        return manifest

    def load(self, split: str, data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
        """One split: ``inputs`` [N, H*W] uint8 pixels (memory-mapped), ``lengths`` [N] int32
        (all H*W), ``targets`` [N] int32 (1 = the markers are connected).

        Raises:
            FileNotFoundError: the split is not prepared; the message names the command.
            ValueError: unknown split, or a file differing from ``manifest.json``.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
        data_dir = Path(data_dir)
        arrays = storage.load_split(data_dir, split, ARRAYS, prepare_command=storage.prepare_command(self.name, data_dir))
        manifest = storage.read_manifest(data_dir) or {}
        for name in ARRAYS:
            path = storage.split_path(data_dir, split, name)
            expected = manifest.get("files", {}).get(path.name, {}).get("sha256")
            if expected is not None and storage.sha256(path, data_dir / "cache") != expected:
                raise ValueError(f"{path} differs from {data_dir / storage.MANIFEST}: it was modified. "
                                 f"Delete {data_dir} and prepare it again: {storage.prepare_command(self.name, data_dir)}")
        if not len(arrays["inputs"]) == len(arrays["lengths"]) == len(arrays["targets"]):
            raise ValueError(f"{data_dir}: the {split} arrays have different lengths")
        return arrays


PATHFINDER = Pathfinder("pathfinder", resolution=32)
PATHX = Pathfinder("pathx", resolution=128)
