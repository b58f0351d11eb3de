"""Pieces shared by the state-space mixers (s4d.py, s5.py, lru.py).

- `SsmParam`: the parameter type of a model's state-space parameters (eigenvalues,
  input matrices, timesteps). `lra.training.train` gives them `config.ssm_learning_rate` and no
  weight decay, as the S4/S5/LRU papers train them; every other parameter is an
  ordinary `nnx.Param`.
- `masked`: zeroes the inputs at padded positions, so padding adds nothing to any
  state. A linear recurrence started from a zero state then stays at zero through
  right padding, so the reverse direction of a bidirectional model (run on the
  flipped sequence) starts at the last real token.
- `linear_recurrence`: h_t = a_t * h_{t-1} + b_t for all t at once with
  `jax.lax.associative_scan` (diagonal, complex or real), the parallel scan of S5 and
  the LRU (and S4D's recurrent form); with the sequence split over the `seq` mesh axis,
  by state passing across the devices.
- `OutputGate`: S5's output nonlinearities (GELU and the GLU variants), which S4D and the
  LRU use too; dropout after each as in S5's code. Which GELU (exact, or the tanh
  approximation) each model's own code uses is the model's choice (`approximate_gelu`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import F32, Choice, boolean
from lra.models.attention.sequence_parallel import map_over_sequence, splits_sequence
from lra.models.attention.state_passing import affine, gather_summaries, incoming_state


class SsmParam(nnx.Param):
    """A state-space parameter: trained with `config.ssm_learning_rate`, no weight decay."""


def masked(x_BxLxE: jax.Array, mask_BxL: jax.Array | None) -> jax.Array:
    """x with zeros at padded positions (mask False); x itself if mask is None."""
    if mask_BxL is None:
        return x_BxLxE
    return jnp.where(mask_BxL[..., None], x_BxLxE, jnp.zeros((), x_BxLxE.dtype))


def take_rows(x_BxLx_: jax.Array, idx_BxL: jax.Array) -> jax.Array:
    """x_BxLx_[b, idx_BxL[b, l]] for every row b and place l."""
    return jnp.take_along_axis(x_BxLx_, idx_BxL[..., None], axis=1)


def real_tokens_first(x_BxLxC: jax.Array, keep_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(each row's real tokens moved to its front in order, zeros after them; the order
    [B, L] that moved them: `take_rows(y, jnp.argsort(order, axis=1))` moves them back).
    How the mixers whose token windows skip padding (the Mamba2 block's convolution,
    RWKV-7's token shift) see only real tokens."""
    order_BxL = jnp.argsort(~keep_BxL, axis=1, stable=True)
    return take_rows(jnp.where(keep_BxL[..., None], x_BxLxC, 0.0), order_BxL), order_BxL


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
    if splits_sequence():  # the sequence split over the `seq` mesh axis
        to_front = lambda x: jnp.moveaxis(x, axis, 1)
        kernel = functools.partial(_recurrence_shard, reverse=reverse)
        h = map_over_sequence(kernel, to_front(a_xLxN), to_front(b_xLxN))
        return jnp.moveaxis(h, 1, axis)
    return _scan_with_products(a_xLxN, b_xLxN, axis=axis, reverse=reverse)[1]


def _scan_with_products(a_xLxN, b_xLxN, *, axis: int, reverse: bool):
    """(the products a_t ... a_s from the start s, h with h_{s-1} = 0), by
    `jax.lax.associative_scan` along `axis` (from the end if `reverse`)."""
    def combine(earlier, later):
        a_1, b_1 = earlier
        a_2, b_2 = later
        return a_2 * a_1, a_2 * b_1 + b_2

    return jax.lax.associative_scan(combine, (a_xLxN, b_xLxN), reverse=reverse, axis=axis)


