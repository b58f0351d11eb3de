"""Tests of lra.tasks.listops and the task registry (no JAX needed)."""

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lra import tasks
from lra.tasks import listops

REPO = Path(__file__).resolve().parents[1]
EXPECTED_VOCAB = ("<pad>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
                  "[MIN", "[MAX", "[MED", "[SM", "]")
SMALL = dict(num_train=200, num_val=50, num_test=50, min_length=10, max_length=200, seed=3, progress=False)


# --- an independent reference, written from the LRA description -------------------------

def reference_value(source: str) -> int:
    """Evaluates a parenthesised source with a stack."""
    stack = [[]]
    for token in source.split():
        if token in ("(", ")"):
            continue
        if token.startswith("["):
            stack.append([token])
        elif token == "]":
            operator, *args = stack.pop()
            value = {"[MIN": min, "[MAX": max, "[MED": lambda a: int(np.median(a)),
                     "[SM": lambda a: sum(a) % 10}[operator](args)
            stack[-1].append(value)
        else:
            stack[-1].append(int(token))
    (value,) = stack[0]
    assert len(stack) == 1
    return value


def reference_tokens(source: str) -> list[int]:
    return [EXPECTED_VOCAB.index(token) for token in source.split() if token not in ("(", ")")]


def lra_to_string(tree) -> str:
    """The LRA generator's recursive to_string on nested pairs."""
    if isinstance(tree, (str, int)):
        return str(tree)
    return "( " + lra_to_string(tree[0]) + " " + lra_to_string(tree[1]) + " )"


def read_tsv(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "Source\tTarget"
    return [(source, int(target)) for source, target in (line.split("\t") for line in lines[1:])]


def write_tsv(path: Path, rows: list[str], newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("Source\tTarget" + newline + "".join(row + newline for row in rows)).encode())
    return path


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("listops")
    listops.prepare(data_dir, **SMALL)
    return data_dir


# --- pure functions -----------------------------------------------------------------------

def test_string_form_value_and_tokens():
    tree = ((("[MAX", 4), 3), "]")
    assert listops.to_string(tree) == "( ( ( [MAX 4 ) 3 ) ] )" == lra_to_string(tree)
    assert listops.evaluate(tree) == 4
    assert listops.tokenize("( ( ( [MAX 4 ) 3 ) ] )").tolist() == [12, 5, 4, 15]


def test_vocabulary_and_task_object():
    assert listops.VOCAB == EXPECTED_VOCAB
    task = tasks.get("listops")
    assert task is listops.TASK
    assert (task.name, task.num_classes, task.vocab_size, task.generated) == ("listops", 10, 16, True)
    assert task.splits == ("train", "val", "test")
    assert "listops" in tasks.NAMES
    with pytest.raises(ValueError, match="listops"):
        tasks.get("nope")


@pytest.mark.parametrize("args", [(1, 2), (3, 4, 8, 9), (0, 9), (5, 1, 7), (2, 2, 3, 3)])
def test_median_is_the_integer_numpy_median(args):
    tree = "[MED"
    for arg in args:
        tree = (tree, arg)
    assert listops.evaluate((tree, "]")) == int(np.median(args))


@pytest.mark.parametrize("max_depth, max_args, count", [(6, 5, 3000), (10, 10, 300), (1, 2, 10)])
def test_generated_trees_match_the_lra_functions(max_depth, max_args, count):
    rng, fused_rng = random.Random(11), random.Random(11)
    for _ in range(count):
        tree, length = listops.generate_tree(1, max_depth, max_args, rng=rng)
        source = lra_to_string(tree)
        assert listops.to_string(tree) == source
        assert listops.evaluate(tree) == reference_value(source)
        assert len(reference_tokens(source)) == length
        # The fused generator used by prepare() draws the same trees from the same stream.
        fused = listops._generate_source(fused_rng, max_depth, max_args)
        assert fused == (source, reference_value(source), length)


# --- generated data --------------------------------------------------------------------------

def test_prepared_labels_lengths_and_counts(small_dir):
    sources = set()
    for split in ("train", "val", "test"):
        rows = read_tsv(small_dir / f"basic_{split}.tsv")
        assert len(rows) == SMALL[f"num_{split}"]
        data = listops.load(split, small_dir)
        for row, (source, target) in enumerate(rows):
            assert reference_value(source) == target == data["targets"][row]
            tokens = reference_tokens(source)
            assert SMALL["min_length"] < len(tokens) < SMALL["max_length"]
            assert data["lengths"][row] == len(tokens)
            assert data["inputs"][row].tolist() == tokens + [0] * (data["inputs"].shape[1] - len(tokens))
        assert data["inputs"].shape[1] == data["lengths"].max()
        sources |= {source for source, _ in rows}
    assert len(sources) == sum(SMALL[f"num_{split}"] for split in ("train", "val", "test"))


def test_manifest(small_dir):
    manifest = json.loads((small_dir / "manifest.json").read_text())
    assert manifest["task"] == "listops"
    assert manifest["counts"] == {"train": 200, "val": 50, "test": 50}
    assert manifest["settings"]["seed"] == 3 and manifest["settings"]["max_depth"] == 10
    for name, record in manifest["files"].items():
        assert hashlib.sha256((small_dir / name).read_bytes()).hexdigest() == record["sha256"]


def test_identical_across_processes_hash_seeds_and_workers(tmp_path):
    # Small trees, so that the worker processes' whole shards are quick.
    tiny = dict(num_train=100, num_val=20, num_test=20, min_length=3, max_length=40, max_depth=5, max_args=4,
                seed=7, progress=False)
    listops.prepare(tmp_path / "here", num_workers=1, **tiny)
    for hash_seed, workers in (("0", 1), ("12345", 2)):
        code = ("from lra.tasks import listops; "
                f"listops.prepare({str(tmp_path / hash_seed)!r}, num_workers={workers}, **{tiny!r})")
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)
    for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv", "manifest.json"):
        expected = (tmp_path / "here" / name).read_bytes()
        assert (tmp_path / "0" / name).read_bytes() == expected
        assert (tmp_path / "12345" / name).read_bytes() == expected
    assert len(read_tsv(tmp_path / "here" / "basic_train.tsv")) == 100


