"""Pixel Image as in Long Range Arena: CIFAR-10 (tfds ``cifar10``) in 8-bit grayscale, 10 classes.

An image is its 32 x 32 grayscale pixels read row by row: 1024 tokens, each a gray level
0-255, so the vocabulary is 256 and pixel 0 (black) is a real token like any other. The mask
comes from ``lengths`` (always 1024), never from pixel values.

Grayscale is exactly what LRA computed with ``tf.image.rgb_to_grayscale``, done in NumPy
(`to_grayscale`): the ITU-R 601-2 luma weights (0.2989, 0.5870, 0.1140) applied in float32 to
the channels scaled by 1/255, then multiplied by 255.5 and *truncated* to uint8 (TF's
``convert_image_dtype``). That is not rounding: about a quarter of the RGB colours come out
one level below the rounded luma. It matches TensorFlow on all 2^24 colours.

Stored by `prepare` (``python -m lra.data prepare image --data_dir DIR``), per split:
``inputs`` [N, 1024] uint8 (memory-mapped when read), ``lengths`` [N] int32, ``targets``
[N] int32 (tfds labels: airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck)
and ``index`` [N] int64 (the row's position in its tfds split).

Splits as LRA's ``train[:90%]`` / ``train[90%:]`` / ``test``: validation="heldout"
(default) makes the last 5,000 of the 50,000 tfds train images validation and the first
45,000 train; test = all 10,000 test images. validation="test": train on all 50,000,
validate on test (see `lra.tasks.tfds_source`). ``num_train`` and ``num_test`` keep only the
first images (the small folder of the runlocal config).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from lra.tasks import tfds_source

NAME = "image"
TFDS_NAME = "cifar10"
SIDE = 32  # pixels per row and per column
NUM_VAL = 5000  # the last 10% of the tfds train split
ARRAYS = ("inputs", "lengths", "targets")
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601-2, as tf.image.rgb_to_grayscale


def to_grayscale(rgb: np.ndarray) -> np.ndarray:
    """8-bit grayscale exactly as ``tf.image.rgb_to_grayscale`` on uint8 images.

    Args:
        rgb: [..., 3] uint8.

    Returns:
        [...] uint8 gray levels.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1:] != (3,):
        raise ValueError(f"expected uint8 RGB images [..., 3], got {rgb.dtype} {rgb.shape}")
    scaled = rgb.astype(np.float32) * np.float32(1 / 255)
    red, green, blue = (np.float32(weight) for weight in LUMA_WEIGHTS)
    # One float32 product and sum per channel in this order: equal to TF's to the last bit.
    luma = scaled[..., 0] * red + scaled[..., 1] * green + scaled[..., 2] * blue
    return (luma * np.float32(255.5)).astype(np.uint8)


def encode(images: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel tokens of a batch of CIFAR images.

    Args:
        images: [B, 32, 32, 3] uint8 RGB.

    Returns:
        ``inputs`` [B, 1024] uint8 gray levels in row-major order, ``lengths`` [B] int32 (1024).
    """
    images = np.asarray(images)
    if images.shape[1:] != (SIDE, SIDE, 3):
        raise ValueError(f"expected CIFAR images [B, {SIDE}, {SIDE}, 3], got {images.shape}")
    inputs = to_grayscale(images).reshape(len(images), SIDE * SIDE)
    return {"inputs": inputs, "lengths": np.full(len(images), SIDE * SIDE, np.int32)}


def prepare(data_dir: str | os.PathLike, *, num_train: int = 0, num_val: int = NUM_VAL, num_test: int = 0,
            validation: str = "heldout", tfds_data_dir: str | os.PathLike | None = None) -> dict:
    """Downloads CIFAR-10 through tfds if needed and writes the grayscale splits into `data_dir`.

    Args:
        data_dir: our output folder.
        num_train: keep the first `num_train` training images; 0 = all.
        num_val: the last `num_val` tfds train images are validation (validation="heldout").
        num_test: keep the first `num_test` test images; 0 = all.
        validation: "heldout" or "test" (the LRA protocol: validate on test).
        tfds_data_dir: tfds's data folder; default: tfds's own (``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).

    Returns:
        The manifest (settings, source, counts, sha256 per file).

    Raises:
        ValueError: bad settings, or `data_dir` prepared with other settings.
        FileNotFoundError: CIFAR-10 could not be downloaded; the message says what to fetch
            and where to put it.
        ModuleNotFoundError: tensorflow-datasets is not installed (``pip install 'lra[tfds]'``).
    """
    settings = tfds_source.split_settings(validation, num_train, num_val, num_test)
    return tfds_source.prepare_task(NAME, data_dir, tfds_name=TFDS_NAME, convert=encode, settings=settings,
                                    heldout_seed=None, tfds_data_dir=tfds_data_dir)


def load(split: str, data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """One split: ``inputs`` [N, 1024] uint8 (memory-mapped), ``lengths``, ``targets`` [N] int32.

    Raises:
        FileNotFoundError: not prepared; the message gives the command.
        ValueError: an unknown split, or a file that differs from the manifest.
    """
    return tfds_source.load_task(NAME, split, data_dir, ARRAYS)[0]


def source_at_hand(data_dir: str | os.PathLike, *, tfds_data_dir: str | os.PathLike | None = None,
                   **settings) -> bool:
    """True when `prepare` needs no download: tfds's data folder holds cifar10 built."""
    return tfds_source.dataset_at_hand(TFDS_NAME, tfds_data_dir)


def is_prepared(data_dir: str | os.PathLike) -> bool:
    """True when `data_dir` holds prepared Image data."""
    return tfds_source.is_prepared(NAME, data_dir)


@dataclasses.dataclass(frozen=True)
class Image:
    """The Image task of the registry (see `lra.tasks`); its methods are this module's functions."""

    name: str = NAME
    num_classes: int = 10
    vocab_size: int = 256  # gray levels; 0 is black, a real token (the mask comes from lengths)
    generated: bool = False  # prepare() downloads CIFAR-10 through tfds
    paired: bool = False
    splits: tuple[str, ...] = tfds_source.SPLITS
    prepare = staticmethod(prepare)
    load = staticmethod(load)
    is_prepared = staticmethod(is_prepared)
    source_at_hand = staticmethod(source_at_hand)


TASK = Image()