def _recurrence_shard(a_BxSxN, b_BxSxN, *, reverse: bool):
    """`linear_recurrence` on one device's shards [b, S, ...], by state passing
    (lra/models/attention/state_passing.py): each device scans its shard from a zero
    state; the (product of a, last h) of every device are all-gathered once; the state
    entering the shard, h_in, is the fold of the devices before it (after it, reverse),
    and h_t gains (a_t ... a_s) h_in."""
    products, h = _scan_with_products(a_BxSxN, b_BxSxN, axis=1, reverse=reverse)
    last = 0 if reverse else -1  # the shard's end in the scan's direction
    gathered = gather_summaries((products[:, last], h[:, last]))
    fold = affine(lambda a, state: a * state)
    h_in = incoming_state(gathered, fold, jnp.zeros_like(h[:, last]), reverse=reverse)
    return h + products * h_in[:, None]


class Activation(Choice):
    """S5's output nonlinearities (its `activation_fn`)."""

    GELU = "gelu"  # y = gelu(x)
    FULL_GLU = "full_glu"  # y = W1 gelu(x) * sigmoid(W2 gelu(x))
    HALF_GLU1 = "half_glu1"  # y = gelu(x) * sigmoid(W gelu(x))
    HALF_GLU2 = "half_glu2"  # y = x * sigmoid(W gelu(x))


class OutputGate(nnx.Module):
    """The nonlinearity after an SSM, as S5's `SequenceLayer`: E -> E, with dropout.

    `approximate_gelu`: GELU's tanh approximation (flax's `nn.gelu`, which S5's code
    calls) if True, the exact x Phi(x) (PyTorch's `nn.GELU()`, S4's code) if False.
    """

    def __init__(self, emb_dim: int, activation: str, dropout: float, *,
                 approximate_gelu: bool, dtype: Any, rngs: nnx.Rngs):
        self.activation = Activation(activation)
        self.approximate_gelu = approximate_gelu
        dense = lambda: nnx.Linear(emb_dim, emb_dim, dtype=dtype, rngs=rngs)
        self.out1 = dense() if self.activation is Activation.FULL_GLU else None
        self.out2 = None if self.activation is Activation.GELU else dense()
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, y_BxLxE: jax.Array, *, deterministic: bool) -> jax.Array:
        drop = lambda x: self.dropout(x, deterministic=deterministic)
        g = drop(jax.nn.gelu(y_BxLxE, approximate=self.approximate_gelu))
        if self.activation is Activation.GELU:
            return g
        if self.activation is Activation.FULL_GLU:
            return drop(self.out1(g) * jax.nn.sigmoid(self.out2(g)))
        if self.activation is Activation.HALF_GLU1:
            return drop(g * jax.nn.sigmoid(self.out2(g)))
        return drop(y_BxLxE * jax.nn.sigmoid(self.out2(g)))


# --- the diagonal SSM layer of S4D (s4d.py) and the LRU (lru.py) ---------------------------------------------


def complex_normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    """A complex array stored as [..., 2] (real, imaginary), each part N(0, std^2)."""
    return std * jax.random.normal(key, (*shape, 2), F32)


def as_complex(param_xx2: nnx.Variable | jax.Array) -> jax.Array:
    """The complex64 value of a parameter stored as [..., 2] (real, imaginary)."""
    p = param_xx2[...]
    return jax.lax.complex(p[..., 0], p[..., 1])


