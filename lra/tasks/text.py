"""Byte-level Text as in Long Range Arena: IMDB reviews (tfds ``imdb_reviews``), 2 classes.

Tokens: a review's UTF-8 bytes as `lra.tasks.bytes_tokens` maps them: byte b is token b + 1
and 0 is padding, so the vocabulary is 257 (every byte value is a real token). There are no
special tokens: the encoder's CLS is a learned vector of its own, not a token id.

Stored by `prepare` (``python -m lra.data prepare text --data_dir DIR``), per split:

- ``inputs`` [N, max_length] uint16: the first ``max_length`` bytes (default 4000, the
  paper's 4K; a config reads fewer with ``config.max_length``, e.g. 1000 for LRA's 1K
  option), padded with 0, read memory-mapped: never decoded per epoch;
- ``lengths`` [N] int32: ``min(bytes, max_length)``, the model's mask;
- ``byte_lengths`` [N] int32: the whole review's bytes, so loading can say how many were cut;
- ``targets`` [N] int32: 0 negative, 1 positive; ``index`` [N] int64: the row's position in
  its tfds split.

Splits: test = the 25,000 tfds test reviews. validation="heldout" (default): 2,500 tfds train
reviews chosen by ``seed`` are validation and the other 22,500 train (their positions are in
``val.index.npy``, their sha256 in the manifest). validation="test" (the LRA protocol): train
on all 25,000 and validate on test. See `lra.tasks.tfds_source` for both. ``num_train`` and
``num_test`` keep only the first reviews (the small folder of the runlocal config).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from lra.tasks import bytes_tokens, tfds_source

NAME = "text"
TFDS_NAME = "imdb_reviews"
MAX_LENGTH = 4000  # bytes stored per review (the LRA paper's 4K)
NUM_VAL = 2500  # held-out tfds train reviews: 10%
ARRAYS = ("inputs", "lengths", "byte_lengths", "targets")


def encode(reviews: np.ndarray, max_length: int) -> dict[str, np.ndarray]:
    """Byte tokens of a batch of reviews.

    Args:
        reviews: [B] ``bytes`` (UTF-8, as tfds gives them) or ``str``.
        max_length: bytes kept per review.

    Returns:
        ``inputs`` [B, max_length] uint16, ``lengths`` [B] int32 (bytes kept) and
        ``byte_lengths`` [B] int32 (bytes of the whole review).
    """
    reviews = [review.encode() if isinstance(review, str) else bytes(review) for review in reviews]
    inputs, lengths = bytes_tokens.encode_bytes(reviews, max_length)
    byte_lengths = np.fromiter(map(len, reviews), np.int32, len(reviews))
    return {"inputs": inputs, "lengths": lengths, "byte_lengths": byte_lengths}


def _summarize(splits: dict[str, dict[str, np.ndarray]]) -> dict:
    return {"reviews_cut": {split: int(np.sum(arrays["byte_lengths"] > arrays["lengths"]))
                            for split, arrays in splits.items()},
            "median_bytes": {split: int(np.median(arrays["byte_lengths"])) for split, arrays in splits.items()}}


def prepare(data_dir: str | os.PathLike, *, max_length: int = MAX_LENGTH, num_train: int = 0,
            num_val: int = NUM_VAL, num_test: int = 0, seed: int = 0, validation: str = "heldout",
            tfds_data_dir: str | os.PathLike | None = None) -> dict:
    """Downloads IMDB through tfds if needed and writes the byte-token splits into `data_dir`.

    Args:
        data_dir: our output folder.
        max_length: bytes stored per review.
        num_train: keep the first `num_train` training reviews; 0 = all.
        num_val: tfds train reviews held out for validation (validation="heldout").
        num_test: keep the first `num_test` test reviews; 0 = all.
        seed: which reviews are held out (`tfds_source.heldout_indices`).
        validation: "heldout" or "test" (the LRA protocol: validate on test).
        tfds_data_dir: tfds's data folder; default: tfds's own (``$TFDS_DATA_DIR`` or
            ``~/tensorflow_datasets``).

    Returns:
        The manifest (settings, source, counts, reviews cut, sha256 per file).

    Raises:
        ValueError: bad settings, or `data_dir` prepared with other settings.
        FileNotFoundError: IMDB could not be downloaded; the message says what to fetch and
            where to put it.
        ModuleNotFoundError: tensorflow-datasets is not installed (``pip install 'lra[tfds]'``).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    settings = {"max_length": max_length, "seed": seed,
                **tfds_source.split_settings(validation, num_train, num_val, num_test)}
    return tfds_source.prepare_task(
        NAME, data_dir, tfds_name=TFDS_NAME, convert=lambda reviews: encode(reviews, max_length),
        settings=settings, heldout_seed=seed, tfds_data_dir=tfds_data_dir, summarize=_summarize)


def load(split: str, data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """One split: ``inputs`` [N, max_length] uint16 (memory-mapped), ``lengths``,
    ``byte_lengths``, ``targets`` [N] int32. Logs how many reviews were cut when prepared.

    Raises:
        FileNotFoundError: not prepared; the message gives the command.
        ValueError: an unknown split, or a file that differs from the manifest.
    """
    arrays, manifest = tfds_source.load_task(NAME, split, data_dir, ARRAYS)
    tfds_source.log_cut(split, arrays["lengths"], arrays["byte_lengths"],
                        manifest["settings"]["max_length"], "bytes")
    return arrays


def source_at_hand(data_dir: str | os.PathLike, *, tfds_data_dir: str | os.PathLike | None = None,
                   **settings) -> bool:
    """True when `prepare` needs no download: tfds's data folder holds imdb_reviews built."""
    return tfds_source.dataset_at_hand(TFDS_NAME, tfds_data_dir)


def is_prepared(data_dir: str | os.PathLike) -> bool:
    """True when `data_dir` holds prepared Text data."""
    return tfds_source.is_prepared(NAME, data_dir)


@dataclasses.dataclass(frozen=True)
class Text:
    """The Text task of the registry (see `lra.tasks`); its methods are this module's functions."""

    name: str = NAME
    num_classes: int = 2
    vocab_size: int = bytes_tokens.VOCAB_SIZE  # 257: padding + 256 byte values
    generated: bool = False  # prepare() downloads IMDB through tfds
    paired: bool = False
    splits: tuple[str, ...] = tfds_source.SPLITS
    prepare = staticmethod(prepare)
    load = staticmethod(load)
    is_prepared = staticmethod(is_prepared)
    source_at_hand = staticmethod(source_at_hand)


TASK = Text()
