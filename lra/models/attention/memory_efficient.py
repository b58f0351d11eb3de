"""Memory-efficient exact softmax attention: an online softmax over key chunks.

Rabe & Staats, 2021, "Self-attention Does Not Need O(n^2) Memory".
Extra shape letters: C = key chunk length, Q = query chunk length, N = number of chunks.

`blockwise_attention` is the computation itself, also for other families: it takes an
optional `BlockBias`, an additive logit bias that the caller computes for one (query
chunk, key chunk) pair at a time (fox.py: the forget gates' decay), so the bias never
exists as an L x L array either. Without one no term is added: `MemoryEfficientAttention`
is `blockwise_attention` without a bias.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import MASKED_LOGIT, to_chunks
from lra.models.attention import check_length
from lra.models.attention.sequence_parallel import (
    sequence_parallel_attention,
    splits_sequence,
)
from lra.models.attention.softmax import kv_cache_shapes


class MemoryEfficientAttention(nnx.Module):
    """Exactly softmax(q k^T / sqrt(D)) v, computed without any L x L array.

    Queries are split into chunks of Q (`lax.map`); for each query chunk a
    `lax.scan` over key chunks of C carries, in float32, the running max m, the
    running sum s = sum exp(logit - m) and the running weighted values
    a = sum exp(logit - m) v; each new chunk rescales them by exp(m_old - m_new).
    The output is a / s. The max is a stop-gradient (the output does not depend
    on it), and both the per-query-chunk function and the per-key-chunk step are
    `jax.checkpoint`ed, so the backward pass recomputes chunk logits instead of
    storing them. L is padded internally to multiples of the chunk lengths;
    padded keys get weight exactly 0, padded query rows are dropped.

    Masked (and, if causal, later) keys get a large negative logit, as in
    `softmax`, so a query row with no allowed key (only ever a masked row) stays
    finite: the plain average of all L values, exactly as `softmax`. Attention
    dropout needs the explicit probabilities, which never exist here:
    `dropout_rate` is accepted and ignored.

    Cost: O(B H L^2 D) time like softmax; memory O(B H Q C) for one chunk's
    logits plus O(B L H D) for inputs and outputs (the backward pass adds the
    carries of one query chunk, O(B Q H D L / C)).

    Inside a mesh context whose `seq` axis has more than one device the sequence is
    split over it and `sequence_parallel.sequence_parallel_attention` runs: ring attention
    by default, each travelling block's keys folded `chunk_size` at a time (logits
    [L/n x C] per step; `query_chunk_size` does not apply there); under the all-gather
    strategy the logits are [L/n x L]. Without a `seq` axis, or with one of size 1,
    nothing changes.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_len: int,
        causal: bool = False,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
        chunk_size: int = 128,
        query_chunk_size: int = 1024,
    ):
        """Stores the chunking.

        Args:
          num_heads: H (no parameters; sizes the `kv_cache`).
          head_dim: D (sizes the `kv_cache`).
          max_len: the longest length L.
          causal: if True, position i attends only to positions <= i.
          dropout_rate: ignored (no explicit probabilities).
          rngs: unused (no parameters, no dropout).
          chunk_size: C, keys per scan step (clipped to L).
          query_chunk_size: Q, queries per chunk (clipped to L).

        Raises:
          ValueError: for a bad option value.
        """
        del dropout_rate, rngs
        for name, size in (("chunk_size", chunk_size), ("query_chunk_size", query_chunk_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive int; got {size!r}")
        self.num_heads, self.head_dim, self.max_len = num_heads, head_dim, max_len
        self.causal = causal
        self.chunk_size = chunk_size
        self.query_chunk_size = query_chunk_size

    def kv_cache(self, batch_size: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """What causal decoding would carry (there is no `step`): as `softmax`, the keys
        and values of every earlier token, up to max_len."""
        return kv_cache_shapes(batch_size, self.max_len, self.num_heads, self.head_dim)

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """q, k, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D].

        Raises:
          ValueError: if L > max_len.
        """
        del deterministic
        check_length("memory_efficient", q.shape[1], self.max_len)
        if splits_sequence():
            return sequence_parallel_attention(q, k, v, mask, causal=self.causal,
                                               key_chunk=self.chunk_size)
        out_BxLxHxD = blockwise_attention(
            q, k, v, mask, causal=self.causal, chunk_size=self.chunk_size,
            query_chunk_size=self.query_chunk_size)
        return out_BxLxHxD.astype(q.dtype)


class BlockBias(NamedTuple):
    """An additive logit bias computed per (query chunk, key chunk) pair.

    `fn(query_side, key_side, qpos_Q, kpos_C)` returns the float32 bias [B, Q, H, C] that
    is added to the scaled logits q k^T / sqrt(D) of Q queries and C keys before masking
    (masked, later-if-causal and padded keys are then excluded whatever the bias). Its
    inputs are the query chunk's and the key chunk's slices of `query_side` and
    `key_side` (pytrees of [B, L, ...] arrays, cut along L like q and k, zero-padded) and
    the chunks' positions (int [Q], [C]; padded ones are >= L). `fn` must be a pure
    function of these: it is recomputed in the backward pass (`jax.checkpoint`).
    """

    fn: Callable[[Any, Any, jax.Array, jax.Array], jax.Array]
    query_side: Any
    key_side: Any


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    causal: bool,
    chunk_size: int,
    query_chunk_size: int,
    bias: BlockBias | None = None,
    query_offset: jax.Array | int = 0,
    key_length: int | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(D) [+ bias]) v by the online softmax (class docstring).

    The keys are at positions 0 .. K - 1 and the queries at query_offset + 0 .. L - 1:
    usually the same L tokens (K = L, offset 0); under sequence parallelism one device's
    queries against the whole gathered sequence (fox.py).

    Args:
      q: [B, L, H, D].
      k, v: [B, K, H, D].
      mask: [B, K] bool (True = real key) or None.
      causal: if True, position i attends only to positions <= i.
      chunk_size: C, keys per scan step (clipped to K).
      query_chunk_size: Q, queries per chunk (clipped to L).
      bias: an optional `BlockBias` (its query side [B, L, ...], key side [B, K, ...]);
        None adds nothing.
      query_offset: the position of q's first row (an int or a traced int scalar).
      key_length: keys at positions >= key_length are padding: weight 0 even in a row
        with no allowed key (whose output is the mean of the key_length values before
        them); default K.

    Returns:
      [B, L, H, D] float32.
    """
    batch, length = q.shape[:2]
    num_keys = k.shape[1]
    keep_BxK = jnp.ones((batch, num_keys), bool) if mask is None else mask.astype(bool)
    key_chunk, query_chunk = min(chunk_size, num_keys), min(query_chunk_size, length)
    k_NxBxCxHxD, kpos_NxC = _chunks(k, key_chunk)
    v_NxBxCxHxD, _ = _chunks(v, key_chunk)
    keep_NxBxC, _ = _chunks(keep_BxK, key_chunk)
    q_MxBxQxHxD, qpos_MxQ = _chunks(q, query_chunk)
    bias_fn, query_side, key_side = (None, None, None) if bias is None else bias
    query_side_M = jax.tree.map(lambda x: _chunks(x, query_chunk)[0], query_side)
    key_side_N = jax.tree.map(lambda x: _chunks(x, key_chunk)[0], key_side)
    attend = jax.checkpoint(
        functools.partial(_attend_query_chunk, causal=causal,
                          length=num_keys if key_length is None else key_length,
                          bias_fn=bias_fn),
        prevent_cse=False,
    )
    out_MxBxQxHxD = jax.lax.map(
        lambda xs: attend(*xs, k_NxBxCxHxD, v_NxBxCxHxD, keep_NxBxC, kpos_NxC, key_side_N),
        (q_MxBxQxHxD, qpos_MxQ + query_offset, query_side_M),
    )
    return jnp.moveaxis(out_MxBxQxHxD, 0, 1).reshape((batch, -1) + q.shape[2:])[:, :length]


def _chunks(x_BxLx: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """[B, L, ...] -> [N, B, size, ...] (zero/False padded) and positions [N, size]."""
    x_NxBxCx = to_chunks(x_BxLx, size)
    return x_NxBxCx, jnp.arange(x_NxBxCx.shape[0] * size).reshape(-1, size)


def _attend_query_chunk(
    q_BxQxHxD: jax.Array,
    qpos_Q: jax.Array,
    query_side: Any,
    k_NxBxCxHxD: jax.Array,
    v_NxBxCxHxD: jax.Array,
    keep_NxBxC: jax.Array,
    kpos_NxC: jax.Array,
    key_side_N: Any,
    *,
    causal: bool,
    length: int,
    bias_fn: Callable | None,
) -> jax.Array:
    """One query chunk against all key chunks (online softmax) -> float32 [B, Q, H, D];
    keys at positions >= `length` are padding.

    `query_side` / `key_side_N` are the `BlockBias` inputs of this query chunk and of
    every key chunk (None without a bias)."""
    batch, chunk, heads, dim = q_BxQxHxD.shape
    scale = dim**-0.5

    def step(carry, xs):
        max_BxQxH, sum_BxQxH, acc_BxQxHxD = carry
        k_BxCxHxD, v_BxCxHxD, keep_BxC, kpos_C, key_side = xs
        logits_BxQxHxC = jnp.einsum(
            "bqhd,bkhd->bqhk", q_BxQxHxD, k_BxCxHxD, preferred_element_type=jnp.float32
        ) * scale
        if bias_fn is not None:
            logits_BxQxHxC = logits_BxQxHxC + bias_fn(query_side, key_side, qpos_Q, kpos_C)
        keep = keep_BxC[:, None, None, :]
        if causal:
            keep = keep & (kpos_C[None, :] <= qpos_Q[:, None])[None, :, None, :]
        logits_BxQxHxC = jnp.where(keep, logits_BxQxHxC, MASKED_LOGIT)
        new_max_BxQxH = jax.lax.stop_gradient(
            jnp.maximum(max_BxQxH, logits_BxQxHxC.max(-1))
        )
        real_C = kpos_C < length  # padding: weight 0, even in rows with no allowed key
        weights_BxQxHxC = jnp.where(
            real_C, jnp.exp(logits_BxQxHxC - new_max_BxQxH[..., None]), 0.0
        )
        rescale_BxQxH = jnp.exp(max_BxQxH - new_max_BxQxH)
        sum_BxQxH = sum_BxQxH * rescale_BxQxH + weights_BxQxHxC.sum(-1)
        acc_BxQxHxD = acc_BxQxHxD * rescale_BxQxH[..., None] + jnp.einsum(
            "bqhk,bkhd->bqhd",
            weights_BxQxHxC.astype(v_BxCxHxD.dtype),
            v_BxCxHxD,
            preferred_element_type=jnp.float32,
        )
        return (new_max_BxQxH, sum_BxQxH, acc_BxQxHxD), None

    init = (  # made `like` q: inside `shard_map` they vary over the same axes as q
        jnp.full_like(q_BxQxHxD, MASKED_LOGIT, jnp.float32, shape=(batch, chunk, heads)),
        jnp.zeros_like(q_BxQxHxD, jnp.float32, shape=(batch, chunk, heads)),
        jnp.zeros_like(q_BxQxHxD, jnp.float32),
    )
    xs = (k_NxBxCxHxD, v_NxBxCxHxD, keep_NxBxC, kpos_NxC, key_side_N)
    (_, sum_BxQxH, acc_BxQxHxD), _ = jax.lax.scan(
        jax.checkpoint(step, prevent_cse=False), init, xs
    )
    return acc_BxQxHxD / sum_BxQxH[..., None]
