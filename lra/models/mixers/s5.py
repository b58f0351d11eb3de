"""S5: a MIMO diagonal state-space layer computed with a parallel scan.

Smith, Warrington & Linderman, "Simplified State Space Layers for Sequence Modeling",
ICLR 2023. Checked against the authors' code (github.com/lindermanlab/S5): s5/ssm.py
(`S5SSM`, `discretize_zoh`, `discretize_bilinear`, `apply_ssm`), s5/ssm_init.py
(`make_DPLR_HiPPO`, `init_VinvB`, `init_CV`, `trunc_standard_normal`,
`init_log_steps`), s5/train.py (block-diagonal initialisation, conj_sym halving),
s5/layers.py (`SequenceLayer`: the output nonlinearity) and s5/train_helpers.py (the
optimiser's parameter groups). The code here is written from the paper's equations.

One multi-input multi-output SSM over all E channels with a state of size P:

    x'(t) = A x(t) + B u(t),    y(t) = C x(t) + D u(t),    A = V Lambda V^-1,

in the eigenbasis of A (state V^-1 x): Lambda diagonal [P] complex, B~ = V^-1 B
[P, E] complex, C~ = C V [E, P] complex, D [E] real. Each state has its own timestep
Delta_p = exp(log_step_p) (S5's per-state timescales). Discretised per token:

    zero-order hold:  Lambda_bar = exp(Lambda Delta),
                      B_bar = (Lambda_bar - 1) / Lambda * B~;
    bilinear:         Lambda_bar = (1 + Delta/2 Lambda) / (1 - Delta/2 Lambda),
                      B_bar = Delta / (1 - Delta/2 Lambda) * B~;

    x_k = Lambda_bar * x_{k-1} + B_bar u_k    (`ssm.linear_recurrence`, complex64),
    y_k = Re(C~ x_k) + D u_k.

Conjugate symmetry (`conj_sym`): the eigenvalues of a real A come in conjugate pairs,
so only the P/2 with negative imaginary part are kept and y_k = 2 Re(C~ x_k) + D u_k
(the pair's second member contributes the complex conjugate).

Bidirectional (`bidirectional`, non-causal models only): a second scan of the same
Lambda_bar, B_bar over the reversed sequence, with its own C~2:
y_k = Re(C~1 x_k^fwd) + Re(C~2 x_k^bwd) + D u_k (x2 with conj_sym), as S5's
`apply_ssm`.

HiPPO-N initialisation (paper section 4.1 and appendix B.1): the HiPPO-LegS matrix

    A_nk = -sqrt(2n+1) sqrt(2k+1)  (n > k),   -(n+1)  (n = k),   0  (n < k),

plus the rank-one p p^T with p_n = sqrt(n + 1/2) is normal: A^N = -I/2 + S with S
skew-symmetric. Lambda = its eigenvalues (real parts all -1/2, imaginary parts the
eigenvalues of -i S, from a Hermitian eigendecomposition as S5's `make_DPLR_HiPPO`),
V its unitary eigenvectors. With `blocks` = J > 1, A is block-diagonal with J copies
of the HiPPO-N matrix of size P/J (S5's `--blocks`), and V likewise. As in S5's code,
B~ = V^-1 B for a real B [P, E] drawn from LeCun-normal with fan-in P (jax's
`lecun_normal` on a [P, E] array, truncated normal), and C~ = C V for a complex
C [E, P] (`c_init`: "trunc_standard_normal", real and imaginary parts truncated
normal with variance 1/P; "lecun_normal", variance 1/(P E); or "complex_normal": C~
itself drawn N(0, 1/2) per part, without V). With conj_sym, V^-1 and V keep the rows /
columns of the kept eigenvalues, so B~ is still V^-1 of a full real B [P, E]. D ~
N(0, 1); log_step uniform in [log dt_min, log dt_max].

Which parameters are `ssm.SsmParam` (own learning rate, no weight decay): S5's
default optimiser setting (train_helpers.py, `opt_config="standard"` with
`dt_global=False`) puts "Lambda_re", "Lambda_im", "B" and "log_step" in its "ssm"
group (Adam at `ssm_lr`, no weight decay); C and D are in the "regular" AdamW group.
(Its other settings move B, or with `dt_global` log_step, to the weight-decayed
groups; this module follows the default.)

Masking: padded inputs are zeroed (`ssm.masked`) and at a padded position the state
passes unchanged (Lambda_bar replaced by 1), so padding is removed from the sequence:
a real output equals that of the sequence of real tokens alone, and `step` with mask
False leaves the state as it is, as `__call__` does (real tokens need not be a
prefix). In particular the state starts at zero and stays zero through left padding,
and the reverse pass of a bidirectional model starts at the last real token with
right padding (nothing has entered its state before it). S5's own code does not
mask padding (it only pools over real tokens).

Numerics: parameters are float32; the SSM runs in float32 with a complex64 state
whatever the input dtype; the output nonlinearity (`ssm.OutputGate`, S5's
`activation_fn`, default "half_glu1") runs in the compute dtype and the result has
x's dtype. Its GELU is the tanh approximation, as S5's code: s5/layers.py calls flax's
`nn.gelu`, whose default is `approximate=True`. No norm and no residual: the encoder
block adds pre-norm and residual.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra import common
from lra.common import Choice
from lra.models.mixers import ssm

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
CLIP_EIGS_MAX = -1e-4  # clip_eigs: Re(Lambda) <= -1e-4, as S5's S5SSM


class Discretization(Choice):
    """How the continuous SSM becomes a per-token recurrence."""

    ZOH = "zoh"  # zero-order hold (S5's default)
    BILINEAR = "bilinear"


class CInit(Choice):
    """How C~ is initialised (S5's `--C_init`)."""

    TRUNC_STANDARD_NORMAL = "trunc_standard_normal"  # C ~ 1/P per part, C~ = C V
    LECUN_NORMAL = "lecun_normal"  # C ~ 1/(P E) per part, C~ = C V
    COMPLEX_NORMAL = "complex_normal"  # C~ ~ 1/2 per part directly


class State(NamedTuple):
    """Decoding state: the complex64 SSM state of the tokens so far, [B, N]."""

    x_BxN: jax.Array


def hippo_n(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues [size] (ascending imaginary part) and unitary eigenvectors
    [size, size] of the normal part of the HiPPO-LegS matrix of this size (float64)."""
    n = np.arange(size)
    root = np.sqrt(2.0 * n + 1.0)
    legs = -np.tril(root[:, None] * root[None, :]) + np.diag(n)  # -(n+1) on the diagonal
    p = np.sqrt(n + 0.5)
    skew = legs + np.outer(p, p) + 0.5 * np.eye(size)  # A^N + I/2, skew-symmetric
    imag, V = np.linalg.eigh(-1j * skew)
    return -0.5 + 1j * imag, V


def init_eigenbasis(state_size: int, blocks: int, conj_sym: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Lambda [N] and V [P, N] of the block-diagonal HiPPO-N matrix (N = P/2 with
    conj_sym: each block keeps its eigenvalues of negative imaginary part)."""
    Lambda, V = hippo_n(state_size // blocks)
    if conj_sym:
        keep = len(Lambda) // 2
        Lambda, V = Lambda[:keep], V[:, :keep]
    return np.tile(Lambda, blocks), np.kron(np.eye(blocks), V)


def _validate(state_size, blocks, conj_sym, dt_min, dt_max) -> None:
    common.positive_int("state_size", state_size)
    common.positive_int("blocks", blocks)
    if state_size % blocks:
        raise ValueError(f"state_size ({state_size}) must be a multiple of blocks ({blocks})")
    if conj_sym and (state_size // blocks) % 2:
        raise ValueError(f"conj_sym needs an even block size state_size / blocks; got "
                         f"{state_size} / {blocks} = {state_size // blocks}")
    if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float))
            and 0 < dt_min <= dt_max):
        raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got "
                         f"dt_min={dt_min!r}, dt_max={dt_max!r}")


