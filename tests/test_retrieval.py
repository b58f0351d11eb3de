"""Retrieval: byte tokens, the LRA AAN TSV reader and converter, the dual encoder, config, a run."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import retrieval as retrieval_config
from lra import models, tasks
from lra.common import set_path
from lra.tasks import bytes_tokens, retrieval
from lra.training import data, train

REPO = Path(__file__).resolve().parents[1]
RELEASE_NAMES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv",
                 "test": "new_aan_pairs.test.tsv"}
MAX_LENGTH = 48


# --- small files in the official layout -------------------------------------------------

def _document(rng: np.random.Generator, index: int) -> bytes:
    """Text with what the release has: quotes, backslashes, UTF-8, b'...' prefixes, any length."""
    words = [b'"quoted', b"it's", b"back\\slash", "d\u00e9j\u00e0 vu".encode(), b"b'abstract",
             b"x" * 30, b"cite", b"P05-1001", b"'", b'"']
    count = int(rng.integers(0, 14))
    return b" ".join(words[int(k)] for k in rng.integers(0, len(words), count)) + f" {index}".encode()


def _write_release(folder: Path, counts: dict, seed: int = 0) -> dict[str, list[tuple[int, bytes, bytes]]]:
    """Writes the three TSVs as the release has them; returns the rows written per split."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, written = np.random.default_rng(seed), {}
    for split, name in RELEASE_NAMES.items():
        rows, lines = [], []
        for index in range(counts[split]):
            label = int(rng.integers(0, 2))
            text1, text2 = _document(rng, index), _document(rng, index + 1000)
            label_text = [b"1.0", b"0.0"][1 - label] if index % 3 else str(label).encode()
            ending = b"\r\n" if index == 1 else b"\n"  # one CRLF line
            lines.append(b"\t".join([label_text, b"W%02d-%04d" % (index, index), b"E-%d" % index,
                                     text1, text2]) + ending)
            rows.append((label, text1, text2))
        (folder / name).write_bytes(b"".join(lines))
        written[split] = rows
    return written


