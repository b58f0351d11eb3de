"""Attention registry: every attention family behind one constructor, `make`.

Shape legend (used in names such as ``q_BxLxHxD``):
  B  batch
  L  sequence length (self-attention: queries and keys have the same length)
  H  heads (num_heads)
  D  per-head width (head_dim)
  E  model width (emb_dim)
  F  feature width of a kernel feature map
  C  chunk length

Contract for every family:
  ``core = make(name, num_heads=..., head_dim=..., max_len=..., rngs=...)`` is an
  ``nnx.Module`` called as ``core(q, k, v, mask=None, *, deterministic=True)`` with
  q, k, v ``[B, L, H, D]``, ``mask`` ``[B, L]`` bool (True = real token) or None,
  output ``[B, L, H, D]``.
  Masking rule: values at masked key positions never change an output at a real
  position; masked query rows give finite values (which the encoder never pools).
  ``dropout_rate`` is dropout on the attention probabilities where the family has
  explicit probabilities; every family accepts it. Dropout randomness comes from
  the module's own ``dropout`` rng stream (reseeded with ``nnx.reseed``).

Adding a family is one file plus one line in ``_FAMILIES``. The file defines a
class whose constructor takes only keyword arguments:
``__init__(self, *, num_heads, head_dim, max_len, causal, dropout_rate, rngs,
<family options, each with a default>)``. The family options are read from that
signature, so they are listed in one place only. Closed choices are `lra.common.Choice` enums; other
options are checked with `positive_int`, `real_number` and `boolean` (families and the
sequence mixers alike), each error naming the option.
"""

from __future__ import annotations

import importlib
import inspect

from flax import nnx

# name -> "module:Class", the module relative to this package; imported on first use.
_FAMILIES: dict[str, str] = {
    # exact
    "softmax": "softmax:SoftmaxAttention",
    "memory_efficient": "memory_efficient:MemoryEfficientAttention",
    "fox": "fox:FoxAttention",  # softmax + forget-gate decay (Lin et al., 2025)
    # sparse patterns, computed on the blocks they attend to
    "local": "local:LocalAttention",
    "sparse": "sparse:SparseAttention",
    "longformer": "longformer:LongformerAttention",
    "bigbird": "bigbird:BigBirdAttention",
    # low rank / learned patterns
    "linformer": "linformer:LinformerAttention",
    "nystromformer": "nystromformer:NystromformerAttention",
    "synthesizer": "synthesizer:SynthesizerAttention",
    # hashing and sorting
    "reformer": "reformer:ReformerAttention",
    "sinkhorn": "sinkhorn:SinkhornAttention",
    # kernelized: a feature map plugged into the one linear-attention core (linear.py)
    "linear": "linear:LinearAttention",
    "performer": "performer:PerformerAttention",
    "cosformer": "cosformer:CosformerAttention",
    "taylor": "taylor:TaylorAttention",
    # gated linear attention: a decay plugged into the gated core (gated.py)
    "retnet": "retnet:RetNetAttention",
    "gla": "gla:GlaAttention",
    "ssd": "ssd:SsdAttention",  # Mamba2's SSD core; the whole block is the mixer `mamba2`
    # delta rule: fast weights corrected by error, not summed (delta.py)
    "deltanet": "delta:DeltaNetAttention",
    "gated_deltanet": "delta:GatedDeltaNetAttention",
    "kda": "kda:KdaAttention",  # Kimi Delta Attention: a decay per key channel
    "gated_deltaproduct": "deltaproduct:GatedDeltaProductAttention",  # n_h delta steps per token
}

NAMES: tuple[str, ...] = tuple(_FAMILIES)

# Keyword arguments that `make` passes to every family; the rest are family options.
_COMMON = frozenset(
    {"num_heads", "head_dim", "max_len", "causal", "dropout_rate", "rngs"}
)


def check_length(family: str, length: int, max_len: int) -> None:
    """Raises ValueError when a sequence is longer than the `max_len` a core was built for."""
    if length > max_len:
        raise ValueError(f"{family}: sequence length {length} exceeds max_len={max_len}")


def _family(name: str) -> type[nnx.Module]:
    if name not in _FAMILIES:
        raise ValueError(
            f"unknown attention {name!r}; known attentions: {', '.join(NAMES)}"
        )
    module_name, class_name = _FAMILIES[name].split(":")
    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, class_name)


def family_options(name: str) -> tuple[str, ...]:
    """Returns the names of the options that attention `name` accepts in `make`.

    Args:
      name: one of `NAMES`.

    Returns:
      The family's keyword-only constructor parameters beyond the common ones.

    Raises:
      ValueError: if `name` is not a known attention.
    """
    parameters = inspect.signature(_family(name).__init__).parameters.values()
    return tuple(
        p.name
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _COMMON
    )


def default_options(name: str) -> dict:
    """The options of attention `name` with their defaults, e.g. for a config file.

    Configs start `config.model.attention_options` from this, so every option shows in
    the resolved config.json and can be set from the command line
    (`--config.model.attention_options.<option>=...`).
    """
    parameters = inspect.signature(_family(name).__init__).parameters
    return {
        option: getattr(parameters[option].default, "value", parameters[option].default)
        for option in family_options(name)
    }


def make(
    name: str,
    *,
    num_heads: int,
    head_dim: int,
    max_len: int,
    causal: bool = False,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs,
    **options,
) -> nnx.Module:
    """Builds the attention core of family `name`.

    Args:
      name: one of `NAMES`.
      num_heads: H.
      head_dim: D.
      max_len: the longest sequence length L the core will see.
      causal: if True, position i attends only to positions <= i.
      dropout_rate: dropout on the attention probabilities (families that have
        explicit probabilities); ignored when called with deterministic=True.
      rngs: streams ``params`` (for families with parameters) and ``dropout``.
      **options: family-specific options; see `family_options(name)`.

    Returns:
      An ``nnx.Module`` called as ``core(q, k, v, mask=None, *, deterministic=True)``;
      see the module docstring for shapes and the masking rule.

    Raises:
      ValueError: for an unknown name, an unknown option, or a bad option value.
    """
    family = _family(name)
    accepted = family_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"attention {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'no options'}"
        )
    return family(
        num_heads=num_heads,
        head_dim=head_dim,
        max_len=max_len,
        causal=causal,
        dropout_rate=dropout_rate,
        rngs=rngs,
        **options,
    )
