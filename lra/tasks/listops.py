"""ListOps as in Long Range Arena: nested list operations, generated offline.

An example is an expression such as ``[MAX 4 [MIN 3 7 ] 2 ]``; its value (0-9) is the
class. Operators: ``[MIN``, ``[MAX``, ``[MED`` (integer median), ``[SM`` (sum mod 10),
each closed by ``]``. Trees are drawn as by the LRA generator (google-research/
long-range-arena, ``lra_benchmarks/data/listops.py``), kept when their token count is
strictly between ``min_length`` and ``max_length``, without duplicates across splits.
Files use the official layout: ``basic_{train,val,test}.tsv``, header ``Source\\tTarget``,
sources fully parenthesised (MAX(4, 3) is ``( ( ( [MAX 4 ) 3 ) ] )``). Tokenising drops
the parentheses and keeps ``]``.

Generation is reproducible across processes, hash seeds, machines and worker counts:
trees come in shards of ``_SHARD_SIZE`` accepted trees, each shard drawn from its own
stream seeded by ``(seed, shard index)``, merged in shard order.
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
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Union

import numpy as np
import tqdm

from lra.tasks import storage

MIN, MAX, MED, SUM_MOD, END = "[MIN", "[MAX", "[MED", "[SM", "]"
OPERATORS = (MIN, MAX, MED, SUM_MOD)
OPERATOR_PROBABILITY = 0.25  # chance that a node above max_depth is an operator
PAD = "<pad>"
VOCAB: tuple[str, ...] = (PAD, *"0123456789", *OPERATORS, END)  # fixed order, never a set
TOKEN_IDS = {token: index for index, token in enumerate(VOCAB) if token != PAD}
PARENTHESES = ("(", ")")
SPLITS = ("train", "val", "test")
RELEASE_FOLDER = "listops-1000"  # folder of the official LRA release
HEADER = b"Source\tTarget"
FORMAT_VERSION = 1
_SHARD_SIZE = 1000  # accepted trees per shard; changing it changes the generated data
_BLOCK_BYTES = 1 << 23  # the reader parses this much of a file at once

Tree = Union[int, str, tuple["Tree", "Tree"]]


def _median(values: list[int]) -> int:
    ordered, middle = sorted(values), len(values) // 2
    if len(values) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) // 2  # == int(np.median(values))


_OPERATIONS: dict[str, Callable[[list[int]], int]] = {
    MIN: min, MAX: max, MED: _median, SUM_MOD: lambda values: sum(values) % 10}


def generate_tree(depth: int = 1, max_depth: int = 10, max_args: int = 10, *,
                  rng: random.Random) -> tuple[Tree, int]:
    """Draws a random tree as the LRA generator does.

    Below `max_depth` a node is an operator with probability 0.25, else a value 0-9. An
    operator has 2..`max_args` arguments, subtrees one level deeper, and is drawn after
    them. The tree is in the LRA nested-pair form ``((((op, a1), a2), ...), "]")``.

    Args:
        depth: depth of this node (the root is at depth 1).
        max_depth: nodes at this depth are values.
        max_args: most arguments of an operator (at least 2).
        rng: the random stream.

    Returns:
        (tree, length); length counts values, operators and ``]``, not parentheses.
    """
    draw = rng.random
    if depth >= max_depth or draw() > OPERATOR_PROBABILITY:
        return int(draw() * 10), 1
    args, length = [], 2
    for _ in range(2 + int(draw() * (max_args - 1))):
        arg, arg_length = generate_tree(depth + 1, max_depth, max_args, rng=rng)
        args.append(arg)
        length += arg_length
    tree = OPERATORS[int(draw() * len(OPERATORS))]
    for arg in args:
        tree = (tree, arg)
    return (tree, END), length


def _generate_source(rng: random.Random, max_depth: int, max_args: int) -> tuple[str, int, int]:
    """(to_string(tree), evaluate(tree), length) of `generate_tree(rng=rng)` in one pass.

    Draws exactly as `generate_tree` does, but builds no tuples and makes no call per
    value: about 2x faster.
    """
    draw, spread = rng.random, max_args - 1
    heads = [f"{operator} " for operator in OPERATORS]
    operations = [_OPERATIONS[operator] for operator in OPERATORS]

    def operator_node(depth: int) -> tuple[str, int, int]:
        num_args = 2 + int(draw() * spread)
        texts, values, length = [], [], 2
        values_only = depth + 1 >= max_depth
        for _ in range(num_args):
            if values_only or draw() > OPERATOR_PROBABILITY:
                value = int(draw() * 10)
                texts.append("0123456789"[value])
                values.append(value)
                length += 1
            else:
                text, value, arg_length = operator_node(depth + 1)
                texts.append(text)
                values.append(value)
                length += arg_length
        operator = int(draw() * len(OPERATORS))
        text = "( " * (num_args + 1) + heads[operator] + " ) ".join(texts) + f" ) {END} )"
        return text, operations[operator](values), length

    if max_depth <= 1 or draw() > OPERATOR_PROBABILITY:
        value = int(draw() * 10)
        return str(value), value, 1
    return operator_node(1)


def _unwind(tree: tuple) -> tuple[str, list[Tree]]:
    chain, args = tree[0], []
    while isinstance(chain, tuple):
        args.append(chain[1])
        chain = chain[0]
    return chain, args[::-1]


def to_string(tree: Tree) -> str:
    """The LRA source string of a tree: each pair (left, right) prints as ``( left right )``."""
    if not isinstance(tree, tuple):
        return str(tree)
    return f"( {to_string(tree[0])} {to_string(tree[1])} )"


def evaluate(tree: Tree) -> int:
    """The value (0-9) of a tree from `generate_tree`."""
    if not isinstance(tree, tuple):
        return tree
    operator, args = _unwind(tree)
    return _OPERATIONS[operator]([evaluate(arg) for arg in args])


def tokenize(source: str) -> np.ndarray:
    """Token ids (uint8) of a source string; parentheses are dropped, ``]`` kept.

    Raises:
        ValueError: an unknown token, or no token at all.
    """
    try:
        ids = [TOKEN_IDS[token] for token in source.split() if token not in PARENTHESES]
    except KeyError as error:
        raise ValueError(f"unknown token {error.args[0][:20]!r}") from None
    if not ids:
        raise ValueError("the source has no tokens")
    return np.array(ids, np.uint8)


# --- reading ------------------------------------------------------------------------
# Fast path: a block of lines in the canonical layout (single spaces, "( " and " )",
# "\t<digit>" at the end, LF or CRLF) is parsed with NumPy. Operators become one-byte
# codes, so the remaining text alternates token, separator. Any other block is parsed
# line by line with `tokenize`, which accepts any whitespace and names a bad line.

_BYTE_IDS = np.full(256, 255, np.uint8)  # byte -> token id; 255: not a token
_BYTE_IDS[[ord(digit) for digit in "0123456789"]] = [TOKEN_IDS[digit] for digit in "0123456789"]
_BYTE_IDS[ord(END)] = TOKEN_IDS[END]
_BYTE_IDS[1: len(OPERATORS) + 1] = [TOKEN_IDS[operator] for operator in OPERATORS]  # codes


def _parse_canonical_block(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    text = np.frombuffer(data, np.uint8)
    newlines = np.flatnonzero(text == ord("\n"))
    starts = np.concatenate([[0], newlines[:-1] + 1])
    ends = newlines - (text[newlines - 1] == ord("\r"))  # end of each line without "\r"
    targets = text[ends - 1] - np.uint8(ord("0"))
    if (ends - starts < 3).any() or (text[ends - 2] != ord("\t")).any() or (targets > 9).any():
        return None
    space, opening, closing = text == ord(" "), text == ord("("), text == ord(")")
    if opening[-1] or (opening[:-1] & ~space[1:]).any() or closing[0] or (closing[1:] & ~space[:-1]).any():
        return None
    drop = opening | closing
    drop[1:] |= opening[:-1]  # "( "
    drop[:-1] |= closing[1:]  # " )"
    drop[ends - 2] = drop[ends - 1] = True  # "\t<digit>"
    drop[ends[ends < newlines]] = True  # "\r"
    text = text[~drop]
    if ((text >= 1) & (text <= len(OPERATORS))).any():  # these bytes will be operator codes
        return None
    brackets = np.flatnonzero(text == ord("["))
    # bytes after each "[" (past the end: the final "\n", which matches no letter)
    following = [text[np.minimum(brackets + offset, len(text) - 1)] for offset in range(5)]
    codes, lengths = np.zeros(len(brackets), np.uint8), np.zeros(len(brackets), np.int64)
    for code, operator in enumerate(OPERATORS, start=1):
        size = len(operator)
        match = (following[size] == ord(" ")) | (following[size] == ord("\n"))
        for offset, character in enumerate(operator[1:], start=1):
            match &= following[offset] == ord(character)
        codes[match], lengths[match] = code, size
    if not codes.all():
        return None
    text[brackets] = codes
    tails = brackets[:, None] + np.arange(1, 4)
    keep = np.ones(len(text), bool)
    keep[tails[np.arange(1, 4) < lengths[:, None]]] = False
    text = text[keep]
    tokens, separators = text[0::2], text[1::2]
    ids, line_ends = _BYTE_IDS[tokens], separators == ord("\n")
    if len(text) % 2 or (ids == 255).any() or (~line_ends & (separators != ord(" "))).any():
        return None
    counts = np.diff(np.concatenate([[-1], np.flatnonzero(line_ends)])).astype(np.int32)
    return ids, counts, targets.astype(np.int32)


def _parse_lines(data: bytes, path: Path, first_line: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, targets = [], []
    for number, line in enumerate(data.split(b"\n")[:-1], start=first_line):
        fields = line.rstrip(b"\r").split(b"\t")
        if len(fields) != 2:
            raise ValueError(f"{path}, line {number}: expected 2 tab-separated columns, got {len(fields)}")
        target = fields[1].strip()
        if not (target.isdigit() and int(target) < 10):
            raise ValueError(f"{path}, line {number}: the target {target[:20].decode(errors='replace')!r} "
                             "is not an integer 0-9")
        try:
            ids.append(tokenize(fields[0].decode(errors="replace")))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
        targets.append(int(target))
    counts = np.array([len(line_ids) for line_ids in ids], np.int32)
    return np.concatenate(ids), counts, np.array(targets, np.int32)


def _whole_lines(file) -> Iterator[bytes]:
    """The rest of a binary file in blocks of whole lines, each ending with a newline."""
    rest = b""
    while chunk := file.read(_BLOCK_BYTES):
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        if cut:
            yield data[:cut]
        rest = data[cut:]
    if rest:
        yield rest + b"\n"


def _read_tsv(path: Path) -> dict[str, np.ndarray]:
    blocks, line_number = [(np.zeros(0, np.uint8), np.zeros(0, np.int32), np.zeros(0, np.int32))], 2
    with open(path, "rb") as file:
        header = file.readline()
        if header.rstrip(b"\r\n") != HEADER:
            raise ValueError(f"{path}, line 1: expected the header 'Source<TAB>Target', got {header[:40]!r}")
        for data in _whole_lines(file):
            blocks.append(_parse_canonical_block(data) or _parse_lines(data, path, line_number))
            line_number += len(blocks[-1][1])
    ids, lengths, targets = (np.concatenate(arrays) for arrays in zip(*blocks))
    inputs = np.zeros((len(lengths), int(lengths.max(initial=0))), np.uint8)
    inputs[np.arange(inputs.shape[1]) < lengths[:, None]] = ids  # row-major: sources one after another
    return {"inputs": inputs, "lengths": lengths, "targets": targets}


# --- files, manifest, cache ---------------------------------------------------------

def _file_name(split: str) -> str:
    return f"basic_{split}.tsv"


def _find_split_file(data_dir: Path, split: str) -> Path | None:
    for folder in (data_dir, data_dir / RELEASE_FOLDER):
        if (folder / _file_name(split)).is_file():
            return folder / _file_name(split)
    return None


def is_prepared(data_dir: str | os.PathLike) -> bool:
    """True when the three TSVs are in `data_dir` or in its ``listops-1000/``."""
    return all(_find_split_file(Path(data_dir), split) for split in SPLITS)


def load(split: str, data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads one split, tokenised; the arrays are cached in ``data_dir/cache/``.

    Args:
        split: "train", "val" or "test".
        data_dir: the folder holding ``basic_<split>.tsv``, directly or in ``listops-1000/``.

    Returns:
        ``inputs`` [N, L] uint8 token ids padded with 0 to the split's longest source
        (memory-mapped once cached), ``lengths`` [N] int32, ``targets`` [N] int32.

    Raises:
        FileNotFoundError: no such file; the message names the command that makes it.
        ValueError: a malformed line (file and line number given), or a file differing
            from ``manifest.json``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    path = _find_split_file(data_dir, split)
    if path is None:
        raise FileNotFoundError(
            f"ListOps: no {_file_name(split)} in {data_dir} or {data_dir / RELEASE_FOLDER}. Make it with: "
            + storage.prepare_command("listops", data_dir))
    cache_dir = data_dir / "cache"
    sha256, manifest = storage.sha256(path, cache_dir), storage.read_manifest(data_dir)
    if manifest is not None:
        expected = manifest.get("files", {}).get(path.name, {}).get("sha256")
        if sha256 != expected:
            raise ValueError(f"{path} differs from {data_dir / 'manifest.json'} (sha256 {sha256}, expected "
                             f"{expected}): it was modified. Delete {data_dir} and prepare it again.")
    paths = {name: cache_dir / f"basic_{split}.{sha256[:16]}.{name}.npy"
             for name in ("inputs", "lengths", "targets")}
    if all(cached.is_file() for cached in paths.values()):
        return {name: np.load(cached, mmap_mode="r" if name == "inputs" else None)
                for name, cached in paths.items()}
    arrays = _read_tsv(path)
    with contextlib.suppress(OSError):  # read-only data_dir: no cache
        cache_dir.mkdir(exist_ok=True)
        for stale in set(cache_dir.glob(f"basic_{split}.*.npy")) - set(paths.values()):
            stale.unlink()  # arrays of an earlier version of the file
        for name, cached in paths.items():
            storage.replace_atomically(cached, lambda file: np.save(file, arrays[name]))
    return arrays


# --- generation ---------------------------------------------------------------------

def _shard(seed: int, index: int, settings: dict) -> Iterator[tuple[str, int]]:
    """The (source, target) pairs of one shard: a fixed stream for (seed, index, settings)."""
    digest = hashlib.sha256(f"lra.listops/{seed}/{index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    for _ in range(_SHARD_SIZE):
        while True:
            source, target, length = _generate_source(rng, settings["max_depth"], settings["max_args"])
            if settings["min_length"] < length < settings["max_length"]:
                break
        yield source, target


def _whole_shard(seed: int, index: int, settings: dict) -> list[tuple[str, int]]:
    return list(_shard(seed, index, settings))


def _candidates(settings: dict, num_workers: int) -> Iterator[tuple[str, int]]:
    """The examples of shards 0, 1, 2, ... in order, drawn by `num_workers` processes."""
    seed, indices = settings["seed"], itertools.count()
    if num_workers <= 1:
        yield from itertools.chain.from_iterable(_shard(seed, index, settings) for index in indices)
        return
    # Spawned, not forked: forking a process that runs JAX threads can deadlock.
    spawn = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=spawn)
    try:
        pending = collections.deque(
            pool.submit(_whole_shard, seed, next(indices), settings) for _ in range(2 * num_workers))
        while True:
            examples = pending.popleft().result()
            pending.append(pool.submit(_whole_shard, seed, next(indices), settings))
            yield from examples
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_settings(settings: dict) -> None:
    if min(settings[f"num_{split}"] for split in SPLITS) < 0 or settings["max_args"] < 2:
        raise ValueError(f"ListOps needs counts >= 0 and max_args >= 2, got {settings}")
    longest = 1  # the longest tree the depth and argument limits allow
    for _ in range(settings["max_depth"] - 1):
        longest = 2 + settings["max_args"] * longest
    if settings["min_length"] + 1 >= min(settings["max_length"], longest + 1):
        raise ValueError(f"ListOps: no tree is longer than min_length and shorter than max_length with "
                         f"{settings} (the longest possible has {longest} tokens)")


def _generate(data_dir: Path, settings: dict, num_workers: int, progress: bool) -> dict:
    files, total = {}, sum(settings[f"num_{split}"] for split in SPLITS)
    candidates = _candidates(settings, num_workers)
    lines = _unique_lines(candidates)
    # On a terminal a live bar; in a log file a line every 30 s instead of a stream of updates.
    bar = tqdm.tqdm(total=total, desc="ListOps", disable=not progress,
                    mininterval=0.1 if sys.stderr.isatty() else 30)
    with contextlib.closing(candidates), bar:
        for split in SPLITS:
            digest, size = hashlib.sha256(HEADER + b"\n"), len(HEADER) + 1
            with open(data_dir / f".{_file_name(split)}.tmp", "wb") as file:
                file.write(HEADER + b"\n")
                for line in itertools.islice(lines, settings[f"num_{split}"]):
                    file.write(line)
                    digest.update(line)
                    size += len(line)
                    bar.update()
            files[_file_name(split)] = {"sha256": digest.hexdigest(), "bytes": size}
    for name in files:
        os.replace(data_dir / f".{name}.tmp", data_dir / name)
    manifest = {"task": "listops", "format_version": FORMAT_VERSION, "settings": settings,
                "counts": {split: settings[f"num_{split}"] for split in SPLITS}, "files": files}
    return storage.write_manifest(data_dir, manifest)


def _unique_lines(candidates: Iterator[tuple[str, int]]) -> Iterator[bytes]:
    """TSV lines of the candidates, each source once (across all splits)."""
    seen = set()
    for source, target in candidates:
        fingerprint = hashlib.blake2b(source.encode(), digest_size=16).digest()
        if fingerprint not in seen:
            seen.add(fingerprint)
            yield f"{source}\t{target}\n".encode()


def _describe_found_files(data_dir: Path) -> dict:
    paths = [_find_split_file(data_dir, split) for split in SPLITS]
    counts = {}
    for split, path in zip(SPLITS, paths):
        with open(path, "rb") as file:
            counts[split] = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 22), b"")) - 1
    print(f"ListOps: using the files found in {paths[0].parent} as they are (no manifest.json).")
    return {"task": "listops", "format_version": None, "settings": None, "counts": counts,
            "files": {path.name: {"path": str(path), "bytes": path.stat().st_size} for path in paths}}


def prepare(data_dir: str | os.PathLike, *, num_train: int = 96_000, num_val: int = 2_000,
            num_test: int = 2_000, seed: int = 0, min_length: int = 500, max_length: int = 2_000,
            max_depth: int = 10, max_args: int = 10, progress: bool = True,
            num_workers: int | None = None) -> dict:
    """Generates ListOps into `data_dir`, or accepts what is already there.

    An empty or missing folder gets the three TSVs and ``manifest.json`` (task, settings,
    counts, sha256 per file, format version). A folder whose manifest has the same
    settings is left alone. TSVs without a manifest (the official release, possibly in
    ``listops-1000/``) are used as found.

    Args:
        data_dir: the folder.
        num_train: training examples: the first unique trees drawn.
        num_val: validation examples: the next ones.
        num_test: test examples: the next ones.
        seed: seed of the generator; the files depend only on the settings.
        min_length: sources have more tokens than this (parentheses not counted).
        max_length: sources have fewer tokens than this.
        max_depth: depth at which every node is a value.
        max_args: most arguments of an operator.
        progress: show a progress bar.
        num_workers: processes drawing trees; the files do not depend on it. Default:
            one per CPU but one (at most 8) for more than 2000 examples; 1 draws in this
            process. Above 1, scripts must call this under ``if __name__ == "__main__":``
            (the processes are spawned).

    Returns:
        The manifest; for found files, ``counts`` and ``files`` with ``settings`` None.

    Raises:
        ValueError: the folder holds ListOps made with other settings, or only some of
            the TSVs, or no tree satisfies the settings.
    """
    data_dir = Path(data_dir)
    settings = dict(num_train=num_train, num_val=num_val, num_test=num_test, seed=seed, min_length=min_length,
                    max_length=max_length, max_depth=max_depth, max_args=max_args)
    _check_settings(settings)
    manifest = storage.read_manifest(data_dir)
    if manifest is not None:
        storage.check_settings(data_dir, manifest, "listops", settings, FORMAT_VERSION)
        if all((data_dir / _file_name(split)).is_file() for split in SPLITS):
            return manifest
    elif is_prepared(data_dir):
        return _describe_found_files(data_dir)
    elif any(_find_split_file(data_dir, split) for split in SPLITS):
        raise ValueError(f"{data_dir} holds only some of the ListOps files and no manifest.json; "
                         f"delete them or add the missing ones.")
    if num_workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_workers = min(cpus - 1, 8) if num_train + num_val + num_test > 2 * _SHARD_SIZE else 1
    data_dir.mkdir(parents=True, exist_ok=True)
    return _generate(data_dir, settings, num_workers, progress)


@dataclasses.dataclass(frozen=True)
class ListOps:
    """The ListOps task of the registry (see `lra.tasks`); its methods are this module's functions."""

    name: str = "listops"
    num_classes: int = 10
    vocab_size: int = len(VOCAB)
    generated: bool = True  # prepare() needs no download
    paired: bool = False  # one sequence per example (retrieval has two)
    splits: tuple[str, ...] = SPLITS
    prepare = staticmethod(prepare)
    load = staticmethod(load)
    is_prepared = staticmethod(is_prepared)


TASK = ListOps()
