"""Mixer registry: the token-mixing layer of an encoder block, chosen by one name.

A mixer maps the (normalised) block input x [B, L, E] and the mask [B, L] to [B, L, E];
the block adds it to x (pre-norm residual) and, if `mlp_dim > 0`, follows it with the
MLP sub-block. Two kinds share one name space (`NAMES`):

- every attention family of `lra.models.attention` (`ATTENTION_NAMES`): the mixer is
  q, k, v projections + that attention core + the output projection
  (`MultiHeadAttention`), as in a Transformer;
- the sequence models of this package (`SEQUENCE_NAMES`: S4D, S5, LRU, the Mamba2
  block, RWKV-7's time mixing), which take x and the mask directly.

A name means one model: no attention family may share a name with a sequence model
(importing this package raises otherwise), so `mamba2` is the whole Mamba2 block and `ssd`
its SSD core in the attention wrapper. `kind(name)` says which of the two a mixer is;
lra.training.train records it in results.json (`mixer_kind`).

Contract of a sequence model (one file each, one line in `_SEQUENCE_MODELS`): a class
whose constructor takes only keyword arguments,
``__init__(self, *, emb_dim, max_len, causal, dropout, dtype, rngs, <options with
defaults>)``, called as ``model(x_BxLxE, mask_BxL, *, deterministic) -> y_BxLxE``.
Values at masked positions never change an output at a real position (outputs and
gradients, both directions); a causal model defines ``init_state(batch_size)`` and
``step(state, x_BxE, mask_B, position) -> (state, y_BxE)`` equal to the full pass.
A class attribute `block_mlp = False` says its paper's block has no MLP sub-block (the
configs' default of `model.block_mlp`). Parameters that the papers train with their own
learning rate and no weight decay
(Lambda, B, dt, ...) are `ssm.SsmParam`s (lra.training.train gives them `config.ssm_learning_rate`).

State size (`state_size`): the bytes per layer and sequence that a causal mixer carries
from one token to the next when it decodes, read from the shapes of what it carries, never
from a table: a mixer that decodes (`init_state` / `step`: the linear, gated and delta-rule
cores in the attention wrapper, and the sequence models) carries `init_state(1)`; an
attention core without `step` may say what decoding it would carry with
``kv_cache(batch_size)`` (shapes; softmax and memory_efficient: the keys and values of
every earlier token, local: of its window). A mixer with neither has no state size.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models import attention
from lra.models.mixers.multi_head import MultiHeadAttention

# name -> "module:Class", the module relative to this package; imported on first use.
_SEQUENCE_MODELS: dict[str, str] = {
    "s4d": "s4d:S4D",
    "s5": "s5:S5",
    "lru": "lru:LRU",
    "mamba2": "mamba2:Mamba2Block",
    "rwkv7": "rwkv7:Rwkv7TimeMix",
}

# The two kinds of mixer (`kind`), as results.json's `mixer_kind` records them.
ATTENTION, SEQUENCE = "attention", "sequence"


def merge_names(attention_names: tuple[str, ...],
                sequence_names: tuple[str, ...]) -> tuple[str, ...]:
    """The one mixer name space: attention families, then sequence models.

    Raises:
      ValueError: a name is both an attention family and a sequence model (one name would
        build two different models, and a run's name would not say which one ran).
    """
    shared = sorted(set(attention_names) & set(sequence_names))
    if shared:
        raise ValueError(f"mixer name(s) {', '.join(shared)} name both an attention family "
                         "and a sequence model; rename one of them")
    return tuple(attention_names) + tuple(sequence_names)


SEQUENCE_NAMES: tuple[str, ...] = tuple(_SEQUENCE_MODELS)
ATTENTION_NAMES: tuple[str, ...] = attention.NAMES
NAMES: tuple[str, ...] = merge_names(ATTENTION_NAMES, SEQUENCE_NAMES)

# Keyword arguments that `make` passes to every sequence model; the rest are options.
_COMMON = frozenset({"emb_dim", "max_len", "causal", "dropout", "dtype", "rngs"})


def is_attention(name: str) -> bool:
    """True if mixer `name` is an attention family (projections + core)."""
    _check(name)
    return name in ATTENTION_NAMES


def kind(name: str) -> str:
    """Which kind of model mixer `name` builds (results.json's `mixer_kind`).

    Args:
      name: one of `NAMES`.

    Returns:
      `ATTENTION` ("attention": the attention core `name` in the attention wrapper) or
      `SEQUENCE` ("sequence": the sequence model `name`).

    Raises:
      ValueError: for an unknown name.
    """
    return ATTENTION if is_attention(name) else SEQUENCE


def describe(name: str) -> str:
    """Which model mixer `name` builds, in words (e.g. for a report)."""
    if is_attention(name):
        return (f"attention core {name!r} in the attention wrapper (q/k/v and output "
                "projections)")
    return f"sequence model {name!r}"


def _check(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown mixer {name!r}; known mixers: {', '.join(NAMES)}")


def _sequence_model(name: str) -> type:
    module_name, class_name = _SEQUENCE_MODELS[name].split(":")
    return getattr(importlib.import_module(f".{module_name}", __name__), class_name)


def family_options(name: str) -> tuple[str, ...]:
    """The options mixer `name` accepts (an attention family's, or the model's own)."""
    if is_attention(name):
        return attention.family_options(name)
    parameters = inspect.signature(_sequence_model(name).__init__).parameters.values()
    return tuple(p.name for p in parameters
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _COMMON)


def default_options(name: str) -> dict:
    """The options of mixer `name` with their defaults (configs start from these)."""
    if is_attention(name):
        return attention.default_options(name)
    parameters = inspect.signature(_sequence_model(name).__init__).parameters
    return {option: getattr(parameters[option].default, "value", parameters[option].default)
            for option in family_options(name)}


def default_block_mlp(name: str) -> bool:
    """Whether the paper's block has an MLP sub-block after mixer `name` (configs' default
    of `model.block_mlp`): True for attention, a sequence model's `block_mlp` attribute."""
    return is_attention(name) or getattr(_sequence_model(name), "block_mlp", True)


def make(
    name: str,
    *,
    emb_dim: int,
    qkv_dim: int,
    num_heads: int,
    max_len: int,
    dropout: float,
    attention_dropout: float,
    causal: bool = False,
    rotary: bool = False,
    dtype: Any,
    rngs: nnx.Rngs,
    **options,
) -> nnx.Module:
    """Builds mixer `name`: x [B, L, E], mask [B, L] -> [B, L, E].

    Args:
      name: one of `NAMES`.
      emb_dim: E.
      qkv_dim, num_heads, attention_dropout: used by attention mixers only.
      max_len: the longest sequence the mixer will see.
      dropout: dropout on the mixer's output (and inside it where its paper has it).
      causal: if True, position i sees only positions <= i.
      rotary: rotary positions on q and k (attention mixers only; lra/models/rotary.py).
      dtype: compute dtype; parameters stay float32.
      rngs: streams ``params`` and ``dropout``.
      **options: the mixer's options; see `family_options(name)`.

    Raises:
      ValueError: for an unknown name, an unknown option or a bad option value.
    """
    _check(name)
    if is_attention(name):
        return MultiHeadAttention(
            emb_dim=emb_dim, qkv_dim=qkv_dim, num_heads=num_heads, max_len=max_len,
            dropout=dropout, attention_dropout=attention_dropout, attention=name,
            attention_options=options, causal=causal, rotary=rotary, dtype=dtype, rngs=rngs)
    if rotary:
        raise ValueError(f"positions='rope' rotates attention queries and keys; mixer {name!r} "
                         "has none (sequence models encode order themselves: use "
                         "positions='none')")
    accepted = family_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"mixer {name!r} got unknown option(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(accepted) or 'no options'}")
    return _sequence_model(name)(emb_dim=emb_dim, max_len=max_len, causal=causal,
                                 dropout=dropout, dtype=dtype, rngs=rngs, **options)


