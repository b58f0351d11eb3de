"""Blockwise machinery of the sparse-pattern families: local, sparse, Longformer, BigBird.

A sequence of L tokens is padded to N * S (N blocks of S tokens; padding is masked) and
reshaped to ``[B, N, S, ...]``. Each query block attends to a small set of keys made of
one or more `KeyGroup`s: per-block keys (the block itself, its neighbours, gathered
random blocks) or keys shared by every block (summary or global tokens). `attend` takes
one float32 softmax over the concatenation of the groups, so the cost is
O(B * N * S * keys-per-block * H * D): never L x L unless the pattern itself is dense.

Every group carries a boolean ``allowed`` mask broadcastable to ``[B, N, H, S, K]``; it
must combine the sequence mask (and padding), the family's pattern, and duplicate
removal (a key present in two groups, or twice in one, is allowed in one place only), so
the softmax over the concatenated keys equals the exact softmax over the pattern.

Extra shape letters: N blocks, S tokens per block, K keys of one group, J blocks gathered
per query block, R random blocks, G global tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lra.common import MASKED_LOGIT


def check_int(option: str, value, minimum: int) -> int:
    """Returns `value` as an int, or raises ValueError naming `option`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def num_blocks(length: int, block_size: int) -> int:
    """N = ceil(length / block_size)."""
    return -(-length // block_size)


def to_blocks(x_BxLxZ: jax.Array, block_size: int) -> jax.Array:
    """[B, L, ...] -> [B, N, S, ...], zero-padded at the end to N * S positions."""
    batch, length = x_BxLxZ.shape[:2]
    n = num_blocks(length, block_size)
    pad = [(0, 0), (0, n * block_size - length)] + [(0, 0)] * (x_BxLxZ.ndim - 2)
    x_BxPxZ = jnp.pad(x_BxLxZ, pad)
    return x_BxPxZ.reshape(batch, n, block_size, *x_BxLxZ.shape[2:])


def from_blocks(x_BxNxSxZ: jax.Array, length: int) -> jax.Array:
    """[B, N, S, ...] -> [B, L, ...]: drops the padding."""
    batch, n, size = x_BxNxSxZ.shape[:3]
    return x_BxNxSxZ.reshape(batch, n * size, *x_BxNxSxZ.shape[3:])[:, :length]


def valid_blocks(
    mask_BxL: jax.Array | None, batch: int, length: int, block_size: int
) -> jax.Array:
    """Key validity [B, N, S]: the sequence mask (all real if None), False on padding."""
    if mask_BxL is None:
        mask_BxL = jnp.ones((batch, length), bool)
    return to_blocks(mask_BxL.astype(bool), block_size)


def positions_NxS(n: int, block_size: int) -> np.ndarray:
    """Absolute position of every padded slot, [N, S] (static)."""
    return np.arange(n * block_size).reshape(n, block_size)


def neighbours(x_BxNxSxZ: jax.Array, offsets: Sequence[int]) -> jax.Array:
    """Blocks n + offset for every block n, concatenated: [B, N, J * S, ...].

    A neighbour outside [0, N) is zeros; callers mask it with `neighbours_exist`.
    """
    batch, n, size = x_BxNxSxZ.shape[:3]
    reach = max(abs(o) for o in offsets)
    pad = [(0, 0), (reach, reach)] + [(0, 0)] * (x_BxNxSxZ.ndim - 2)
    padded = jnp.pad(x_BxNxSxZ, pad)
    shifted = [padded[:, reach + o : reach + o + n] for o in offsets]
    x_BxNxJxSxZ = jnp.stack(shifted, axis=2)
    return x_BxNxJxSxZ.reshape(batch, n, len(offsets) * size, *x_BxNxSxZ.shape[3:])


def neighbours_exist(n: int, block_size: int, offsets: Sequence[int]) -> np.ndarray:
    """[N, J * S] (static): True where block n + offset lies inside [0, N)."""
    block_NxJ = np.arange(n)[:, None] + np.asarray(offsets)[None, :]
    exist_NxJ = (block_NxJ >= 0) & (block_NxJ < n)
    return np.repeat(exist_NxJ, block_size, axis=1)


def neighbour_positions(n: int, block_size: int, offsets: Sequence[int]) -> np.ndarray:
    """[N, J * S] (static): absolute position of each key that `neighbours` gathers."""
    start_NxJ = (np.arange(n)[:, None] + np.asarray(offsets)[None, :]) * block_size
    return (start_NxJ[:, :, None] + np.arange(block_size)).reshape(n, -1)


class KeyGroup(NamedTuple):
    """Keys and values one query block attends to, with the allowed (query, key) pairs.

    Attributes:
      k: [B, N, K, H, D] (different keys per query block) or [B, K, H, D] (shared).
      v: the same shape as k.
      allowed: bool, broadcastable to [B, N, H, S, K].
    """

    k: jax.Array
    v: jax.Array
    allowed: jax.Array


def attend(
    q_BxNxSxHxD: jax.Array,
    groups: Sequence[KeyGroup],
    drop: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """Softmax attention of every query block over the concatenation of `groups`.

    Logits are scaled by 1/sqrt(D) and accumulated in float32; disallowed logits become
    the most negative float32, so a row with no allowed key (a masked query) is finite.

    Args:
      q_BxNxSxHxD: queries in blocks.
      groups: the key groups; together they must hold each allowed key exactly once.
      drop: dropout on the probabilities [B, N, H, S, K_total] (identity when off).

    Returns:
      [B, N, S, H, D] in q's dtype.
    """
    scale = q_BxNxSxHxD.shape[-1] ** -0.5
    logits, sizes = [], []
    for group in groups:
        spec = "bnshd,bnkhd->bnhsk" if group.k.ndim == 5 else "bnshd,bkhd->bnhsk"
        logits_BxNxHxSxK = jnp.einsum(
            spec, q_BxNxSxHxD, group.k, preferred_element_type=jnp.float32
        ) * scale
        logits.append(jnp.where(group.allowed, logits_BxNxHxSxK, MASKED_LOGIT))
        sizes.append(group.k.shape[-3])
    probs_BxNxHxSxK = drop(jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1))
    splits = np.cumsum(sizes)[:-1].tolist()
    out_BxNxSxHxD = jnp.zeros(q_BxNxSxHxD.shape, jnp.float32)
    for group, probs in zip(groups, jnp.split(probs_BxNxHxSxK, splits, axis=-1)):
        spec = "bnhsk,bnkhd->bnshd" if group.v.ndim == 5 else "bnhsk,bkhd->bnshd"
        out_BxNxSxHxD = out_BxNxSxHxD + jnp.einsum(
            spec, probs.astype(group.v.dtype), group.v, preferred_element_type=jnp.float32
        )
    return out_BxNxSxHxD.astype(q_BxNxSxHxD.dtype)
