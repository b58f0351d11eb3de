"""Linformer: softmax attention over keys and values projected along the sequence.

Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity".
Extra shape letters: N = max_len, P = proj_len.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention import check_length


class LinformerAttention(nnx.Module):
    """softmax(q (E k)^T / sqrt(D)) (F v), with E, F learned [P, L] projections.

    Masked keys and values are zeroed before the projection, so a masked token
    contributes nothing to the P projected keys and values (the original
    harness projected them unmasked). For a length L < max_len, the first L
    columns of E and F are used (E^T, F^T are stored as [N, P] and sliced by rows).

    Sharing: E and F are shared across heads (the paper's "headwise" sharing);
    ``share_kv=True`` also ties F = E (its "key-value" sharing). Layerwise
    sharing would cross module boundaries and is not offered.

    Dropout is applied to the [L, P] attention probabilities. Linformer is an
    encoder (the projection mixes all positions), so ``causal=True`` raises.

    Cost: O(B H L P D) time, O(B H L P) memory for the probabilities; the
    projections add O(B L P H D). Parameters: (1 or 2) N P.
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
        proj_len: int = 256,
        share_kv: bool = False,
    ):
        """Builds the projections.

        Args:
          num_heads: H (unused: projections are shared across heads).
          head_dim: D (unused).
          max_len: N, the longest length; E and F have N rows.
          causal: must be False (Linformer is encoder-only).
          dropout_rate: dropout on the attention probabilities.
          rngs: streams ``params`` and ``dropout``.
          proj_len: P, the projected length (paper's k).
          share_kv: if True, one projection serves keys and values (E = F).

        Raises:
          ValueError: for causal=True or a bad option value.
        """
        del num_heads, head_dim
        if causal:
            raise ValueError("linformer attention is encoder-only: causal=True is not supported")
        if isinstance(proj_len, bool) or not isinstance(proj_len, int) or proj_len < 1:
            raise ValueError(f"proj_len must be a positive int; got {proj_len!r}")
        if not isinstance(share_kv, bool):
            raise ValueError(f"share_kv must be a bool; got {share_kv!r}")
        self.max_len = max_len
        self.proj_len = proj_len
        self.share_kv = share_kv
        init = nnx.initializers.lecun_normal()  # fan_in = N (axis -2)
        self.e_NxP = nnx.Param(init(rngs.params(), (max_len, proj_len), jnp.float32))
        self.f_NxP = None if share_kv else nnx.Param(
            init(rngs.params(), (max_len, proj_len), jnp.float32))
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
        """q, k, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D].

        Raises:
          ValueError: if L > max_len.
        """
        length = q.shape[1]
        check_length("linformer", length, self.max_len)
        e_LxP = self.e_NxP[...][:length]
        f_LxP = e_LxP if self.f_NxP is None else self.f_NxP[...][:length]
        k_BxPxHxD = _project(k, mask, e_LxP)
        v_BxPxHxD = _project(v, mask, f_LxP)
        logits_BxHxLxP = jnp.einsum(
            "blhd,bphd->bhlp", q, k_BxPxHxD, preferred_element_type=jnp.float32
        ) * (q.shape[-1] ** -0.5)
        probs_BxHxLxP = jax.nn.softmax(logits_BxHxLxP, axis=-1)
        probs_BxHxLxP = self.dropout(probs_BxHxLxP, deterministic=deterministic)
        out_BxLxHxD = jnp.einsum(
            "bhlp,bphd->blhd", probs_BxHxLxP.astype(v_BxPxHxD.dtype), v_BxPxHxD
        )
        return out_BxLxHxD.astype(q.dtype)


def _project(x_BxLxHxD: jax.Array, mask_BxL: jax.Array | None, proj_LxP: jax.Array) -> jax.Array:
    """Zeroes masked positions, then projects the sequence axis L -> P."""
    if mask_BxL is not None:
        x_BxLxHxD = jnp.where(mask_BxL[:, :, None, None], x_BxLxHxD, 0)
    return jnp.einsum("blhd,lp->bphd", x_BxLxHxD, proj_LxP.astype(x_BxLxHxD.dtype))
