"""Gated Linear Attention (Yang et al., 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training") on the gated linear-attention core (gated.py).

A data-dependent forget gate per key channel, from a low-rank projection:

    alpha_t = sigmoid(x_t W1 W2 + b)^(1/tau),     S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,
    o_t = q_t S_t,

computed in log space (log alpha = logsigmoid(.) / tau, tau = 16, rank 16). The core
sees only q, k, v per head, so the gate's input x_t is the token's key k_t of the same
head (before scaling): W1 [H, D, r], W2 [H, r, D], b [H, D] per head. Queries are
scaled by D^-0.5 (as GLA's code). The GLA layer's output path: a per-head GroupNorm
(`group_norm`) and then the output gate swish(q_t W_g + b_g) (`output_gate`), with
the gate's input the token's (unscaled) query of the same head, W_g [H, D, D].
Bidirectional as fwd + rev - diag (gated.py).

The decay is per key channel, so the chunked form's C x C matrix inside each chunk
(C = `chunk_size`, 64) cannot be a plain q k^T scaled per entry: gated.py builds it by
recursive halving (`_intra_channels`), one matmul per block below the diagonal with q and
k rescaled around the block's boundary, C D log2(C) elementwise work and no [C, C, D]
array; the state of earlier chunks is carried by `lax.scan` as for every gated family.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.gated import GatedAttention


class GlaAttention(GatedAttention):
    """GLA on the gated core.

    Options: `rank` (r of the gate projection), `tau` (gate temperature),
    `output_gate` (swish gate from q), `group_norm`, `form` (parallel | chunked |
    recurrent), `chunk_size`, `chunk_strategy` (auto | scan | batched), `short_conv`
    (gated.py). `dropout_rate` is accepted and not applied.
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
        rank: int = 16,
        tau: float = 16.0,
        output_gate: bool = True,
        group_norm: bool = True,
        form: str = "chunked",
        chunk_size: int = 64,
        chunk_strategy: str = "auto",
        short_conv: int = 0,
    ):
        del dropout_rate  # no probabilities
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_len=max_len,
                         causal=causal, form=form, chunk_size=chunk_size,
                         group_norm=group_norm, short_conv=short_conv, rngs=rngs,
                         chunk_strategy=chunk_strategy)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int; got {rank!r}")
        if not tau > 0:
            raise ValueError(f"tau must be positive; got {tau!r}")
        self.tau = float(tau)
        normal = jax.nn.initializers.normal
        H, D = num_heads, head_dim
        f32 = jnp.float32  # not the default float, which x64 mode makes float64
        self.gate_down_HxDxR = nnx.Param(normal(D**-0.5)(rngs.params(), (H, D, rank), f32))
        self.gate_up_HxRxD = nnx.Param(normal(rank**-0.5)(rngs.params(), (H, rank, D), f32))
        self.gate_bias_HxD = nnx.Param(jnp.zeros((H, D), f32))
        if output_gate:
            self.out_gate_HxDxD = nnx.Param(normal(D**-0.5)(rngs.params(), (H, D, D), f32))
            self.out_gate_bias_HxD = nnx.Param(jnp.zeros((H, D), f32))
        else:
            self.out_gate_HxDxD = None

    def gate(self, q, k, v):
        low_BxLxHxR = jnp.einsum("blhd,hdr->blhr", k, self.gate_down_HxDxR[...])
        logits_BxLxHxD = jnp.einsum("blhr,hrd->blhd", low_BxLxHxR, self.gate_up_HxRxD[...])
        g_BxLxHxD = jax.nn.log_sigmoid(logits_BxLxHxD + self.gate_bias_HxD[...]) / self.tau
        return q * self.head_dim**-0.5, k, v, g_BxLxHxD

    def finish(self, out_BxLxHxD, q, k, v):
        out_BxLxHxD = super().finish(out_BxLxHxD, q, k, v)
        if self.out_gate_HxDxD is None:
            return out_BxLxHxD
        r_BxLxHxD = jnp.einsum("blhd,hde->blhe", q, self.out_gate_HxDxD[...])
        return out_BxLxHxD * jax.nn.swish(r_BxLxHxD + self.out_gate_bias_HxD[...])