class StateSize(NamedTuple):
    """What a causal mixer carries from one token to the next when it decodes, per layer
    and per sequence (`state_size`)."""

    bytes: int
    grows_with_length: bool  # True for a cache of every earlier token (exact attention)


def state_size(name: str, *, emb_dim: int, qkv_dim: int, num_heads: int, max_len: int,
               options: Mapping[str, Any] | None = None) -> StateSize:
    """The decoding state of mixer `name` built causal, in float32 (module docstring).

    Args:
      name: one of `NAMES`.
      emb_dim, qkv_dim, num_heads, max_len: as for `make`; a cache of every earlier token
        holds max_len of them.
      options: the mixer's options (defaults where not given).

    Returns:
      `StateSize`: the bytes of the arrays carried (`init_state(1)`, or the core's
      `kv_cache(1)`), and whether they grow with the sequence length, i.e. are larger when
      the mixer is built for 2 max_len (measured, not declared). Computed abstractly:
      nothing is allocated.

    Raises:
      ValueError: naming the mixer, if it cannot be built causal (no causal form, or a
        bad option) or carries nothing it can name (neither `step` nor `kv_cache`).
    """
    carried = lambda length: _carried_bytes(
        name, emb_dim=emb_dim, qkv_dim=qkv_dim, num_heads=num_heads, max_len=length,
        **dict(options or {}))
    size = carried(max_len)
    return StateSize(size, carried(2 * max_len) > size)


def _carried_bytes(name: str, **settings) -> int:
    """Bytes of what mixer `name`, built causal with `settings`, carries per sequence."""
    try:
        mixer = nnx.eval_shape(lambda: make(
            name, causal=True, dropout=0.0, attention_dropout=0.0, dtype=jnp.float32,
            rngs=nnx.Rngs(0), **settings))
    except ValueError as error:
        raise ValueError(f"state_size: mixer {name!r} cannot be built causal: {error}") from error
    if getattr(mixer, "decodes", False):
        shapes = nnx.eval_shape(lambda built: built.init_state(1), mixer)
    else:
        cache = getattr(mixer, "kv_cache", None)
        shapes = None if cache is None else cache(1)
    if shapes is None:
        raise ValueError(f"state_size: mixer {name!r} defines no decoding state (neither "
                         "init_state / step nor a kv_cache)")
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(shapes))
