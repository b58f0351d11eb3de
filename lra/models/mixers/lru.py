"""LRU: the Linear Recurrent Unit (Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De,
"Resurrecting Recurrent Neural Networks for Long Sequences", ICML 2023).

A diagonal complex linear recurrence over N = `state_size` states (Eq. 7, Appendix A):

    lambda = exp(-exp(nu_log) + i exp(theta_log))          (stable exponential form)
    x_k = diag(lambda) x_{k-1} + gamma * (B u_k),  gamma = exp(gamma_log),
    y_k = Re(C x_k) + D * u_k,

B [N, E] and C [E, N] complex, D [E] real. Computed for every token at once with the
parallel scan `ssm.linear_recurrence` (and token by token by `step` when causal).

Initialisation (Sec. 3.3-3.4, Lemma 2, Appendix A): eigenvalues uniform on the ring
r_min <= |lambda| <= r_max with phase uniform in [0, max_phase]: with u1, u2 ~ U[0, 1],
nu = -1/2 log(u1 (r_max^2 - r_min^2) + r_min^2), theta = max_phase u2, stored as
nu_log = log nu, theta_log = log theta; gamma_log = log sqrt(1 - |lambda|^2) (the
normalisation of Sec. 3.4). B: real and imaginary parts N(0, 1/(2E)) (Glorot, with the
extra factor 2 of Appendix A for taking the real part); C: parts N(0, 1/N); D: N(0, 1)
(as NicolasZucchet/minimal-LRU, lru/model.py, which follows the paper's Appendix A).

Defaults: state_size N = 256 (Table 9: ListOps, Retrieval, Pathfinder, PathX; 384
for sCIFAR, 192 for Text); [r_min, r_max] = [0.9, 0.999] (Table 8, the LRU's ring for
sCIFAR and Pathfinder; ListOps [0.0, 0.99], Text and Retrieval [0.5, 0.9], PathX
[0.999, 0.9999]); max_phase = 2 pi (Table 8 caption; pi/10 for PathX, Sec. 3.4).
r_max must be < 1: at |lambda| = 1 the normalisation gamma is 0.

SSM parameters (`ssm.SsmParam`: own learning rate, no weight decay): nu_log,
theta_log, gamma_log and B (Appendix D.2: "a smaller learning rate for the RNN/SSM
parameters A and B ... and gamma", weight decay on all others; minimal-LRU's
train_helpers.py: nu_log, theta_log, gamma_log, B_re, B_im). C, D and the output
layers are ordinary `nnx.Param`s.

Bidirectional (`bidirectional=True`, not causal): a second scan over the reversed
sequence, sharing lambda, gamma and B, read through its own C_bwd, and the two
readouts summed: y_k = Re(C_fwd x_k) + Re(C_bwd x'_k) + D u_k with
x'_k = lambda x'_{k+1} + gamma * (B u_k). The paper uses bidirectional models for
Pathfinder and PathX "using a similar setup as S4" (Appendix D.1). Both S4 and S5
combine the directions this way: shared dynamics, one readout per direction, summed
(state-spaces/s4 src/models/sequence/kernels/fftconv.py: a second C channel on the
reversed sequence; lindermanlab/S5 s5/ssm.py `apply_ssm`: C_tilde = [C1, C2] over the
concatenated forward and reverse states, the same Lambda and B); the LRU paper's
hyperparameters follow S5's (Appendix D.3). No concatenation + projection.
`causal=True` makes the model unidirectional (the `bidirectional` option is then
ignored), so the default options work for causal models too.

Masking: inputs at padded positions are zeroed first (`ssm.masked`), so padding adds
nothing to any state; the zero-initial state stays zero through right padding and
the reverse scan starts at the last real token. A masked hole in the middle is a
time step with zero input (the state decays across it).

Output nonlinearity (`activation`, `ssm.OutputGate`): "full_glu" by default, the
paper's block (Appendix D.1, Fig. 1): GELU, dropout, GLU W1 g * sigmoid(W2 g),
dropout ("half_glu1", the GLU without one linear map as in S5, for PathX). The GELU is
the tanh approximation: the paper releases no training code and its setup is S5's
(Appendix D), whose code calls flax's `nn.gelu` (`approximate=True`), as does
minimal-LRU's `SequenceLayer`. No norm and no residual: the encoder block does
pre-norm + residual.

dtype: parameters are float32; the recurrence runs in complex64 whatever the input
dtype; the output gate computes in `dtype`; the output has x's dtype. The shared
layer (masking, scans, D skip, gate, `init_state` / `step`) is `ssm.DiagonalSsmLayer`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lra import common
from lra.models.mixers import ssm

_F32 = jnp.float32


def ring_init(key: jax.Array, state_size: int, r_min: float, r_max: float,
              max_phase: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(nu_log, theta_log, gamma_log) [N]: lambda uniform on the ring (Lemma 2).

    |lambda|^2 = u1 (r_max^2 - r_min^2) + r_min^2 is uniform in [r_min^2, r_max^2]
    (area-uniform radius); 1 - |lambda|^2 is computed directly (not as 1 minus a
    number near 1), so nu and gamma stay accurate for r_max near 1 in float32.
    """
    key_r, key_phase = jax.random.split(key)
    u1 = jax.random.uniform(key_r, (state_size,), _F32)
    u2 = 1.0 - jax.random.uniform(key_phase, (state_size,), _F32)  # (0, 1]: log finite
    one_minus_r2 = (1.0 - r_min**2) - u1 * (r_max**2 - r_min**2)  # 1 - |lambda|^2 > 0
    nu = -0.5 * jnp.log1p(-one_minus_r2)  # |lambda| = exp(-nu)
    return jnp.log(nu), jnp.log(max_phase * u2), 0.5 * jnp.log(one_minus_r2)


