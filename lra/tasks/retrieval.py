"""Retrieval as in Long Range Arena: do two ACL Anthology (AAN) papers have a citation link?

An example is a pair of documents, each read as bytes (at most ``max_length`` = 4000 per
document), and a binary label. The model encodes both documents with one shared tower
(`lra.models.DualEncoderClassifier`). The data comes from the LRA release (it cannot be
generated): ``lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv``, used as the
train, validation and test splits.

Source layout, as the LRA reader (``lra_benchmarks/matching/input_pipeline.py``) takes it:
one pair per line, no header, five tab-separated columns ``label, id1, id2, text1,
text2``; the label is a number (``1.0``/``0.0`` or ``1``/``0``); quotes are ordinary
characters (no CSV quoting). Lines are read as bytes, so no text is ever decoded or
re-encoded; CRLF endings and blank lines are accepted, a header row ``label ...`` is
skipped.

`prepare` converts the three TSVs into byte tokens (`lra.tasks.bytes_tokens`: byte b is
token b + 1, 0 is padding) saved as ``<split>.{inputs,lengths,inputs2,lengths2,
targets}.npy`` plus ``manifest.json`` (settings, counts, sha256 of every source and
output). It streams: memory stays bounded whatever the file size.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tqdm

from lra.tasks import bytes_tokens, storage

NAME = "retrieval"
SPLITS = ("train", "val", "test")
# The LRA release's file of each split (its validation split is called "eval").
SOURCE_FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv",
                "test": "new_aan_pairs.test.tsv"}
# Where the files are looked for inside the source folder, in this order.
SOURCE_SUBFOLDERS = (".", "tsv_data", "lra_release/tsv_data", "lra_release/lra_release/tsv_data")
RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
COLUMNS = (b"label", b"id1", b"id2", b"text1", b"text2")
ARRAYS = ("inputs", "lengths", "inputs2", "lengths2", "targets")
# (tokens array, lengths array, index of the document in a `read_pairs` tuple)
DOCUMENTS = (("inputs", "lengths", 2), ("inputs2", "lengths2", 3))
MAX_LENGTH = 4000  # bytes kept per document, as in LRA
FORMAT_VERSION = 1
_CHUNK_ROWS = 1024  # documents encoded and written at a time


# --- reading the LRA TSV ------------------------------------------------------------

def _label(field: bytes, path: Path, number: int) -> int:
    try:
        value = float(field)
    except ValueError:
        value = None
    if value not in (0.0, 1.0):
        raise ValueError(f"{path}, line {number}: the label {field[:20].decode(errors='replace')!r} "
                         "is not 0 or 1 (written e.g. '1', '0', '1.0' or '0.0')")
    return int(value)


def read_pairs(path: str | os.PathLike) -> Iterator[tuple[int, int, bytes, bytes]]:
    """The pairs of an LRA AAN file, streamed.

    Args:
        path: a ``new_aan_pairs.*.tsv`` file.

    Yields:
        (line number, label 0/1, text1 bytes, text2 bytes) per pair; blank lines and a
        header row (first column ``label``) are skipped.

    Raises:
        ValueError: a line without exactly 5 tab-separated columns or with a label that
            is not 0/1; the message gives the file and line number.
    """
    path = Path(path)
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            line = line[:-1] if line.endswith(b"\n") else line
            line = line[:-1] if line.endswith(b"\r") else line
            if not line.strip():
                continue
            fields = line.split(b"\t")
            if len(fields) != len(COLUMNS):
                raise ValueError(f"{path}, line {number}: expected {len(COLUMNS)} tab-separated columns "
                                 f"(label, id1, id2, text1, text2), got {len(fields)}")
            if number == 1 and fields[0].strip().lower() == COLUMNS[0]:
                continue  # a header row (the release has none)
            yield number, _label(fields[0], path, number), fields[3], fields[4]


# --- locating the sources -----------------------------------------------------------

def _download_help(source_dir: Path, data_dir: Path) -> str:
    extra = {"source_dir": source_dir} if source_dir != data_dir else {}
    command = storage.prepare_command("retrieval", data_dir, extra)
    return (f"Retrieval uses the AAN pairs of the LRA release, which must be downloaded: fetch "
            f"{RELEASE_URL}, unpack it (tar xzf lra_release.gz) and copy "
            f"{', '.join('lra_release/tsv_data/' + name for name in SOURCE_FILES.values())} into "
            f"{source_dir} (unpacking the archive inside {source_dir} works too: its "
            f"lra_release/tsv_data/ is searched). Then run:\n  {command}")


def find_sources(source_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The source TSV of each split, looked for in `source_dir` and its `SOURCE_SUBFOLDERS`.

    Args:
        source_dir: the folder holding the release files.
        data_dir: the folder being prepared, for the command in error messages; default
            `source_dir`.

    Raises:
        FileNotFoundError: some file is missing; the message says what to download,
            where to put it and the command to run then.
    """
    source_dir = Path(source_dir).expanduser()
    found = {}
    for split, name in SOURCE_FILES.items():
        paths = [source_dir / sub / name for sub in SOURCE_SUBFOLDERS if (source_dir / sub / name).is_file()]
        if paths:
            found[split] = paths[0]
    if len(found) < len(SPLITS):
        missing = [name for split, name in SOURCE_FILES.items() if split not in found]
        places = ", ".join(str(source_dir / sub) for sub in SOURCE_SUBFOLDERS)
        raise FileNotFoundError(f"Retrieval: {', '.join(missing)} not found (looked in {places}).\n"
                                + _download_help(source_dir, Path(data_dir or source_dir).expanduser()))
    return found


