"""Nystromformer: Nystrom approximation of softmax attention through segment-mean landmarks.

Xiong et al., 2021, "Nystromformer: A Nystrom-Based Algorithm for Approximating
Self-Attention". Extra shape letters: M = landmarks, K = conv kernel size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.common import MASKED_LOGIT
from lra.models.attention import check_length


class NystromformerAttention(nnx.Module):
    """F A^+ (B v): F = sm(q k~^T), A = sm(q~ k~^T), B = sm(q~ k^T), sm(x) = softmax(x/sqrt(D)).

    Landmarks q~, k~ [M, D] are segment means over M = min(num_landmarks, L)
    contiguous segments of near-equal length (`segment_ids`). For
    L <= num_landmarks every token is its own landmark, and the result is
    softmax attention up to the pseudo-inverse's error (F A^+ B = S S^+ S = S).
    Means are taken over real tokens only; a segment with no real token is an invalid landmark:
    it is excluded from the softmax of F and A (as a key), its row and column
    of A are replaced by the identity's, so A = [A_valid, 0; 0, I] and
    F A^+ B = F_valid A_valid^+ B_valid exactly. B excludes masked keys.

    A^+ is the paper's iterative pseudo-inverse: Z_0 = A^T / (||A||_1 ||A||_inf),
    Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4, `pinv_iterations` times,
    with the norms taken per matrix (the paper's definition; its code takes the
    max over the whole batch). Everything after the input dtype is float32.

    Optional skip (``conv_kernel_size``): a learned depthwise convolution over
    the sequence, one length-K kernel per head shared across D (as in the
    paper's code), of v with masked positions zeroed, added to the output.

    Nystromformer has no explicit [L, L] probabilities; `dropout_rate` is
    accepted and ignored. It is encoder-only: ``causal=True`` raises.

    Cost: O(B H (L M D + M^3 pinv_iterations)) time, O(B H L M) memory.
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
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        conv_kernel_size: int = 0,
    ):
        """Builds the optional convolution.

        Args:
          num_heads: H.
          head_dim: D (unused).
          max_len: the longest length L.
          causal: must be False (Nystromformer is encoder-only).
          dropout_rate: ignored (no explicit probabilities).
          rngs: stream ``params`` (for the convolution).
          num_landmarks: M, the number of segment-mean landmarks.
          pinv_iterations: iterations of the pseudo-inverse.
          conv_kernel_size: K (odd) of the depthwise skip convolution; 0 = no skip
            (0 rather than None so the option can be set from the command line).

        Raises:
          ValueError: for causal=True or a bad option value.
        """
        del head_dim, dropout_rate
        if causal:
            raise ValueError(
                "nystromformer attention is encoder-only: causal=True is not supported"
            )
        for name, value, low in (
            ("num_landmarks", num_landmarks, 1),
            ("pinv_iterations", pinv_iterations, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
        if conv_kernel_size != 0 and (
            isinstance(conv_kernel_size, bool)
            or not isinstance(conv_kernel_size, int)
            or conv_kernel_size < 1
            or conv_kernel_size % 2 == 0
        ):
            raise ValueError(
                f"conv_kernel_size must be 0 (off) or an odd positive int; got {conv_kernel_size!r}"
            )
        self.max_len = max_len
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.conv_HxK = None if conv_kernel_size == 0 else nnx.Param(
            nnx.initializers.normal(conv_kernel_size**-0.5)(
                rngs.params(), (num_heads, conv_kernel_size)
            )
        )

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
        del deterministic
        batch, length, _, dim = q.shape
        check_length("nystromformer", length, self.max_len)
        keep_BxL = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
        scale = dim**-0.5
        zeroed = jnp.where(keep_BxL[:, :, None, None], jnp.stack([k, v]), 0)
        k_BxLxHxD, v_BxLxHxD = zeroed.astype(jnp.float32)
        q_BxLxHxD = q.astype(jnp.float32)
        ql_BxMxHxD, kl_BxMxHxD, valid_BxM = landmarks(q, k, keep_BxL, self.num_landmarks)
        f_BxHxLxM = _masked_softmax(
            jnp.einsum("blhd,bmhd->bhlm", q_BxLxHxD, kl_BxMxHxD) * scale, valid_BxM
        )
        a_BxHxMxM = _masked_softmax(
            jnp.einsum("bnhd,bmhd->bhnm", ql_BxMxHxD, kl_BxMxHxD) * scale, valid_BxM
        )
        both_Bx1xMxM = valid_BxM[:, None, :, None] & valid_BxM[:, None, None, :]
        a_BxHxMxM = jnp.where(both_Bx1xMxM, a_BxHxMxM, jnp.eye(a_BxHxMxM.shape[-1]))
        b_BxHxMxL = _masked_softmax(
            jnp.einsum("bmhd,blhd->bhml", ql_BxMxHxD, k_BxLxHxD) * scale, keep_BxL
        )
        bv_BxHxMxD = jnp.einsum("bhml,blhd->bhmd", b_BxHxMxL, v_BxLxHxD)
        z_BxHxMxM = pseudo_inverse(a_BxHxMxM, self.pinv_iterations)
        zbv_BxHxMxD = jnp.matmul(z_BxHxMxM, bv_BxHxMxD, precision=jax.lax.Precision.HIGHEST)
        out_BxLxHxD = jnp.einsum("bhlm,bhmd->blhd", f_BxHxLxM, zbv_BxHxMxD)
        if self.conv_HxK is not None:
            out_BxLxHxD = out_BxLxHxD + _depthwise_conv(v_BxLxHxD, self.conv_HxK[...])
        return out_BxLxHxD.astype(q.dtype)


def segment_ids(length: int, num_landmarks: int) -> np.ndarray:
    """Segment of each position -> [L]: M = min(num_landmarks, L) contiguous segments.

    The first L mod M segments hold ceil(L / M) positions, the rest floor(L / M)
    (as `np.array_split`); for L divisible by M, the paper's equal segments.
    """
    m = min(num_landmarks, length)
    sizes_M = np.full(m, length // m) + (np.arange(m) < length % m)
    return np.repeat(np.arange(m), sizes_M)


def landmarks(
    q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, keep_BxL: jax.Array, num_landmarks: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Segment means of q and k over real tokens, and which segments have one.

    Args:
      q_BxLxHxD, k_BxLxHxD: queries and keys (masked positions are ignored).
      keep_BxL: True at real tokens.
      num_landmarks: the requested M (at most L are made).

    Returns:
      q landmarks [B, M, H, D], k landmarks [B, M, H, D] (zero for a segment
      without a real token) and valid [B, M] (the segment has a real token).
    """
    length = q_BxLxHxD.shape[1]
    ids_L = segment_ids(length, num_landmarks)
    onehot_LxM = jnp.asarray(ids_L[:, None] == np.arange(ids_L[-1] + 1), jnp.float32)
    weight_BxLxM = keep_BxL[:, :, None] * onehot_LxM
    count_BxM = weight_BxLxM.sum(1)
    inv_BxM = 1.0 / jnp.maximum(count_BxM, 1.0)

    def mean(x_BxLxHxD):
        x_BxLxHxD = jnp.where(keep_BxL[:, :, None, None], x_BxLxHxD, 0).astype(jnp.float32)
        return jnp.einsum("blm,blhd->bmhd", weight_BxLxM, x_BxLxHxD) * inv_BxM[:, :, None, None]

    return mean(q_BxLxHxD), mean(k_BxLxHxD), count_BxM > 0


def pseudo_inverse(a_XxMxM: jax.Array, iterations: int) -> jax.Array:
    """The paper's iterative Moore-Penrose pseudo-inverse of each [M, M] matrix.

    Args:
      a_XxMxM: matrices (any leading axes), float32.
      iterations: number of updates Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4.

    Returns:
      Z [..., M, M], starting from Z_0 = A^T / (max column sum * max row sum).
    """
    abs_a = jnp.abs(a_XxMxM)
    norm_1 = abs_a.sum(-2).max(-1)[..., None, None]
    norm_inf = abs_a.sum(-1).max(-1)[..., None, None]
    z = jnp.swapaxes(a_XxMxM, -1, -2) / (norm_1 * norm_inf)
    eye = jnp.eye(a_XxMxM.shape[-1], dtype=a_XxMxM.dtype)
    # Full float32 matmuls (TPUs and TF32 GPUs would otherwise round to ~bf16).
    matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    for _ in range(iterations):
        az = matmul(a_XxMxM, z)
        z = 0.25 * matmul(z, 13 * eye - matmul(az, 15 * eye - matmul(az, 7 * eye - az)))
    return z


def _masked_softmax(logits: jax.Array, keep_BxN: jax.Array) -> jax.Array:
    """Softmax over the last axis (keys), excluding keys where keep [B, N] is False."""
    keep = keep_BxN[:, None, None, :]
    return jax.nn.softmax(jnp.where(keep, logits, MASKED_LOGIT), axis=-1)


def _depthwise_conv(v_BxLxHxD: jax.Array, kernel_HxK: jax.Array) -> jax.Array:
    """out[b, l, h] = sum_t kernel[h, t] v[b, l + t - K // 2, h] (zero padded), per d."""
    batch, length, heads, dim = v_BxLxHxD.shape
    x_NxLxH = jnp.moveaxis(v_BxLxHxD, 3, 1).reshape(batch * dim, length, heads)
    out_NxLxH = jax.lax.conv_general_dilated(
        x_NxLxH,
        kernel_HxK.T[:, None, :],  # [K, 1, H]: one input channel per group
        window_strides=(1,),
        padding="SAME",
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=heads,
    )
    return jnp.moveaxis(out_NxLxH.reshape(batch, dim, length, heads), 1, 3)