def test_other_seed_gives_other_data_and_empty_splits_load(tmp_path):
    listops.prepare(tmp_path / "a", **{**SMALL, "num_train": 20, "num_test": 0, "seed": 1})
    listops.prepare(tmp_path / "b", **{**SMALL, "num_train": 20, "num_test": 0, "seed": 2})
    assert (tmp_path / "a/basic_train.tsv").read_bytes() != (tmp_path / "b/basic_train.tsv").read_bytes()
    empty = listops.load("test", tmp_path / "a")
    assert empty["inputs"].shape == (0, 0) and empty["lengths"].shape == empty["targets"].shape == (0,)


def test_prepare_twice_does_not_rewrite(small_dir):
    mtimes = {path: path.stat().st_mtime_ns for path in small_dir.glob("*") if path.is_file()}
    manifest = listops.prepare(small_dir, **SMALL)
    assert manifest == json.loads((small_dir / "manifest.json").read_text())
    assert mtimes == {path: path.stat().st_mtime_ns for path in mtimes}
    assert listops.is_prepared(small_dir)


def test_prepare_with_other_settings_raises(tmp_path):
    listops.prepare(tmp_path, **{**SMALL, "num_train": 20})
    with pytest.raises(ValueError, match=r"seed=3 there, 4 requested.*another data_dir"):
        listops.prepare(tmp_path, **{**SMALL, "num_train": 20, "seed": 4})


def test_tampered_file_is_rejected(tmp_path):
    listops.prepare(tmp_path, **{**SMALL, "num_train": 20})
    path = tmp_path / "basic_val.tsv"
    listops.load("val", tmp_path)  # memoises the hash
    data = bytearray(path.read_bytes())
    data[-2] = ord("0") + (data[-2] - ord("0") + 1) % 10  # another target, same layout
    stamp = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="basic_val.tsv"):
        listops.load("val", tmp_path)


def test_cache_is_memory_mapped_and_optional(small_dir, tmp_path):
    first = listops.load("val", small_dir)
    cached = listops.load("val", small_dir)
    assert isinstance(cached["inputs"], np.memmap)
    for name in ("inputs", "lengths", "targets"):
        np.testing.assert_array_equal(first[name], cached[name])
    assert cached["inputs"].dtype == np.uint8
    assert cached["lengths"].dtype == cached["targets"].dtype == np.int32
    # A data_dir where no cache can be written (here "cache" is a file) still loads.
    write_tsv(tmp_path / "basic_test.tsv", ["( ( ( [SM 4 ) 9 ) ] )\t3"])
    (tmp_path / "cache").write_text("not a folder")
    assert listops.load("test", tmp_path)["targets"].tolist() == [3]


