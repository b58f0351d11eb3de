"""RetNet's retention (Sun et al., 2023, "Retentive Network: A Successor to Transformer
for Large Language Models") on the gated linear-attention core (gated.py).

Each head h has a fixed decay gamma_h, by default RetNet's schedule
gamma_h = 1 - 2^(-5-h), h = 0..H-1, and no denominator:

    o_i = sum_{j <= i} gamma_h^(i-j) (q_i . k_j) v_j,       S_t = gamma_h S_{t-1} + k_t^T v_t,

bidirectional as fwd + rev - diag (gated.py), i.e. gamma^|i-j| for every pair. Keys
are scaled by D^-0.5, as RetNet's code does (`k *= self.scaling`), and the output of
each head is normalised by a GroupNorm (one group per head, `group_norm`, the paper's
default). The xPos rotation is left to the encoder's `positions`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from lra.models.attention.gated import GatedAttention


def retnet_gammas(num_heads: int) -> tuple[float, ...]:
    """RetNet's decay schedule: gamma_h = 1 - 2^(-5-h) for h = 0..H-1."""
    return tuple(1.0 - 2.0 ** (-5 - h) for h in range(num_heads))


class RetNetAttention(GatedAttention):
    """Multi-scale retention on the gated core.

    Options: `gammas` (one decay per head in (0, 1]; empty = RetNet's schedule),
    `group_norm` (per-head GroupNorm of the output), `form` (parallel | chunked |
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
        gammas: tuple[float, ...] = (),
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
        gammas = tuple(gammas) or retnet_gammas(num_heads)
        if len(gammas) != num_heads or not all(0.0 < g <= 1.0 for g in gammas):
            raise ValueError(f"gammas must be {num_heads} decays in (0, 1]; got {gammas!r}")
        self.log_gamma_H = tuple(math.log(g) for g in gammas)

    def gate(self, q, k, v):
        log_gamma_1x1xHx1 = jnp.asarray(self.log_gamma_H, jnp.float32)[None, None, :, None]
        g_BxLxHx1 = jnp.broadcast_to(log_gamma_1x1xHx1, (*q.shape[:3], 1))
        return q, k * self.head_dim**-0.5, v, g_BxLxHx1
