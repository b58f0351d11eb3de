"""Induction heads as in the Mamba paper (Gu & Dao, "Mamba: Linear-Time Sequence Modeling
with Selective State Spaces", 2023, section 4.1.2 and appendix E.1): recall the token that
followed the special token, at lengths up to far beyond training.

    inputs   3  9  0  S  7  2  11 5  ...  4  S
    targets  .  .  .  .  .  .  .  .  ...  .  7      (S: the special token; . = not scored)

An example is `seq_len` - 1 random tokens, one of which is replaced by the special token,
then the special token again; the one target, at the last position, is the token that
followed the first special token. The paper trains at length 256 with a vocabulary of 16
and tests at lengths 2^6 .. 2^20; it points to the H3 paper's task for the data (Dao, Fu,
Saab et al. 2023), whose generator is HazyResearch/safari ``src/dataloaders/synthetics.py``
(``generate_induction_head``, ``ICLDataModule``, commit 02220c6), transcribed here:

- the vocabulary of `vocab_size` ids holds two special tokens (safari's copy prefix "=>",
  here the special token, id `vocab_size` - 1, and its no-op ".", id `vocab_size` - 2,
  which induction heads never uses), so the random tokens are the `vocab_size` - 2 ids
  below them, drawn uniformly with replacement;
- the special token overwrites the token at a position drawn uniformly from
  [0, `seq_len` - 3) (safari: ``rng.integers(input_seq_len - (1 + induction_len))`` with
  induction_len 1), so the token after it is itself a random token of the body, and the
  special token occurs exactly once before the last position (one trigger: safari's
  ``induction_num_triggers`` default);
- the target is scored at the last position only (safari's test targets; its training
  split also scores every next token, while the paper's accuracy, and this task, count the
  recalled token alone).

Lengths. `seq_len` is the length the model reads, the final special token included (safari's
``input_seq_len`` counts the body alone, one less). The test split has length `test_seq_len`
(the extrapolation split, `split_settings`); validation uses the training length.

Defaults: vocabulary 16, training length 256 (the paper), test length 1,024 (4x, one of the
paper's extrapolation lengths). The paper draws fresh data at every step (batch 8); here the
data is a fixed set of `num_train` examples (100,000, about 200 MB: the 204,800 steps of
its schedule see each about 16 times), with 1,000 validation and 1,000 test examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lra.tasks.token_tasks import UNSCORED, TokenTask

DEFAULTS = {
    "vocab_size": 16,
    "seq_len": 256,
    "test_seq_len": 1024,
    "num_train": 100_000,
    "num_val": 1_000,
    "num_test": 1_000,
    "seed": 0,
}


def special_token(settings: Mapping[str, Any]) -> int:
    """The special token's id: the top one."""
    return settings["vocab_size"] - 1


def check(settings: Mapping[str, Any]) -> None:
    """A random token exists, and each length fits a body with room for the trigger."""
    if settings["vocab_size"] < 3:
        raise ValueError(f"induction_heads: vocab_size must be >= 3 (the special token, the "
                         f"unused no-op token and a random one), got {settings['vocab_size']}")
    for key in ("seq_len", "test_seq_len"):
        if settings[key] < 4:
            raise ValueError(f"induction_heads: {key} must be >= 4, got {settings[key]}")


def generate(count: int, settings: Mapping[str, Any], rng: np.random.Generator):
    """`count` examples of length `seq_len`: (inputs [N, L], lengths [N], targets [N, L])."""
    length, special = settings["seq_len"], special_token(settings)
    rows = np.arange(count)
    body = rng.integers(0, settings["vocab_size"] - 2, (count, length - 1))
    trigger = rng.integers(0, length - 3, count)
    body[rows, trigger] = special
    inputs = np.concatenate([body, np.full((count, 1), special)], 1)
    targets = np.full((count, length), UNSCORED, np.int64)
    targets[:, -1] = body[rows, trigger + 1]
    return inputs, np.full(count, length), targets


def split_settings(split: str, settings: Mapping[str, Any]) -> Mapping[str, Any]:
    """The test split at `test_seq_len`; training and validation at `seq_len`."""
    return {**settings, "seq_len": settings["test_seq_len"]} if split == "test" else settings


TASK = TokenTask(
    name="induction_heads",
    defaults=DEFAULTS,
    generate=generate,
    vocabulary=lambda settings: settings["vocab_size"],
    max_targets=lambda settings: 1,
    check=check,
    split_settings=split_settings,
)
