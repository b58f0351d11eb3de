"""Gated DeltaProduct: n_h delta-rule (Householder) steps per token, one decay per token.

Gated DeltaProduct (Siems et al., 2025, "DeltaProduct: Improving State-Tracking in
Linear RNNs via Householder Products", arXiv:2502.10297) generalises Gated DeltaNet
(delta.py) by taking n_h = `num_householder` delta-rule steps per token, each with its
own key, value and beta, so the state transition of a token is a product of n_h
generalised Householder matrices (rank n_h instead of rank 1). In this repository's row
convention (S [D_k, D_v], rows = keys, o_t = q_t S_t; delta.py), for token t and steps
j = 1, ..., n_h:

    S_{t,0} = alpha_t S_{t-1},
    S_{t,j} = (I - beta_{t,j} k_{t,j}^T k_{t,j}) S_{t,j-1} + beta_{t,j} k_{t,j}^T v_{t,j},
    S_t = S_{t,n_h},   o_t = (q_t / sqrt(D)) S_t.

Conventions, transcribed from flash-linear-attention (github.com/fla-org/
flash-linear-attention, the authors' implementation; read at commit
bc3b101dcb713ddc5bd8924b66754eb68b5ccf89, each file cited with the commit that last
changed it) and written here from them, no code taken over:

- The gate applies once per token, before the first Householder step:
  fla/ops/gated_delta_product/naive.py (`naive_recurrent_gated_delta_product`, commit
  39f2d4029eb29a16d963b39dda20a2a0cfdad0f7) multiplies S by exp(g_t), then runs the
  n_h erase-and-write steps, then reads q_t S (inclusive of token t, only after the
  last step).
- Interleaving: fla/ops/gated_delta_product/chunk_ref.py (same commit) computes it as
  the ordinary gated delta rule on an expanded sequence of L * n_h tokens, token t's
  steps at positions t n_h, ..., t n_h + n_h - 1, the log-gate g_t at the first of
  them (0 at the others), the query at the last (0 at the others), the output read
  at the last. This module does the same with delta.py's `delta_rule`, so the forms
  `chunked` (`chunk_size` counts expanded positions, i.e. chunk_size / n_h tokens) and
  `recurrent` come from that core.
- Normalisation and scaling: the layer calls the kernel with
  `use_qk_l2norm_in_kernel=True` (fla/layers/gated_deltaproduct.py, commit
  f7c2c1912da445301e0191c9d1126cd01674eb50), so q and every k_{t,j} are unit vectors
  (here delta.py's `l2_normalize`), and `scale` defaults to K^-1/2
  (fla/ops/gated_delta_product/chunk.py `chunk_gated_delta_product`, commit
  0d0a2f9a5bac74b34b5d2fb4e7192fe85374ea90), applied to q.
- beta_{t,j} = sigmoid(projection), doubled when `allow_neg_eigval` (fla's layer:
  `beta = b_proj(x).sigmoid()`, `* 2` if `allow_neg_eigval`, default True; the paper's
  setting for state tracking): beta in (0, 2), so I - beta k^T k has the eigenvalue
  1 - beta in (-1, 1) along k (a reflection for beta = 2) and 1 elsewhere; the state
  stays bounded either way. Option `allow_neg_eigval` (default True, as fla's layer);
  False gives beta in (0, 1).
- The gate: log alpha_t = -exp(A_log[h]) softplus(a_t + dt_bias[h]), Mamba2's
  parameterisation, as fla's layer (`use_forget_gate=True`) and delta.py's Gated
  DeltaNet; initialised as delta.py's (ssd.py's `mamba2_init`: A ~ U(1, 16), fla's
  layer draws A ~ U(0, 16); dt log-uniform in [1e-3, 1e-1]).

Inputs of the steps (this repository's choice). The core receives only q, k, v
[B, L, H, D] (one key and value per token), while fla's layer projects the block input x
to n_h keys, n_h values, n_h betas and the gate pre-activation. Here, per head h, from
the raw key k_t and value v_t (after the optional short convolution, before any
normalisation, as delta.py reads its gates):

    k_{t,1} = k_t,  v_{t,1} = v_t;  k_{t,j} = k_t W_k[h, j],  v_{t,j} = v_t W_v[h, j]
        for j = 2, ..., n_h (per-head D -> D projections, `key_w_HxNxDxD`,
        `value_w_HxNxDxD` with N = n_h - 1; absent when n_h = 1),
    beta_{t,j} = sigmoid(k_t . w_beta[h, j] + b_beta[h, j]) (x 2 if allow_neg_eigval)
        (a D -> n_h projection: step 1's row is delta.py's `beta_w_HxD`, `beta_b_H`,
        the others `beta_w_HxNxD`, `beta_b_HxN`),
    a_t = k_t . w_alpha[h]  (D -> 1, delta.py's Gated DeltaNet: `alpha_w_HxD`,
        `dt_bias_H`, `a_log_H`).

With n_h = 1 and allow_neg_eigval=False the parameters are Gated DeltaNet's and the
output is `gated_deltanet`'s times D^-1/2 (its q is not scaled). Not part of the core,
as for the other delta-rule families here: fla's output gate and RMSNorm, its SiLU on
q, k, v when the short convolution is off, grouped value heads. The short convolutions
(option `short_conv`, default 0) act on q, k, v before everything above; fla's layer
convolves the n_h keys and values it projects (default width 4).

Bidirectional (causal=False): delta.py's construction (forward inclusive pass plus an
exclusive reverse pass with gates shifted by one position) applied to the expanded
sequence, with reads only at each token's last sub-step. What it computes, per token:

    o_t = q_t S->_t + alpha_{t+1} q_t S<-_{t+1}      (alpha_L = 1, S<-_L = 0, q scaled),
    S<-_t = H_{t,1} ... H_{t,n_h} applied to (alpha_{t+1} S<-_{t+1}): starting from
        R = alpha_{t+1} S<-_{t+1}, R <- (I - beta_{t,j} k_{t,j}^T k_{t,j}) R
        + beta_{t,j} k_{t,j}^T v_{t,j} for j = n_h, n_h - 1, ..., 1,

i.e. the reverse pass is the gated delta product run from the last token to the first
with each token's steps in reverse order (the time reversal of the expanded sequence)
and its gate crossed when leaving it towards the previous token. S<-_{t+1} holds only
tokens > t, so each token's writes reach every output once (token t's own steps
only in the forward read). A write of token s decays by the gates over
(min(s, t), max(s, t)]: alpha_{s+1} ... alpha_t for s < t (alpha_s scales the state
before token s's steps, so not its writes), alpha_{t+1} ... alpha_s for s > t;
symmetric, as in delta.py. A token's homogeneous transition on the reverse side,
H_{t,1} ... H_{t,n_h} (H_{t,j} = I - beta_{t,j} k_{t,j}^T k_{t,j}, symmetric), is the
transpose of its forward one, H_{t,n_h} ... H_{t,1}; for n_h = 1 they are equal and the
form is `gated_deltanet`'s bidirectional one (times D^-1/2, the q scale; tested).

Masking: a masked token has q, k, v zeroed, every beta_{t,j} = 0 and alpha_t = 1, so
it adds no write and no decay in either direction and its values change nothing;
masked queries read 0. Decoding (`init_state` / `step`) carries S and does the n_h
steps inside `step`; it equals the causal pass. float32 inside; the output has q's
dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import F32, boolean, positive_int
from lra.models.attention.delta import (
    GatedDeltaNetAttention,
    State,
    delta_rule,
    delta_update,
    l2_normalize,
)
from lra.models.attention.linear import decode_keep
from lra.models.attention.short_conv import convolve_qkv


class GatedDeltaProductAttention(GatedDeltaNetAttention):
    """Gated DeltaProduct (Siems et al., 2025): n_h delta-rule steps per token.

    Options: `num_householder` (n_h, default 2), `allow_neg_eigval` (beta in (0, 2),
    default True; False: (0, 1)), `form` (chunked | recurrent), `chunk_size` (positions
    of the expanded L * n_h sequence per chunk), `chunk_strategy` (auto | scan |
    batched) and `short_conv` (as delta.py). Parameters:
    Gated DeltaNet's (`beta_w_HxD`, `beta_b_H` for step 1; `alpha_w_HxD`, `dt_bias_H`,
    `a_log_H`) and, for n_h > 1, `beta_w_HxNxD`, `beta_b_HxN`, `key_w_HxNxDxD`,
    `value_w_HxNxDxD` for steps 2..n_h. Causal cores decode with `init_state` / `step`.
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
        num_householder: int = 2,
        allow_neg_eigval: bool = True,
        form: str = "chunked",
        chunk_size: int = 64,
        chunk_strategy: str = "auto",
        short_conv: int = 0,
    ):
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_len=max_len,
                         causal=causal, dropout_rate=dropout_rate, rngs=rngs, form=form,
                         chunk_size=chunk_size, chunk_strategy=chunk_strategy,
                         short_conv=short_conv)
        self.num_householder = positive_int("num_householder", num_householder)
        self.allow_neg_eigval = boolean("allow_neg_eigval", allow_neg_eigval)
        extra = self.num_householder - 1
        if extra:
            init = nnx.initializers.normal(1.0 / math.sqrt(head_dim))
            shape = (num_heads, extra, head_dim)
            self.beta_w_HxNxD = nnx.Param(init(rngs.params(), shape, F32))
            self.beta_b_HxN = nnx.Param(jnp.zeros(shape[:2], F32))
            self.key_w_HxNxDxD = nnx.Param(init(rngs.params(), (*shape, head_dim), F32))
            self.value_w_HxNxDxD = nnx.Param(init(rngs.params(), (*shape, head_dim), F32))

    def betas(self, k_BxLxHxD: jax.Array) -> jax.Array:
        """beta [B, L, H, n_h] in (0, 1), or (0, 2) with allow_neg_eigval, from raw keys."""
        logit_BxLxH = jnp.einsum("blhd,hd->blh", k_BxLxHxD, self.beta_w_HxD[...])
        logits = [(logit_BxLxH + self.beta_b_H[...])[..., None]]
        if self.num_householder > 1:
            logits.append(jnp.einsum("blhd,hnd->blhn", k_BxLxHxD, self.beta_w_HxNxD[...])
                          + self.beta_b_HxN[...])
        beta = jax.nn.sigmoid(jnp.concatenate(logits, -1))
        return 2.0 * beta if self.allow_neg_eigval else beta

    def steps(self, k_BxLxHxD, v_BxLxHxD):
        """The n_h keys and values per token, [B, L, n_h, H, D] each (not normalised)."""
        keys, values = [k_BxLxHxD[:, :, None]], [v_BxLxHxD[:, :, None]]
        if self.num_householder > 1:
            keys.append(jnp.einsum("blhd,hnde->blnhe", k_BxLxHxD, self.key_w_HxNxDxD[...]))
            values.append(jnp.einsum("blhd,hnde->blnhe", v_BxLxHxD,
                                     self.value_w_HxNxDxD[...]))
        return jnp.concatenate(keys, 2), jnp.concatenate(values, 2)

    def _prepare(self, q, k, v, keep_BxL):
        """Masked float32 inputs per token: q [B, L, H, D] (unit, scaled by D^-1/2), keys
        [B, L, n_h, H, D] (unit), values [B, L, n_h, H, D], betas [B, L, n_h, H] (0 where
        masked), log alpha [B, L, H] (0 where masked)."""
        keep = keep_BxL[:, :, None, None]
        q, k, v = (jnp.where(keep, x.astype(F32), 0.0) for x in (q, k, v))
        keys, values = self.steps(k, v)
        betas = jnp.where(keep, self.betas(k), 0.0)
        log_alpha = jnp.where(keep_BxL[..., None], self.log_alpha(k), 0.0)
        q = l2_normalize(q) * (self.head_dim ** -0.5)
        return q, l2_normalize(keys), values, jnp.moveaxis(betas, -1, 2), log_alpha

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        """q, k, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D]."""
        del deterministic  # no dropout (no attention probabilities)
        keep_BxL = jnp.ones(q.shape[:2], bool) if mask is None else mask.astype(bool)
        (q, k, v), _ = convolve_qkv(self.qkv_conv, q, k, v, keep_BxL)
        q_BxLxHxD, keys, values, betas, log_alpha_BxLxH = self._prepare(q, k, v, keep_BxL)
        batch, length, steps = keys.shape[:3]
        expand = lambda x: x.reshape(batch, length * steps, *x.shape[3:])
        at = lambda x, j: jnp.zeros((batch, length, steps, *x.shape[2:]), F32).at[:, :, j].set(x)
        dtype = q.dtype  # q, k, v reach delta_rule in the input dtype (delta.py)
        out = delta_rule(expand(at(q_BxLxHxD, -1)).astype(dtype), expand(keys).astype(dtype),
                         expand(values).astype(dtype), expand(betas),
                         expand(at(log_alpha_BxLxH, 0)), form=self.form, causal=self.causal,
                         chunk_size=self.chunk_size, chunk_strategy=self.chunk_strategy)
        out_BxLxHxD = out.reshape(batch, length, steps, *out.shape[2:])[:, :, -1]
        return out_BxLxHxD.astype(q.dtype)

    def step(self, state, q_BxHxD, k_BxHxD, v_BxHxD, position, mask_B=None):
        """Decodes one token: decays S by alpha_t, applies the n_h steps, reads q_t S.

        Applied to tokens 0, 1, ... it gives the causal `__call__` outputs; arguments
        and return as `DeltaNetAttention.step`. Raises ValueError if not causal.
        """
        del position
        keep_Bx1 = decode_keep(self.causal, q_BxHxD, mask_B)
        token = lambda x: x[:, None]
        (q, k, v), conv = convolve_qkv(self.qkv_conv, *map(token, (q_BxHxD, k_BxHxD, v_BxHxD)),
                                       keep_Bx1, state.conv)
        q, keys, values, betas, log_alpha = self._prepare(q, k, v, keep_Bx1)
        S_BxHxDxD = state.S_BxHxDxD
        for j in range(self.num_householder):
            S_BxHxDxD = delta_update(S_BxHxDxD, keys[:, 0, j], values[:, 0, j], betas[:, 0, j],
                                     log_alpha[:, 0] if j == 0 else None)
        out_BxHxD = jnp.einsum("bhd,bhde->bhe", q[:, 0], S_BxHxDxD)
        return State(S_BxHxDxD, conv), out_BxHxD.astype(q_BxHxD.dtype)