# --- writing the arrays -------------------------------------------------------------

def _scan(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets, byte lengths of text1, of text2) of every pair of a file."""
    targets, lengths1, lengths2 = [], [], []
    for _, label, text1, text2 in read_pairs(path):
        targets.append(label)
        lengths1.append(len(text1))
        lengths2.append(len(text2))
    return np.array(targets, np.int32), np.array(lengths1, np.int64), np.array(lengths2, np.int64)


def _select(num_rows: int, wanted: int | None, seed: int, split_index: int, path: Path) -> np.ndarray:
    """Which rows a split keeps: all, or `wanted` of them drawn by `seed`, in file order."""
    if wanted is None or wanted == num_rows:
        return np.ones(num_rows, bool)
    if not 0 <= wanted <= num_rows:
        raise ValueError(f"Retrieval: {wanted} pairs asked for from {path}, which has {num_rows}")
    keep = np.zeros(num_rows, bool)
    keep[np.random.default_rng([seed, split_index]).choice(num_rows, wanted, replace=False)] = True
    return keep


def _write_tokens(target: Path, source: Path, keep: np.ndarray, field: int, max_length: int,
                  bar: tqdm.tqdm) -> None:
    """Streams the byte tokens of the kept pairs' document `field` into the .npy file `target`."""
    shape = (int(keep.sum()), max_length)
    dtype = np.dtype(bytes_tokens.DTYPE).newbyteorder("<")

    def write(file) -> None:
        np.lib.format.write_array_header_1_0(
            file, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        rows = (pair[field] for pair in itertools.compress(read_pairs(source), keep))
        written = 0
        while chunk := list(itertools.islice(rows, _CHUNK_ROWS)):
            tokens_CxL, _ = bytes_tokens.encode_bytes(chunk, max_length)
            file.write(tokens_CxL.astype(dtype, copy=False).tobytes())
            written += len(chunk)
            bar.update(len(chunk))
        if written != shape[0]:
            raise ValueError(f"{source} changed while it was being read; prepare again")

    storage.replace_atomically(target, write)


def _convert_split(data_dir: Path, split: str, source: Path, settings: dict, bar: tqdm.tqdm) -> dict:
    """Writes one split's arrays; returns its manifest entries."""
    targets, *byte_lengths = _scan(source)
    keep = _select(len(targets), settings[f"num_{split}"], settings["seed"], SPLITS.index(split), source)
    max_length, cache_dir = settings["max_length"], data_dir / "cache"
    files, small = {}, {"targets": targets[keep]}
    for (inputs_name, lengths_name, field), lengths in zip(DOCUMENTS, byte_lengths):
        path = storage.split_path(data_dir, split, inputs_name)
        _write_tokens(path, source, keep, field, max_length, bar)
        files[path.name] = {"sha256": storage.sha256(path, cache_dir),
                            "shape": [int(keep.sum()), max_length], "dtype": "uint16"}
        small[lengths_name] = np.minimum(lengths[keep], max_length).astype(np.int32)
    files.update(storage.save_split(data_dir, split, small))
    summary = {"source": str(source), "source_rows": len(targets), "pairs": int(keep.sum()),
               "positives": int(small["targets"].sum()),
               "truncated": {name: int((lengths[keep] > max_length).sum())
                             for (name, _, _), lengths in zip(DOCUMENTS, byte_lengths)}}
    return {"files": files, "summary": summary,
            "source": {source.name: {"sha256": storage.sha256(source, cache_dir),
                                     "bytes": source.stat().st_size}}}


# --- the task interface -------------------------------------------------------------

def _output_paths(data_dir: Path) -> list[Path]:
    return [storage.split_path(data_dir, split, name) for split in SPLITS for name in ARRAYS]


def is_prepared(data_dir: str | os.PathLike) -> bool:
    """True when `data_dir` holds a retrieval manifest and every split array."""
    manifest = storage.read_manifest(Path(data_dir))
    return (manifest is not None and manifest.get("task") == NAME
            and all(path.is_file() for path in _output_paths(Path(data_dir))))


def source_at_hand(data_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
                   **settings) -> bool:
    """True when the three AAN TSVs are in `source_dir` (default `data_dir`), so `prepare`
    can run without a download."""
    try:
        find_sources(data_dir if source_dir is None else source_dir, data_dir)
    except FileNotFoundError:
        return False
    return True


def prepare(data_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
            max_length: int = MAX_LENGTH, num_train: int | None = None, num_val: int | None = None,
            num_test: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Converts the LRA AAN TSVs into byte-token arrays in `data_dir`.

    Args:
        data_dir: the output folder (created if needed).
        source_dir: where the three ``new_aan_pairs.*.tsv`` are, directly or in one of
            `SOURCE_SUBFOLDERS`; default `data_dir`.
        max_length: bytes kept per document (longer documents are cut).
        num_train: training pairs to keep, drawn at random (by `seed`) in file order;
            None keeps all. A subset is for quick runs (``runlocal``).
        num_val: the same for the validation split (``new_aan_pairs.eval.tsv``).
        num_test: the same for the test split.
        seed: draws the subsets; unused when every pair is kept.
        progress: show a progress bar.

    Returns:
        The manifest: task, format version, settings, per split counts and a summary
        (pairs, positives, truncated documents), sha256 of every source and output file.
        A folder already prepared with the same settings is returned as it is.

    Raises:
        FileNotFoundError: a source file is missing; the message says what to download
            and where to put it.
        ValueError: the folder holds data prepared with other settings or for another
            task, a malformed source line (file and line given), or a bad setting.
    """
    data_dir = Path(data_dir).expanduser()
    settings = {"max_length": max_length, "num_train": num_train, "num_val": num_val,
                "num_test": num_test, "seed": seed}
    if max_length < 1 or any(settings[f"num_{split}"] is not None and settings[f"num_{split}"] < 0
                             for split in SPLITS):
        raise ValueError(f"Retrieval needs max_length >= 1 and pair counts >= 0, got {settings}")
    manifest = storage.read_manifest(data_dir)
    if manifest is not None:
        storage.check_settings(data_dir, manifest, NAME, settings, FORMAT_VERSION)
        if is_prepared(data_dir):
            return manifest
    sources = find_sources(data_dir if source_dir is None else source_dir, data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"task": NAME, "format_version": FORMAT_VERSION, "settings": settings,
                "vocab": {"pad": bytes_tokens.PAD, "byte_offset": bytes_tokens.OFFSET,
                          "vocab_size": bytes_tokens.VOCAB_SIZE},
                "counts": {}, "summary": {}, "sources": {}, "files": {}}
    bar = tqdm.tqdm(desc="Retrieval", unit=" documents", disable=not progress,
                    mininterval=0.1 if sys.stderr.isatty() else 30)
    with bar:
        for split in SPLITS:
            entries = _convert_split(data_dir, split, sources[split], settings, bar)
            manifest["counts"][split] = entries["summary"]["pairs"]
            manifest["summary"][split] = entries["summary"]
            manifest["sources"].update(entries["source"])
            manifest["files"].update(entries["files"])
    return storage.write_manifest(data_dir, manifest)


def load(split: str, data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads one prepared split, memory-mapped.

    Args:
        split: "train", "val" or "test".
        data_dir: a folder made by `prepare`.

    Returns:
        ``inputs`` and ``inputs2`` [N, max_length] uint16 byte tokens padded with 0,
        ``lengths`` and ``lengths2`` [N] int32, ``targets`` [N] int32 (1 = linked).

    Raises:
        FileNotFoundError: the folder is not prepared; the message says how to prepare it.
        ValueError: an unknown split, or an array differing from ``manifest.json``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    data_dir = Path(data_dir).expanduser()
    manifest = storage.read_manifest(data_dir)
    if manifest is None or manifest.get("task") != NAME:
        raise FileNotFoundError(f"no prepared retrieval data in {data_dir} (no retrieval manifest.json). "
                                + _download_help(data_dir, data_dir))
    command = storage.prepare_command("retrieval", data_dir)
    arrays = storage.load_verified_split(data_dir, split, ARRAYS, manifest, prepare_command=command)
    return arrays


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """The Retrieval task of the registry (see `lra.tasks`); its methods are this module's functions."""

    name: str = NAME
    num_classes: int = 2
    vocab_size: int = bytes_tokens.VOCAB_SIZE
    generated: bool = False  # prepare() needs the downloaded LRA release
    paired: bool = True  # two documents per example: a dual encoder
    splits: tuple[str, ...] = SPLITS
    prepare = staticmethod(prepare)
    load = staticmethod(load)
    is_prepared = staticmethod(is_prepared)
    source_at_hand = staticmethod(source_at_hand)


TASK = Retrieval()
