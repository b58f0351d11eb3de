"""Sequence parallelism for exact attention: global arrays on a mesh with a `seq` axis.

The attention itself (ring and all-gather, the online softmax, the module hook) lives with
the attention it computes, `lra.models.attention.sequence_parallel` (module docstring there): the
attention modules must run it when they find a `seq` axis in the mesh in context, and
lra.models may not import this package. Here is what works on whole (global) arrays:

- `ring_attention_sharded`: exact softmax attention of global q, k, v [B, L, H, D] and
  mask [B, L] on an explicit mesh, the batch split over its other axes (data, fsdp) and
  the length over `seq`; `kv_strategy` ``"ring"`` (default) or ``"all_gather"``.
- `to_striped` / `from_striped`: the permutation between token order and the striped
  layout (Brandon et al., 2023), where a length-split array's device i holds tokens i,
  i + n, i + 2n, ... `ring_attention_sharded(..., layout="striped")` expects its inputs
  striped and returns its outputs striped. A whole model runs striped with
  `config.seq_layout="striped"` (`sequence_parallel.use_seq_layout`): the encoder stripes
  its embedded sequence once, its blocks run in that order (attention with the striped
  positions, rotary angles from them) and it restores token order after the last block.
"""

from __future__ import annotations

import jax

from lra.models.attention.sequence_parallel import (  # noqa: F401  (re-exported)
    from_striped,
    sequence_parallel_attention,
    to_striped,
)


def ring_attention_sharded(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    causal: bool,
    mesh: jax.sharding.Mesh,
    kv_strategy: str = "ring",
    layout: str = "contiguous",
    key_chunk: int | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v over real (and, if causal, earlier) keys, on `mesh`.

    Runs `sequence_parallel_attention` under `jax.shard_map` over `mesh`: the batch split
    over the mesh's axes other than `seq` (when they divide it), the length over `seq`.
    Results equal `SoftmaxAttention`'s xla path up to float rounding, rows with no allowed
    key included (the plain average of all L values).

    Args:
      q, k, v: [B, L, H, D] global arrays (any sharding; `PartitionSpec(("data", "fsdp"),
        "seq")` needs no movement), in `layout`'s order.
      mask: [B, L] bool (True = real token) or None, in `layout`'s order.
      causal: if True, token t attends only to tokens <= t (token positions, whatever the
        layout).
      mesh: a mesh with a `seq` axis.
      kv_strategy: ``"ring"`` (default: blocks pass around the ring, `jax.lax.ppermute`;
        logits [L/n x L/n] per step) or ``"all_gather"`` (keys and values gathered whole;
        logits [L/n x L]).
      layout: ``"contiguous"`` (token order; a length that `seq` does not divide is padded
        inside) or ``"striped"`` (inputs from `to_striped`; outputs striped too).
      key_chunk: the ring folds each block's keys this many at a time (None: whole
        blocks; the all-gather strategy ignores it).

    Returns:
      [B, L, H, D] in q's dtype.

    Raises:
      ValueError: no `seq` axis in `mesh`, an unknown strategy or layout, or a striped
        length that `seq` does not divide.
    """
    return sequence_parallel_attention(q, k, v, mask, causal=causal, kv_strategy=kv_strategy,
                                       layout=layout, mesh=mesh, key_chunk=key_chunk)
