"""Local attention: contiguous, non-overlapping blocks, optionally seeing their neighbours."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import boolean
from lra.models.attention import blocks
from lra.models.attention.softmax import kv_cache_shapes


class LocalAttention(nnx.Module):
    """Softmax attention inside contiguous blocks of `block_size` tokens.

    Pattern (S = block_size, blocks of positions [nS, (n+1)S), the last one partial):
    query i attends to key j iff j is real and
      * overlap=False: j // S == i // S (its own block);
      * overlap=True: |j // S - i // S| <= 1 (its own, left and right blocks);
      * causal=True: additionally j <= i (so the right block drops out: within-block
        causal, plus the whole previous block when overlap=True).
    Blocks are contiguous (the original LRA reshape made strided ones). Any length
    works: L is padded internally to a multiple of S with masked padding.

    Cost: O(L * S * H * D) time and O(L * S * H) memory, times 3 (2 if causal) with
    overlap.
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
        overlap: bool = False,
    ):
        del max_len  # no parameters, no length-dependent state
        self.num_heads, self.head_dim = num_heads, head_dim
        self.causal = causal
        self.block_size = blocks.check_int("block_size", block_size, 1)
        self.overlap = boolean("overlap", overlap)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    @property
    def window(self) -> int:
        """The most keys a causal query sees: its block (block_size), and with `overlap`
        the previous block too (2 block_size)."""
        return self.block_size * (2 if self.overlap else 1)

    def kv_cache(self, batch_size: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """What causal decoding would carry (there is no `step`): the keys and values of
        the last `window` tokens, whatever the sequence length."""
        return kv_cache_shapes(batch_size, self.window, self.num_heads, self.head_dim)

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
        size = self.block_size
        n = blocks.num_blocks(length, size)
        offsets = (0,) if not self.overlap else (-1, 0) if self.causal else (-1, 0, 1)
        q_BxNxSxHxD = blocks.to_blocks(q, size)
        k_BxNxKxHxD = blocks.neighbours(blocks.to_blocks(k, size), offsets)
        v_BxNxKxHxD = blocks.neighbours(blocks.to_blocks(v, size), offsets)
        valid_BxNxS = blocks.valid_blocks(mask, batch, length, size)
        valid_BxNxK = blocks.neighbours(valid_BxNxS, offsets)
        pattern_NxSxK = blocks.neighbours_exist(n, size, offsets)[:, None, :]
        if self.causal:
            query_NxS = blocks.positions_NxS(n, size)
            key_NxK = blocks.neighbour_positions(n, size, offsets)
            pattern_NxSxK = pattern_NxSxK & (key_NxK[:, None, :] <= query_NxS[:, :, None])
        allowed = valid_BxNxK[:, :, None, None, :] & jnp.asarray(pattern_NxSxK)[None, :, None]
        drop = functools.partial(self.dropout, deterministic=deterministic)
        out_BxNxSxHxD = blocks.attend(
            q_BxNxSxHxD, [blocks.KeyGroup(k_BxNxKxHxD, v_BxNxKxHxD, allowed)], drop
        )
        return blocks.from_blocks(out_BxNxSxHxD, length)