def _c_tilde(c_init: CInit, key, emb_dim: int, V_PxN: jax.Array) -> jax.Array:
    """C~ [E, N] complex64."""
    state_size, n = V_PxN.shape
    if c_init is CInit.COMPLEX_NORMAL:
        re_im = jax.random.normal(key, (2, emb_dim, n), _F32) * math.sqrt(0.5)
        return jax.lax.complex(re_im[0], re_im[1])
    # truncated normal with fan-in P (trunc_standard_normal) or P E (lecun_normal)
    batch_axis = (0,) if c_init is CInit.TRUNC_STANDARD_NORMAL else ()
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=-2, out_axis=-1, batch_axis=batch_axis)
    c = init(key, (emb_dim, state_size, 2), _F32)
    return jnp.matmul(jax.lax.complex(c[..., 0], c[..., 1]), V_PxN, precision=_HIGHEST)


class S5(nnx.Module):
    """The S5 layer and its output nonlinearity: x [B, L, E], mask [B, L] -> [B, L, E]."""

    block_mlp = False  # S5's SequenceLayer has no MLP sub-block (config default)

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
        blocks: int = 1,
        conj_sym: bool = True,
        bidirectional: bool = True,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        discretization: str = "zoh",
        c_init: str = "trunc_standard_normal",
        clip_eigs: bool = False,
        activation: str = "half_glu1",
    ):
        """Builds the layer (module docstring: parameters and initialisation).

        Args:
          emb_dim: E, the input and output width (S5's H).
          max_len: unused (the layer has no length limit); part of the contract.
          causal: if True, output k sees tokens <= k only (and `step` decodes).
          dropout: rate of the dropout inside the output nonlinearity (as S5).
          dtype: compute dtype of the output nonlinearity; the SSM is float32.
          rngs: streams ``params`` and ``dropout``.
          state_size: P, the state size before conjugate-symmetry halving (S5's
            `ssm_size_base`).
          blocks: J, the number of HiPPO-N blocks of A's block-diagonal initialisation;
            must divide P.
          conj_sym: keep P/2 eigenvalues (one of each conjugate pair), y = 2 Re(C~ x).
          bidirectional: add a reverse scan with its own C~ (ignored when causal).
          dt_min, dt_max: range of the log-uniform initial timesteps.
          discretization: "zoh" or "bilinear".
          c_init: "trunc_standard_normal", "lecun_normal" or "complex_normal".
          clip_eigs: clip Re(Lambda) to <= -1e-4 in the forward pass (stable states).
          activation: "gelu", "full_glu", "half_glu1" or "half_glu2" (`ssm.OutputGate`).

        Raises:
          ValueError: naming the option, for a bad option value.
        """
        del max_len
        _validate(state_size, blocks, conj_sym, dt_min, dt_max)
        self.discretization = Discretization(discretization)
        c_init = CInit(c_init)
        self.emb_dim, self.causal, self.dtype = emb_dim, causal, dtype
        self.conj_sym, self.clip_eigs = bool(conj_sym), bool(clip_eigs)
        self.bidirectional = bool(bidirectional) and not causal
        self.gate = ssm.OutputGate(emb_dim, activation, dropout, approximate_gelu=True,
                                   dtype=dtype, rngs=rngs)

        Lambda_N, V_PxN = init_eigenbasis(state_size, blocks, conj_sym)
        V_PxN = jnp.asarray(V_PxN, jnp.complex64)
        n = len(Lambda_N)
        self.Lambda_re_N = ssm.SsmParam(jnp.asarray(Lambda_N.real, _F32))
        self.Lambda_im_N = ssm.SsmParam(jnp.asarray(Lambda_N.imag, _F32))
        B_PxE = jax.nn.initializers.lecun_normal()(rngs.params(), (state_size, emb_dim), _F32)
        B_NxE = jnp.matmul(V_PxN.conj().T, B_PxE.astype(jnp.complex64), precision=_HIGHEST)
        self.B_re_NxE = ssm.SsmParam(B_NxE.real)
        self.B_im_NxE = ssm.SsmParam(B_NxE.imag)
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        self.log_step_N = ssm.SsmParam(
            jax.random.uniform(rngs.params(), (n,), _F32) * (log_hi - log_lo) + log_lo)
        C_ExN = _c_tilde(c_init, rngs.params(), emb_dim, V_PxN)
        self.C_re_ExN, self.C_im_ExN = nnx.Param(C_ExN.real), nnx.Param(C_ExN.imag)
        if self.bidirectional:
            C2_ExN = _c_tilde(c_init, rngs.params(), emb_dim, V_PxN)
            self.C2_re_ExN, self.C2_im_ExN = nnx.Param(C2_ExN.real), nnx.Param(C2_ExN.imag)
        else:
            self.C2_re_ExN = self.C2_im_ExN = None
        self.D_E = nnx.Param(jax.random.normal(rngs.params(), (emb_dim,), _F32))

    @property
    def decodes(self) -> bool:
        """True if the layer decodes token by token (`init_state` / `step`): causal."""
        return self.causal

    def discretize(self) -> tuple[jax.Array, jax.Array]:
        """Lambda_bar [N] and B_bar [N, E], complex64 (module docstring)."""
        Lambda_re = self.Lambda_re_N[...]
        if self.clip_eigs:
            Lambda_re = jnp.minimum(Lambda_re, CLIP_EIGS_MAX)
        Lambda = jax.lax.complex(Lambda_re, self.Lambda_im_N[...])
        B = jax.lax.complex(self.B_re_NxE[...], self.B_im_NxE[...])
        step = jnp.exp(self.log_step_N[...])
        if self.discretization is Discretization.ZOH:
            Lambda_bar = jnp.exp(Lambda * step)
            scale = (Lambda_bar - 1.0) / Lambda
        else:
            inverse = 1.0 / (1.0 - step / 2.0 * Lambda)
            Lambda_bar = inverse * (1.0 + step / 2.0 * Lambda)
            scale = inverse * step
        return Lambda_bar, scale[:, None] * B

    def _inputs(self, u_xE, B_bar_NxE):
        """B_bar u for real u [..., E]: complex64 [..., N]."""
        project = lambda W_NxE: jnp.einsum("...e,ne->...n", u_xE, W_NxE)
        return jax.lax.complex(project(B_bar_NxE.real), project(B_bar_NxE.imag))

    def _read(self, x_xN, C_re_ExN, C_im_ExN):
        """Re(C~ x) (x2 with conj_sym), float32 [..., E]."""
        read = lambda W_ExN, h_xN: jnp.einsum("...n,en->...e", h_xN, W_ExN[...])
        y = read(C_re_ExN, x_xN.real) - read(C_im_ExN, x_xN.imag)
        return 2.0 * y if self.conj_sym else y

    def ssm_outputs(self, x_BxLxE: jax.Array, mask_BxL: jax.Array | None) -> jax.Array:
        """The SSM's output y [B, L, E] float32, before the nonlinearity."""
        u_BxLxE = ssm.masked(x_BxLxE, mask_BxL).astype(_F32)
        Lambda_bar_N, B_bar_NxE = self.discretize()
        Bu_BxLxN = self._inputs(u_BxLxE, B_bar_NxE)
        a_xLxN = Lambda_bar_N[None, None, :]
        if mask_BxL is not None:  # padding: the state passes unchanged
            a_xLxN = jnp.where(mask_BxL[..., None], a_xLxN, jnp.ones((), jnp.complex64))
        forward_BxLxN = ssm.linear_recurrence(a_xLxN, Bu_BxLxN)
        y_BxLxE = self._read(forward_BxLxN, self.C_re_ExN, self.C_im_ExN)
        if self.bidirectional:
            backward_BxLxN = ssm.linear_recurrence(a_xLxN, Bu_BxLxN, reverse=True)
            y_BxLxE = y_BxLxE + self._read(backward_BxLxN, self.C2_re_ExN, self.C2_im_ExN)
        return y_BxLxE + self.D_E[...] * u_BxLxE

    def __call__(self, x_BxLxE: jax.Array, mask_BxL: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """x [B, L, E], mask [B, L] bool (True = real) -> [B, L, E] in x's dtype."""
        y_BxLxE = self.ssm_outputs(x_BxLxE, mask_BxL).astype(self.dtype)
        return self.gate(y_BxLxE, deterministic=deterministic).astype(x_BxLxE.dtype)

    def init_state(self, batch_size: int) -> State:
        """The empty decoding state: x = 0, complex64 [B, N]."""
        return State(jnp.zeros((batch_size, self.Lambda_re_N.shape[0]), jnp.complex64))

    def step(self, state: State, x_BxE: jax.Array, mask_B: jax.Array | None,
             position: int) -> tuple[State, jax.Array]:
        """Decodes one token: x = Lambda_bar x + B_bar u, y = Re(C~ x) + D u, then the
        nonlinearity. Applied to tokens 0, 1, ... it gives the causal `__call__` outputs.

        Args:
          state: from `init_state` or the previous step.
          x_BxE: the token's input.
          mask_B: bool, False where the token is padding (the state passes unchanged;
            the output there is finite and meaningless).
          position: unused (the layer is time-invariant).

        Returns:
          (new state, output [B, E] in x's dtype).

        Raises:
          ValueError: if the layer is not causal.
        """
        del position
        if not self.causal:
            raise ValueError("step decodes a causal S5; build it with causal=True")
        keep_B, u_BxE = ssm.step_input(x_BxE, mask_B)
        keep_Bx1, u_BxE = keep_B[:, None], u_BxE.astype(_F32)
        Lambda_bar_N, B_bar_NxE = self.discretize()
        x_BxN = Lambda_bar_N * state.x_BxN + self._inputs(u_BxE, B_bar_NxE)
        x_BxN = jnp.where(keep_Bx1, x_BxN, state.x_BxN)
        y_BxE = self._read(x_BxN, self.C_re_ExN, self.C_im_ExN) + self.D_E[...] * u_BxE
        out = self.gate(y_BxE[:, None].astype(self.dtype), deterministic=True)
        return State(x_BxN), out[:, 0].astype(x_BxE.dtype)
