"""Performer / FAVOR+ (Choromanski et al., 2021): random features for the softmax kernel.

With x = q / D^(1/4) (so that x_q . x_k = q . k / sqrt(D)) and m random vectors w_r,

    exp(x_q . x_k) = E_w[exp(w . x_q - |x_q|^2/2) exp(w . x_k - |x_k|^2/2)],
    phi(x)_r = exp(w_r . x - |x|^2 / 2) / sqrt(m)          (kernel="softmax"),

are positive random features whose dot product estimates the softmax kernel; the
w_r are orthogonal in blocks of D (QR of a Gaussian matrix) with chi(D)-distributed
norms, drawn once from the ``params`` stream and redrawn only by `redraw(key)`.
kernel="relu" uses phi(x)_r = relu(w_r . x) / sqrt(m) instead.

kernel="generalized_relu" has no random projection: phi(x) = relu(x) + 1e-3 on the raw
query or key (no D^(-1/4) scaling), F = D, and `num_features` is not used. This is the
"generalized attention" of the Performer code that LRA released, and the attention its
Performer rows for Text, Retrieval, Image and Pathfinder ran (performer.py's default
attention_fn_cls="generalized", whose make_fast_generalized_attention defaults are
features_type="deterministic", kernel_fn=relu, kernel_epsilon=0.001, normalize_data=False);
it is a linear attention with a relu feature map, not an estimate of softmax.

Scale and stabiliser. Constant factors of the query features, and of all key
features together, cancel in the output's ratio; only the eps added to its
denominator sees them, so they are chosen to make the denominator large (about one
per key that a query matches) and exp() never overflow, without mixing information
across positions:
  * the 1/sqrt(m) of the estimator is left out;
  * a query's features are divided by exp(max_r w_r . x_q - |x_q|^2/2), a constant
    per query, so its largest feature is 1;
  * a key's features are returned as (phi / exp(s), s) with
    s = max_r w_r . x_k - |x_k|^2/2 (stop-gradient); the linear-attention core
    rescales them by exp(s - max s) over the keys a query may see (the running
    maximum for causal attention), so the largest is 1 and nothing depends on masked
    or later tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import Choice
from lra.models.attention.linear import KernelizedAttention


class Kernel(Choice):
    """The kernel that Performer's random features estimate."""

    SOFTMAX = "softmax"  # positive features exp(w.x - |x|^2/2): FAVOR+
    RELU = "relu"  # relu(w.x): a generalised kernel, not softmax
    GENERALIZED_RELU = "generalized_relu"  # relu(x) + 1e-3, no projection (LRA's default)


# kernel_epsilon of LRA's make_fast_generalized_attention (performer_attention.py), added
# to every feature of kernel="generalized_relu".
GENERALIZED_EPSILON = 1e-3


class RandomFeatures(nnx.Variable):
    """Random projection vectors: state (saved with the model), never trained."""


def orthogonal_features(key: jax.Array, num_features: int, dim: int) -> jax.Array:
    """m x D random vectors, orthogonal within each block of D, Gaussian-like norms.

    Args:
      key: a JAX random key.
      num_features: m, the number of vectors.
      dim: D, their dimension.

    Returns:
      float32 [num_features, dim].
    """
    blocks = -(-num_features // dim)
    key_q, key_norm = jax.random.split(key)
    gaussian_NxDxD = jax.random.normal(key_q, (blocks, dim, dim), jnp.float32)
    q_NxDxD, r_NxDxD = jnp.linalg.qr(gaussian_NxDxD)
    signs_NxD = jnp.sign(jnp.diagonal(r_NxDxD, axis1=1, axis2=2))
    rows_NxDxD = jnp.swapaxes(q_NxDxD * signs_NxD[:, None, :], 1, 2)  # Haar rows
    rows_MxD = rows_NxDxD.reshape(blocks * dim, dim)[:num_features]
    norms_M = jnp.linalg.norm(jax.random.normal(key_norm, (num_features, dim), jnp.float32),
                             axis=-1)
    return rows_MxD * norms_M[:, None]


class PerformerAttention(KernelizedAttention):
    """FAVOR+ attention on the linear-attention core.

    Options: `kernel` (softmax | relu | generalized_relu), `num_features` m (default
    256; unused by generalized_relu, whose F is D), `form` (parallel | chunked |
    recurrent), `chunk_size`, `short_conv` (linear.py). The random vectors are shared by all heads, drawn at
    construction from ``rngs.params`` and redrawn only by `redraw` (generalized_relu
    has none). `dropout_rate` is accepted and not applied (no attention probabilities).
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
        kernel: str = "softmax",
        num_features: int = 256,
        form: str = "chunked",
        chunk_size: int = 64,
        short_conv: int = 0,
    ):
        super().__init__(
            num_heads=num_heads, head_dim=head_dim, max_len=max_len, causal=causal,
            dropout_rate=dropout_rate, rngs=rngs, form=form, chunk_size=chunk_size,
            short_conv=short_conv,
        )
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int; got {num_features!r}")
        self.kernel = Kernel(kernel)
        self.m = num_features
        if self.kernel is Kernel.GENERALIZED_RELU:
            self.w_MxD = None  # no random projection
        else:
            self.w_MxD = RandomFeatures(
                orthogonal_features(rngs.params(), num_features, head_dim)
            )

    @property
    def num_features(self) -> int:
        return self.head_dim if self.kernel is Kernel.GENERALIZED_RELU else self.m

    def redraw(self, key: jax.Array) -> None:
        """Replaces the random vectors with fresh ones drawn from `key` (none: no-op)."""
        if self.w_MxD is not None:
            self.w_MxD.set_value(orthogonal_features(key, self.m, self.head_dim))

    def features(self, x_BxLxHxD, positions_BxL, *, query):
        del positions_BxL
        if self.kernel is Kernel.GENERALIZED_RELU:
            return jax.nn.relu(x_BxLxHxD) + GENERALIZED_EPSILON, None
        x_BxLxHxD = x_BxLxHxD * self.head_dim**-0.25
        proj_BxLxHxM = jnp.einsum("blhd,md->blhm", x_BxLxHxD, self.w_MxD[...])
        if self.kernel is Kernel.RELU:
            return jax.nn.relu(proj_BxLxHxM), None
        log_BxLxHxM = proj_BxLxHxM - 0.5 * jnp.sum(x_BxLxHxD**2, -1, keepdims=True)
        shift_BxLxH = jax.lax.stop_gradient(log_BxLxHxM.max(-1))
        phi_BxLxHxM = jnp.exp(log_BxLxHxM - shift_BxLxH[..., None])
        return phi_BxLxHxM, (None if query else shift_BxLxH)
