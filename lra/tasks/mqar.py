"""MQAR: multi-query associative recall (Arora, Eyuboglu et al., "Zoology: Measuring and
Improving Recall in Efficient Language Models", ICLR 2024).

An example lists `num_kv_pairs` key-value pairs, then queries every key once, later in the
sequence; the target at each query's position is the value its key was paired with:

    inputs   k1 v1 k2 v2 k3 v3  0  0 k2  0  0  0 k1  0 k3  0
    targets   .  .  .  .  .  .  .  . v2  .  .  .  v1 . v3  .      (. = not scored)

The recipe is transcribed from Zoology's generator (HazyResearch/zoology,
``zoology/data/multiquery_ar.py``, function ``multiquery_ar``, commit d88d6f5): keys are
drawn without replacement from ``[1, vocab_size // 2)`` and values without replacement
from ``[vocab_size // 2, vocab_size)``; the pairs fill the first ``2 * num_kv_pairs``
positions; the rest holds ``space = (seq_len - 2 * num_kv_pairs) // 2`` slots at even
offsets, and key i is placed in slot g_i (so at position ``2 * num_kv_pairs + 2 * g_i``),
the slots drawn without replacement with probability proportional to
``a * s^(a - 1)``, s = 1..space, a = `power_a` = 0.01: short gaps are much likelier than
long ones. Every other position is a filler: 0, as in Zoology's Figure 2 sweep
(``zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py``,
``random_non_queries=False``), or, with `random_fillers=True` (the default of Zoology's
generator function), a token drawn uniformly from the whole vocabulary.

Defaults are Zoology's Figure 2 data: vocabulary 8,192, 100,000 training and 3,000 test
examples (its ``DataConfig``), (seq_len, num_kv_pairs) = (64, 4) (one of its settings
(64, 4), (128, 8), (256, 16)); the validation split (Zoology has none: it validates on the
test examples) is 3,000 more examples from a stream of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lra.tasks.token_tasks import UNSCORED, TokenTask, power_law

DEFAULTS = {
    "vocab_size": 8192,
    "seq_len": 64,
    "num_kv_pairs": 4,
    "power_a": 0.01,
    "random_fillers": False,
    "num_train": 100_000,
    "num_val": 3_000,
    "num_test": 3_000,
    "seed": 0,
}


def check(settings: Mapping[str, Any]) -> None:
    """Zoology's conditions: an even length, the pairs and their queries fit, keys and
    values are distinct tokens."""
    length, pairs, vocab = settings["seq_len"], settings["num_kv_pairs"], settings["vocab_size"]
    if length % 2 or length < 2:
        raise ValueError(f"mqar: seq_len must be even and >= 2, got {length}")
    if pairs < 1 or 4 * pairs > length:
        raise ValueError(f"mqar: num_kv_pairs={pairs} needs seq_len >= 4 * num_kv_pairs (the "
                         f"pairs and one query slot per key); seq_len={length}")
    if vocab // 2 - 1 < pairs:
        raise ValueError(f"mqar: vocab_size={vocab} has fewer than num_kv_pairs={pairs} keys "
                         "(keys are 1 .. vocab_size // 2 - 1)")
    if not 0 < settings["power_a"] <= 1:
        raise ValueError(f"mqar: power_a must be in (0, 1], got {settings['power_a']}")


def distinct_rows(rng: np.random.Generator, count: int, low: int, high: int, k: int) -> np.ndarray:
    """[count, k]: each row k distinct integers drawn uniformly from [low, high)."""
    return np.stack([rng.choice(high - low, size=k, replace=False) + low for _ in range(count)])


def generate(count: int, settings: Mapping[str, Any], rng: np.random.Generator):
    """`count` MQAR examples: (inputs [N, L], lengths [N], targets [N, L])."""
    length, pairs, vocab = settings["seq_len"], settings["num_kv_pairs"], settings["vocab_size"]
    context = 2 * pairs
    keys = distinct_rows(rng, count, 1, vocab // 2, pairs)
    values = distinct_rows(rng, count, vocab // 2, vocab, pairs)
    space = (length - context) // 2
    p = power_law(space, settings["power_a"])
    slots = np.stack([rng.choice(space, size=pairs, replace=False, p=p) for _ in range(count)])

    inputs = np.zeros((count, length), np.int64)
    targets = np.full((count, length), UNSCORED, np.int64)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    query_positions = context + 2 * slots
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    np.put_along_axis(targets, query_positions, values, axis=1)
    if settings["random_fillers"]:
        fillers = rng.integers(0, vocab, size=inputs.shape)
        is_filler = np.ones(inputs.shape, bool)
        is_filler[:, :context] = False
        np.put_along_axis(is_filler, query_positions, False, axis=1)
        inputs = np.where(is_filler, fillers, inputs)
    return inputs, np.full(count, length), targets


TASK = TokenTask(
    name="mqar",
    defaults=DEFAULTS,
    generate=generate,
    vocabulary=lambda settings: settings["vocab_size"],
    max_targets=lambda settings: settings["num_kv_pairs"],
    check=check,
)
