"""Sparse Transformer "fixed" pattern (Child et al., 2019), bidirectional for encoders."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention import blocks


class SparseAttention(nnx.Module):
    """Softmax attention over the fixed pattern of the Sparse Transformer, blockwise.

    Pattern (S = block_size, c = num_summary; position j is a *summary* position iff
    j mod S >= S - c, i.e. one of the last c positions of its block, following the
    paper's A(2) = {j : j mod l in {t, ..., l}}, t = l - c): query i attends to key j
    iff j is real and
      * j // S == i // S (its own block), or
      * j is a summary position of any block (bidirectional: later blocks' summaries
        too; the original LRA harness masked this causally in an encoder);
      * causal=True: additionally j <= i (the paper's original, autoregressive pattern).
    L is padded to a multiple of S with masked padding, so a partial last block has
    summary positions only where its positions j mod S >= S - c exist.

    Computation: each query block takes one softmax over its own block (S keys) and the
    N * c summary keys of all blocks, where its own block's summaries are masked out of
    the summary group (they are already in the block): each key is counted once.
    Cost: O(L * (S + c * L / S) * H * D) time, O(L * (S + c * L / S) * H) memory.
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
        block_size: int = 50,
        num_summary: int = 10,
    ):
        del num_heads, head_dim, max_len  # no parameters, no length-dependent state
        self.causal = causal
        self.block_size = blocks.check_int("block_size", block_size, 1)
        self.num_summary = blocks.check_int("num_summary", num_summary, 1)
        if self.num_summary > self.block_size:
            raise ValueError(
                f"num_summary must be <= block_size={self.block_size}; got {num_summary!r}"
            )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """q, k, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D]."""
        batch, length = q.shape[:2]
        size, summary = self.block_size, self.num_summary
        n = blocks.num_blocks(length, size)
        q_BxNxSxHxD = blocks.to_blocks(q, size)
        k_BxNxSxHxD = blocks.to_blocks(k, size)
        v_BxNxSxHxD = blocks.to_blocks(v, size)
        valid_BxNxS = blocks.valid_blocks(mask, batch, length, size)
        query_NxS = blocks.positions_NxS(n, size)

        # Own block.
        own_SxS = np.ones((size, size), bool)
        if self.causal:
            own_SxS = np.tril(own_SxS)
        own = valid_BxNxS[:, :, None, None, :] & jnp.asarray(own_SxS)

        # Summary positions of all blocks, shared by every query block: [B, N * c, H, D].
        def summaries(x_BxNxSxZ):
            x = x_BxNxSxZ[:, :, size - summary :]
            return x.reshape(batch, n * summary, *x.shape[3:])

        # A query block's own summaries are already in its block: mask them here.
        summary_block_K = np.repeat(np.arange(n), summary)
        pattern_NxSxK = (summary_block_K[None, :] != np.arange(n)[:, None])[:, None, :]  # S: 1
        if self.causal:
            summary_K = query_NxS[:, size - summary :].reshape(-1)
            pattern_NxSxK = pattern_NxSxK & (summary_K[None, None, :] <= query_NxS[:, :, None])
        valid_BxK = summaries(valid_BxNxS)
        shared = valid_BxK[:, None, None, None, :] & jnp.asarray(pattern_NxSxK)[None, :, None]
        groups = [
            blocks.KeyGroup(k_BxNxSxHxD, v_BxNxSxHxD, own),
            blocks.KeyGroup(summaries(k_BxNxSxHxD), summaries(v_BxNxSxHxD), shared),
        ]
        drop = functools.partial(self.dropout, deterministic=deterministic)
        out_BxNxSxHxD = blocks.attend(q_BxNxSxHxD, groups, drop)
        return blocks.from_blocks(out_BxNxSxHxD, length)