def _csv_reference(path: Path) -> list[tuple[int, bytes, bytes]]:
    """An independent reader: the csv module, no quoting, latin-1 so every byte survives."""
    with open(path, encoding="latin-1", newline="") as file:
        return [(int(float(row[0])), row[3].encode("latin-1"), row[4].encode("latin-1"))
                for row in csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _expected_tokens(text: bytes, max_length: int) -> list[int]:
    return [byte + 1 for byte in text[:max_length]] + [0] * (max_length - len(text[:max_length]))


COUNTS = {"train": 64, "val": 20, "test": 18}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A folder laid out like the unpacked archive: release/lra_release/tsv_data/*.tsv."""
    folder = tmp_path_factory.mktemp("release")
    rows = _write_release(folder / "lra_release" / "tsv_data", COUNTS)
    return folder, rows


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("retrieval")
    manifest = retrieval.prepare(data_dir, source_dir=release[0], max_length=MAX_LENGTH, progress=False)
    return data_dir, manifest


# --- byte tokens ------------------------------------------------------------------------

def test_encode_bytes_is_byte_plus_one_padded_with_zero():
    tokens, lengths = bytes_tokens.encode_bytes(["a\u00e9", b"\x00\xff\x10z", ""], max_length=3)
    assert tokens.dtype == np.uint16 and lengths.dtype == np.int32
    np.testing.assert_array_equal(tokens, [[98, 0xC3 + 1, 0xA9 + 1], [1, 256, 17], [0, 0, 0]])
    np.testing.assert_array_equal(lengths, [3, 3, 0])
    assert bytes_tokens.VOCAB_SIZE == 257 and bytes_tokens.PAD == 0
    assert bytes_tokens.decode_bytes(tokens[1]) == b"\x00\xff\x10"
    assert bytes_tokens.decode_bytes(tokens[0], 1) == b"a"
    with pytest.raises(ValueError, match="max_length"):
        bytes_tokens.encode_bytes(["a"], 0)
    with pytest.raises(TypeError, match="document 1 is a int"):
        bytes_tokens.encode_bytes(["a", 3], 4)


# --- reading and converting ------------------------------------------------------------

def test_prepared_arrays_match_an_independent_reading_of_the_files(release, prepared):
    folder, rows = release
    data_dir, manifest = prepared
    for split, name in RELEASE_NAMES.items():
        reference = _csv_reference(folder / "lra_release" / "tsv_data" / name)
        assert reference == rows[split]  # the csv reader agrees with what was written
        arrays = retrieval.load(split, data_dir)
        assert set(arrays) == {"inputs", "lengths", "inputs2", "lengths2", "targets"}
        assert all(isinstance(array, np.memmap) for array in arrays.values())
        assert arrays["inputs"].dtype == np.uint16 and arrays["inputs"].shape == (COUNTS[split], MAX_LENGTH)
        np.testing.assert_array_equal(arrays["targets"], [label for label, _, _ in reference])
        for key, lengths_key, column in (("inputs", "lengths", 1), ("inputs2", "lengths2", 2)):
            texts = [row[column] for row in reference]
            np.testing.assert_array_equal(arrays[key], [_expected_tokens(t, MAX_LENGTH) for t in texts])
            np.testing.assert_array_equal(arrays[lengths_key], [min(len(t), MAX_LENGTH) for t in texts])
        summary = manifest["summary"][split]
        assert summary["pairs"] == manifest["counts"][split] == COUNTS[split]
        assert summary["positives"] == sum(label for label, _, _ in reference)
        assert summary["truncated"]["inputs"] == sum(len(r[1]) > MAX_LENGTH for r in reference)
    # The fixture exercises truncation, empty-ish short documents and both label spellings.
    assert manifest["summary"]["train"]["truncated"]["inputs2"] > 0


def test_manifest_records_sha256_of_sources_and_outputs(release, prepared):
    folder, _ = release
    data_dir, manifest = prepared
    assert manifest == json.loads((data_dir / "manifest.json").read_text())
    assert manifest["settings"] == {"max_length": MAX_LENGTH, "num_train": None, "num_val": None,
                                    "num_test": None, "seed": 0}
    for name in RELEASE_NAMES.values():
        source = (folder / "lra_release" / "tsv_data" / name).read_bytes()
        assert manifest["sources"][name]["sha256"] == hashlib.sha256(source).hexdigest()
    assert len(manifest["files"]) == 15
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((data_dir / name).read_bytes()).hexdigest(), name


def test_preparing_again_keeps_the_files_and_other_settings_are_refused(release, prepared):
    data_dir, manifest = prepared
    stamps = {path.name: path.stat().st_mtime_ns for path in data_dir.glob("*.npy")}
    assert retrieval.prepare(data_dir, source_dir=release[0], max_length=MAX_LENGTH) == manifest
    assert {path.name: path.stat().st_mtime_ns for path in data_dir.glob("*.npy")} == stamps
    with pytest.raises(ValueError, match="max_length=48 there, 64 requested"):
        retrieval.prepare(data_dir, source_dir=release[0], max_length=64)
    assert retrieval.is_prepared(data_dir)


def test_modified_output_is_detected(prepared, tmp_path):
    data_dir, _ = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in data_dir.glob("*"):
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    targets = np.load(copy / "val.targets.npy")
    np.save(copy / "val.targets.npy", 1 - targets)
    with pytest.raises(ValueError, match="val.targets.npy differs"):
        retrieval.load("val", copy)
    (copy / "test.inputs2.npy").unlink()
    assert not retrieval.is_prepared(copy)
    with pytest.raises(FileNotFoundError, match="prepare retrieval"):
        retrieval.load("test", copy)


def _row_indices(arrays, rows) -> list[int]:
    """Which source rows the loaded pairs are (every text ends with its unique row number)."""
    texts = [bytes_tokens.decode_bytes(tokens, length)
             for tokens, length in zip(arrays["inputs"], arrays["lengths"])]
    return [[text1 for _, text1, _ in rows].index(text) for text in texts]


def test_files_directly_in_data_dir_subsets_and_a_header_row(tmp_path):
    rows = _write_release(tmp_path / "a", {"train": 30, "val": 6, "test": 5}, seed=1)
    train_file = tmp_path / "a" / RELEASE_NAMES["train"]
    train_file.write_bytes(b"label\tid1\tid2\ttext1\ttext2\n" + train_file.read_bytes())
    manifest = retrieval.prepare(tmp_path / "a", num_train=7, num_test=5, seed=3, max_length=200,
                                 progress=False)
    assert manifest["counts"] == {"train": 7, "val": 6, "test": 5}
    arrays = retrieval.load("train", tmp_path / "a")
    chosen = _row_indices(arrays, rows["train"])
    assert chosen == sorted(set(chosen)) and len(chosen) == 7  # distinct rows, in file order
    np.testing.assert_array_equal(arrays["targets"], [rows["train"][i][0] for i in chosen])
    for seed, same in ((3, True), (4, False)):
        again = retrieval.prepare(tmp_path / f"seed{seed}", source_dir=tmp_path / "a", num_train=7,
                                  seed=seed, max_length=200, progress=False)
        assert again["counts"]["train"] == 7
        other = _row_indices(retrieval.load("train", tmp_path / f"seed{seed}"), rows["train"])
        assert (other == chosen) == same
    with pytest.raises(ValueError, match="40 pairs asked for"):
        retrieval.prepare(tmp_path / "other", source_dir=tmp_path / "a", num_train=40, progress=False)


@pytest.mark.parametrize("line, message", [
    (b"2.0\ta\tb\tx\ty\n", r"line 2: the label '2.0' is not 0 or 1"),
    (b"yes\ta\tb\tx\ty\n", r"line 2: the label 'yes'"),
    (b"1\ta\tb\tx\n", r"line 2: expected 5 tab-separated columns .* got 4"),
    (b"1\ta\tb\tx\ty\tz\n", r"line 2: expected 5 .* got 6"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(b"1.0\tA\tB\tfirst\tsecond\n" + line)
    with pytest.raises(ValueError, match=f"pairs.tsv, {message}"):
        list(retrieval.read_pairs(path))


def test_missing_files_say_what_to_download_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        retrieval.prepare(tmp_path / "empty")
    message = str(error.value)
    assert retrieval.RELEASE_URL in message
    for name in RELEASE_NAMES.values():
        assert f"lra_release/tsv_data/{name}" in message
    with pytest.raises(FileNotFoundError, match="lra_release.gz"):
        retrieval.load("train", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"--data_dir \S*out --source_dir \S*nowhere"):
        retrieval.prepare(tmp_path / "out", source_dir=tmp_path / "nowhere")
    partial = tmp_path / "partial"
    _write_release(partial, {"train": 2, "val": 2, "test": 2})
    (partial / RELEASE_NAMES["val"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"^Retrieval: new_aan_pairs.eval.tsv not found"):
        retrieval.prepare(partial)


def test_command_line_prepares_and_explains_missing_files_without_a_traceback(release, tmp_path):
    command = [sys.executable, "-m", "lra.data", "prepare", "retrieval", "--data_dir", str(tmp_path / "out")]
    missing = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and retrieval.RELEASE_URL in missing.stderr
    done = subprocess.run([*command, "--source_dir", str(release[0]), "--num_train", "5", "--max_length", "16"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "'train': 5, 'val': 20, 'test': 18" in done.stdout
    assert retrieval.load("val", tmp_path / "out")["inputs"].shape == (20, 16)


def test_a_run_prepares_retrieval_itself_when_the_tsvs_are_at_hand(release, prepared, tmp_path):
    """Missing prepared data, the TSVs in prepare.source_dir: a launch converts them."""
    settings = {"source_dir": str(release[0]), "max_length": MAX_LENGTH}
    data.ensure_prepared(retrieval.TASK, str(tmp_path / "out"), settings)
    made = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert made["files"] == prepared[1]["files"]
    nowhere = {**settings, "source_dir": str(tmp_path / "nowhere")}
    with pytest.raises(FileNotFoundError, match="python -m lra.data prepare retrieval"):
        data.ensure_prepared(retrieval.TASK, str(tmp_path / "other"), nowhere)
    assert not (tmp_path / "other").exists()


def test_registry_entry():
    task = tasks.get("retrieval")
    assert task is retrieval.TASK
    assert (task.name, task.num_classes, task.vocab_size, task.paired, task.generated) == (
        "retrieval", 2, 257, True, False)
    assert task.splits == ("train", "val", "test")


# --- the dual encoder -------------------------------------------------------------------

def _tiny_model(pooling="cls", seed=0, norm="layer"):
    config = retrieval_config.get_config("runlocal")
    model_config = config.model
    model_config.num_layers, model_config.emb_dim, model_config.qkv_dim = 1, 16, 16
    model_config.num_heads, model_config.mlp_dim, model_config.pooling = 2, 24, pooling
    model_config.norm = norm
    return models.build_model(model_config, attention="softmax", vocab_size=257, num_classes=2,
                              max_len=12, rngs=nnx.Rngs(params=seed, dropout=seed + 1), paired=True)


def _documents(seed=0, batch=3, length=12):
    rng = np.random.default_rng(seed)
    tokens, tokens2 = (rng.integers(1, 257, (batch, length)).astype(np.int32) for _ in range(2))
    mask = np.arange(length)[None, :] < np.array([[12], [5], [1]])
    mask2 = np.arange(length)[None, :] < np.array([[7], [12], [3]])
    return tokens, mask, tokens2, mask2


def _manual_head(model, features):
    """LRA's classifier_head_dual (common_layers.py) in NumPy from the parameters:
    Dense(mlp) -> relu -> Dense(mlp // 2) -> relu -> Dense(classes)."""
    def dense(layer, x):
        return x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

    h = np.maximum(dense(model.head.hidden, np.asarray(features)), 0)
    h2 = np.maximum(dense(model.head.hidden2, h), 0)
    return dense(model.head.logits, h2)


@nnx.jit
def _pair_logits(model, tokens, mask, tokens2, mask2):
    return model(tokens, mask, tokens2, mask2)


@nnx.jit
def _encode(encoder, tokens, mask):
    return encoder(tokens, mask)


@nnx.jit
def _embedding_gradient(model, tokens, mask, tokens2, mask2):
    grads = nnx.grad(lambda m: m(tokens, mask, tokens2, mask2).sum())(model)
    return grads.encoder.embed.embedding[...]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_head_sees_u_v_product_and_difference(pooling):
    model = _tiny_model(pooling)
    tokens, mask, tokens2, mask2 = _documents()
    u = np.asarray(_encode(model.encoder, tokens, mask))
    v = np.asarray(_encode(model.encoder, tokens2, mask2))
    assert model.head.hidden.kernel.shape == (4 * 16, 24)
    assert model.head.hidden2.kernel.shape == (24, 12) and model.head.logits.kernel.shape == (12, 2)
    expected = _manual_head(model, np.concatenate([u, v, u * v, u - v], axis=-1))
    logits = _pair_logits(model, tokens, mask, tokens2, mask2)
    assert logits.shape == (3, 2) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    # The order matters: u-v is not symmetric, so swapping the documents changes the logits.
    swapped = _pair_logits(model, tokens2, mask2, tokens, mask)
    np.testing.assert_allclose(swapped, _manual_head(model, np.concatenate([v, u, v * u, v - u], -1)),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(swapped, logits)


def test_both_documents_go_through_one_tower():
    model = _tiny_model()
    tokens, mask, _, _ = _documents()
    u = np.asarray(_encode(model.encoder, tokens, mask))
    same = _pair_logits(model, tokens, mask, tokens, mask)  # identical documents: u == v, u - v == 0
    expected = _manual_head(model, np.concatenate([u, u, u * u, np.zeros_like(u)], -1))
    np.testing.assert_allclose(same, expected, rtol=1e-5, atol=1e-6)
    # Parameters: one encoder and the head, nothing else (no second tower).
    assert _num_params(model) == _num_params(model.encoder) + _num_params(model.head)
    # One embedding table serves both documents: the gradient of the logits reaches exactly
    # the rows of the tokens at real positions of document 1 and of document 2.
    _, _, tokens2, mask2 = _documents(seed=1)
    gradient = np.asarray(_embedding_gradient(model, tokens, mask, tokens2, mask2))
    touched = set(np.flatnonzero(np.abs(gradient).sum(1) > 0))
    real1, real2 = set(tokens[mask]), set(tokens2[mask2])
    assert touched == real1 | real2 and real2 - real1


def _num_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _two_tower_calls(model, tokens, mask, tokens2, mask2, *, deterministic=True):
    """The pair as LRA's released code encodes it: the tower called once per document."""
    u = model.encoder(tokens, mask, deterministic=deterministic)
    v = model.encoder(tokens2, mask2, deterministic=deterministic)
    return model.head(u, v)


@nnx.jit
def _logits_and_gradients(model, tokens, mask, tokens2, mask2):
    """(one-pass logits, their gradient, two-call logits, their gradient)."""
    one_pass = lambda m: m(tokens, mask, tokens2, mask2)
    two_calls = lambda m: _two_tower_calls(m, tokens, mask, tokens2, mask2)
    gradient = lambda f: nnx.grad(lambda m: (f(m) * jnp.arange(1.0, 3.0)).sum())(model)
    return one_pass(model), gradient(one_pass), two_calls(model), gradient(two_calls)


def test_one_pass_over_both_documents_equals_two_tower_calls():
    """Both documents go through the tower as one batch of 2B rows: with LayerNorm the
    logits and every parameter's gradient equal those of two calls of B rows."""
    model = _tiny_model(pooling="mean")
    one_pass, one_pass_grads, two_calls, two_call_grads = _logits_and_gradients(
        model, *_documents())
    np.testing.assert_allclose(one_pass, two_calls, rtol=1e-5, atol=1e-6)
    expected = dict(jax.tree.leaves_with_path(two_call_grads))
    for path, value in jax.tree.leaves_with_path(one_pass_grads):
        np.testing.assert_allclose(value, expected[path], rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_batch_norm_statistics_span_both_documents_of_the_batch():
    """With model.norm=batch the one pass normalises with statistics over all 2B documents
    (as S5's released retrieval model), which two calls of B rows would not."""
    tokens, mask, tokens2, mask2 = _documents()
    logits = _tiny_model(norm="batch")(tokens, mask, tokens2, mask2, deterministic=False)
    model = _tiny_model(norm="batch")
    pooled = model.encoder(np.concatenate([tokens, tokens2]), np.concatenate([mask, mask2]),
                           deterministic=False)
    np.testing.assert_allclose(logits, model.head(pooled[:3], pooled[3:]), rtol=1e-5, atol=1e-6)
    separate = _two_tower_calls(_tiny_model(norm="batch"), tokens, mask, tokens2, mask2,
                                deterministic=False)
    assert not np.allclose(logits, separate, rtol=1e-3)


def test_padding_of_either_document_does_not_change_the_logits():
    model = _tiny_model()
    tokens, mask, tokens2, mask2 = _documents()
    logits = _pair_logits(model, tokens, mask, tokens2, mask2)
    noise = np.random.default_rng(5).integers(0, 257, tokens.shape).astype(np.int32)
    padded1 = np.where(mask, tokens, noise)
    padded2 = np.where(mask2, tokens2, noise[::-1])
    np.testing.assert_allclose(_pair_logits(model, padded1, mask, tokens2, mask2), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_pair_logits(model, tokens, mask, padded2, mask2), logits, rtol=1e-5, atol=1e-6)
    # A real token of either document does change them (the check can fail).
    changed1, changed2 = tokens.copy(), tokens2.copy()
    changed1[0, 0] = tokens[0, 0] % 256 + 1
    changed2[1, 0] = tokens2[1, 0] % 256 + 1
    assert not np.allclose(_pair_logits(model, changed1, mask, tokens2, mask2)[0], logits[0])
    assert not np.allclose(_pair_logits(model, tokens, mask, changed2, mask2)[1], logits[1])


# --- config and a run -------------------------------------------------------------------

def test_lra_preset_is_the_released_matching_config_with_a_warmup_inside_training():
    config = retrieval_config.get_config("preset=lra")
    model = config.model
    assert (model.num_layers, model.emb_dim, model.qkv_dim, model.num_heads, model.mlp_dim) == (
        4, 128, 128, 4, 512)
    assert (config.max_length, config.batch_size, config.num_train_steps) == (4000, 32, 5000)
    assert config.warmup_steps < config.num_train_steps and config.schedule == "rsqrt"
    assert config.learning_rate == pytest.approx(0.05 / np.sqrt(8000))
    assert model.pooling == "cls" and config.weight_decay == 0.1
    train.validate_config(config, num_devices=4)
    abstract = nnx.eval_shape(lambda: train._build(config, tasks.get("retrieval"))[0])
    assert isinstance(abstract, models.DualEncoderClassifier)
    assert abstract.head.hidden.kernel.shape == (4 * 128, 512)
    assert abstract.head.hidden2.kernel.shape == (512, 256)  # classifier_head_dual's mlp2
    assert abstract.head.logits.kernel.shape == (256, 2)
    assert abstract.encoder.embed.embedding.shape == (257, 128)


def test_runlocal_is_small_and_valid():
    config = retrieval_config.get_config("runlocal,seed=2,attention=linear")
    assert config.seed == 2 and config.max_length <= 512 and config.num_train_steps <= 1000
    assert config.data_dir.endswith("retrieval-runlocal")
    train.validate_config(config, num_devices=jax.device_count())


TINY = {"max_length": 32, "batch_size": 8, "eval_batch_size": 8, "num_train_steps": 6,
        "warmup_steps": 2, "log_every": 2, "eval_every": 3, "checkpoint_every": 3,
        "model.num_layers": 1, "model.emb_dim": 16, "model.qkv_dim": 16, "model.num_heads": 2,
        "model.mlp_dim": 16}


def test_runlocal_trains_end_to_end_on_the_fixture(prepared, tmp_path):
    data_dir, _ = prepared
    config = retrieval_config.get_config("runlocal")
    for key, value in TINY.items():
        set_path(config, key, value)
    config.data_dir = str(data_dir)
    arrays = tasks.get("retrieval").load("train", str(data_dir))
    batch = data.gather(arrays, np.arange(4), max_length=32)
    assert {"inputs", "mask", "inputs2", "mask2", "targets"} <= set(batch)
    results = train.train_and_evaluate(config, tmp_path)
    assert results["task"] == "retrieval" and results["step"] == 6
    for split in ("val", "test"):  # counts of whole examples over the whole split
        size = len(tasks.get("retrieval").load(split, str(data_dir))["targets"])
        accuracy = results[f"{split}_accuracy"]
        assert 0 <= accuracy <= 1 and round(accuracy * size, 6).is_integer(), (split, size)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
