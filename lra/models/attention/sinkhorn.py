"""Sparse Sinkhorn attention: learned soft block sorting (Tay et al., 2020)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.common import positive_int
from lra.models.attention import check_length

# Logit of a key that may not be attended to (masked or padding).
_MASKED = -1e9


class SinkhornAttention(nnx.Module):
    """Each query block attends to its own block and to its (soft-)sorted partner block.

    The sequence is padded to ``N`` blocks of ``C = block_size`` tokens. Per head:

    1. Block summaries ``s_i``: the mean of block i's real *key* vectors (0 for a
       block with no real token).
    2. SortNet (the paper's two-layer ReLU MLP) gives logits
       ``R_i = relu(W2 relu(W1 s_i + b1) + b2)[:N]``; W2 has one output per block of
       a ``max_len`` sequence, and a shorter sequence uses its first N.
    3. Sinkhorn in log space: ``log P = R / temperature``, then ``sinkhorn_iters``
       times (the paper's order) normalise rows, then columns. ``P = exp(log P)`` is
       doubly stochastic; at low temperature it approaches a permutation.
    4. Partner block of query block i, token slot t: the P-mixture of the blocks'
       slot-t tokens, over real tokens only. With the mixed validity
       ``w_it = sum_j P_ij m_jt`` (m = 1 at real tokens):
       ``k~_it = sum_j P_ij m_jt k_jt / w_it`` (and ``v~`` alike), a partner token
       with ``w_it = 0`` is excluded and the others get the logit
       ``q . k~_it / sqrt(D) + log w_it`` (a soft token of mass ``w_it``). For a
       permutation matrix P this is exactly block ``pi(i)``, its masked tokens
       excluded. Masked tokens enter neither the summaries nor the mixtures, so
       their values never change a real output.
    5. Softmax (float32) over the 2C keys: the real keys of the own block and the
       partner tokens.

    No Gumbel noise is added to the sort logits (the paper's optional Gumbel-Sinkhorn),
    and the causal variant (cumulative sorting) is not implemented.

    Cost: O(B H (L C D + N^2 (C D + iters))) time and O(B H (L C + N^2)) memory
    for N = L / C blocks, instead of O(B H L^2 D).
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
        sinkhorn_iters: int = 8,
        temperature: float = 0.75,
        hidden_dim: int = 64,
    ):
        if causal:
            raise ValueError(
                "sinkhorn attention does not support causal=True (the paper's causal "
                "variant with cumulative sorting is not implemented)"
            )
        self.block_size = positive_int("block_size", block_size)
        self.sinkhorn_iters = positive_int("sinkhorn_iters", sinkhorn_iters)
        hidden_dim = positive_int("hidden_dim", hidden_dim)
        if isinstance(temperature, bool) or not (
            isinstance(temperature, (int, float, np.number)) and 0 < temperature < math.inf
        ):
            raise ValueError(f"temperature must be a positive number; got {temperature!r}")
        self.temperature = float(temperature)
        self.max_len = max_len
        max_blocks = math.ceil(max_len / self.block_size)
        init = jax.nn.initializers.lecun_normal(batch_axis=(0,))
        f32 = jnp.float32  # not the default float, which x64 mode makes float64
        self.w1_HxDxK = nnx.Param(init(rngs.params(), (num_heads, head_dim, hidden_dim), f32))
        self.b1_HxK = nnx.Param(jnp.zeros((num_heads, hidden_dim), f32))
        self.w2_HxKxM = nnx.Param(init(rngs.params(), (num_heads, hidden_dim, max_blocks), f32))
        self.b2_HxM = nnx.Param(jnp.zeros((num_heads, max_blocks), f32))
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
        p_BxHxNxN = self.sort_matrix(k, mask)
        return self.attend(q, k, v, mask, p_BxHxNxN, deterministic=deterministic)

    def sort_matrix(self, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The doubly stochastic block sorting matrix P [B, H, N, N] (float32).

        Args:
          k: keys [B, L, H, D].
          mask: [B, L] bool (True = real) or None.
        """
        logits_BxHxNxN = self.sort_logits(k, mask)
        return jnp.exp(sinkhorn_log(logits_BxHxNxN / self.temperature, self.sinkhorn_iters))

    def sort_logits(self, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """SortNet logits R [B, H, N, N] from the masked mean keys of each block."""
        k_BxHxNxCxD, real_BxNxC = self._blocks(k, mask)
        real_Bx1xNxCx1 = real_BxNxC[:, None, :, :, None]
        total_BxHxNxD = jnp.sum(
            jnp.where(real_Bx1xNxCx1, k_BxHxNxCxD.astype(jnp.float32), 0.0), axis=3
        )
        count_Bx1xNx1 = jnp.sum(real_Bx1xNxCx1, axis=3)
        summary_BxHxNxD = total_BxHxNxD / jnp.maximum(count_Bx1xNx1, 1)
        num_blocks = summary_BxHxNxD.shape[2]
        hidden_BxHxNxK = jax.nn.relu(
            jnp.einsum("bhnd,hdk->bhnk", summary_BxHxNxD, self.w1_HxDxK[...])
            + self.b1_HxK[...][:, None]
        )
        return jax.nn.relu(
            jnp.einsum("bhnk,hkm->bhnm", hidden_BxHxNxK, self.w2_HxKxM[...][..., :num_blocks])
            + self.b2_HxM[...][:, None, :num_blocks]
        )

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None,
        p_BxHxNxN: jax.Array,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Local + partner block attention for a given block sorting matrix P.

        Args:
          q, k, v: [B, L, H, D].
          mask: [B, L] bool (True = real) or None.
          p_BxHxNxN: mixing weights; row i gives query block i's partner block.
          deterministic: if False, dropout on the attention probabilities.

        Returns:
          [B, L, H, D] in q's dtype.
        """
        batch, length, heads, dim = q.shape
        (q_BxHxNxCxD, k_BxHxNxCxD, v_BxHxNxCxD), (real_BxNxC, *_) = zip(
            *(self._blocks(x, mask) for x in (q, k, v))
        )
        k_partner, v_partner, weight_BxHxNxC = partner_blocks(
            p_BxHxNxN, k_BxHxNxCxD, v_BxHxNxCxD, real_BxNxC
        )
        local_BxHxNxCxC = jnp.einsum("bhncd,bhnkd->bhnck", q_BxHxNxCxD, k_BxHxNxCxD,
                                     preferred_element_type=jnp.float32)
        local_BxHxNxCxC = jnp.where(real_BxNxC[:, None, :, None, :], local_BxHxNxCxC * dim**-0.5,
                                    _MASKED)
        partner_allowed = (weight_BxHxNxC > 0)[..., None, :]
        log_weight = jnp.log(jnp.where(partner_allowed, weight_BxHxNxC[..., None, :], 1.0))
        partner_BxHxNxCxC = jnp.einsum(
            "bhncd,bhnkd->bhnck", q_BxHxNxCxD.astype(jnp.float32), k_partner
        ) * dim**-0.5 + log_weight
        partner_BxHxNxCxC = jnp.where(partner_allowed, partner_BxHxNxCxC, _MASKED)
        logits = jnp.concatenate([local_BxHxNxCxC, partner_BxHxNxCxC], axis=-1)
        probs = self.dropout(jax.nn.softmax(logits, axis=-1), deterministic=deterministic)
        chunk = self.block_size
        out_BxHxNxCxD = jnp.einsum(
            "bhnck,bhnkd->bhncd", probs[..., :chunk].astype(v.dtype), v_BxHxNxCxD,
            preferred_element_type=jnp.float32,
        ) + jnp.einsum("bhnck,bhnkd->bhncd", probs[..., chunk:], v_partner)
        out_BxHxPxD = out_BxHxNxCxD.reshape(batch, heads, -1, dim)
        return out_BxHxPxD.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)

    def _blocks(self, x_BxLxHxD: jax.Array, mask: jax.Array | None):
        """Pads to whole blocks: ([B, H, N, C, D], real [B, N, C])."""
        batch, length, heads, dim = x_BxLxHxD.shape
        check_length("sinkhorn", length, self.max_len)
        chunk = self.block_size
        pad = chunk * math.ceil(length / chunk) - length
        real_BxL = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
        real_BxNxC = jnp.pad(real_BxL, ((0, 0), (0, pad))).reshape(batch, -1, chunk)
        x_BxPxHxD = jnp.pad(x_BxLxHxD, ((0, 0), (0, pad), (0, 0), (0, 0)))
        x_BxHxNxCxD = x_BxPxHxD.reshape(batch, -1, chunk, heads, dim).transpose(0, 3, 1, 2, 4)
        return x_BxHxNxCxD, real_BxNxC


def sinkhorn_log(log_p_BxHxNxN: jax.Array, iters: int) -> jax.Array:
    """Sinkhorn normalisation in log space: `iters` x (rows, then columns)."""

    def step(_, log_p):
        log_p = log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)
        return log_p - jax.nn.logsumexp(log_p, axis=-2, keepdims=True)

    return jax.lax.fori_loop(0, iters, step, log_p_BxHxNxN.astype(jnp.float32))


def partner_blocks(p_BxHxNxN, k_BxHxNxCxD, v_BxHxNxCxD, real_BxNxC):
    """The sorted partner blocks: P-mixtures of the real tokens, float32.

    Returns:
      k~, v~ [B, H, N, C, D] (mixtures renormalised by the mixed validity) and the
      mixed validity w [B, H, N, C] = sum_j P[i, j] * real[j]; w = 0 where no block
      has a real token in that slot (then k~ = v~ = 0).
    """
    real_BxHxNxC = jnp.broadcast_to(
        real_BxNxC[:, None], p_BxHxNxN.shape[:2] + real_BxNxC.shape[1:]
    )
    weight_BxHxNxC = permute_blocks(p_BxHxNxN, real_BxHxNxC.astype(jnp.float32))
    safe_BxHxNxCx1 = jnp.where(weight_BxHxNxC > 0, weight_BxHxNxC, 1.0)[..., None]
    k_partner, v_partner = (
        permute_blocks(
            p_BxHxNxN, jnp.where(real_BxHxNxC[..., None], x.astype(jnp.float32), 0.0)
        ) / safe_BxHxNxCx1
        for x in (k_BxHxNxCxD, v_BxHxNxCxD)
    )
    return k_partner, v_partner, weight_BxHxNxC


def permute_blocks(p_BxHxNxN: jax.Array, x_BxHxNx_: jax.Array) -> jax.Array:
    """Block i of the result is ``sum_j P[i, j] * block_j`` (exactly block pi(i) when P
    is the permutation matrix of pi)."""
    return jnp.einsum(
        "bhij,bhj...->bhi...", p_BxHxNxN, x_BxHxNx_, precision=jax.lax.Precision.HIGHEST
    )
