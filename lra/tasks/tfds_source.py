"""Shared code of the tasks read from TensorFlow Datasets: byte-level Text and pixel Image.

Preparing (``python -m lra.data prepare text|image --data_dir DIR``) is the only step that
imports TensorFlow Datasets: it reads the tfds train and test splits once, in tfds's own
order (``shuffle_files=False``), converts them to token arrays with the task's function and
stores them with `lra.tasks.storage` as ``<split>.<array>.npy`` plus ``manifest.json``.
Training reads those files memory-mapped and never imports TensorFlow.

Validation (the ``validation`` setting of `prepare`, recorded in the manifest):

- ``"heldout"`` (default): ``num_val`` examples of the tfds train split are held out and
  the model never trains on them. Which ones is fixed by the task: a seeded choice
  (`heldout_indices` with a seed, Text) or the last ``num_val`` rows (without one, Image,
  as LRA's ``train[90%:]``). Their positions in the tfds train split are saved as
  ``val.index.npy`` and their sha256 is in the manifest (``val_indices_sha256``).
- ``"test"``: the LRA protocol. Training uses the whole tfds train split and validation
  *is* the test split (the same files; nothing is copied). Best-validation numbers are
  then chosen on test, as in the LRA paper.

``num_train`` / ``num_test`` (0 = all) keep only the first rows of train (after holding
out validation) and test: the small folders the ``runlocal`` configs read.

The protocol is a preparation setting, not a config key, because it decides which rows are in the
training split: one prepared folder is one protocol. Prepare the other protocol into another
folder and point ``--config.data_dir`` at it.

The tfds data (downloaded archives, built records) lives in tfds's data folder: its default
(``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) or ``--tfds_data_dir``. A machine without
internet access gets a message saying which archive to fetch and where to put it (the
``downloads/manual`` folder there), never a traceback; it comes after tfds's own download
retries (about 3.5 minutes when the host name does not resolve).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from lra.tasks import storage

SPLITS = ("train", "val", "test")
VALIDATIONS = ("heldout", "test")  # see the module docstring
PIP_HINT = "pip install 'lra[tfds]'"
FORMAT_VERSION = 1
_READ_BATCH = 1024  # examples converted at a time while reading a tfds split
_LOG = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
# A task's conversion of one batch of tfds features (as_supervised) into its arrays.
Convert = Callable[[np.ndarray], Arrays]


# --- tfds -----------------------------------------------------------------------------

def import_tfds():
    """Imports ``tensorflow_datasets`` (and TensorFlow, which reading needs), CPU only.

    Raises:
        ModuleNotFoundError: either is missing; the message gives the pip command.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no banner of TF's C++ logs
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ModuleNotFoundError(
            f"preparing the text and image tasks needs tensorflow-datasets and TensorFlow "
            f"({error}). Install them with: {PIP_HINT}") from None
    try:
        tf.config.set_visible_devices([], "GPU")  # reading must not take the accelerators' memory
    except RuntimeError:  # TensorFlow was initialised earlier in this process: leave it as it is
        pass
    return tfds


def dataset_at_hand(tfds_name: str, tfds_data_dir: str | os.PathLike | None) -> bool:
    """True when tfds's data folder already holds `tfds_name` built, so preparing needs no
    download (tfds's own check, `builder.is_prepared()`); False without tensorflow-datasets."""
    try:
        tfds = import_tfds()
    except ModuleNotFoundError:
        return False
    data_dir = None if tfds_data_dir is None else str(Path(tfds_data_dir).expanduser())
    return tfds.builder(tfds_name, data_dir=data_dir).is_prepared()


def _download_help(builder, tfds_name: str) -> str:
    manual_dir = Path(builder.data_dir_root) / "downloads" / "manual"
    try:
        archives = [f"{url} ({info.size}) and put it in {manual_dir}/ as {info.filename}"
                    for url, info in builder.url_infos.items()]
    except (ImportError, OSError, KeyError, AttributeError):  # the URLs are only a convenience
        archives = [f"the archives named on the dataset's tfds catalog page and put them in {manual_dir}/"]
    return (f"Either run the same command on a machine with internet access, or download "
            f"{'; '.join(archives)} (replacing any file there), or copy a folder "
            f"{tfds_name}/ built elsewhere (`tfds build {tfds_name}`) into {builder.data_dir_root}/. "
            f"Then run the command again (--tfds_data_dir picks another tfds data folder).")


def _download_and_prepare(tfds, builder, tfds_name: str) -> None:
    """tfds's download and build, with every failure turned into one clear message."""
    from tensorflow_datasets.core.download import download_manager, extractor

    failures = (OSError, tfds.download.DownloadError, download_manager.NonMatchingChecksumError,
                extractor.ExtractError)
    try:
        builder.download_and_prepare()
    except ImportError as error:  # tensorflow-datasets 4.9.x needs it but does not declare it
        raise ModuleNotFoundError(
            f"tensorflow-datasets could not build {tfds_name}: {error}. Install the missing "
            f"package (importlib_resources: pip install importlib_resources, see "
            f"tensorflow/datasets#11212) or reinstall with: {PIP_HINT}") from None
    except failures as error:
        reason = " ".join(str(error).split())[:400]
        raise FileNotFoundError(
            f"could not download or build the tfds dataset {tfds_name} into {builder.data_dir_root} "
            f"({type(error).__name__}: {reason}). {_download_help(builder, tfds_name)}") from None


