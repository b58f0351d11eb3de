"""BigBird block-sparse attention, ITC variant (Zaheer et al., 2020)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention import blocks, check_length


class RandomBlocks(nnx.Variable):
    """Non-trainable block indices [H, N_max, R]: the random key blocks of each query block."""


class BigBirdAttention(nnx.Module):
    """Block-sparse softmax attention: window + global + random blocks (BigBird-ITC).

    Pattern (b = block_size; block n holds positions [nb, (n+1)b), L padded to N * b
    with masked padding; the global blocks are the first and the last, {0, N-1}):
    query i in block n attends to key j in block m, with j real, iff
      * n is global (global blocks attend to everything), or
      * m is global (everything attends to the global blocks), or
      * |m - n| <= 1 (3 window blocks: own, left, right), or
      * m is one of the random blocks R[h, n] of head h (`num_random_blocks` per
        query block and head, drawn once at init from the `params` stream as in the
        original implementation: distinct and outside n's window and global blocks for
        the N_max = ceil(max_len / b) blocks of max_len; a shorter input keeps those
        still inside it that are not window or global blocks at its own N).
    With N <= 2 every block is global: full attention. causal=True is not supported
    (ValueError): global blocks see the whole sequence by definition.

    Computation: the rows of the 2 global blocks take full attention, O(b * L); every
    other query block takes one softmax over its gathered blocks only (3 window, 2
    global, R random), with window blocks that are global and random blocks that repeat
    an earlier block masked so each key counts once. Cost O(L * (5 + R) * b * H * D)
    time and O(L * (5 + R) * b * H) memory, plus O(b * L) for the global rows.
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
        block_size: int = 64,
        num_random_blocks: int = 3,
    ):
        del head_dim  # no parameters
        if causal:
            raise ValueError(
                "bigbird attention does not support causal=True: its global blocks "
                "attend to and are attended by the whole sequence"
            )
        self.block_size = blocks.check_int("block_size", block_size, 1)
        self.num_random_blocks = blocks.check_int("num_random_blocks", num_random_blocks, 0)
        self.max_len = max_len
        self.random_blocks = RandomBlocks(
            _draw_random_blocks(
                rngs.params(),
                num_heads,
                blocks.num_blocks(max_len, self.block_size),
                self.num_random_blocks,
            )
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
        check_length("bigbird", length, self.max_len)
        size = self.block_size
        n = blocks.num_blocks(length, size)
        drop = functools.partial(self.dropout, deterministic=deterministic)
        q_BxNxSxHxD = blocks.to_blocks(q, size)
        k_BxNxSxHxD = blocks.to_blocks(k, size)
        v_BxNxSxHxD = blocks.to_blocks(v, size)
        valid_BxNxS = blocks.valid_blocks(mask, batch, length, size)
        global_blocks = [0, n - 1] if n > 1 else [0]

        # Global query blocks: full attention over all (real) keys.
        def flat(x_BxNxSxZ):
            return x_BxNxSxZ.reshape(batch, -1, *x_BxNxSxZ.shape[3:])

        out_global = blocks.attend(
            q_BxNxSxHxD[:, global_blocks],
            [
                blocks.KeyGroup(
                    flat(k_BxNxSxHxD),
                    flat(v_BxNxSxHxD),
                    flat(valid_BxNxS)[:, None, None, None, :],
                )
            ],
            drop,
        )
        if n <= 2:
            return blocks.from_blocks(out_global, length)

        # Middle query blocks 1..N-2 (M of them): window, global and random key blocks.
        offsets = (-1, 0, 1)
        window_key_block_MxK = blocks.neighbour_positions(n, size, offsets)[1:-1] // size
        window_MxK = (window_key_block_MxK != 0) & (window_key_block_MxK != n - 1)
        groups = [
            blocks.KeyGroup(
                blocks.neighbours(k_BxNxSxHxD, offsets)[:, 1:-1],
                blocks.neighbours(v_BxNxSxHxD, offsets)[:, 1:-1],
                blocks.neighbours(valid_BxNxS, offsets)[:, 1:-1, None, None, :]
                & jnp.asarray(window_MxK)[None, :, None, None, :],
            ),
            blocks.KeyGroup(
                flat(k_BxNxSxHxD[:, global_blocks]),
                flat(v_BxNxSxHxD[:, global_blocks]),
                flat(valid_BxNxS[:, global_blocks])[:, None, None, None, :],
            ),
        ]
        if self.num_random_blocks:
            groups.append(self._random_group(k_BxNxSxHxD, v_BxNxSxHxD, valid_BxNxS))
        out_middle = blocks.attend(q_BxNxSxHxD[:, 1:-1], groups, drop)
        out_BxNxSxHxD = jnp.concatenate(
            [out_global[:, :1], out_middle, out_global[:, 1:]], axis=1
        )
        return blocks.from_blocks(out_BxNxSxHxD, length)

    def _random_group(
        self, k_BxNxSxHxD: jax.Array, v_BxNxSxHxD: jax.Array, valid_BxNxS: jax.Array
    ) -> blocks.KeyGroup:
        """The random key blocks of middle query blocks, gathered per head."""
        batch, n, size, heads = k_BxNxSxHxD.shape[:4]
        idx_HxMxR = self.random_blocks[...][:, 1 : n - 1].astype(jnp.int32)
        query_1xMx1 = jnp.arange(1, n - 1)[None, :, None]
        usable_HxMxR = (
            (idx_HxMxR >= 1) & (idx_HxMxR <= n - 2) & (jnp.abs(idx_HxMxR - query_1xMx1) > 1)
        )
        repeats_HxMxRxR = idx_HxMxR[..., :, None] == idx_HxMxR[..., None, :]
        earlier_RxR = jnp.tril(jnp.ones(repeats_HxMxRxR.shape[-2:], bool), k=-1)
        usable_HxMxR = usable_HxMxR & ~jnp.any(repeats_HxMxRxR & earlier_RxR, axis=-1)
        idx_HxMxR = jnp.clip(idx_HxMxR, 0, n - 1)
        head_Hx1x1 = jnp.arange(heads)[:, None, None]

        def gather(x_BxNxSxHxD):  # -> [B, M, R * S, H, D]
            x_BxHxMxRxSxD = jnp.moveaxis(x_BxNxSxHxD, 3, 1)[:, head_Hx1x1, idx_HxMxR]
            x_BxMxRxSxHxD = jnp.moveaxis(x_BxHxMxRxSxD, 1, 4)
            return x_BxMxRxSxHxD.reshape(batch, n - 2, -1, heads, x_BxNxSxHxD.shape[-1])

        valid_BxHxMxRxS = valid_BxNxS[:, idx_HxMxR] & jnp.repeat(
            usable_HxMxR[..., None], size, axis=-1
        )[None]
        valid_BxMxHxK = jnp.moveaxis(valid_BxHxMxRxS, 1, 2).reshape(batch, n - 2, heads, -1)
        return blocks.KeyGroup(
            gather(k_BxNxSxHxD), gather(v_BxNxSxHxD), valid_BxMxHxK[:, :, :, None, :]
        )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_random_blocks(key: jax.Array, heads: int, n: int, count: int) -> jax.Array:
    """[heads, n, count] int32: per head and query block, `count` distinct random blocks.

    Drawn (traceably, so init may run under jit) from blocks other than the query block's
    window (n-1, n, n+1) and the global blocks (0, N-1); where fewer remain, the rest
    are copies of block 0, which the attention masks as a duplicate of a global block.
    """
    blocks_N = jnp.arange(n)
    excluded_NxN = (
        (jnp.abs(blocks_N[None, :] - blocks_N[:, None]) <= 1)
        | (blocks_N[None, :] == 0)
        | (blocks_N[None, :] == n - 1)
    )
    scores_HxNxN = jax.random.uniform(key, (heads, n, n))
    scores_HxNxN = jnp.where(excluded_NxN, 2.0, scores_HxNxN)  # excluded sort last
    order_HxNxN = jnp.argsort(scores_HxNxN, axis=-1).astype(jnp.int32)
    drawn = min(count, n)
    picks_HxNxC = order_HxNxN[:, :, :drawn]
    candidates_N = jnp.sum(~excluded_NxN, axis=-1)
    picks_HxNxC = jnp.where(jnp.arange(drawn) < candidates_N[:, None], picks_HxNxC, 0)
    return jnp.pad(picks_HxNxC, ((0, 0), (0, 0), (0, count - drawn)))
