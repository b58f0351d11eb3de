"""Synthesizer: attention weights synthesized without (or besides) token-token dot products.

Tay et al., 2021, "Synthesizer: Rethinking Self-Attention for Transformer Models".
Extra shape letters: N = max_len, R = factor_rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import MASKED_LOGIT, Choice
from lra.models.attention import check_length


class Mode(Choice):
    """How the synthetic logits are made."""

    DENSE = "dense"  # per token: W2 relu(W1 x + b1) + b2 -> N logits
    RANDOM = "random"  # one learned (or fixed) [N, N] logits matrix per head
    FACTORIZED_RANDOM = "factorized_random"  # R1 R2^T, R1, R2 [N, R] per head


class FixedRandom(nnx.Variable):
    """Random logits that the optimizer does not update (``trainable_random=False``)."""


class SynthesizerAttention(nnx.Module):
    """softmax(S + [q k^T / sqrt(D)]) v with synthetic logits S [H, L, L] per head.

    Modes (per head h; x_i = q_i, token i's query vector in head h, stands in
    for the paper's per-head token input X_i; logits over N keys, sliced to L):
      dense:             S_i = W2 relu(W1 x_i + b1) + b2,  W1 [D, D], W2 [D, N]
      random:            S = R,  R [N, N] (trainable unless trainable_random=False)
      factorized_random: S = R1 R2^T,  R1, R2 [N, R]
    ``with_dot_product=True`` adds the usual dot-product logits. The paper mixes
    synthesizers with learned softmax-normalised weights; here the two logits
    are simply summed (a simplification: no mixing parameters).

    Masked keys (and, if causal, later keys) get a large negative logit before
    the float32 softmax, in every mode. Causal use (the paper's decoder form)
    simply masks future logits. Dropout is applied to the probabilities.

    Cost: O(B H L^2 D) time and O(B H L^2) memory (the L x L probabilities),
    like softmax attention; dense adds O(B H L D (D + L)).
    Parameters per head: dense D^2 + D + D N + N; random N^2; factorized 2 N R.
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
        mode: str = "dense",
        with_dot_product: bool = False,
        trainable_random: bool = True,
        factor_rank: int = 8,
    ):
        """Builds the synthetic-logit parameters of `mode`.

        Args:
          num_heads: H.
          head_dim: D.
          max_len: N, the longest length; synthetic logits cover N x N.
          causal: if True, position i attends only to positions <= i.
          dropout_rate: dropout on the attention probabilities.
          rngs: streams ``params`` and ``dropout``.
          mode: a `Mode` value.
          with_dot_product: add q k^T / sqrt(D) to the synthetic logits.
          trainable_random: (random mode) if False, R is fixed at its random init.
          factor_rank: R, the rank of factorized_random logits.

        Raises:
          ValueError: for a bad option value.
        """
        self.mode = Mode(mode)
        flags = (("with_dot_product", with_dot_product), ("trainable_random", trainable_random))
        for name, flag in flags:
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool; got {flag!r}")
        if isinstance(factor_rank, bool) or not isinstance(factor_rank, int) or factor_rank < 1:
            raise ValueError(f"factor_rank must be a positive int; got {factor_rank!r}")
        self.max_len = max_len
        self.causal = causal
        self.with_dot_product = with_dot_product
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        h, d, n = num_heads, head_dim, max_len
        lecun = nnx.initializers.lecun_normal()  # fan_in = axis -2
        normal = nnx.initializers.normal(1.0)
        if self.mode is Mode.DENSE:
            self.w1_HxDxD = nnx.Param(lecun(rngs.params(), (h, d, d), jnp.float32))
            self.b1_HxD = nnx.Param(jnp.zeros((h, d), jnp.float32))
            self.w2_HxDxN = nnx.Param(lecun(rngs.params(), (h, d, n), jnp.float32))
            self.b2_HxN = nnx.Param(jnp.zeros((h, n), jnp.float32))
        elif self.mode is Mode.RANDOM:
            kind = nnx.Param if trainable_random else FixedRandom
            self.r_HxNxN = kind(normal(rngs.params(), (h, n, n), jnp.float32))
        else:
            # Entries N(0, R^-1/2) give R1 R2^T entries of unit variance.
            factor = nnx.initializers.normal(factor_rank**-0.25)
            self.r1_HxNxR = nnx.Param(factor(rngs.params(), (h, n, factor_rank), jnp.float32))
            self.r2_HxNxR = nnx.Param(factor(rngs.params(), (h, n, factor_rank), jnp.float32))

    @property
    def rotary_error(self) -> str | None:
        """Why rotary positions do not apply (read by the multi-head mixer), or None.

        RoPE rotates q and k for their dot product; the dense mode's synthetic logits
        read q itself, and without `with_dot_product` there is no q k^T to rotate.
        """
        if self.mode is Mode.DENSE:
            return "its dense synthetic logits are computed from q itself, not from q k^T"
        if not self.with_dot_product:
            return "without with_dot_product its logits do not use q or k"
        return None

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
        length = q.shape[1]
        check_length("synthesizer", length, self.max_len)
        batch, _, heads, _ = q.shape
        # Broadcast so that dropout draws independent masks per example.
        logits_BxHxLxL = jnp.broadcast_to(
            self.synthetic_logits(q), (batch, heads, length, length)
        )
        if self.with_dot_product:
            logits_BxHxLxL = logits_BxHxLxL + jnp.einsum(
                "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
            ) * (q.shape[-1] ** -0.5)
        keep = jnp.tril(jnp.ones((length, length), bool)) if self.causal else None
        if mask is not None:
            keep_Bx1x1xL = mask[:, None, None, :].astype(bool)
            keep = keep_Bx1x1xL if keep is None else keep & keep_Bx1x1xL
        if keep is not None:
            logits_BxHxLxL = jnp.where(keep, logits_BxHxLxL, MASKED_LOGIT)
        probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1)
        probs_BxHxLxL = self.dropout(probs_BxHxLxL, deterministic=deterministic)
        out_BxLxHxD = jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxLxL.astype(v.dtype), v)
        return out_BxLxHxD.astype(q.dtype)

    def synthetic_logits(self, q_BxLxHxD: jax.Array) -> jax.Array:
        """The mode's logits, float32, broadcastable to [B, H, L, L] (before masking)."""
        length = q_BxLxHxD.shape[1]
        if self.mode is Mode.DENSE:
            x_BxLxHxD = q_BxLxHxD.astype(jnp.float32)
            hidden_BxLxHxD = jax.nn.relu(
                jnp.einsum("blhd,hde->blhe", x_BxLxHxD, self.w1_HxDxD[...]) + self.b1_HxD[...]
            )
            w2_HxDxL = self.w2_HxDxN[...][:, :, :length]
            return jnp.einsum("blhe,hek->bhlk", hidden_BxLxHxD, w2_HxDxL) + (
                self.b2_HxN[...][:, None, :length]
            )
        if self.mode is Mode.RANDOM:
            return self.r_HxNxN[...][None, :, :length, :length].astype(jnp.float32)
        r1_HxLxR = self.r1_HxNxR[...][:, :length]
        r2_HxLxR = self.r2_HxNxR[...][:, :length]
        return jnp.einsum("hqr,hkr->hqk", r1_HxLxR, r2_HxLxR)[None].astype(jnp.float32)
