"""The attention `ssd`: Mamba2's SSD core (Dao & Gu, 2024, "Transformers are SSMs:
Generalized Models and Efficient Algorithms Through Structured State Space Duality") on the
gated linear-attention core (gated.py). The Mamba2 block (in_proj, convolution, gate, norm)
is not part of it: that block is the sequence model `mamba2` of the mixer registry
(lra/models/mixers/mamba2.py), which runs this core inside. As a mixer, `ssd` is this core
in the attention wrapper (q/k/v and output projections, lra/models/mixers/multi_head.py).

With q, k, v standing for C, B, x, each head has a scalar data-dependent decay and
step size:

    dt_t = softplus(x_t . w_h + dt_bias_h),     a_t = exp(-dt_t exp(A_log_h)),
    S_t = a_t S_{t-1} + k_t^T (dt_t x_t),        o_t = q_t S_t + D_h x_t,

so the log-gate is -dt_t exp(A_log_h) and the input is scaled by dt. The core sees only
q, k, v per head, so dt's input is x_t = v_t of the same head, projected by w_h [D]
(`dt_weight_HxD`). A_log and dt_bias are initialised as Mamba2: A ~ U[1, 16],
dt ~ log-uniform in [0.001, 0.1] (at least 1e-4) and dt_bias = softplus^-1(dt).
The D skip (`d_skip`, D = 1 at init as Mamba2) is off by default: the encoder's block
already adds its input x around the mixer, and a second x at full weight drowns the
dt-scaled SSD term early in training (with it, the far-pair test of
tests/test_learning.py stays at chance within its 300 steps; without it, it learns).
No scaling of q or k (SSD has none). The output is normalised per head
(`group_norm`, on by default), standing in for the Mamba2 block's norm: without it the
dt-scaled output is small and the far-pair test (one layer) stays at chance. Bidirectional as
fwd + rev - diag (gated.py), the D skip added once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.gated import GatedAttention

A_RANGE = (1.0, 16.0)
DT_RANGE = (0.001, 0.1)
DT_FLOOR = 1e-4


def mamba2_init(key: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array]:
    """(A_log [H], dt_bias [H]) as Mamba2 initialises them."""
    key_a, key_dt = jax.random.split(key)
    a_H = jax.random.uniform(key_a, (num_heads,), jnp.float32, A_RANGE[0], A_RANGE[1])
    lo, hi = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
    dt_H = jnp.exp(jax.random.uniform(key_dt, (num_heads,), jnp.float32, lo, hi))
    dt_H = jnp.maximum(dt_H, DT_FLOOR)
    return jnp.log(a_H), dt_H + jnp.log(-jnp.expm1(-dt_H))  # inverse softplus


class SsdAttention(GatedAttention):
    """SSD on the gated core (the attention `ssd`).

    Options: `d_skip` (add D_h x_t; off, see the module docstring), `group_norm`
    (per-head GroupNorm of the output, on: it stands in for the norm that Mamba2's block
    applies to the SSD output before its output projection),
    `form` (parallel | chunked | recurrent), `chunk_size`, `short_conv` (gated.py).
    `dropout_rate` is accepted and not applied.
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
        d_skip: bool = False,
        group_norm: bool = True,
        form: str = "chunked",
        chunk_size: int = 64,
        short_conv: int = 0,
    ):
        del dropout_rate  # no probabilities
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_len=max_len,
                         causal=causal, form=form, chunk_size=chunk_size,
                         group_norm=group_norm, short_conv=short_conv, rngs=rngs)
        a_log_H, dt_bias_H = mamba2_init(rngs.params(), num_heads)
        self.A_log_H = nnx.Param(a_log_H)
        self.dt_bias_H = nnx.Param(dt_bias_H)
        self.dt_weight_HxD = nnx.Param(
            jax.nn.initializers.normal(head_dim**-0.5)(rngs.params(), (num_heads, head_dim),
                                                        jnp.float32))
        self.D_H = nnx.Param(jnp.ones((num_heads,), jnp.float32)) if d_skip else None

    def gate(self, q, k, v):
        dt_BxLxH = jax.nn.softplus(
            jnp.einsum("blhd,hd->blh", v, self.dt_weight_HxD[...]) + self.dt_bias_H[...])
        g_BxLxHx1 = (-dt_BxLxH * jnp.exp(self.A_log_H[...]))[..., None]
        return q, k, v * dt_BxLxH[..., None], g_BxLxHx1

    def finish(self, out_BxLxHxD, q, k, v):
        if self.D_H is not None:
            out_BxLxHxD = out_BxLxHxD + self.D_H[...][:, None] * v
        return super().finish(out_BxLxHxD, q, k, v)
