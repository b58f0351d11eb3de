"""Exact softmax attention (the quadratic baseline) on `jax.nn.dot_product_attention` or,
with ``implementation="pallas"``, on JAX's Pallas flash-attention kernels (`flash.py`).

Inside a mesh context whose `seq` axis has more than one device, the xla implementation
runs `sequence_parallel.sequence_parallel_attention` (ring attention by default).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import F32, MASKED_LOGIT, Choice
from lra.models.attention import flash
from lra.models.attention.sequence_parallel import (
    sequence_parallel_attention,
    splits_sequence,
)


class Implementation(Choice):
    """Which code computes the attention."""

    XLA = "xla"  # jax.nn.dot_product_attention's XLA path: any platform
    CUDNN = "cudnn"  # cuDNN flash attention: NVIDIA GPUs, fp16/bf16, some shapes only
    PALLAS = "pallas"  # JAX's Pallas kernels (flash.py): GPU, TPU; interpreted on CPU


class SoftmaxAttention(nnx.Module):
    """softmax(q k^T / sqrt(D)) v over real (and, if causal, earlier) keys.

    The fused path (`jax.nn.dot_product_attention`) runs whenever no attention
    dropout is applied; dropout on the probabilities (dropout_rate > 0 and
    deterministic=False) needs the explicit path, which masks the same way.
    Both paths replace disallowed logits by a large finite negative number, so a
    query row with no allowed key (only ever a masked row: a real query always
    sees itself) gets the uniform average of all L values: finite.

    With ``implementation="cudnn"`` the mask goes to cuDNN as per-example lengths
    (``query_seq_lengths`` / ``key_value_seq_lengths`` = the number of real tokens), not as
    a dense [B, 1, L, L] mask: cuDNN's fused kernel skips the padded keys instead of reading
    an L x L bias. This reads the mask as right padding (real tokens first), which is what
    every lra task and the encoder (CLS first) produce. cuDNN has no dropout on the
    probabilities and runs in float16/bfloat16 only, so `lra.training.train` rejects
    ``implementation="cudnn"`` with attention dropout > 0 or float32 compute before training.

    With ``implementation="pallas"`` JAX's own Pallas flash-attention kernels run
    (`lra.models.attention.flash`): on a GPU `jax.experimental.pallas.ops.gpu.attention.mha`
    (Triton), on a TPU splash attention, elsewhere (CPU) the GPU kernel in Pallas' interpret
    mode, a slow correctness path; the platform is `jax.default_backend()` at trace time.
    The mask goes in as segment ids (real 1, masked 0), so real queries see only real keys
    and masked queries only masked ones (finite, unused); any real positions, not only a
    prefix. The kernels have no dropout on the probabilities (refused here and, naming the
    config key, by `lra.training.train`); any dtype.
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
        self.num_heads, self.head_dim, self.max_len = num_heads, head_dim, max_len
        self.causal = causal
        self.implementation = Implementation(implementation)
        fused = (Implementation.CUDNN, Implementation.PALLAS)
        if self.implementation in fused and dropout_rate > 0:
            raise ValueError(
                f"implementation={self.implementation.value!r} has no attention dropout; "
                f"got dropout_rate={dropout_rate}"
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
        keep_Bx1x1xL = None if mask is None else mask[:, None, None, :].astype(bool)
        if self.dropout.rate > 0 and not deterministic:
            drop = functools.partial(self.dropout, deterministic=False)
            return _explicit_attention(q, k, v, keep_Bx1x1xL, self.causal, drop)
        if self.implementation is Implementation.CUDNN:
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=self.causal, implementation="cudnn",
                **seq_lengths_of(mask),
            )
        if self.implementation is Implementation.PALLAS:
            return flash.attention(q, k, v, mask, causal=self.causal)
        if splits_sequence():
            return sequence_parallel_attention(q, k, v, mask, causal=self.causal)
        return jax.nn.dot_product_attention(
            q, k, v, mask=keep_Bx1x1xL, is_causal=self.causal, implementation="xla"
        )


    def kv_cache(self, batch_size: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """What causal decoding would carry from token to token (there is no `step`): the
        keys and values of every earlier token, up to max_len (`kv_cache_shapes`)."""
        return kv_cache_shapes(batch_size, self.max_len, self.num_heads, self.head_dim)


def kv_cache_shapes(batch_size: int, length: int, num_heads: int,
                    head_dim: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """The shapes of a KV cache of `length` tokens: keys and values [B, length, H, D] each,
    float32 (the dtype of every decoding state in lra: the recurrent cores' are float32
    whatever the compute dtype), so that cache and states compare at one precision."""
    shape = jax.ShapeDtypeStruct((batch_size, length, num_heads, head_dim), F32)
    return shape, shape


def seq_lengths_of(mask_BxL: jax.Array | None) -> dict[str, jax.Array]:
    """`dot_product_attention`'s length arguments for a right-padded mask (none without one)."""
    if mask_BxL is None:
        return {}
    lengths_B = jnp.sum(mask_BxL.astype(jnp.int32), axis=-1)
    return {"query_seq_lengths": lengths_B, "key_value_seq_lengths": lengths_B}


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
    logits_BxHxLxL = jnp.where(keep, logits_BxHxLxL, MASKED_LOGIT)
    probs_BxHxLxL = drop(jax.nn.softmax(logits_BxHxLxL, axis=-1))
    return jnp.einsum(
        "bhqk,bkhd->bqhd", probs_BxHxLxL.astype(v_BxLxHxD.dtype), v_BxLxHxD
    )
