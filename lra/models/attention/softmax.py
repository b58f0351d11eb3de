"""Exact softmax attention (the quadratic baseline) on `jax.nn.dot_product_attention`."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention import Choice


class Implementation(Choice):
    """Backend of `jax.nn.dot_product_attention`."""

    XLA = "xla"  # any platform
    CUDNN = "cudnn"  # cuDNN flash attention: NVIDIA GPUs, fp16/bf16, some shapes only


class SoftmaxAttention(nnx.Module):
    """softmax(q k^T / sqrt(D)) v over real (and, if causal, earlier) keys.

    The fused path (`jax.nn.dot_product_attention`) runs whenever no attention
    dropout is applied; dropout on the probabilities (dropout_rate > 0 and
    deterministic=False) needs the explicit path, which masks the same way.
    Both paths replace disallowed logits by a large finite negative number, so a
    query row with no allowed key (only ever a masked row: a real query always
    sees itself) gets the uniform average of all L values: finite.
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
        implementation: str = "xla",
    ):
        del num_heads, head_dim, max_len  # no parameters, no length-dependent state
        self.causal = causal
        self.implementation = Implementation(implementation)
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
        keep_Bx1x1xL = None if mask is None else mask[:, None, None, :].astype(bool)
        if self.dropout.rate > 0 and not deterministic:
            drop = functools.partial(self.dropout, deterministic=False)
            return _explicit_attention(q, k, v, keep_Bx1x1xL, self.causal, drop)
        keep = keep_Bx1x1xL
        if keep is not None and self.implementation is Implementation.CUDNN:
            # cuDNN turns the mask into a bias whose query length must be explicit.
            batch, length = q.shape[:2]
            keep = jnp.broadcast_to(keep, (batch, 1, length, length))
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=keep,
            is_causal=self.causal,
            implementation=self.implementation.value,
        )


def _explicit_attention(
    q_BxLxHxD: jax.Array,
    k_BxLxHxD: jax.Array,
    v_BxLxHxD: jax.Array,
    keep_Bx1x1xL: jax.Array | None,
    causal: bool,
    drop: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """Softmax attention with `drop` applied to the probabilities (float32 softmax)."""
    length, head_dim = q_BxLxHxD.shape[1], q_BxLxHxD.shape[3]
    logits_BxHxLxL = jnp.einsum(
        "bqhd,bkhd->bhqk", q_BxLxHxD, k_BxLxHxD, preferred_element_type=jnp.float32
    ) * (head_dim**-0.5)
    keep_LxL = jnp.ones((length, length), bool)
    if causal:
        keep_LxL = jnp.tril(keep_LxL)
    keep = keep_LxL if keep_Bx1x1xL is None else keep_LxL & keep_Bx1x1xL
    logits_BxHxLxL = jnp.where(keep, logits_BxHxLxL, jnp.finfo(jnp.float32).min)
    probs_BxHxLxL = drop(jax.nn.softmax(logits_BxHxLxL, axis=-1))
    return jnp.einsum(
        "bhqk,bkhd->bqhd", probs_BxHxLxL.astype(v_BxLxHxD.dtype), v_BxLxHxD
    )