class LRU(ssm.DiagonalSsmLayer):
    """The Linear Recurrent Unit and its output gate (module docstring)."""

    def __init__(
        self,
        *,
        emb_dim: int,
        max_len: int,
        causal: bool,
        dropout: float,
        dtype: Any,
        rngs: nnx.Rngs,
        state_size: int = 256,
        r_min: float = 0.9,
        r_max: float = 0.999,
        max_phase: float = 2 * math.pi,
        bidirectional: bool = True,
        activation: str = "full_glu",
    ):
        """See the module docstring for the options and their sources.

        Raises:
          ValueError: for a bad option (the message names it).
        """
        del max_len  # a recurrence: any length
        common.positive_int("state_size", state_size)
        for name, value in (("r_min", r_min), ("r_max", r_max), ("max_phase", max_phase)):
            common.real_number(name, value)
        if not 0 <= r_min <= r_max < 1:
            raise ValueError(f"r_min and r_max must satisfy 0 <= r_min <= r_max < 1; "
                             f"got r_min={r_min!r}, r_max={r_max!r}")
        if not 0 < max_phase <= 2 * math.pi:
            raise ValueError(f"max_phase must be in (0, 2 pi]; got {max_phase!r}")
        self._setup(emb_dim=emb_dim, causal=causal, bidirectional=bidirectional,
                    activation=activation, approximate_gelu=True, dropout=dropout,
                    dtype=dtype, rngs=rngs)
        nu_log, theta_log, gamma_log = ring_init(rngs.params(), state_size, r_min, r_max,
                                                 max_phase)
        self.nu_log_N = ssm.SsmParam(nu_log)
        self.theta_log_N = ssm.SsmParam(theta_log)
        self.gamma_log_N = ssm.SsmParam(gamma_log)
        self.B_NxEx2 = ssm.SsmParam(
            ssm.complex_normal(rngs.params(), (state_size, emb_dim), 1 / math.sqrt(2 * emb_dim)))
        C = lambda: nnx.Param(
            ssm.complex_normal(rngs.params(), (emb_dim, state_size), 1 / math.sqrt(state_size)))
        self.C_fwd = C()
        self.C_bwd = C() if self.bidirectional else None
        self.D_E = nnx.Param(jax.random.normal(rngs.params(), (emb_dim,), _F32))

    def eigenvalues(self) -> jax.Array:
        """lambda = exp(-exp(nu_log) + i exp(theta_log)) [N] complex64."""
        return jnp.exp(jax.lax.complex(-jnp.exp(self.nu_log_N[...]),
                                       jnp.exp(self.theta_log_N[...])))

    def _transition(self) -> jax.Array:
        return self.eigenvalues()

    def _drive(self, u_BxLxE: jax.Array) -> jax.Array:
        """gamma * (B u) [B, L, N] complex64, as two real matmuls."""
        B_NxE = ssm.as_complex(self.B_NxEx2) * jnp.exp(self.gamma_log_N[...])[:, None]
        matmul = lambda w_NxE: jnp.einsum("ble,ne->bln", u_BxLxE, w_NxE,
                                          precision=jax.lax.Precision.HIGHEST)
        return jax.lax.complex(matmul(B_NxE.real), matmul(B_NxE.imag))

    def _read(self, x_BxLxN: jax.Array, C: nnx.Variable) -> jax.Array:
        """Re(C x) = Re(C) Re(x) - Im(C) Im(x): [B, L, E] float32."""
        C_ExN = ssm.as_complex(C)
        matmul = lambda x, w_ExN: jnp.einsum("bln,en->ble", x, w_ExN,
                                             precision=jax.lax.Precision.HIGHEST)
        return matmul(x_BxLxN.real, C_ExN.real) - matmul(x_BxLxN.imag, C_ExN.imag)
