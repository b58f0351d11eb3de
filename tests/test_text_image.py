"""Text (IMDB bytes) and Image (CIFAR-10 pixels) through `tfds.testing.mock_data`: tokens,
splits, manifests, error messages, configs, and a runlocal run of each task end to end."""

import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from configs import image as image_config
from configs import text as text_config
from lra import tasks
from lra.training import data, train
from lra.tasks import image, text, tfds_source

ROOT = Path(__file__).resolve().parents[1]

# Reviews chosen to exercise the byte mapping: multi-byte UTF-8, a NUL byte, a newline, reviews
# longer than the stored length (16 bytes in these tests) and an empty review.
TRAIN_REVIEWS = [("great film, loved it", 1), ("Ça déçoit. 日本", 0), ("a\x00b", 1), ("x" * 40, 0),
                 ("", 1), ("terrible " * 5, 0), ("ok", 1), ("meh?!", 0), ("10/10 would watch again", 1),
                 ("two\nlines", 0)]
TEST_REVIEWS = [("test one", 1), ("ünïcödé" * 3, 0), ("short", 1)]


def _reviews_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    rows = TRAIN_REVIEWS if str(split).startswith("train") else TEST_REVIEWS
    return tf.data.Dataset.from_tensor_slices({
        "text": [review.encode() for review, _ in rows],
        "label": np.array([label for _, label in rows], np.int64)})