# --- reading official-format files ------------------------------------------------------------

OFFICIAL_ROWS = [
    "( ( ( [MAX 4 ) 3 ) ] )\t4",
    "( ( ( ( [MIN ( ( ( [SM 5 ) 9 ) ] ) ) 7 ) 8 ) ] )\t4",
    "( ( ( ( ( [MED 1 ) 2 ) 8 ) 9 ) ] )\t5",
]
OFFICIAL_TOKENS = [[12, 5, 4, 15], [11, 14, 6, 10, 15, 8, 9, 15], [13, 2, 3, 9, 10, 15]]


@pytest.mark.parametrize("folder", ["", "listops-1000"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_reads_the_official_layout(tmp_path, folder, newline):
    for split in ("train", "val", "test"):
        write_tsv(tmp_path / folder / f"basic_{split}.tsv", OFFICIAL_ROWS, newline)
    assert listops.is_prepared(tmp_path)
    manifest = listops.prepare(tmp_path, progress=False)
    assert manifest["counts"] == {"train": 3, "val": 3, "test": 3}
    assert not (tmp_path / "manifest.json").exists()
    for _ in range(2):  # parsed, then cached
        data = listops.load("train", tmp_path)
        assert data["inputs"].tolist() == [tokens + [0] * (8 - len(tokens)) for tokens in OFFICIAL_TOKENS]
        assert data["lengths"].tolist() == [4, 8, 6]
        assert data["targets"].tolist() == [4, 4, 5]


def test_irregular_spacing_is_read_like_the_canonical_form(tmp_path):
    write_tsv(tmp_path / "basic_test.tsv", ["(  ( ( [MAX 4 ) 3 )   ] )\t 4 ", *OFFICIAL_ROWS[1:]])
    data = listops.load("test", tmp_path)
    assert data["lengths"].tolist() == [4, 8, 6]
    assert data["inputs"][0, :4].tolist() == OFFICIAL_TOKENS[0]


@pytest.mark.parametrize("bad_row, message", [
    ("( ( ( [MAX 4 ) 3 ) ] )", "expected 2 tab-separated columns"),
    ("( ( ( [MAX 4 ) 3 ) ] )\t4\t1", "expected 2 tab-separated columns"),
    ("( ( ( [MAX 4 ) 13 ) ] )\t4", "unknown token '13'"),
    ("( ( ( [MAXI 4 ) 3 ) ] )\t4", "unknown token"),
    ("( ( ( [MAX 4 ) 3 ) ] )\t10", "not an integer 0-9"),
    ("( ( ( [MAX 4 ) 3 ) ] )\tx", "not an integer 0-9"),
    ("\t4", "no tokens"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_row, message):
    write_tsv(tmp_path / "basic_val.tsv", [OFFICIAL_ROWS[0], OFFICIAL_ROWS[1], bad_row, OFFICIAL_ROWS[2]])
    with pytest.raises(ValueError, match=rf"basic_val.tsv, line 4: .*{message}"):
        listops.load("val", tmp_path)


def test_missing_header_is_malformed(tmp_path):
    (tmp_path / "basic_val.tsv").write_text(OFFICIAL_ROWS[0] + "\n")
    with pytest.raises(ValueError, match="basic_val.tsv, line 1"):
        listops.load("val", tmp_path)


def test_missing_data_names_the_prepare_command(tmp_path):
    data_dir = tmp_path / "absent"
    with pytest.raises(FileNotFoundError) as error:
        listops.load("train", data_dir)
    assert f"python -m lra.data prepare listops --data_dir {data_dir}" in str(error.value)
    assert not listops.is_prepared(data_dir)


def test_partial_files_without_manifest_raise(tmp_path):
    write_tsv(tmp_path / "basic_train.tsv", OFFICIAL_ROWS)
    with pytest.raises(ValueError, match="only some"):
        listops.prepare(tmp_path, progress=False)


def test_impossible_settings_raise(tmp_path):
    with pytest.raises(ValueError, match="no tree"):
        listops.prepare(tmp_path, max_depth=2, max_args=3, progress=False)
