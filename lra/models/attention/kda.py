"""Kimi Delta Attention (KDA): the gated delta rule with a decay per key channel.

KDA (Kimi Team, 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture",
arXiv:2510.26692, Moonshot AI) replaces Gated DeltaNet's one decay per head by a
diagonal one, alpha_t in (0, 1)^D per head, applied to the state before the delta
rule's erase. In this repository's row convention (S [D_k, D_v], rows = keys, o_t =
q_t S_t; delta.py):

    S_t = (I - beta_t k_t^T k_t) Diag(alpha_t) S_{t-1} + beta_t k_t^T v_t,
    o_t = (q_t / sqrt(D)) S_t.

Conventions, transcribed from flash-linear-attention (github.com/fla-org/
flash-linear-attention, where Moonshot AI published the KDA kernels) and written here
from them, no code taken over:

- Order of decay and erase: fla/ops/kda/naive.py (`naive_recurrent_kda`, commit
  26051539099e6703a1bc932691bcf705d715aef9) first scales row d of S by exp(g_t[d]),
  then adds beta_t k_t^T (v_t - k_t S) with that decayed S, then reads q_t S: decay,
  then erase and write, then read (inclusive of token t).
- Scaling of q: `scale` defaults to K^-1/2 (naive.py; fla/ops/kda/chunk.py `chunk_kda`,
  commit 0395eef12dd31ec73cd853230f555609b620d4c5), applied to q after its L2
  normalisation; the layer calls the kernel with `use_qk_l2norm_in_kernel=True`
  (fla/layers/kda.py, commit 0812a88c5e0eb95299f1370cd2cc6256f732dbc8), so q and k are
  unit vectors (here delta.py's `l2_normalize`, x / sqrt(|x|^2 + 1e-6)) and q has
  norm D^-1/2.
- beta = sigmoid(projection) (fla/layers/kda.py: `b_proj(x).sigmoid()`), in (0, 1).
- Decay: log alpha_t[d] = -exp(A_log[h]) * softplus(f_t[d] + dt_bias[h, d]), A_log one
  per head, dt_bias one per key channel (fla/ops/kda/gate.py `naive_kda_gate`, commit
  05cf28ae63ecc067559d3f8f5bc6751f006765dc): Mamba2's parameterisation with a
  per-channel dt. Initialisation as fla's model (fla/models/kda/modeling_kda.py
  `_init_weights`, commit 07e2bd329df15090d34c7d4b25b638b3cb57c516): A = U(1, 16)
  per head, dt log-uniform in [1e-3, 1e-1] (floor 1e-4) per channel, dt_bias its
  inverse softplus (ssd.py's `mamba2_init`, drawn for H heads and for H * D channels).

Gates from the raw key (this repository's choice, as delta.py's Gated DeltaNet). The
core receives only q, k, v [B, L, H, D], so the gates are read, per head, from the raw
key k_t (after the optional short convolution, before the L2 normalisation) with the
family's own projections:

    f_t = k_t W_alpha[h]                 (D -> D: one pre-activation per key channel)
    beta_t = sigmoid(k_t . w_beta[h] + b_beta[h])     (D -> 1, delta.py's)

fla's layer reads them from the block input x instead (f = a low-rank x -> D_v -> H*D
projection, beta = x -> H without bias); this core has no access to x. Not part of the
core, as for Gated DeltaNet here: fla's output gate and RMSNorm (`FusedRMSNormGated`)
and its SiLU on q, k, v when the short convolution is off; `allow_neg_eigval`,
`safe_gate` / `lower_bound` and grouped value heads are not offered. The short
convolutions are the option `short_conv` (default 0, off, as the other delta-rule
families here; fla's layer defaults to width 4).

Computation: delta.py's core (`delta_rule`) with log-gates [B, L, H, D]: the forms
`chunked` (the UT transform per chunk, with the per-channel relative decays exp(sum of
log-gates over (j, i]) of the chunk's k k^T and q k^T matrices formed by recursive
halving: only exponentials of non-positive sums of log-gates, no [C, C, D] array and no
difference of large cumulative sums) and `recurrent` (`lax.scan` over tokens;
`init_state` / `step` decode one token at a time), the bidirectional form (forward
pass plus an exclusive reverse pass whose gates are shifted by one token, so a write
decays channel by channel over the gates between key and query on either side), and
masking (a masked token: q, k, v zeroed, beta = 0, every channel's alpha = 1: no write,
no decay, its values change nothing). float32 inside; the output has q's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import F32
from lra.models.attention.delta import DeltaNetAttention
from lra.models.attention.ssd import mamba2_init


class KdaAttention(DeltaNetAttention):
    """Kimi Delta Attention (Kimi Team, 2025): the delta rule with a per-channel decay.

    log alpha_t = -exp(a_log[h]) softplus(k_t W_alpha[h] + dt_bias[h]) per key channel,
    from the raw key (parameters `alpha_w_HxDxD`, `dt_bias_HxD`, `a_log_H`); beta and
    its parameters, the options (`form` chunked | recurrent, `chunk_size`, `short_conv`),
    masking and decoding (`init_state` / `step`) as `DeltaNetAttention`; queries are
    scaled by D^-1/2 after their L2 normalisation (module docstring).
    """

    def _init_gate(self, rngs: nnx.Rngs) -> None:
        heads, dim = self.num_heads, self.head_dim
        init = nnx.initializers.normal(1.0 / math.sqrt(dim))
        self.alpha_w_HxDxD = nnx.Param(init(rngs.params(), (heads, dim, dim), F32))
        a_log_H, _ = mamba2_init(rngs.params(), heads)  # A ~ U(1, 16) per head
        _, dt_bias_C = mamba2_init(rngs.params(), heads * dim)  # dt per key channel
        self.a_log_H = nnx.Param(a_log_H)
        self.dt_bias_HxD = nnx.Param(dt_bias_C.reshape(heads, dim))

    def log_alpha(self, k_BxLxHxD: jax.Array) -> jax.Array:
        """log alpha [B, L, H, D] <= 0 from raw float32 keys: one decay per key channel."""
        logit_BxLxHxD = jnp.einsum("blhd,hde->blhe", k_BxLxHxD, self.alpha_w_HxDxD[...])
        dt_BxLxHxD = jax.nn.softplus(logit_BxLxHxD + self.dt_bias_HxD[...])
        return -jnp.exp(self.a_log_H[...])[:, None] * dt_BxLxHxD

    def _prepare(self, q, k, v, keep_BxL):
        """`DeltaNetAttention._prepare`, then q scaled by D^-1/2 (fla's default scale)."""
        q, k, v, beta, log_alpha = super()._prepare(q, k, v, keep_BxL)
        return q * (self.head_dim ** -0.5), k, v, beta, log_alpha
