"""Pieces shared by the state-space mixers (s4d.py, s5.py, lru.py).

- `SsmParam`: the parameter type of a model's state-space parameters (eigenvalues,
  input matrices, timesteps). `lra.train` gives them `config.ssm_learning_rate` and no
  weight decay, as the S4/S5/LRU papers train them; every other parameter is an
  ordinary `nnx.Param`.
- `masked`: zeroes the inputs at padded positions, so padding adds nothing to any
  state. A linear recurrence started from a zero state then stays at zero through
  right padding, so the reverse direction of a bidirectional model (run on the
  flipped sequence) starts at the last real token.
- `linear_recurrence`: h_t = a_t * h_{t-1} + b_t for all t at once with
  `jax.lax.associative_scan` (diagonal, complex or real), the parallel scan of S5 and
  the LRU.
- `OutputGate`: S5's output nonlinearities (GELU and the GLU variants), which LRU uses
  too; dropout after each as in S5's code.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention import Choice


class SsmParam(nnx.Param):
    """A state-space parameter: trained with `config.ssm_learning_rate`, no weight decay."""


def masked(x_BxLxE: jax.Array, mask_BxL: jax.Array | None) -> jax.Array:
    """x with zeros at padded positions (mask False); x itself if mask is None."""
    if mask_BxL is None:
        return x_BxLxE
    return jnp.where(mask_BxL[..., None], x_BxLxE, jnp.zeros((), x_BxLxE.dtype))


def step_input(x_BxE: jax.Array, mask_B: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """One decoding step's (keep_B, x with zeros at padding): keep_B is bool [B], True at
    real tokens (all True when mask is None); a recurrence keeps its state where False."""
    keep_B = jnp.ones(x_BxE.shape[:1], bool) if mask_B is None else mask_B.astype(bool)
    return keep_B, masked(x_BxE, keep_B)


def linear_recurrence(a_xLxN: jax.Array, b_xLxN: jax.Array, *, axis: int = 1,
                      reverse: bool = False) -> jax.Array:
    """h_t = a_t * h_{t-1} + b_t with h_{-1} = 0, every t at once (parallel scan).

    Args:
      a_xLxN: the per-step multipliers, broadcastable to b (e.g. [1, L, N] or [B, L, N]).
      b_xLxN: the inputs [..., L, ...] (real or complex).
      axis: the time axis.
      reverse: if True, runs from the last step to the first (h_t = a_t h_{t+1} + b_t).

    Returns:
      h, the shape of b.
    """
    a_xLxN = jnp.broadcast_to(a_xLxN, b_xLxN.shape).astype(b_xLxN.dtype)

    def combine(earlier, later):
        a_1, b_1 = earlier
        a_2, b_2 = later
        return a_2 * a_1, a_2 * b_1 + b_2

    _, h = jax.lax.associative_scan(combine, (a_xLxN, b_xLxN), reverse=reverse, axis=axis)
    return h


class Activation(Choice):
    """S5's output nonlinearities (its `activation_fn`)."""

    GELU = "gelu"  # y = gelu(x)
    FULL_GLU = "full_glu"  # y = W1 gelu(x) * sigmoid(W2 gelu(x))
    HALF_GLU1 = "half_glu1"  # y = gelu(x) * sigmoid(W gelu(x))
    HALF_GLU2 = "half_glu2"  # y = x * sigmoid(W gelu(x))


class OutputGate(nnx.Module):
    """The nonlinearity after an SSM, as S5's `SequenceLayer`: E -> E, with dropout."""

    def __init__(self, emb_dim: int, activation: str, dropout: float, *, dtype: Any,
                 rngs: nnx.Rngs):
        self.activation = Activation(activation)
        dense = lambda: nnx.Linear(emb_dim, emb_dim, dtype=dtype, rngs=rngs)
        self.out1 = dense() if self.activation is Activation.FULL_GLU else None
        self.out2 = None if self.activation is Activation.GELU else dense()
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, y_BxLxE: jax.Array, *, deterministic: bool) -> jax.Array:
        drop = lambda x: self.dropout(x, deterministic=deterministic)
        g = drop(jax.nn.gelu(y_BxLxE))
        if self.activation is Activation.GELU:
            return g
        if self.activation is Activation.FULL_GLU:
            return drop(self.out1(g) * jax.nn.sigmoid(self.out2(g)))
        if self.activation is Activation.HALF_GLU1:
            return drop(g * jax.nn.sigmoid(self.out2(g)))
        return drop(y_BxLxE * jax.nn.sigmoid(self.out2(g)))
