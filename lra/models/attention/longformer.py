"""Longformer attention (Beltagy et al., 2020): sliding window plus global tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.common import boolean
from lra.models.attention import blocks


class LongformerAttention(nnx.Module):
    """Sliding-window softmax attention plus symmetric global attention.

    Pattern (w = window, G = global_positions): query i attends to key j iff j is real
    and
      * |i - j| <= w / 2 (w / 2 tokens on each side plus i itself), or
      * i is in G (a global query attends to every real token), or
      * j is in G (every query attends to the global tokens);
      * causal=True: additionally j <= i (left half-window only; a global query sees
        every earlier token, a global key is seen by every later query).

    Computation, O(L * w) time and memory (no L x L mask): the band uses blocks of
    S = w / 2 tokens (S = L when L < w / 2); a query block attends to its own and its
    two neighbouring blocks (the left one only if causal) with the exact band mask
    applied inside, and to the G global keys in the same softmax; global keys are
    masked out of the band so each counts once. The rows of the global queries are
    then recomputed with full attention over all keys, O(|G| * L).

    ``global_projections=True`` gives the global attention projections of its own, as
    in the Longformer paper (separate Q_g, K_g, V_g) and LRA's code: the rows of the
    global queries then use q_g = q A_q, k_g = k A_k, v_g = v A_v, with learned
    per-head maps A_q, A_k, A_v [H, D, D] (initialised N(0, 1/D), so the scale of q is
    kept); every other row, including its attention to the global keys, uses q, k, v
    as given (as in the paper and LRA). Relation to LRA's separate Dense projections of
    x: the core receives q = x W_q (per head, W_q [E, D]), so q_g = x (W_q A_q), a Dense
    projection of x whose matrix is restricted to W_q A_q, i.e. to the D-dimensional
    column space of W_q, instead of a free [E, D] matrix (likewise for k and v); with
    E = D per head (one head of full width) and W_q invertible the two are the same
    family of maps. Parameters: 3 H D^2. Without global positions the maps are unused.
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
        window: int = 512,
        global_positions: tuple[int, ...] = (0,),
        global_projections: bool = False,
    ):
        self.causal = causal
        self.global_projections = boolean("global_projections", global_projections)
        if self.global_projections:
            init = nnx.initializers.normal(head_dim**-0.5)
            shape = (num_heads, head_dim, head_dim)
            self.global_q_HxDxD = nnx.Param(init(rngs.params(), shape))
            self.global_k_HxDxD = nnx.Param(init(rngs.params(), shape))
            self.global_v_HxDxD = nnx.Param(init(rngs.params(), shape))
        self.window = blocks.check_int("window", window, 2)
        if self.window % 2:
            raise ValueError(f"window must be even (half on each side); got {window!r}")
        if isinstance(global_positions, (str, bytes)) or not hasattr(
            global_positions, "__iter__"
        ):
            raise ValueError(
                f"global_positions must be a tuple of ints; got {global_positions!r}"
            )
        positions = tuple(
            blocks.check_int("global_positions", p, 0) for p in global_positions
        )
        if len(set(positions)) != len(positions) or any(p >= max_len for p in positions):
            raise ValueError(
                f"global_positions must be distinct and < max_len={max_len}; "
                f"got {global_positions!r}"
            )
        self.global_positions = tuple(sorted(positions))
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
        g_G = np.asarray(self.global_positions, int)
        if len(g_G) and g_G.max() >= length:
            raise ValueError(
                f"global_positions {self.global_positions} must be < the length {length}"
            )
        half = self.window // 2
        size = min(half, length)
        n = blocks.num_blocks(length, size)
        offsets = (-1, 0) if self.causal else (-1, 0, 1)
        drop = functools.partial(self.dropout, deterministic=deterministic)
        if mask is None:
            mask = jnp.ones((batch, length), bool)
        mask = mask.astype(bool)

        # Band (minus global keys) + global keys, for every query block.
        q_BxNxSxHxD = blocks.to_blocks(q, size)
        k_BxNxKxHxD = blocks.neighbours(blocks.to_blocks(k, size), offsets)
        v_BxNxKxHxD = blocks.neighbours(blocks.to_blocks(v, size), offsets)
        valid_BxNxK = blocks.neighbours(blocks.to_blocks(mask, size), offsets)
        query_NxSx1 = blocks.positions_NxS(n, size)[:, :, None]
        key_Nx1xK = blocks.neighbour_positions(n, size, offsets)[:, None, :]
        band_NxSxK = (
            blocks.neighbours_exist(n, size, offsets)[:, None, :]
            & (np.abs(key_Nx1xK - query_NxSx1) <= half)
            & ~np.isin(key_Nx1xK, g_G)
        )
        if self.causal:
            band_NxSxK = band_NxSxK & (key_Nx1xK <= query_NxSx1)
        groups = [
            blocks.KeyGroup(
                k_BxNxKxHxD,
                v_BxNxKxHxD,
                valid_BxNxK[:, :, None, None, :] & jnp.asarray(band_NxSxK)[None, :, None],
            )
        ]
        if len(g_G):
            to_global_NxSxG = np.ones((1, 1, len(g_G)), bool)
            if self.causal:
                to_global_NxSxG = g_G[None, None, :] <= query_NxSx1
            groups.append(
                blocks.KeyGroup(
                    k[:, g_G],
                    v[:, g_G],
                    mask[:, g_G][:, None, None, None, :]
                    & jnp.asarray(to_global_NxSxG)[None, :, None],
                )
            )
        out_BxLxHxD = blocks.from_blocks(blocks.attend(q_BxNxSxHxD, groups, drop), length)
        if not len(g_G):
            return out_BxLxHxD

        # Global queries: full attention over every real (earlier, if causal) key.
        full_GxL = np.ones((len(g_G), length), bool)
        if self.causal:
            full_GxL = np.arange(length)[None, :] <= g_G[:, None]
        allowed = mask[:, None, None, None, :] & jnp.asarray(full_GxL)[None, None, None]
        q_BxGxHxD = q[:, g_G]
        if self.global_projections:
            q_BxGxHxD, k, v = (
                jnp.einsum("blhd,hde->blhe", x, a[...].astype(x.dtype))
                for x, a in ((q_BxGxHxD, self.global_q_HxDxD), (k, self.global_k_HxDxD),
                             (v, self.global_v_HxDxD))
            )
        out_Bx1xGxHxD = blocks.attend(
            q_BxGxHxD[:, None], [blocks.KeyGroup(k, v, allowed)], drop
        )
        return out_BxLxHxD.at[:, g_G].set(out_Bx1xGxHxD[:, 0])