def _images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Known CIFAR-like images: random colours plus all-black and all-white images."""
    count = 12 if split == "train" else 5
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    images[1] = 0  # black: every token is pixel value 0, all of them real
    images[2] = 255
    return images, np.arange(count, dtype=np.int64) % 10


def _images_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    images, labels = _images("train" if str(split).startswith("train") else "test")
    ids = [f"{split}_{index}".encode() for index in range(len(images))]
    return tf.data.Dataset.from_tensor_slices({"id": ids, "image": images, "label": labels})


def _byte_tokens(review: str, max_length: int) -> list[int]:
    """Independent reference: UTF-8 bytes + 1, cut, padded with 0."""
    tokens = [byte + 1 for byte in review.encode("utf-8")][:max_length]
    return tokens + [0] * (max_length - len(tokens))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("text")
    with tfds.testing.mock_data(as_dataset_fn=_reviews_as_dataset):
        text.prepare(path, max_length=16, num_val=3, seed=5)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("image")
    with tfds.testing.mock_data(as_dataset_fn=_images_as_dataset):
        image.prepare(path, num_val=4)
    return path


# --- registry ---------------------------------------------------------------------------------

def test_registry_entries():
    assert tasks.get("text") is text.TASK and tasks.get("image") is image.TASK
    assert (text.TASK.num_classes, text.TASK.vocab_size, text.TASK.generated) == (2, 257, False)
    assert (image.TASK.num_classes, image.TASK.vocab_size, image.TASK.generated) == (10, 256, False)
    assert text.TASK.splits == image.TASK.splits == ("train", "val", "test")
    assert not text.TASK.paired and not image.TASK.paired


# --- text ---------------------------------------------------------------------------------------

def test_text_tokens_lengths_and_targets(text_dir):
    manifest = json.loads((text_dir / "manifest.json").read_text())
    rows = {"train": [], "val": []}
    val_positions = set(np.load(text_dir / "val.index.npy").tolist())
    assert len(val_positions) == 3
    for position, row in enumerate(TRAIN_REVIEWS):
        rows["val" if position in val_positions else "train"].append(row)
    rows["test"] = TEST_REVIEWS
    for split, expected in rows.items():
        arrays = text.load(split, text_dir)
        assert isinstance(arrays["inputs"], np.memmap) and arrays["inputs"].dtype == np.uint16
        assert arrays["inputs"].tolist() == [_byte_tokens(review, 16) for review, _ in expected]
        full = [len(review.encode()) for review, _ in expected]
        assert arrays["byte_lengths"].tolist() == full
        assert arrays["lengths"].tolist() == [min(length, 16) for length in full]
        assert arrays["targets"].tolist() == [label for _, label in expected]
        assert manifest["counts"][split] == len(expected)
    assert manifest["summary"]["reviews_cut"] == {
        split: sum(len(review.encode()) > 16 for review, _ in expected) for split, expected in rows.items()}


def test_text_validation_is_a_recorded_seeded_tenth(text_dir):
    manifest = json.loads((text_dir / "manifest.json").read_text())
    val_index = np.load(text_dir / "val.index.npy")
    train_index = np.load(text_dir / "train.index.npy")
    assert sorted(np.concatenate([train_index, val_index]).tolist()) == list(range(len(TRAIN_REVIEWS)))
    expected = hashlib.sha256(np.sort(val_index).astype("<i8").tobytes()).hexdigest()
    assert manifest["val_indices_sha256"] == expected
    assert manifest["settings"] == {"max_length": 16, "seed": 5, "validation": "heldout", "num_train": 0,
                                    "num_val": 3, "num_test": 0}
    assert manifest["source"]["tfds_name"] == "imdb_reviews"


def test_a_run_asking_for_another_validation_protocol_stops_with_the_command(text_dir):
    """preset=lra asks for validation on test; a held-out folder is refused, naming both."""
    task = tasks.get("text")
    data.ensure_prepared(task, str(text_dir), {"validation": "heldout"})  # the same: accepted
    with pytest.raises(ValueError, match=r"validation='test' but .* prepared with "
                       r"validation=.heldout.(.|\n)*--validation test"):
        data.ensure_prepared(task, str(text_dir), {"validation": "test", "max_length": 16})


def test_text_lra_preset_trains_on_all_reviews_and_validates_on_test():
    config = text_config.get_config("preset=lra")
    assert config.prepare.validation == "test" and config.data_dir.endswith("text-valtest")
    assert text_config.get_config("runlocal").prepare.validation == "heldout"


def test_heldout_choice_depends_only_on_seed():
    chosen = tfds_source.heldout_indices(1000, 100, seed=0)
    assert len(set(chosen.tolist())) == 100 and np.all(np.diff(chosen) > 0)
    assert np.array_equal(chosen, tfds_source.heldout_indices(1000, 100, seed=0))
    assert not np.array_equal(chosen, tfds_source.heldout_indices(1000, 100, seed=1))
    assert chosen.min() < 500 < chosen.max()  # spread over the split, not a block
    assert tfds_source.heldout_indices(10, 3, seed=None).tolist() == [7, 8, 9]
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="num_val"):
            tfds_source.heldout_indices(1000, bad, seed=0)


def test_loading_says_how_many_reviews_were_cut(text_dir, caplog):
    with caplog.at_level(logging.WARNING):
        text.load("train", text_dir)
    cut = json.loads((text_dir / "manifest.json").read_text())["summary"]["reviews_cut"]["train"]
    assert cut > 0 and f"{cut} of " in caplog.text and "max_length=16" in caplog.text


def test_validation_on_test_is_the_lra_protocol(tmp_path):
    with tfds.testing.mock_data(as_dataset_fn=_reviews_as_dataset):
        manifest = text.prepare(tmp_path, max_length=16, validation="test")
    assert manifest["settings"]["num_val"] == 0
    assert manifest["counts"] == {"train": len(TRAIN_REVIEWS), "val": len(TEST_REVIEWS),
                                  "test": len(TEST_REVIEWS)}
    assert not list(tmp_path.glob("val.*.npy"))  # nothing copied
    val, test = text.load("val", tmp_path), text.load("test", tmp_path)
    for name in text.ARRAYS:
        np.testing.assert_array_equal(val[name], test[name])
    assert text.load("train", tmp_path)["targets"].tolist() == [label for _, label in TRAIN_REVIEWS]
    with pytest.raises(ValueError, match="validation='dev' is unknown"):
        text.prepare(tmp_path / "other", validation="dev")


# --- image ---------------------------------------------------------------------------------------

def test_grayscale_matches_tensorflow_on_every_colour():
    levels = np.arange(256, dtype=np.uint8)
    colours = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(4096, 4096, 3)
    expected = tf.image.rgb_to_grayscale(colours).numpy()[..., 0]
    np.testing.assert_array_equal(image.to_grayscale(colours), expected)
    with pytest.raises(ValueError, match="uint8 RGB"):
        image.to_grayscale(colours.astype(np.float32))


def test_image_pixels_splits_and_masks(image_dir):
    train_images, train_labels = _images("train")
    test_images, test_labels = _images("test")

    def reference(images):  # LRA's own conversion, then row-major flattening
        return tf.image.rgb_to_grayscale(images).numpy().reshape(len(images), 1024)

    expected = {"train": (reference(train_images[:8]), train_labels[:8]),
                "val": (reference(train_images[8:]), train_labels[8:]),  # the last num_val=4
                "test": (reference(test_images), test_labels)}
    for split, (pixels, labels) in expected.items():
        arrays = image.load(split, image_dir)
        assert arrays["inputs"].dtype == np.uint8 and arrays["inputs"].shape == (len(labels), 1024)
        np.testing.assert_array_equal(arrays["inputs"], pixels)
        assert arrays["targets"].tolist() == labels.tolist()
        assert arrays["lengths"].tolist() == [1024] * len(labels)
    train_arrays = image.load("train", image_dir)
    assert np.all(train_arrays["inputs"][1] == 0) and np.all(train_arrays["inputs"][2] == 255)
    batch = data.gather(train_arrays, np.arange(3), 1024)
    assert batch["mask"].all()  # black pixels are real tokens: the mask comes from lengths
    manifest = json.loads((image_dir / "manifest.json").read_text())
    assert manifest["val_indices_sha256"] == hashlib.sha256(np.arange(8, 12, dtype="<i8").tobytes()).hexdigest()
    assert manifest["counts"] == {"train": 8, "val": 4, "test": 5}


def test_image_through_default_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=20):
        manifest = image.prepare(tmp_path, num_val=5)
        reference = tfds.as_numpy(tfds.builder("cifar10").as_dataset(
            split="train", as_supervised=True, shuffle_files=False).batch(20))
        images, labels = next(iter(reference))
    assert manifest["counts"] == {"train": 15, "val": 5, "test": 20}
    val = image.load("val", tmp_path)
    np.testing.assert_array_equal(val["inputs"], image.to_grayscale(images[15:]).reshape(5, 1024))
    assert val["targets"].tolist() == labels[15:].tolist()


def test_subsets_keep_the_first_rows(tmp_path, image_dir):
    with tfds.testing.mock_data(as_dataset_fn=_images_as_dataset):
        manifest = image.prepare(tmp_path, num_train=5, num_val=4, num_test=2)
        with pytest.raises(ValueError, match="num_test=6 asks for more than the 5 test examples"):
            image.prepare(tmp_path / "too-many", num_val=4, num_test=6)
    assert manifest["counts"] == {"train": 5, "val": 4, "test": 2}
    full = {split: image.load(split, image_dir) for split in ("train", "val", "test")}
    for split, count in manifest["counts"].items():  # validation is the same held-out rows
        np.testing.assert_array_equal(image.load(split, tmp_path)["inputs"], full[split]["inputs"][:count])
    with pytest.raises(ValueError, match="counts must be >= 0"):
        image.prepare(tmp_path / "negative", num_train=-1)


# --- preparing again, tampering, missing data ------------------------------------------------------

def test_prepare_again_with_same_settings_does_nothing(text_dir):
    stamps = {path: path.stat().st_mtime_ns for path in text_dir.glob("*.npy")}
    manifest = text.prepare(text_dir, max_length=16, num_val=3, seed=5)  # no tfds read: no mock
    assert manifest == json.loads((text_dir / "manifest.json").read_text())
    assert stamps == {path: path.stat().st_mtime_ns for path in stamps}
    assert text.is_prepared(text_dir) and not image.is_prepared(text_dir)


def test_prepare_with_other_settings_or_task_raises(text_dir):
    with pytest.raises(ValueError, match=r"seed=5 there, 6 requested.*another data_dir"):
        text.prepare(text_dir, max_length=16, num_val=3, seed=6)
    with pytest.raises(ValueError, match="holds data of the task 'text', not 'image'"):
        image.prepare(text_dir)


def test_tampered_file_is_rejected(tmp_path):
    with tfds.testing.mock_data(as_dataset_fn=_images_as_dataset):
        image.prepare(tmp_path, num_val=4)
    path = tmp_path / "test.targets.npy"
    image.load("test", tmp_path)  # memoises the hash
    targets = np.load(path)
    stamp = path.stat()
    np.save(path, (targets + 1) % 10)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="test.targets.npy differs"):
        image.load("test", tmp_path)


@pytest.mark.parametrize("task", [text.TASK, image.TASK])
def test_unprepared_folder_names_the_prepare_command(task, tmp_path):
    command = f"python -m lra.data prepare {task.name} --data_dir {tmp_path}"
    with pytest.raises(FileNotFoundError, match="Prepare it with") as error:
        task.load("train", tmp_path)
    assert command in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        data.ensure_prepared(task, str(tmp_path), {})
    assert command in str(error.value)
    with pytest.raises(ValueError, match="unknown split"):
        task.load("dev", tmp_path)


def _tfds_folder_holding(tfds_name: str, folder: Path) -> Path:
    """A tfds data folder where tfds finds `tfds_name` built (its dataset_info.json and
    features.json; the records themselves come from `tfds.testing.mock_data`)."""
    builder = tfds.builder(tfds_name, data_dir=str(folder))
    Path(builder.data_path).mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    return folder


def test_a_run_prepares_text_itself_when_tfds_holds_the_dataset(tmp_path, text_dir, monkeypatch):
    """Missing prepared data with imdb_reviews in the tfds folder: prepared, no command."""
    settings = {"max_length": 16, "num_val": 3, "seed": 5,
                "tfds_data_dir": str(_tfds_folder_holding(text.TFDS_NAME, tmp_path / "tfds"))}
    assert text.source_at_hand(tmp_path / "out", **settings)
    # mock_data points builders at tfds's own metadata folder: keep the answer found above.
    monkeypatch.setattr(text.Text, "source_at_hand", staticmethod(lambda *args, **kwargs: True))
    with tfds.testing.mock_data(as_dataset_fn=_reviews_as_dataset):
        data.ensure_prepared(text.TASK, str(tmp_path / "out"), settings)
    made = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert made["files"] == json.loads((text_dir / "manifest.json").read_text())["files"]


def test_without_the_tfds_dataset_a_run_still_names_the_prepare_command(tmp_path):
    settings = {"tfds_data_dir": str(tmp_path / "empty-tfds")}
    assert not text.source_at_hand(tmp_path / "out", **settings)
    with pytest.raises(FileNotFoundError, match="python -m lra.data prepare text"):
        data.ensure_prepared(text.TASK, str(tmp_path / "out"), settings)
    assert not (tmp_path / "out").exists()


def test_missing_tfds_is_one_message_with_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if absent
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lra\[tfds\]'"):
        image.prepare(tmp_path)
    assert data.command_main(["prepare", "text", "--data_dir", str(tmp_path)]) == 2
    assert "pip install 'lra[tfds]'" in capsys.readouterr().err


def test_failed_download_says_what_to_fetch_and_where(tmp_path, monkeypatch, capsys):
    def offline(self, *args, **kwargs):
        raise OSError("Failed to resolve 'ai.stanford.edu' ([Errno -2] Name or service not known)")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    argv = ["prepare", "text", "--data_dir", str(tmp_path / "out"), "--tfds_data_dir", str(tmp_path / "tfds")]
    assert data.command_main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: could not download") and "Traceback" not in message
    assert f"{tmp_path / 'tfds' / 'downloads' / 'manual'}/" in message and "Failed to resolve" in message
    assert "aclImdb_v1.tar.gz" in message  # the archive's name (from tfds's checksums)
    assert not text.is_prepared(tmp_path / "out")


def test_wrong_archive_in_the_manual_folder_is_reported(tmp_path):
    pytest.importorskip("importlib_resources")  # tensorflow-datasets 4.9 needs it to build
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "cifar-10-binary.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(FileNotFoundError, match=r"NonMatchingChecksumError.*cifar-10-binary\.tar\.gz"):
        image.prepare(tmp_path / "out", tfds_data_dir=tmp_path / "tfds")


def test_command_line_passes_validation_and_tfds_data_dir(tmp_path, capsys):
    argv = ["prepare", "text", "--data_dir", str(tmp_path), "--validation", "test", "--max_length", "8",
            "--tfds_data_dir", str(tmp_path / "ignored-by-the-mock")]
    with tfds.testing.mock_data(as_dataset_fn=_reviews_as_dataset):
        assert data.command_main(argv) == 0
    assert "text data ready" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"] == {"max_length": 8, "seed": 0, "validation": "test", "num_train": 0,
                                    "num_val": 0, "num_test": 0}


# --- configs --------------------------------------------------------------------------------------

def test_lra_presets():
    config = text_config.get_config("preset=lra")
    model = config.model
    assert (model.num_layers, model.emb_dim, model.num_heads, model.mlp_dim) == (4, 256, 4, 1024)
    assert (config.max_length, config.batch_size, config.num_train_steps) == (4000, 32, 20_000)
    assert (config.schedule, config.warmup_steps, config.weight_decay) == ("rsqrt", 8000, 0.1)
    assert config.learning_rate == pytest.approx(0.05 / np.sqrt(8000))
    config = image_config.get_config("preset=lra")
    model = config.model
    assert (model.num_layers, model.emb_dim, model.num_heads, model.qkv_dim, model.mlp_dim) == (1, 128, 8, 64, 128)
    assert (config.max_length, config.batch_size, config.num_train_steps) == (1024, 256, 35_000)
    assert (config.schedule, config.warmup_steps, config.learning_rate) == ("cosine", 175, 5e-4)
    assert model.dropout == 0.3
    for module in (text_config, image_config):
        for arg in ("preset=lra", "runlocal"):
            train.validate_config(module.get_config(arg), num_devices=4)
    # the full data: Text keeps only LRA's protocol flag (validate on test), Image none
    assert dict(text_config.get_config("preset=lra").prepare) == {"validation": "test"}
    assert not image_config.get_config("preset=lra").prepare
    for module in (text_config, image_config):
        runlocal = module.get_config("runlocal")
        assert runlocal.num_train_steps <= 1000 and runlocal.data_dir.endswith("-runlocal")
        prepare_keywords = inspect.signature(tasks.get(runlocal.task).prepare).parameters
        assert set(runlocal.prepare) <= set(prepare_keywords)  # the message's flags exist


# --- end to end: launch.py with runlocal on mock-prepared data, TensorFlow blocked ----------------

TINY = {"batch_size": 8, "eval_batch_size": 8, "num_train_steps": 6, "warmup_steps": 2, "log_every": 2,
        "eval_every": 3, "checkpoint_every": 3, "model.num_layers": 1, "model.emb_dim": 16,
        "model.qkv_dim": 16, "model.num_heads": 2, "model.mlp_dim": 16}
# Runs launch.py with TensorFlow and tfds made unimportable: training must never need them.
NO_TF_LAUNCH = ("import runpy, sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None; "
                "sys.argv = ['launch.py'] + sys.argv[1:]; runpy.run_path('launch.py', run_name='__main__')")


@pytest.fixture(scope="module")
def mock_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mock")
    with tfds.testing.mock_data(num_examples=40):
        text.prepare(root / "text", num_val=8)
        image.prepare(root / "image", num_val=8)
    return root


@pytest.mark.parametrize("task, max_length", [("text", 64), ("image", 1024)])
def test_runlocal_end_to_end_without_tensorflow(task, max_length, mock_prepared, tmp_path):
    overrides = {**TINY, "max_length": max_length, "data_dir": mock_prepared / task}
    command = [sys.executable, "-c", NO_TF_LAUNCH, "--config", f"configs/{task}.py:runlocal",
               "--workdir", str(tmp_path), *[f"--config.{key}={value}" for key, value in overrides.items()]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == task and results["step"] == 6
    assert 0 <= results["test_accuracy"] <= 1 and results["best_step"] in (3, 6)
    size = len(tasks.get(task).load("test", str(mock_prepared / task))["targets"])
    assert round(results["test_accuracy"] * size, 6).is_integer(), size  # whole test split
    assert json.loads((tmp_path / "config.json").read_text())["data_dir"] == str(mock_prepared / task)
