"""Taylor features (as in Based, Arora et al., 2024): exp(q.k/sqrt(d)) to second order.

With x = q / d^(1/4) and y = k / d^(1/4) (d the dimension of q and k),

    phi(x) = [1, x, vec(x x^T) / sqrt(2)]               (F = 1 + d + d^2),
    phi(x) . phi(y) = 1 + t + t^2 / 2,   t = q . k / sqrt(d),

the second-order Taylor expansion of exp(t). It is > 0 for every t, so the
denominator of linear attention stays positive. The full outer product is kept (as
Based does) rather than its d(d+1)/2 distinct entries.

F grows as d^2, so the option `feature_dim` (default 0 = off) first projects queries
and keys, per head, with learned D x feature_dim matrices (one for queries, one for
keys, as Based's feature projections); then d = feature_dim. Based uses 16.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lra.models.attention.linear import KernelizedAttention


class TaylorAttention(KernelizedAttention):
    """Second-order Taylor (Based) features on the linear-attention core.

    Options: `feature_dim` (project q and k to this many dimensions per head before
    the expansion; 0 = no projection, d = D), `form` (parallel | chunked |
    recurrent), `chunk_size`, `short_conv` (linear.py). `dropout_rate` is accepted and not applied (no attention
    probabilities).
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
        feature_dim: int = 0,
        form: str = "chunked",
        chunk_size: int = 64,
        short_conv: int = 0,
    ):
        super().__init__(
            num_heads=num_heads, head_dim=head_dim, max_len=max_len, causal=causal,
            dropout_rate=dropout_rate, rngs=rngs, form=form, chunk_size=chunk_size,
            short_conv=short_conv,
        )
        if not isinstance(feature_dim, int) or feature_dim < 0:
            raise ValueError(f"feature_dim must be an int >= 0 (0 = off); got {feature_dim!r}")
        self.dim = feature_dim or head_dim
        init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2)
        shape = (num_heads, head_dim, feature_dim)
        project = lambda: nnx.Param(init(rngs.params(), shape)) if feature_dim else None
        self.query_proj_HxDxP = project()
        self.key_proj_HxDxP = project()

    @property
    def num_features(self) -> int:
        return 1 + self.dim + self.dim**2

    def features(self, x_BxLxHxD, positions_BxL, *, query):
        del positions_BxL
        proj = self.query_proj_HxDxP if query else self.key_proj_HxDxP
        if proj is not None:
            x_BxLxHxD = jnp.einsum("blhd,hdp->blhp", x_BxLxHxD, proj[...])
        x_BxLxHxP = x_BxLxHxD * self.dim**-0.25
        outer_BxLxHxPP = (x_BxLxHxP[..., :, None] * x_BxLxHxP[..., None, :]).reshape(
            *x_BxLxHxP.shape[:-1], self.dim**2
        )
        ones_BxLxHx1 = jnp.ones((*x_BxLxHxP.shape[:-1], 1), x_BxLxHxP.dtype)
        return jnp.concatenate([ones_BxLxHx1, x_BxLxHxP, outer_BxLxHxPP * 0.5**0.5], -1), None
