"""Rotary position embeddings (RoPE; Su et al., 2021, "RoFormer: Enhanced Transformer
with Rotary Position Embedding", eq. 14-15).

Each head's query and key vectors are rotated, pair of coordinates by pair, by an angle
proportional to the token's position m: pair i turns by m * theta_i with
theta_i = base^(-2i / D), i = 0 .. D/2 - 1 (the paper's theta_i = 10000^(-2(i-1)/d) with
i from 1). The dot product of a query at m and a key at n then depends on m - n only,
so attention logits see relative positions. The pairs here are (x[i], x[i + D/2]) (the
"rotate half" layout of GPT-NeoX) rather than the paper's adjacent (x[2i], x[2i+1]):
the two differ by a fixed permutation of the coordinates, which the learned q and k
projections absorb.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROTARY_BASE = 10_000.0  # RoFormer, eq. 15


def rotary_angles(positions_L: jax.Array, head_dim: int, base: float = ROTARY_BASE
                  ) -> jax.Array:
    """[L, D/2] angles m * theta_i, float32, for integer positions m."""
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim; got {head_dim}")
    theta_D2 = base ** (-jnp.arange(head_dim // 2, dtype=jnp.float32) * 2 / head_dim)
    return jnp.asarray(positions_L, jnp.float32)[..., None] * theta_D2


def apply_rotary(x_BxLxHxD: jax.Array, positions_L: jax.Array) -> jax.Array:
    """Rotates every head's vectors by their positions' angles (computed in float32).

    Args:
      x_BxLxHxD: queries or keys; also [B, H, D] with a scalar position (decoding).
      positions_L: int positions [L] (or a scalar for one token).

    Returns:
      The rotated vectors, in x's dtype.
    """
    angles = rotary_angles(positions_L, x_BxLxHxD.shape[-1])[..., None, :]  # [L, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.astype(x_BxLxHxD.dtype)