def read_split(tfds_name: str, split: str, convert: Convert, *,
               tfds_data_dir: str | os.PathLike | None) -> tuple[Arrays, dict]:
    """Reads one tfds split, in tfds's order, as the task's arrays plus ``targets``.

    Downloads and builds the dataset first if the tfds data folder lacks it.

    Args:
        tfds_name: the tfds dataset, e.g. "imdb_reviews".
        split: a tfds split name, e.g. "train".
        convert: turns a batch of features (NumPy) into a dict of arrays of that batch.
        tfds_data_dir: tfds's data folder; None = tfds's default.

    Returns:
        (arrays, source): the converted arrays of all examples with ``targets`` [N] int32,
        and a description of the source (tfds name, version, data folder).

    Raises:
        ModuleNotFoundError: tensorflow-datasets or TensorFlow is not installed.
        FileNotFoundError: the data could not be downloaded; the message says what to fetch
            and where to put it.
    """
    tfds = import_tfds()
    builder = tfds.builder(tfds_name, data_dir=None if tfds_data_dir is None else str(tfds_data_dir))
    _download_and_prepare(tfds, builder, tfds_name)
    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    batches, labels = [], []
    for features, label in tfds.as_numpy(dataset.batch(_READ_BATCH)):
        batches.append(convert(features))
        labels.append(np.asarray(label, np.int32))
    if not batches:
        raise ValueError(f"the tfds split {tfds_name}/{split} in {builder.data_dir} is empty")
    arrays = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    arrays["targets"] = np.concatenate(labels)
    source = {"tfds_name": tfds_name, "tfds_version": str(builder.version),
              "tfds_data_dir": str(builder.data_dir_root)}
    return arrays, source


# --- validation split -------------------------------------------------------------------

def heldout_indices(num_examples: int, num_val: int, seed: int | None) -> np.ndarray:
    """Sorted positions of the `num_val` held-out examples among `num_examples`.

    Args:
        num_examples: size of the tfds train split.
        num_val: how many to hold out (0 < num_val < num_examples).
        seed: None = the last `num_val` positions; an int = the `num_val` positions with the
            smallest blake2b hash of ``(seed, position)``: a fixed choice that depends on
            nothing but the seed and the position (no NumPy random stream).

    Raises:
        ValueError: `num_val` leaves no training or no validation example.
    """
    if not 0 < num_val < num_examples:
        raise ValueError(f"num_val={num_val} must be between 1 and the {num_examples} training "
                         f"examples minus 1 (or prepare with --validation test)")
    if seed is None:
        return np.arange(num_examples - num_val, num_examples)
    keys = [hashlib.blake2b(f"lra.heldout/{seed}/{index}".encode(), digest_size=8).digest()
            for index in range(num_examples)]
    order = sorted(range(num_examples), key=keys.__getitem__)
    return np.sort(np.array(order[:num_val], np.int64))


def indices_sha256(indices: np.ndarray) -> str:
    """sha256 of positions written as little-endian int64 (recorded in the manifest)."""
    return hashlib.sha256(np.asarray(indices, "<i8").tobytes()).hexdigest()


# --- prepare, load ----------------------------------------------------------------------

def split_settings(validation: str, num_train: int, num_val: int, num_test: int) -> dict:
    """Checks the split settings; returns them as recorded (num_val 0 when validating on test).

    Raises:
        ValueError: an unknown protocol or a negative count.
    """
    if validation not in VALIDATIONS:
        raise ValueError(f"validation={validation!r} is unknown; known: {', '.join(VALIDATIONS)}")
    if min(num_train, num_val, num_test) < 0:
        raise ValueError(f"counts must be >= 0 (0 = all), got num_train={num_train}, num_val={num_val}, "
                         f"num_test={num_test}")
    return {"validation": validation, "num_train": num_train,
            "num_val": 0 if validation == "test" else num_val, "num_test": num_test}


def _first(arrays: Arrays, count: int, split: str) -> Arrays:
    """The first `count` rows (0 = all)."""
    available = len(arrays["targets"])
    if count > available:
        raise ValueError(f"num_{split}={count} asks for more than the {available} {split} examples there are")
    return {name: array[:count or available] for name, array in arrays.items()}


def _existing(task_name: str, data_dir: Path, settings: Mapping) -> dict | None:
    """The manifest when `data_dir` already holds this preparation; raises on a conflict."""
    manifest = storage.read_manifest(data_dir)
    if manifest is None:
        return None
    storage.check_settings(data_dir, manifest, task_name, settings, FORMAT_VERSION)
    if all((data_dir / name).is_file() for name in manifest.get("files", {})):
        return manifest
    return None  # files are missing: prepare again


