"""MAD's six synthetic tasks (Poli, Thomas et al., "Mechanistic Design and Scaling of Hybrid
Architectures", ICML 2024): in-context recall, fuzzy recall, noisy recall, selective copying,
compression and memorization, as token tasks (lra/tasks/token_tasks.py).

Every recipe is transcribed from the authors' generators, athms/mad-lab commit 0f49a45
(``mad/data/instances.py``: ``generate_in_context_recall_instance``,
``generate_noisy_in_context_recall_instance``, ``generate_fuzzy_in_context_recall_instance``,
``generate_kv_map``, ``generate_memorization_instance``, ``generate_compression_instance``,
``generate_copying_instance`` with ``selective=True``), with the arguments MAD hands them
(``mad/configs.py``: ``MADConfig``, ``instance_fn_kwargs``). The defaults are MAD's baseline
settings: the ``baseline`` of each ``configs/tasks/<task>.yml`` over ``MADConfig``'s defaults
(12,800 training and 1,280 test examples, multi-query recall, no noise); each file's
``changes`` (vocabulary, length, training examples, noise fraction, tokens to copy) are the
settings of the same names here. The code is NumPy written for these files, drawing many
examples at once; it draws the same distributions as MAD's per-example loops, not MAD's numbers.

Vocabulary (MAD's layout): the highest ids are the special tokens, the `noise_vocab_size`
noise tokens lie just below them, and the remaining "plain" ids split in half, keys then
values (recall, memorization).

Alignment. MAD's loss is cross-entropy at every position against its targets, -100 where
ignored (here `UNSCORED`, -1). Where MAD shifts (recall tasks: inputs ``x[:-1]``, targets
``t[1:]``), the target at position i here is MAD's ``t[i + 1]``: the causal model's output
at i, having read ``x[0..i]``, predicts token i + 1. Memorization, compression and selective
copying are not shifted in MAD, and are not here.

Train and test differ in the recall tasks, as in MAD (``is_training``): the training split
scores every position on the next token (``inputs[1:]``: language modelling over the whole
sequence, noise and all), the validation and test splits only the recall targets. MAD has no
validation split (it validates on its test set); `num_val` more examples are drawn the test
way from a stream of their own.

in_context_recall, noisy_recall (one recipe; noisy_recall's defaults add MAD's noise)::

    inputs   k1 v1 k2 v2 n  n  k1 v1 k3 v3 k2 v2 k1        (n: noise tokens, a pair of them)
    test     .  .  .  .  .  .  v1 .  .  .  v2 .  v1        (target at i: token i + 1)

  `seq_len` / 2 - 1 slots, each a key-value pair or, with probability `frac_noise`, two
  noise tokens (one slot per example, drawn uniformly, is never noise); keys are drawn with
  replacement from the key half, each key's value is drawn from the value half when the key
  first appears and repeats after; then a final query: a key drawn uniformly among the
  distinct keys shown (its value, MAD's last token, is the target at the last position,
  not an input). Test targets: every value of a key already shown
  (`multi_query`, MAD's default) and the final value; the training split scores every
  position. Multi-query examples are `seq_len` - 1 tokens long (MAD's ``x[:-1]`` of
  `seq_len` tokens). With `multi_query=False` the top id is a copy prefix placed before the
  final query, only the final value is a test target, and examples are `seq_len` long.

fuzzy_recall: as in-context recall, but keys are 1 .. `k_motif_size` distinct key tokens
  and values 1 .. `v_motif_size` distinct value tokens (sizes uniform; the test split's keys
  are all `k_motif_size` long). Slots are added until the sequence reaches `seq_len` - |probe
  pair| - (`k_motif_size` + `v_motif_size`) tokens; the probe pair (a key and value drawn
  first) is placed at the first slot starting at or after a uniform position in
  [0, `seq_len` - 2 |probe pair|), unless its key came up by itself before; the example ends
  with the probe key and its value (all its value tokens are test targets) and is padded on
  the left to `seq_len` + 1 tokens with the pad token (the top id; a real input token the
  model sees, never scored at test) before the shift: `seq_len` tokens. As in MAD, when the
  probe's slot would start past the last slot the probe pair is not shown before its query.

selective_copying::

    inputs   a  _  _  b  _  c  =  _  _  _               (_: blank, =: copy token)
    targets  .  .  .  .  .  .  .  a  b  c

  `num_tokens_to_copy` data tokens (the ids below the blank and copy tokens, with
  replacement) with `seq_len` - 2 `num_tokens_to_copy` - 1 blanks inserted before data
  tokens drawn uniformly (MAD's ``np.insert``: the last data token always sits just before
  the copy token), the copy token, then one blank per data token, whose targets are the data
  tokens in order. (MAD draws the insert positions from NumPy's global generator; here they
  come from the split's stream like everything else.)

compression::

    inputs   x0 x1 x2 x3 C  C  C  C  C                  (C: the compression token)
    targets  .  .  .  .  x0 x1 x2 x3 C

  MAD's example is `seq_len` - 1 random plain tokens (each replaced by a noise token with
  probability `frac_noise`) and the compression token; its AutoEncoder
  (``mad/model/auto_encoder.py``) encodes it into the output at the last position alone,
  and an MLP reads every position p back from that one vector (plus a position embedding of
  p); the targets are the whole input, the compression token and noise tokens included
  (``generate_compression_instance`` returns ``inputs, inputs``: the noise-masked targets it
  builds are unused). This format has one output per position, so the read-out becomes
  positions of the sequence: after MAD's `seq_len` tokens come `seq_len` - 1 more
  compression tokens, and the output at the compression token and at each following one is
  scored against the input tokens in order (2 `seq_len` - 1 positions, `seq_len` targets).
  What differs from MAD: the read-out is the model itself rather than a separate MLP on one
  vector, and the read-out positions can look back at the input. A model with a fixed-size
  state must still carry the whole sequence through its state at the compression token, as
  MAD asks; an attention model can copy instead of compressing, so for attention this is a
  copying task, not MAD's compression.

memorization::

    inputs   k1 I  k2 I  n  n  k3 I                     (I: the insert token)
    targets  .  v1 .  v2 .  .  .  v3

  `seq_len` / 2 slots, each a key drawn uniformly from the key half and the insert token
  (its target: the key's value in a fixed table), or with probability `frac_noise` two noise
  tokens (one slot per example is never noise). The table maps each key to a distinct value
  (MAD's ``generate_kv_map``: shuffled keys zipped with shuffled values); it is drawn once
  from `seed`, apart from the splits' streams, so every split shares it (`memory_table`).
  MAD's ``MADConfig`` builds its table from ``vocab_size - 1`` tokens whatever the noise
  vocabulary, which then overlaps the values; the table here follows the generator's own
  layout (keys and values below the noise tokens); the two agree without noise, MAD's
  setting.

Differences from MAD besides those above: the random streams (and the default seed, 0);
MAD's in-context recall draws its never-noise slot among `seq_len` / 2 slots of which only
`seq_len` / 2 - 1 exist, so its guarantee of one shown key can miss (its generator then
fails); here the slot is one of the existing ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lra.tasks.token_tasks import UNSCORED, TokenTask, split_rng

SPLIT = "_split"  # the split, added to the settings `generate` gets (`_with_split`)
CHUNK = 1024  # examples drawn at once (bounds memory at long lengths)
COUNTS = {"num_train": 12_800, "num_val": 1_280, "num_test": 1_280, "seed": 0}
NOISE = {"noise_vocab_size": 0, "frac_noise": 0.0}


# -- shared pieces ------------------------------------------------------------------------


def _plain_split(vocab_size: int, specials: int, noise_vocab_size: int) -> tuple[int, int]:
    """(keys, plain): MAD's layout, keys [0, keys), values [keys, plain), noise
    [plain, plain + noise_vocab_size), the `specials` special tokens above."""
    plain = vocab_size - specials - noise_vocab_size
    return plain // 2, plain


def _noise_slots(rng: np.random.Generator, count: int, slots: int, frac: float,
                 keep_one: bool) -> np.ndarray:
    """bool [count, slots]: each slot noise with probability `frac`; with `keep_one`, one
    slot per row, drawn uniformly, never is (MAD's ``not_noise_idx``)."""
    noise = rng.random((count, slots)) < frac if frac > 0 else np.zeros((count, slots), bool)
    if frac > 0 and keep_one:
        noise[np.arange(count), rng.integers(0, slots, count)] = False
    return noise


def _noise_tokens(rng: np.random.Generator, shape: tuple[int, ...], settings: Mapping[str, Any],
                  low: int) -> np.ndarray:
    """Noise tokens drawn uniformly from [low, low + noise_vocab_size) (zeros when the task
    has no noise, so nothing is drawn)."""
    if settings["frac_noise"] <= 0:
        return np.zeros(shape, np.int64)
    return rng.integers(low, low + settings["noise_vocab_size"], shape)


def _distinct(rng: np.random.Generator, shape: tuple[int, ...], n: int, m: int) -> np.ndarray:
    """int [*shape, m]: m distinct integers of [0, n) in random order, each ordered m-tuple
    equally likely (MAD's motifs: ``itertools.permutations`` drawn uniformly)."""
    picks = np.zeros(shape + (m,), np.int64)
    for i in range(m):
        pick = rng.integers(0, n - i, shape)
        for taken in np.moveaxis(np.sort(picks[..., :i], axis=-1), -1, 0):
            pick += pick >= taken  # the pick-th value not taken yet
        picks[..., i] = pick
    return picks


def _first_slots(codes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """int [N, S]: for each slot, the first slot of its row holding the same code among
    the `valid` ones (itself when it is the first; invalid slots are their own)."""
    count, slots = codes.shape
    codes = np.where(valid, codes, codes.max(initial=0) + 1 + np.arange(slots))
    flat = (np.arange(count)[:, None] * (codes.max() + 1) + codes).ravel()
    order = np.argsort(flat, kind="stable")  # equal codes keep slot order
    ordered = flat[order]
    starts = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    first = np.empty_like(order)
    first[order] = order[starts][np.cumsum(starts) - 1]
    return first.reshape(count, slots) % slots


def _pack_right(tokens: np.ndarray, targets: np.ndarray, keep: np.ndarray, width: int,
                pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The kept entries of each row of `tokens` and `targets` [N, K], in order, at the end
    of rows `width` long; the rest `pad` (targets: `UNSCORED`). MAD's left padding."""
    count = len(tokens)
    used = keep.sum(1)
    if used.max(initial=0) > width:
        raise AssertionError(f"an example is {used.max()} tokens long, over {width}")
    columns = width - used[:, None] + np.cumsum(keep, 1) - 1
    rows = np.broadcast_to(np.arange(count)[:, None], keep.shape)
    out_tokens = np.full((count, width), pad, np.int64)
    out_targets = np.full((count, width), UNSCORED, np.int64)
    out_tokens[rows[keep], columns[keep]] = tokens[keep]
    out_targets[rows[keep], columns[keep]] = targets[keep]
    return out_tokens, out_targets


def _next_token(inputs: np.ndarray, targets: np.ndarray, training: bool):
    """MAD's shift: inputs ``x[:-1]``, targets ``x[1:]`` when training (every next token),
    ``t[1:]`` otherwise (the recall targets)."""
    shifted = (inputs if training else targets)[:, 1:]
    return inputs[:, :-1], np.full(len(inputs), inputs.shape[1] - 1), shifted


def _training(settings: Mapping[str, Any]) -> bool:
    return settings.get(SPLIT, "train") == "train"


def _with_split(split: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    return {**settings, SPLIT: split}


def _in_chunks(draw: Callable) -> Callable:
    """`draw` over `CHUNK` examples at a time, concatenated."""
    def generate(count: int, settings: Mapping[str, Any], rng: np.random.Generator):
        parts = [draw(min(CHUNK, count - start), settings, rng)
                 for start in range(0, count, CHUNK)]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts))
    return generate


def _check_noise(name: str, settings: Mapping[str, Any], *, below_one: bool) -> None:
    frac, size = settings["frac_noise"], settings["noise_vocab_size"]
    if not (0 <= frac < 1 if below_one else 0 <= frac <= 1):
        raise ValueError(f"{name}: frac_noise must be in [0, 1{')' if below_one else ']'}, "
                         f"got {frac}")
    if size < 0 or (frac > 0 and size == 0):
        raise ValueError(f"{name}: noise_vocab_size must be >= 0, and > 0 when frac_noise > 0; "
                         f"got {size}")


def _check_even_length(name: str, settings: Mapping[str, Any], least: int) -> None:
    length = settings["seq_len"]
    if length % 2 or length < least:
        raise ValueError(f"{name}: seq_len must be even and >= {least}, got {length}")


def _check_halves(name: str, keys: int, values: int, need_keys: int = 1,
                  need_values: int = 1) -> None:
    if keys < need_keys or values < need_values:
        raise ValueError(
            f"{name}: vocab_size leaves {keys} key and {values} value tokens (after the special "
            f"and noise tokens); at least {need_keys} and {need_values} are needed")


# -- in-context recall, noisy recall ------------------------------------------------------


def _recall_specials(settings: Mapping[str, Any]) -> int:
    return 0 if settings["multi_query"] else 1  # the copy prefix of single-query recall


def check_recall(settings: Mapping[str, Any], name: str = "in_context_recall") -> None:
    _check_even_length(name, settings, 4)
    _check_noise(name, settings, below_one=True)
    keys, plain = _plain_split(settings["vocab_size"], _recall_specials(settings),
                               settings["noise_vocab_size"])
    _check_halves(name, keys, plain - keys)


def _recall(count: int, settings: Mapping[str, Any], rng: np.random.Generator):
    """In-context recall (noisy with `frac_noise` > 0); see the module docstring."""
    multi = settings["multi_query"]
    keys_n, plain = _plain_split(settings["vocab_size"], _recall_specials(settings),
                                 settings["noise_vocab_size"])
    slots = settings["seq_len"] // 2 - 1
    rows = np.arange(count)
    noise = _noise_slots(rng, count, slots, settings["frac_noise"], keep_one=True)
    keys = rng.integers(0, keys_n, (count, slots))
    first = _first_slots(keys, ~noise)
    values = np.take_along_axis(rng.integers(keys_n, plain, (count, slots)), first, 1)
    repeated = ~noise & (first != np.arange(slots))

    shown = np.zeros((count, keys_n), bool)
    shown[np.broadcast_to(rows[:, None], keys.shape)[~noise], keys[~noise]] = True
    query = np.argmax(np.where(shown, rng.random((count, keys_n)), -1.0), 1)
    answer = values[rows, np.argmax((keys == query[:, None]) & ~noise, 1)]

    pairs = np.where(noise[..., None], _noise_tokens(rng, (count, slots, 2), settings, plain),
                     np.stack([keys, values], -1))
    pair_targets = np.full((count, slots, 2), UNSCORED, np.int64)
    if multi:
        pair_targets[..., 1] = np.where(repeated, values, UNSCORED)
    last = [query, answer] if multi else [np.full(count, settings["vocab_size"] - 1), query, answer]
    last_targets = [np.full(count, UNSCORED)] * (len(last) - 1) + [answer]
    inputs = np.concatenate([pairs.reshape(count, -1), np.stack(last, 1)], 1)
    targets = np.concatenate([pair_targets.reshape(count, -1), np.stack(last_targets, 1)], 1)
    return _next_token(inputs, targets, _training(settings))


def _recall_task(name: str, defaults: Mapping[str, Any]) -> TokenTask:
    return TokenTask(
        name=name,
        defaults={**defaults, **COUNTS},
        generate=_in_chunks(_recall),
        vocabulary=lambda settings: settings["vocab_size"],
        # the training split scores every position: seq_len - 1 of them multi-query
        max_targets=lambda settings: settings["seq_len"] - (1 if settings["multi_query"] else 0),
        check=lambda settings: check_recall(settings, name),
        split_settings=_with_split,
    )


# configs/tasks/in-context-recall.yml, noisy-in-context-recall.yml (vocab 32 = 16 + 16 noise)
IN_CONTEXT_RECALL = _recall_task("in_context_recall", {
    "vocab_size": 16, "seq_len": 128, "multi_query": True, **NOISE})
NOISY_RECALL = _recall_task("noisy_recall", {
    "vocab_size": 32, "seq_len": 128, "multi_query": True, "noise_vocab_size": 16,
    "frac_noise": 0.2})


# -- fuzzy recall -------------------------------------------------------------------------


def _fuzzy_specials(settings: Mapping[str, Any]) -> int:
    return 1 if settings["multi_query"] else 2  # pad (and copy prefix)


def check_fuzzy(settings: Mapping[str, Any]) -> None:
    name, km, vm = "fuzzy_recall", settings["k_motif_size"], settings["v_motif_size"]
    if km < 1 or vm < 1:
        raise ValueError(f"{name}: k_motif_size and v_motif_size must be >= 1, got {km}, {vm}")
    if settings["seq_len"] <= 2 * (km + vm):
        raise ValueError(f"{name}: seq_len must exceed 2 * (k_motif_size + v_motif_size) = "
                         f"{2 * (km + vm)}, got {settings['seq_len']}")
    _check_noise(name, settings, below_one=True)
    keys, plain = _plain_split(settings["vocab_size"], _fuzzy_specials(settings),
                               settings["noise_vocab_size"])
    _check_halves(name, keys, plain - keys, km, vm)  # a motif's tokens are distinct


def _motif_codes(tokens: np.ndarray, sizes: np.ndarray, n: int) -> np.ndarray:
    """One integer per motif (its first `sizes` tokens of [0, n)): equal iff the motifs are."""
    weights = (n + 1) ** np.arange(tokens.shape[-1])
    inside = np.arange(tokens.shape[-1]) < sizes[..., None]
    return np.sum(np.where(inside, tokens + 1, 0) * weights, -1)


def _motif_pairs(keys: np.ndarray, key_sizes: np.ndarray, values: np.ndarray,
                 value_sizes: np.ndarray, width: int):
    """Blocks [..., width]: a key motif then a value motif, left-aligned; and bool masks
    [..., width] of the value tokens and of all the pair's tokens."""
    column = np.arange(width)
    in_key = column < key_sizes[..., None]
    offset = column - key_sizes[..., None]
    in_value = ~in_key & (offset < value_sizes[..., None])
    pick = lambda motif, index: np.take_along_axis(
        motif, np.clip(index, 0, motif.shape[-1] - 1), -1)
    blocks = np.where(in_key, pick(keys, np.broadcast_to(column, in_key.shape)),
                      pick(values, offset))
    return blocks, in_value, in_key | in_value


def _fuzzy(count: int, settings: Mapping[str, Any], rng: np.random.Generator):
    """Fuzzy in-context recall; see the module docstring."""
    length, km, vm = settings["seq_len"], settings["k_motif_size"], settings["v_motif_size"]
    multi, training = settings["multi_query"], _training(settings)
    keys_n, plain = _plain_split(settings["vocab_size"], _fuzzy_specials(settings),
                                 settings["noise_vocab_size"])
    key_size = (lambda shape: rng.integers(1, km + 1, shape)) if training else (
        lambda shape: np.full(shape, km))
    rows, slots, width = np.arange(count), (length + 1) // 2 + 1, km + vm

    probe_ks, probe_vs = key_size(count), rng.integers(1, vm + 1, count)
    probe_keys = _distinct(rng, (count,), keys_n, km)
    probe_values = _distinct(rng, (count,), plain - keys_n, vm) + keys_n
    probe_at = rng.integers(0, length - 2 * (probe_ks + probe_vs))
    stop = length - (probe_ks + probe_vs) - width  # slots start while shorter than this

    ks, vs = key_size((count, slots)), rng.integers(1, vm + 1, (count, slots))
    keys = _distinct(rng, (count, slots), keys_n, km)
    fresh_values = _distinct(rng, (count, slots), plain - keys_n, vm) + keys_n
    noise = _noise_slots(rng, count, slots, settings["frac_noise"], keep_one=False)
    noise_blocks = _noise_tokens(rng, (count, slots, width), settings, plain)
    probe_code = _motif_codes(probe_keys, probe_ks, keys_n)

    def layout(codes, ks, noise):
        """Each slot's first occurrence, value, value size and start."""
        first = _first_slots(codes, ~noise)
        is_probe = ~noise & (codes == probe_code[:, None])
        value_sizes = np.where(is_probe, probe_vs[:, None], np.take_along_axis(vs, first, 1))
        values = np.where(is_probe[..., None], probe_values[:, None],
                          np.take_along_axis(fresh_values, first[..., None], 1))
        sizes = ks + np.where(noise, vs, value_sizes)
        return first, values, value_sizes, np.cumsum(sizes, 1) - sizes

    # The probe pair takes the first slot starting at or after probe_at, unless its key
    # was drawn before that slot; the slots' starts up to there do not depend on it.
    codes = _motif_codes(keys, ks, keys_n)
    *_, starts = layout(codes, ks, noise)
    at = np.argmax(starts >= probe_at[:, None], 1)
    earlier = np.any(~noise & (codes == probe_code[:, None]) & (np.arange(slots) < at[:, None]), 1)
    put = ~earlier & (starts[rows, at] < stop)
    codes[rows[put], at[put]] = probe_code[put]
    ks[rows[put], at[put]], keys[rows[put], at[put]] = probe_ks[put], probe_keys[put]
    noise[rows[put], at[put]] = False
    first, values, value_sizes, starts = layout(codes, ks, noise)

    blocks, in_value, in_pair = _motif_pairs(keys, ks, values, value_sizes, width)
    blocks = np.where(noise[..., None], noise_blocks, blocks)
    in_pair = np.where(noise[..., None], np.arange(width) < (ks + vs)[..., None], in_pair)
    scored = in_value & (multi & ~noise & (first != np.arange(slots)))[..., None]
    keep = in_pair & (starts < stop[:, None])[..., None]

    last, last_value, last_keep = _motif_pairs(probe_keys, probe_ks, probe_values, probe_vs, width)
    if not multi:  # the copy prefix (the top id) before the query
        prefix = np.ones((count, 1), bool)
        last = np.concatenate([np.full((count, 1), settings["vocab_size"] - 1), last], 1)
        last_value = np.concatenate([~prefix, last_value], 1)
        last_keep = np.concatenate([prefix, last_keep], 1)
    tokens = np.concatenate([blocks.reshape(count, -1), last], 1)
    targets = np.where(np.concatenate([scored.reshape(count, -1), last_value], 1), tokens, UNSCORED)
    keep = np.concatenate([keep.reshape(count, -1), last_keep], 1)
    pad = settings["vocab_size"] - (1 if multi else 2)
    inputs, targets = _pack_right(tokens, targets, keep, length + 1, pad)
    return _next_token(inputs, targets, training)


# configs/tasks/fuzzy-in-context-recall.yml
FUZZY_RECALL = TokenTask(
    name="fuzzy_recall",
    defaults={"vocab_size": 16, "seq_len": 128, "k_motif_size": 3, "v_motif_size": 3,
              "multi_query": True, **NOISE, **COUNTS},
    generate=_in_chunks(_fuzzy),
    vocabulary=lambda settings: settings["vocab_size"],
    max_targets=lambda settings: settings["seq_len"],  # the training split scores all
    check=check_fuzzy,
    split_settings=_with_split,
)


# -- selective copying --------------------------------------------------------------------


def check_copying(settings: Mapping[str, Any]) -> None:
    length, copies = settings["seq_len"], settings["num_tokens_to_copy"]
    if copies < 1 or length <= 2 * copies + 1:
        raise ValueError(f"selective_copying: needs num_tokens_to_copy >= 1 and seq_len > "
                         f"2 * num_tokens_to_copy + 1; got {copies}, {length}")
    if settings["vocab_size"] < 3:
        raise ValueError("selective_copying: vocab_size must be >= 3 (data, blank, copy)")


def _selective_copying(count: int, settings: Mapping[str, Any], rng: np.random.Generator):
    """Selective copying; see the module docstring."""
    length, copies, vocab = (settings[key] for key in ("seq_len", "num_tokens_to_copy",
                                                       "vocab_size"))
    blank, copy, blanks = vocab - 2, vocab - 1, length - 2 * copies - 1
    rows = np.arange(count)
    data = rng.integers(0, vocab - 2, (count, copies))
    before = rng.integers(0, copies, (count, blanks))  # each blank goes before this data token
    ahead = np.bincount((rows[:, None] * copies + before).ravel(), minlength=count * copies)
    inputs = np.full((count, length), blank, np.int64)
    inputs[rows[:, None], np.arange(copies) + np.cumsum(ahead.reshape(count, copies), 1)] = data
    inputs[:, copies + blanks] = copy
    targets = np.full((count, length), UNSCORED, np.int64)
    targets[:, copies + blanks + 1:] = data
    return inputs, np.full(count, length), targets


# configs/tasks/selective-copying.yml
SELECTIVE_COPYING = TokenTask(
    name="selective_copying",
    defaults={"vocab_size": 16, "seq_len": 256, "num_tokens_to_copy": 16, **COUNTS},
    generate=_in_chunks(_selective_copying),
    vocabulary=lambda settings: settings["vocab_size"],
    max_targets=lambda settings: settings["num_tokens_to_copy"],
    check=check_copying,
)


# -- compression --------------------------------------------------------------------------


def check_compression(settings: Mapping[str, Any]) -> None:
    if settings["seq_len"] < 2:
        raise ValueError(f"compression: seq_len must be >= 2, got {settings['seq_len']}")
    _check_noise("compression", settings, below_one=False)
    if settings["vocab_size"] - 1 - settings["noise_vocab_size"] < 1:
        raise ValueError("compression: vocab_size leaves no plain token (after the compression "
                         "token and the noise tokens)")


def _compression(count: int, settings: Mapping[str, Any], rng: np.random.Generator):
    """Compression, its read-out as positions; see the module docstring."""
    length, token = settings["seq_len"], settings["vocab_size"] - 1
    plain = token - settings["noise_vocab_size"]
    sequence = rng.integers(0, plain, (count, length - 1))
    if settings["frac_noise"] > 0:
        noisy = rng.random(sequence.shape) < settings["frac_noise"]
        sequence = np.where(noisy, _noise_tokens(rng, sequence.shape, settings, plain), sequence)
    mad_input = np.concatenate([sequence, np.full((count, 1), token)], 1)
    inputs = np.concatenate([mad_input, np.full((count, length - 1), token)], 1)
    targets = np.concatenate([np.full((count, length - 1), UNSCORED), mad_input], 1)
    return inputs, np.full(count, 2 * length - 1), targets


# configs/tasks/compression.yml
COMPRESSION = TokenTask(
    name="compression",
    defaults={"vocab_size": 16, "seq_len": 32, **NOISE, **COUNTS},
    generate=_in_chunks(_compression),
    vocabulary=lambda settings: settings["vocab_size"],
    max_targets=lambda settings: settings["seq_len"],
    check=check_compression,
)


# -- memorization -------------------------------------------------------------------------


def check_memorization(settings: Mapping[str, Any]) -> None:
    _check_even_length("memorization", settings, 2)
    _check_noise("memorization", settings, below_one=False)
    keys, plain = _plain_split(settings["vocab_size"], 1, settings["noise_vocab_size"])
    _check_halves("memorization", keys, plain - keys)


def memory_table(settings: Mapping[str, Any]) -> np.ndarray:
    """int [keys]: the value of each key, one distinct value per key, drawn from `seed`
    alone (a stream apart from the splits'), so every split shares it."""
    keys, plain = _plain_split(settings["vocab_size"], 1, settings["noise_vocab_size"])
    rng = split_rng("memorization", settings["seed"], "key-value table")
    return rng.permutation(np.arange(keys, plain))[:keys]


def _memorization(count: int, settings: Mapping[str, Any], rng: np.random.Generator):
    """Memorization; see the module docstring."""
    keys_n, plain = _plain_split(settings["vocab_size"], 1, settings["noise_vocab_size"])
    slots, insert = settings["seq_len"] // 2, settings["vocab_size"] - 1
    noise = _noise_slots(rng, count, slots, settings["frac_noise"], keep_one=True)
    keys = rng.integers(0, keys_n, (count, slots))
    pairs = np.stack([keys, np.full_like(keys, insert)], -1)
    inputs = np.where(noise[..., None], _noise_tokens(rng, (count, slots, 2), settings, plain),
                      pairs).reshape(count, -1)
    targets = np.full((count, slots, 2), UNSCORED, np.int64)
    targets[..., 1] = np.where(noise, UNSCORED, memory_table(settings)[keys])
    return inputs, np.full(count, 2 * slots), targets.reshape(count, -1)


# configs/tasks/memorization.yml: 256 training examples (the test set keeps MADConfig's 1,280)
MEMORIZATION = TokenTask(
    name="memorization",
    defaults={"vocab_size": 256, "seq_len": 32, **NOISE, **COUNTS, "num_train": 256},
    generate=_in_chunks(_memorization),
    vocabulary=lambda settings: settings["vocab_size"],
    max_targets=lambda settings: settings["seq_len"] // 2,
    check=check_memorization,
)

TASKS = {task.name: task for task in (IN_CONTEXT_RECALL, FUZZY_RECALL, NOISY_RECALL,
                                      SELECTIVE_COPYING, COMPRESSION, MEMORIZATION)}
