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
  i + n, i + 2n, ... Who applies them: whoever owns the token order of the whole model,
  once per batch, not the attention. A trainer that runs striped permutes the batch
  (tokens, mask, targets and the position ids that the embeddings and rotary read) with
  `to_striped` before placing it on the mesh, every layer then works in striped order
  (attention called with ``layout="striped"``), and per-token outputs go back with
  `from_striped`. The attention modules run the contiguous layout (their inputs are in
  token order); `ring_attention_sharded(..., layout="striped")` expects its inputs striped
  and returns its outputs striped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lra.models.attention.sequence_parallel import sequence_parallel_attention


def to_striped(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """Token order -> striped order along `axis`: the result's contiguous shard i of
    `num_shards` holds tokens i, i + n, i + 2n, ... (token t at shard t mod n, place t // n).

    Raises:
      ValueError: if `num_shards` does not divide the length.
    """
    length = _length(x, num_shards, axis)
    shape = x.shape[:axis] + (length // num_shards, num_shards) + x.shape[axis + 1:]
    return jnp.swapaxes(x.reshape(shape), axis, axis + 1).reshape(x.shape)


def from_striped(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """Striped order -> token order along `axis` (the inverse of `to_striped`).

    Raises:
      ValueError: if `num_shards` does not divide the length.
    """
    length = _length(x, num_shards, axis)
    shape = x.shape[:axis] + (num_shards, length // num_shards) + x.shape[axis + 1:]
    return jnp.swapaxes(x.reshape(shape), axis, axis + 1).reshape(x.shape)


def _length(x: jax.Array, num_shards: int, axis: int) -> int:
    length = x.shape[axis]
    if num_shards < 1 or length % num_shards:
        raise ValueError(f"the striped layout needs a length divisible by {num_shards} "
                         f"shards; got {length}")
    return length


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

    Returns:
      [B, L, H, D] in q's dtype.

    Raises:
      ValueError: no `seq` axis in `mesh`, an unknown strategy or layout, or a striped
        length that `seq` does not divide.
    """
    return sequence_parallel_attention(q, k, v, mask, causal=causal, kv_strategy=kv_strategy,
                                       layout=layout, mesh=mesh)
