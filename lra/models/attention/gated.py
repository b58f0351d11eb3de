"""The decay-aware linear-attention core shared by RetNet, GLA and Mamba2's SSD.

A sibling of `linear.py` without the denominator and with a gate: per token t, head h,
a log-gate g_t <= 0 (one number per head, G = 1, or one per key channel, G = D) and

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t    [D, D],      o_t = q_t S_t,

so o_i = sum_{j <= i} q_i diag(exp(g_{j+1} + ... + g_i)) k_j^T v_j (causal). A family
(retnet.py, gla.py, ssd.py) turns q, k, v into gated inputs (its own scales and
parameters, see `GatedAttention.gate`) and may post-process the output (`finish`:
D skip, per-head GroupNorm, output gate). Three forms compute the same numbers (`Form`):

  parallel   the L x L decay matrix exp(cum_i - cum_j) (cum = cumulative log-gate),
             masked to j <= i: the quadratic reference.
  chunked    per chunk of C tokens: the C x C matrix q_i . k_j exp(cum_i - cum_j)
             inside the chunk (for per-channel gates by GLA's secondary chunks of
             s ~ sqrt(C) tokens: matmuls between sub-chunks, an [s, s, D] masked
             product inside one), plus the state of all earlier chunks, carried by
             `lax.scan` (the default).
  recurrent  `lax.scan` over tokens; `init_state` / `step` decode one token at a time.

Numerics: gates stay in log space; cumulative sums are float32 and restart at every
chunk; every exponent is a difference cum_i - cum_j with j <= i (or the state's
"since chunk start" / "until chunk end" factors), so it is <= 0 and exp() never
overflows, whatever the length and however close the gates are to 0 or 1. The upper
triangle is replaced before exp(), so gradients stay finite.

Bidirectional (causal=False): o = fwd + rev - diag, as in LION (Afzal et al., 2025)
and Hydra (Hwang et al., 2024): `fwd` is the causal pass, `rev` the causal pass over the
reversed sequence, and the diagonal term q_i . k_i v_i, which both include, is
subtracted once. The reverse pass uses the gates shifted by one token (position m
carries g_{m+1}), so the decay between tokens i and j is exp(sum of g over (min, max])
in both directions: the matrix is symmetric in its decays.

Masking: q, k, v are zeroed and the log-gate set to 0 (neutral: the state passes
unchanged) at masked positions before anything else, so a masked token changes no
real output nor gradient, in either direction; with right padding the reverse pass
starts with an empty state at the last real token. Matmuls take the input dtype with
float32 accumulation; the state is float32.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.linear import _F32, Form, _dot, decode_keep

GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm's default, as RetNet's GroupNorm


class State(NamedTuple):
    """Decoding state, float32: S = sum_j decay(j..t) k_j^T v_j, [B, H, D(key), D(value)]."""

    S_BxHxDxD: jax.Array


def _decay(diff, tril):
    """exp(diff) where `tril`, else 0; diff is replaced before exp so nothing overflows."""
    return jnp.where(tril, jnp.exp(jnp.where(tril, diff, 0.0)), 0.0)


def _intra(q_BxCxHxD, k_BxCxHxD, cum_BxCxHxG) -> jax.Array:
    """The masked C x C matrix q_i . diag(exp(cum_i - cum_j)) k_j, j <= i: [B, H, C, C]."""
    length = q_BxCxHxD.shape[1]
    if cum_BxCxHxG.shape[-1] == 1:  # one decay per head: scale the plain q k^T matrix
        cum_BxHxC = cum_BxCxHxG[..., 0].transpose(0, 2, 1)
        tril_CxC = jnp.tril(jnp.ones((length, length), bool))
        decay_BxHxCxC = _decay(cum_BxHxC[..., :, None] - cum_BxHxC[..., None, :], tril_CxC)
        return _dot("bihd,bjhd->bhij", q_BxCxHxD, k_BxCxHxD) * decay_BxHxCxC
    return _intra_channels(q_BxCxHxD, k_BxCxHxD, cum_BxCxHxG)


def _sub_length(length: int) -> int:
    """s, the sub-chunk length: the largest divisor of C that is at most sqrt(C)."""
    sub = math.isqrt(length)
    while length % sub:
        sub -= 1
    return sub


def _intra_channels(q_BxCxHxD, k_BxCxHxD, cum_BxCxHxD) -> jax.Array:
    """`_intra` for per-channel decays, by sub-chunks of s tokens (GLA's secondary chunks).

    For i in sub-chunk I after j in sub-chunk J, exp(cum_i - cum_j) factors as
    exp(cum_i - start_I) exp(start_I - end_J) exp(end_J - cum_j), every factor <= 1:
    matmuls of the scaled q and k with an [n, n, D] decay between sub-chunks. Inside a
    sub-chunk the decay is an [s, s, D] masked product.
    """
    batch, length, heads, dim = q_BxCxHxD.shape
    sub = _sub_length(length)
    n = length // sub
    split = lambda x: x.astype(_F32).transpose(0, 2, 1, 3).reshape(batch, heads, n, sub, dim)
    q, k, cum = split(q_BxCxHxD), split(k_BxCxHxD), split(cum_BxCxHxD)  # [B, H, n, s, D]
    end_BxHxNxD = cum[:, :, :, -1]
    start_BxHxNxD = jnp.pad(end_BxHxNxD[:, :, :-1], [(0, 0), (0, 0), (1, 0), (0, 0)])
    q_hat = q * jnp.exp(cum - start_BxHxNxD[:, :, :, None])  # decay since its sub-chunk start
    k_hat = k * jnp.exp(end_BxHxNxD[:, :, :, None] - cum)  # decay until its sub-chunk end
    after_NxN = jnp.triu(jnp.ones((n, n), bool), 1)[:, :, None]  # [J, I]: I after J
    between_BxHxNxNxD = _decay(start_BxHxNxD[:, :, None] - end_BxHxNxD[:, :, :, None], after_NxN)
    between_BxHxNxCxD = jnp.repeat(between_BxHxNxNxD, sub, axis=3)  # [B, H, J, i, D]
    qm_BxHxNxCxD = q_hat.reshape(batch, heads, 1, length, dim) * between_BxHxNxCxD
    a_BxHxNxCxS = jnp.einsum("bhjcd,bhjtd->bhjct", qm_BxHxNxCxD, k_hat)  # batched over J
    a_BxHxNxSxNxS = a_BxHxNxCxS.reshape(batch, heads, n, n, sub, sub).transpose(0, 1, 3, 4, 2, 5)
    tril_SxS = jnp.tril(jnp.ones((sub, sub), bool))[:, :, None]
    decay_BxHxNxSxSxD = _decay(cum[:, :, :, :, None] - cum[:, :, :, None], tril_SxS)
    diag_BxHxNxSxS = jnp.sum(q[:, :, :, :, None] * k[:, :, :, None] * decay_BxHxNxSxSxD, -1)
    a_BxHxNxSxNxS = a_BxHxNxSxNxS + jnp.einsum("bhist,ij->bhisjt", diag_BxHxNxSxS, jnp.eye(n))
    return a_BxHxNxSxNxS.reshape(batch, heads, length, length)


def _parallel(q, k, v, g_BxLxHxG, chunk_size):
    """Causal output from the L x L matrix (the quadratic reference)."""
    del chunk_size
    a_BxHxLxL = _intra(q, k, jnp.cumsum(g_BxLxHxG.astype(_F32), axis=1))
    return _dot("bhij,bjhd->bihd", a_BxHxLxL.astype(v.dtype), v)


def _chunks(x, chunk: int):
    """[B, L, ...] -> [B * L/C, C, ...], zero-padded at the end (zero k, v and log-gate)."""
    batch, length = x.shape[:2]
    n = -(-length // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - length)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(batch * n, chunk, *x.shape[2:])


def _carry(total_BxNxHxG, kv_BxNxHxDxD):
    """The state before each chunk: S_{n+1} = diag(exp(total_n)) S_n + kv_n, by `lax.scan`."""

    def body(S_BxHxDxD, xs):
        total_BxHxG, kv_BxHxDxD = xs
        return jnp.exp(total_BxHxG)[..., None] * S_BxHxDxD + kv_BxHxDxD, S_BxHxDxD

    S0 = jnp.zeros_like(kv_BxNxHxDxD[:, 0])
    _, before_NxBxHxDxD = jax.lax.scan(
        body, S0, (jnp.moveaxis(total_BxNxHxG, 1, 0), jnp.moveaxis(kv_BxNxHxDxD, 1, 0)))
    return jnp.moveaxis(before_NxBxHxDxD, 0, 1)


def _chunked(q, k, v, g, chunk_size):
    """Every chunk's own C x C part and contribution to the state at once (batched over
    chunks); only the [D, D] state recurrence between chunks is a `lax.scan`."""
    batch, length, heads, dim = v.shape
    chunk = min(chunk_size, length)
    q, k, v, g = (_chunks(x, chunk) for x in (q, k, v, g))  # [B*N, C, H, .]
    cum_MxCxHxG = jnp.cumsum(g.astype(_F32), axis=1)  # restarts at each chunk (M = B*N)
    a_MxHxCxC = _intra(q, k, cum_MxCxHxG)
    out_MxCxHxD = _dot("bhij,bjhd->bihd", a_MxHxCxC.astype(v.dtype), v)
    total_MxHxG = cum_MxCxHxG[:, -1]
    k_new = (k * jnp.exp(total_MxHxG[:, None] - cum_MxCxHxG)).astype(v.dtype)  # until its end
    kv_MxHxDxD = _dot("bjhd,bjhe->bhde", k_new, v)
    split = lambda x: x.reshape(batch, -1, *x.shape[1:])
    before_MxHxDxD = _carry(split(total_MxHxG), split(kv_MxHxDxD)).reshape(kv_MxHxDxD.shape)
    q_old = (q * jnp.exp(cum_MxCxHxG)).astype(v.dtype)  # decay since the chunk start <= 1
    out_MxCxHxD = out_MxCxHxD + _dot("bihd,bhde->bihe", q_old, before_MxHxDxD.astype(v.dtype))
    return out_MxCxHxD.reshape(batch, -1, heads, dim)[:, :length]


def _recurrent_step(S_BxHxDxD, q_BxHxD, k_BxHxD, v_BxHxD, g_BxHxG):
    """S = diag(exp(g)) S + k^T v, o = q S: one token."""
    kv_BxHxDxD = _dot("bhd,bhe->bhde", k_BxHxD, v_BxHxD)
    S_BxHxDxD = jnp.exp(g_BxHxG.astype(_F32))[..., None] * S_BxHxDxD + kv_BxHxDxD
    return S_BxHxDxD, _dot("bhd,bhde->bhe", q_BxHxD.astype(_F32), S_BxHxDxD)


def _recurrent(q, k, v, g, chunk_size):
    del chunk_size
    batch, length, heads, dim = v.shape
    S0 = jnp.zeros((batch, heads, q.shape[-1], dim), _F32)
    body = lambda S, xs: _recurrent_step(S, *xs)
    _, out = jax.lax.scan(body, S0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g)))
    return jnp.moveaxis(out, 0, 1)


_FORMS = {Form.PARALLEL: _parallel, Form.CHUNKED: _chunked, Form.RECURRENT: _recurrent}


@functools.partial(jax.jit, static_argnames=("form", "causal", "chunk_size"))
def retain(q, k, v, g_BxLxHxG, *, form: Form, causal: bool, chunk_size: int) -> jax.Array:
    """The gated linear attention of gated inputs, float32 [B, L, H, D].

    Args:
      q, k, v: [B, L, H, D], zero at masked positions.
      g_BxLxHxG: float log-gates <= 0 (G = 1: per head; G = D: per key channel), 0 at
        masked positions.
      form: a `Form`.
      causal: causal, or bidirectional as fwd + rev - diag (module docstring).
      chunk_size: C of the chunked form.
    """
    attend = functools.partial(_FORMS[form], chunk_size=chunk_size)
    fwd_BxLxHxD = attend(q, k, v, g_BxLxHxG)
    if causal:
        return fwd_BxLxHxD
    g_next = jnp.concatenate([g_BxLxHxG[:, 1:], jnp.zeros_like(g_BxLxHxG[:, :1])], axis=1)
    flip = lambda x: x[:, ::-1]
    rev_BxLxHxD = flip(attend(flip(q), flip(k), flip(v), flip(g_next)))
    diag_BxLxH = jnp.sum(q.astype(_F32) * k.astype(_F32), -1)
    return fwd_BxLxHxD + rev_BxLxHxD - diag_BxLxH[..., None] * v.astype(_F32)


class GroupNorm(nnx.Module):
    """Per-head normalisation over D (GroupNorm with one group per head), learned affine."""

    def __init__(self, num_heads: int, head_dim: int):
        self.scale_HxD = nnx.Param(jnp.ones((num_heads, head_dim), _F32))
        self.bias_HxD = nnx.Param(jnp.zeros((num_heads, head_dim), _F32))

    def __call__(self, x_BxLxHxD: jax.Array) -> jax.Array:
        x = x_BxLxHxD.astype(_F32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)
        return y * self.scale_HxD[...] + self.bias_HxD[...]


class GatedAttention(nnx.Module):
    """The gated linear-attention core; a family subclasses it and defines its gate.

    A subclass implements `gate` (its scales, log-gates and input transform) and may
    override `finish` (post-processing of the float32 output); it has its own
    keyword-only constructor (the registry reads its options from it) that calls
    this one. The core gives `__call__` (the registry contract, computed in `form`)
    and, for causal cores, `init_state` / `step`. No attention probabilities exist,
    so `dropout_rate` is accepted (the registry contract) and not applied.
    """

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_len: int,
        causal: bool,
        form: str,
        chunk_size: int,
        group_norm: bool,
    ):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
        self.num_heads, self.head_dim, self.max_len = num_heads, head_dim, max_len
        self.causal = causal
        self.form = Form(form)
        self.chunk_size = chunk_size
        self.norm = GroupNorm(num_heads, head_dim) if group_norm else None

    def gate(self, q, k, v):
        """The family's gated inputs from the (float32, masked-to-zero) q, k, v [B, L, H, D].

        Returns:
          (q, k, v) to retain, and the log-gates [B, L, H, G] (G = 1 or D), <= 0.
        """
        raise NotImplementedError

    def finish(self, out_BxLxHxD, q, k, v):
        """Post-processing of the float32 output (inputs as given to `gate`)."""
        del q, k, v
        return out_BxLxHxD if self.norm is None else self.norm(out_BxLxHxD)

    def _gated(self, q, k, v, keep_BxL):
        keep = keep_BxL[:, :, None, None]
        q, k, v = (jnp.where(keep, x, jnp.zeros((), x.dtype)).astype(_F32) for x in (q, k, v))
        qg, kg, vg, g_BxLxHxG = self.gate(q, k, v)
        g_BxLxHxG = jnp.where(keep, g_BxLxHxG, 0.0)  # masked: neutral, the state passes
        return q, k, v, (qg, jnp.where(keep, kg, 0.0), jnp.where(keep, vg, 0.0), g_BxLxHxG)

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        """q, k, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D]."""
        del deterministic  # no dropout (see the class docstring)
        keep_BxL = jnp.ones(q.shape[:2], bool) if mask is None else mask.astype(bool)
        q32, k32, v32, (qg, kg, vg, g) = self._gated(q, k, v, keep_BxL)
        qg, kg, vg = (x.astype(q.dtype) for x in (qg, kg, vg))
        out = retain(qg, kg, vg, g, form=self.form, causal=self.causal, chunk_size=self.chunk_size)
        return self.finish(out, q32, k32, v32).astype(q.dtype)

    def init_state(self, batch_size: int) -> State:
        """The empty decoding state (float32, constant size in the sequence length)."""
        return State(jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim), _F32))

    def step(self, state, q_BxHxD, k_BxHxD, v_BxHxD, position, mask_B=None):
        """Decodes one token: S = diag(a) S + k^T v, o = q S (then `finish`).

        Applied to tokens 0, 1, ... it gives the causal `__call__` outputs.

        Args:
          state: from `init_state` or the previous step.
          q_BxHxD, k_BxHxD, v_BxHxD: the token's query, key and value.
          position: int index of the token (unused: the gates are not positional).
          mask_B: bool, False where the token is padding (the state passes unchanged).

        Returns:
          (new state, output [B, H, D] in q's dtype).

        Raises:
          ValueError: if the core is not causal.
        """
        del position
        keep_Bx1 = decode_keep(self.causal, q_BxHxD, mask_B)
        token = lambda x: x[:, None]
        q32, k32, v32, (qg, kg, vg, g) = self._gated(*map(token, (q_BxHxD, k_BxHxD, v_BxHxD)),
                                                     keep_Bx1)
        qg, kg, vg = (x[:, 0].astype(q_BxHxD.dtype) for x in (qg, kg, vg))
        S, out_BxHxD = _recurrent_step(state.S_BxHxDxD, qg, kg, vg, g[:, 0])
        out = self.finish(out_BxHxD[:, None], q32, k32, v32)
        return State(S), out[:, 0].astype(q_BxHxD.dtype)