class DiagonalSsmLayer(nnx.Module):
    """A diagonal linear recurrence x_k = a x_{k-1} + b_k, its readout, D skip and gate.

    The layer of S4D and the LRU. A subclass calls `_setup` in its constructor, creates
    `C_fwd` (and `C_bwd` if `self.bidirectional`) and `D_E`, and defines:

      `_transition()`  a, the complex per-state multiplier, shape S (the state's shape);
      `_drive(u)`      b, the state input for u [B, L, E] (float32): [B, L, *S] complex;
      `_read(x, C)`    the real output [B, L, E] of states x [B, L, *S] through C.

    `__call__` masks x, computes the SSM output in float32/complex64 (`_ssm`: both scans
    by default; a subclass may compute the same numbers another way), adds D u and
    applies the output gate; `init_state` / `step` decode a causal layer token by token.
    """

    # The papers' blocks put their GLU inside the layer (OutputGate) and have no separate
    # MLP sub-block: the configs' default of `model.block_mlp`.
    block_mlp = False

    def _setup(self, *, emb_dim: int, causal: bool, bidirectional: bool, activation: str,
               approximate_gelu: bool, dropout: float, dtype: Any, rngs: nnx.Rngs) -> None:
        boolean("bidirectional", bidirectional)
        self.emb_dim = emb_dim
        self.causal = causal
        self.bidirectional = bidirectional and not causal  # causal implies one direction
        self.gate = OutputGate(emb_dim, activation, dropout,
                               approximate_gelu=approximate_gelu, dtype=dtype, rngs=rngs)

    def _transition(self) -> jax.Array:
        raise NotImplementedError

    def _drive(self, u_BxLxE: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _read(self, x_BxLxS: jax.Array, C: nnx.Variable) -> jax.Array:
        raise NotImplementedError

    def _ssm(self, u_BxLxE: jax.Array) -> jax.Array:
        """The SSM output without the D term: forward scan, plus the reverse scan read
        through C_bwd if bidirectional (S5's `apply_ssm`: both directions share a, b)."""
        a_11xS = self._transition()[None, None]
        b_BxLxS = self._drive(u_BxLxE)
        y_BxLxE = self._read(linear_recurrence(a_11xS, b_BxLxS), self.C_fwd)
        if self.bidirectional:
            x_BxLxS = linear_recurrence(a_11xS, b_BxLxS, reverse=True)
            y_BxLxE = y_BxLxE + self._read(x_BxLxS, self.C_bwd)
        return y_BxLxE

    def __call__(self, x_BxLxE: jax.Array, mask_BxL: jax.Array | None = None, *,
                 deterministic: bool) -> jax.Array:
        """x [B, L, E], mask [B, L] bool (True = real) or None -> [B, L, E] in x's dtype."""
        u_BxLxE = masked(x_BxLxE, mask_BxL).astype(F32)
        y_BxLxE = self._ssm(u_BxLxE) + self.D_E[...] * u_BxLxE
        return self.gate(y_BxLxE, deterministic=deterministic).astype(x_BxLxE.dtype)

    @property
    def decodes(self) -> bool:
        """True if the layer decodes token by token (`init_state` / `step`): causal."""
        return self.causal

    def init_state(self, batch_size: int) -> jax.Array:
        """The empty decoding state: the forward recurrence's x, zeros [B, *S] complex64."""
        return jnp.zeros((batch_size, *self._transition().shape), jnp.complex64)

    def step(self, state: jax.Array, x_BxE: jax.Array, mask_B: jax.Array | None,
             position: int) -> tuple[jax.Array, jax.Array]:
        """Decodes one token: x = a x + b(u), y = gate(read(x) + D u).

        Applied to tokens 0, 1, ... it gives the causal `__call__` outputs. A padded
        token (mask False) has zero input: the state decays as in the full pass.

        Args:
          state: from `init_state` or the previous step.
          x_BxE: the token's input.
          mask_B: bool, False where the token is padding; None: all real.
          position: the token's index (unused: the recurrence is time-invariant).

        Returns:
          (new state, output [B, E] in x's dtype).

        Raises:
          ValueError: if the layer is not causal.
        """
        del position
        if not self.causal:
            raise ValueError("step decodes a causal layer; build it with causal=True")
        mask_Bx1 = None if mask_B is None else mask_B[:, None]
        u_Bx1xE = masked(x_BxE[:, None], mask_Bx1).astype(F32)
        state = self._transition() * state + self._drive(u_Bx1xE)[:, 0]
        y_Bx1xE = self._read(state[:, None], self.C_fwd) + self.D_E[...] * u_Bx1xE
        return state, self.gate(y_Bx1xE, deterministic=True)[:, 0].astype(x_BxE.dtype)


# --- S4D -----------------------------------------------------------------------------
