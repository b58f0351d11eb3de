"""S4D: a diagonal state-space model per channel (Gu, Gupta, Goel & Re, "On the
Parameterization and Initialization of Diagonal State Space Models", NeurIPS 2022).

Also `ssm.DiagonalSsmLayer`, the layer around a diagonal linear recurrence that S4D and
the LRU (lru.py) share: masking, float32/complex64 compute, D skip, bidirectional
readout, output gate, token-by-token decoding.

The SSM, per channel e (E = emb_dim of them, each a 1-D input u -> 1-D output y) and
state n < P = N/2 (N = `state_size`; the other N/2 states are the complex conjugates,
so their contribution is the conjugate one and the output is 2 Re of the sum):

    A_n = -exp(log_A_real_n) + i A_imag_n,   dt = exp(log_dt) (one per channel),
    ZOH:  dA_n = exp(dt A_n),   dB_n = (exp(dt A_n) - 1) / A_n * B_n,
    x_k = dA x_{k-1} + dB u_k,   y_k = 2 Re(sum_n C_n x_{k,n}) + D u_k.

Unrolled, y = K * u + D u with the kernel K_l = 2 Re(sum_n C_n dB_n dA_n^l), l < L.
Two forms give the same numbers (`form`):

  conv       (default) the kernel by a Vandermonde product (`_vandermonde`), then
             y = K * u by an FFT convolution of length 2L (no wrap-around), as
             S4D's code (state-spaces/s4, models/s4/s4d.py, `S4DKernel` and `S4D`).
  recurrent  the recurrence for every token at once with `ssm.linear_recurrence`.

A causal conv form is causal up to float32 FFT rounding: an output's gradient with
respect to a later input is ~1e-7 of the largest one instead of exactly 0 (every
frequency bin mixes all positions); the recurrent form (and `step`) is exactly causal.
The property `exactly_causal` says which (the mixer contract's future-leak check reads it).

Initialisation (S4D paper, Sec. 4 / state-spaces/s4 src/models/sequence/kernels/
dplr.py): real part -1/2 (log_A_real = log 1/2); imaginary part by `init`,
S4D-Lin: A_n = -1/2 + i pi n, S4D-Inv: A_n = -1/2 + i N/pi (N/(2n+1) - 1), n < N/2;
B = 1 (dplr.py's B_init="constant"; trained, as in the S4 repo's SSMKernelDiag);
C complex standard normal (E|C|^2 = 1, torch.randn(cfloat)); D standard normal;
log dt uniform in [log dt_min, log dt_max] per channel. Defaults: N = 64,
dt in [0.001, 0.1] and S4D-Lin as S4D's s4d.py (the S4 repo's LRA configs use the
same dt range, 1e-4 for PathX).

SSM parameters (`ssm.SsmParam`: own learning rate, no weight decay): log_dt,
log_A_real, A_imag and B, the parameters the S4 repo registers with its `lr` dict
(dt, A, B) and weight decay 0 (ssm.py `SSMKernelDiag.register_params`, configs/
model/layer/s4.yaml). C, D and the output layers are ordinary `nnx.Param`s.

Bidirectional (`bidirectional=True`, not causal): as the S4 repo's FFTConv with
`bidirectional=True`: the second channel of the kernel (its own C; A, B, dt shared)
is applied to the reversed sequence, so y = K_fwd * u + flip(K_bwd * flip(u)) + D u,
i.e. y_i = sum_{j<=i} K_fwd[i-j] u_j + sum_{j>=i} K_bwd[j-i] u_j + D u_i. One
difference from S4's fftconv.py: there the reverse kernel is shifted by one step
(K_bwd[0] multiplies u_{i+1}; its comment calls this off-by-one deliberate and gives
the exact placement, commented out); here K_bwd[0] multiplies u_i, so the conv form
equals a reverse recurrence (the `recurrent` form). `causal=True` makes the model unidirectional
(the `bidirectional` option is then ignored), so the default options work for both.

Masking: inputs at padded positions are zeroed first (`ssm.masked`), so padding adds
nothing to any state; a zero-initial state stays zero through right padding and the
reverse direction starts at the last real token. A masked hole in the middle is a
time step with zero input (the state decays across it), the same in both forms and
in `step`.

Output nonlinearity (`activation`, `ssm.OutputGate`): "full_glu" by default, S4's
block: GELU, dropout, then a position-wise linear E -> 2E and a GLU (s4d.py's
`output_linear`, the S4 config's `final_act: glu`), which is W1 g * sigmoid(W2 g);
OutputGate also applies dropout after the GLU. The GELU is the exact one, x Phi(x), as
S4's code: PyTorch's `nn.GELU()` (default `approximate='none'`) in s4d.py and as the S4
block's activation (the LRU, lru.py, and S5 use the tanh approximation, as their code).
No norm and no residual: the encoder block does pre-norm + residual.

dtype: parameters are float32; the SSM runs in float32/complex64 whatever the input
dtype (bfloat16 too); the output gate computes in `dtype`; the output has x's dtype.
`max_len` is not needed (the kernel is built for the length of each call).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lra import common
from lra.common import Choice
from lra.models.attention.sequence_parallel import map_over_batch
from lra.models.mixers import ssm

_F32 = jnp.float32
_C64 = jnp.complex64


class Init(Choice):
    """S4D's initialisations of A's imaginary part (S4D paper, Sec. 4)."""

    LIN = "lin"  # S4D-Lin: A_n = -1/2 + i pi n
    INV = "inv"  # S4D-Inv: A_n = -1/2 + i N/pi (N/(2n+1) - 1)


class Form(Choice):
    """How S4D computes its output (both give the same numbers)."""

    CONV = "conv"  # Vandermonde kernel + FFT convolution (training)
    RECURRENT = "recurrent"  # the recurrence by a parallel scan over tokens


def imag_init(init: Init, state_size: int) -> jax.Array:
    """A_imag_n for n < N/2 under S4D-Lin or S4D-Inv (S4D paper, Sec. 4)."""
    n_P = jnp.arange(state_size // 2, dtype=_F32)
    if init is Init.LIN:
        return math.pi * n_P
    return state_size / math.pi * (state_size / (2 * n_P + 1) - 1)


def _vandermonde(coef_ExP: jax.Array, dtA_ExP: jax.Array, length: int) -> jax.Array:
    """Re(sum_n coef_n exp(dtA_n l)) for l < length: [E, length] float32.

    With l = a S + s (blocks of S ~ sqrt(L) steps), exp(dtA l) = exp(dtA a S) exp(dtA s):
    one batched matmul [E, L/S, P] x [E, P, S] instead of an [E, P, L] array of powers.
    """
    size = math.isqrt(length - 1) + 1  # ceil(sqrt(length))
    blocks = -(-length // size)
    starts = jnp.arange(blocks, dtype=_F32) * size
    outer_ExAxP = coef_ExP[:, None, :] * jnp.exp(dtA_ExP[:, None, :] * starts[None, :, None])
    inner_ExPxS = jnp.exp(dtA_ExP[:, :, None] * jnp.arange(size, dtype=_F32))
    k_ExAxS = jnp.matmul(outer_ExAxP, inner_ExPxS, precision=jax.lax.Precision.HIGHEST)
    return k_ExAxS.real.reshape(coef_ExP.shape[0], blocks * size)[:, :length]


def _fft_conv(u_BxLxE: jax.Array, k_Ex2L: jax.Array) -> jax.Array:
    """y_i = sum_j k[(i - j) mod 2L] u_j for i < L: the convolution with a kernel of
    length 2L (lags 0..L-1 first, then negative lags -L..-1), no wrap-around. Each
    device transforms its own rows (`map_over_batch`)."""
    length = u_BxLxE.shape[1]
    k_f = jnp.fft.rfft(k_Ex2L, n=2 * length, axis=-1).T  # [L + 1, E]

    def rows(u_BxLxE, k_f):
        u_f = jnp.fft.rfft(u_BxLxE, n=2 * length, axis=1)  # [B, L + 1, E]
        return jnp.fft.irfft(u_f * k_f[None], n=2 * length, axis=1)[:, :length]

    return map_over_batch(rows, u_BxLxE, shared=(k_f,))


class S4D(ssm.DiagonalSsmLayer):
    """S4D: one diagonal complex SSM per channel, ZOH-discretised (module docstring)."""

    def __init__(
        self,
        *,
        emb_dim: int,
        max_len: int,
        causal: bool,
        dropout: float,
        dtype: Any,
        rngs: nnx.Rngs,
        state_size: int = 64,
        init: str = "lin",
        form: str = "conv",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        bidirectional: bool = True,
        activation: str = "full_glu",
    ):
        """See the module docstring for the options and their sources.

        Raises:
          ValueError: for a bad option (the message names it).
        """
        del max_len  # the kernel is built for each call's length
        common.positive_int("state_size", state_size)
        if state_size % 2:
            raise ValueError(f"state_size must be even (N/2 conjugate pairs); got {state_size}")
        common.real_number("dt_min", dt_min)
        common.real_number("dt_max", dt_max)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; "
                             f"got dt_min={dt_min!r}, dt_max={dt_max!r}")
        self.init, self.form = Init(init), Form(form)
        self._setup(emb_dim=emb_dim, causal=causal, bidirectional=bidirectional,
                    activation=activation, approximate_gelu=False, dropout=dropout,
                    dtype=dtype, rngs=rngs)
        states = state_size // 2
        log_dt_E = jax.random.uniform(rngs.params(), (emb_dim,), _F32,
                                      math.log(dt_min), math.log(dt_max))
        self.log_dt_E = ssm.SsmParam(log_dt_E)
        self.log_A_real_ExP = ssm.SsmParam(jnp.full((emb_dim, states), math.log(0.5), _F32))
        self.A_imag_ExP = ssm.SsmParam(
            jnp.broadcast_to(imag_init(self.init, state_size), (emb_dim, states)))
        ones_ExP = jnp.ones((emb_dim, states), _F32)
        self.B_ExPx2 = ssm.SsmParam(jnp.stack([ones_ExP, jnp.zeros_like(ones_ExP)], -1))
        C = lambda: nnx.Param(ssm.complex_normal(rngs.params(), (emb_dim, states), math.sqrt(0.5)))
        self.C_fwd = C()
        self.C_bwd = C() if self.bidirectional else None
        self.D_E = nnx.Param(jax.random.normal(rngs.params(), (emb_dim,), _F32))

    @property
    def exactly_causal(self) -> bool:
        """False for the conv form, whose FFT leaks ~1e-7 of a gradient to earlier
        outputs (module docstring); True for the recurrent form."""
        return self.form is not Form.CONV

    def discretize(self) -> tuple[jax.Array, jax.Array]:
        """(dt A, dB) [E, P] complex64: ZOH, dA = exp(dt A), dB = (exp(dt A) - 1) / A B."""
        A_ExP = jax.lax.complex(-jnp.exp(self.log_A_real_ExP[...]), self.A_imag_ExP[...])
        dtA_ExP = jnp.exp(self.log_dt_E[...])[:, None] * A_ExP
        return dtA_ExP, jnp.expm1(dtA_ExP) / A_ExP * ssm.as_complex(self.B_ExPx2)

    def _transition(self) -> jax.Array:
        return jnp.exp(self.discretize()[0])

    def _drive(self, u_BxLxE: jax.Array) -> jax.Array:
        return self.discretize()[1] * u_BxLxE[..., None]

    def _read(self, x_BxLxExP: jax.Array, C: nnx.Variable) -> jax.Array:
        C_ExP = ssm.as_complex(C)
        return 2 * jnp.sum(x_BxLxExP.real * C_ExP.real - x_BxLxExP.imag * C_ExP.imag, -1)

    def kernel(self, C: nnx.Variable, length: int) -> jax.Array:
        """K_l = 2 Re(sum_n C_n dB_n exp(dt A_n l)), l < length: [E, length] float32."""
        dtA_ExP, dB_ExP = self.discretize()
        return _vandermonde(2 * ssm.as_complex(C) * dB_ExP, dtA_ExP, length)

    def _ssm(self, u_BxLxE: jax.Array) -> jax.Array:
        if self.form is Form.RECURRENT:
            return super()._ssm(u_BxLxE)
        length = u_BxLxE.shape[1]
        k_fwd_ExL = self.kernel(self.C_fwd, length)
        if not self.bidirectional:
            k_Ex2L = jnp.pad(k_fwd_ExL, ((0, 0), (0, length)))
        else:  # lag 0: both kernels; lags 1..L-1: forward; lags -(L-1)..-1: reverse
            k_bwd_ExL = self.kernel(self.C_bwd, length)
            k_Ex2L = jnp.concatenate(
                [k_fwd_ExL[:, :1] + k_bwd_ExL[:, :1], k_fwd_ExL[:, 1:],
                 jnp.zeros_like(k_fwd_ExL[:, :1]), k_bwd_ExL[:, :0:-1]], axis=-1)
        return _fft_conv(u_BxLxE, k_Ex2L)