def prepare_task(task_name: str, data_dir: str | os.PathLike, *, tfds_name: str, convert: Convert,
                 settings: dict, heldout_seed: int | None,
                 tfds_data_dir: str | os.PathLike | None,
                 summarize: Callable[[dict[str, Arrays]], dict] | None = None) -> dict:
    """Reads the tfds train and test splits and writes the task's three splits.

    Args:
        task_name: the task ("text", "image").
        data_dir: our output folder.
        tfds_name: the tfds dataset.
        convert: the task's conversion of a batch of tfds features (see `read_split`).
        settings: the preparation settings, recorded in the manifest; must hold
            those of `split_settings`. ``num_train`` and ``num_test`` keep the first rows
            of train (after holding out validation) and test: a small subset for quick runs.
        heldout_seed: how the held-out rows are chosen (see `heldout_indices`).
        tfds_data_dir: tfds's data folder; None = tfds's default.
        summarize: optional; {split: arrays} -> facts recorded as the manifest's ``summary``.

    Returns:
        The manifest. A folder already prepared with the same settings is left as it is.

    Raises:
        ValueError: the folder holds other settings or another task, or bad settings.
        FileNotFoundError: the tfds data could not be downloaded (the message says how to
            get it).
        ModuleNotFoundError: tensorflow-datasets is not installed.
    """
    data_dir = Path(data_dir)
    if (manifest := _existing(task_name, data_dir, settings)) is not None:
        return manifest
    train, source = read_split(tfds_name, "train", convert, tfds_data_dir=tfds_data_dir)
    test, _ = read_split(tfds_name, "test", convert, tfds_data_dir=tfds_data_dir)
    train["index"] = np.arange(len(train["targets"]), dtype=np.int64)
    test["index"] = np.arange(len(test["targets"]), dtype=np.int64)
    splits = {"train": train, "test": test}
    manifest = {"task": task_name, "format_version": FORMAT_VERSION, "settings": dict(settings),
                "source": source}
    if settings["validation"] == "heldout":
        val_index = heldout_indices(len(train["targets"]), settings["num_val"], heldout_seed)
        keep = np.ones(len(train["targets"]), bool)
        keep[val_index] = False
        splits = {"train": {name: array[keep] for name, array in train.items()},
                  "val": {name: array[val_index] for name, array in train.items()}, "test": test}
        manifest["val_indices_sha256"] = indices_sha256(val_index)
    splits["train"] = _first(splits["train"], settings["num_train"], "train")
    splits["test"] = _first(splits["test"], settings["num_test"], "test")
    # Which stored files each split reads: with validation=test, "val" reads the test files.
    manifest["split_files"] = {split: split if split in splits else "test" for split in SPLITS}
    manifest["counts"] = {split: len(splits[manifest["split_files"][split]]["targets"]) for split in SPLITS}
    if summarize is not None:
        manifest["summary"] = summarize(splits)
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest["files"] = {}
    for split, arrays in splits.items():
        manifest["files"].update(storage.save_split(data_dir, split, arrays))
    return storage.write_manifest(data_dir, manifest)


def is_prepared(task_name: str, data_dir: str | os.PathLike) -> bool:
    """True when `data_dir` has a manifest of `task_name` and every file it lists."""
    data_dir = Path(data_dir)
    manifest = storage.read_manifest(data_dir)
    return (manifest is not None and manifest.get("task") == task_name
            and all((data_dir / name).is_file() for name in manifest.get("files", {})))


def load_task(task_name: str, split: str, data_dir: str | os.PathLike,
              names: tuple[str, ...]) -> tuple[Arrays, dict]:
    """Reads the arrays `names` of one split, memory-mapped, checked against the manifest.

    Returns:
        (arrays, manifest).

    Raises:
        ValueError: an unknown split, or a file that differs from the manifest.
        FileNotFoundError: the folder is not prepared; the message gives the command.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    command = storage.prepare_command(task_name, data_dir)
    manifest = storage.read_manifest(data_dir)
    if manifest is None or manifest.get("task") != task_name:
        raise FileNotFoundError(f"no prepared {task_name} data in {data_dir}. Prepare it with:\n  {command}")
    stored = manifest["split_files"][split]
    arrays = storage.load_verified_split(data_dir, stored, names, manifest, prepare_command=command)
    return arrays, manifest


def log_cut(split: str, lengths: np.ndarray, full_lengths: np.ndarray, max_length: int, unit: str) -> int:
    """Logs how many examples were cut to `max_length` when prepared; returns that number."""
    cut = int(np.sum(np.asarray(full_lengths) > np.asarray(lengths)))
    if cut:
        _LOG.warning("%s: %d of %d examples are longer than the prepared max_length=%d %s and were "
                     "cut to it", split, cut, len(lengths), max_length, unit)
    return cut
