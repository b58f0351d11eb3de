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

`grouped_ssd` (and `grouped_ssd_step`) is the SSD of the Mamba2 block, where B and C
come from the block's input projection per group of heads (Mamba2's ngroups) rather
than per head: written from the paper's chunked SSD (its Listing 1, the [C, C]
intra-chunk matrix plus states passed between chunks) and the conventions of
github.com/state-spaces/mamba at commit e9594ce1c732d97440f0332fdc43170a2294dbfa
(mamba_ssm/ops/triton/ssd_combined.py `_mamba_chunk_scan_combined_fwd`: head h reads
group h // (H / G), C B^T computed per group by `_bmm_chunk_fwd`, `initial_states`;
mamba_ssm/modules/ssd_minimal.py), not copied. Per chunk, C B^T [C, C] is one matmul
per group; each head's decay exp(cum_i - cum_j) multiplies it (the only per-head
[C, C] array); the state is read with C per group and written with B per group, the
decays since the chunk start and until its end applied to the output and to dt x.
With one group per head it is gated.py's computation with q = C, k = B (tested); the
numerics (log-space decays, float32 cumulative sums restarted each chunk, exponents
<= 0, matmuls in the inputs' dtype with float32 accumulation, float32 state) are
gated.py's. It lives here rather than in gated.py so that the per-head gated core
keeps one layout.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import F32, dot_f32, from_chunks, to_chunks
from lra.models.attention.gated import GatedAttention, next_gates
from lra.models.attention.linear import Form
from lra.models.attention.sequence_parallel import map_over_sequence
from lra.models.attention.state_passing import affine, gather_summaries, incoming_states

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
    `form` (parallel | chunked | recurrent), `chunk_size`, `chunk_strategy`, `short_conv` (gated.py).
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
        chunk_strategy: str = "auto",
        short_conv: int = 0,
    ):
        del dropout_rate  # no probabilities
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_len=max_len,
                         causal=causal, form=form, chunk_size=chunk_size,
                         chunk_strategy=chunk_strategy, group_norm=group_norm, short_conv=short_conv, rngs=rngs)
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


# --- the grouped SSD of the Mamba2 block (B and C shared by groups of heads) ------------


def _segment_decay(cum_BxCxGxR: jax.Array) -> jax.Array:
    """exp(cum_i - cum_j) for j <= i, else 0: [B, G, R, C, C]. The upper triangle is
    replaced before exp(), so nothing overflows and gradients stay finite."""
    cum = jnp.moveaxis(cum_BxCxGxR, 1, -1)  # [B, G, R, C]
    length = cum.shape[-1]
    tril_CxC = jnp.tril(jnp.ones((length, length), bool))
    diff = cum[..., :, None] - cum[..., None, :]
    return jnp.where(tril_CxC, jnp.exp(jnp.where(tril_CxC, diff, 0.0)), 0.0)


def _grouped_chunked(c, b, x, g, S0, chunk_size):
    """The causal grouped SSD's outputs (`grouped_chunked_with_state`)."""
    return grouped_chunked_with_state(c, b, x, g, S0, chunk_size)[0]


def grouped_chunked_with_state(c, b, x, g, S0, chunk_size):
    """(outputs, final state [B, G, R, N, P] float32) of the causal grouped SSD, one
    chunk per `lax.scan` step (Listing 1 of the paper,
    chunk by chunk): the chunk's own [C, C] part, the read of the state that all earlier
    chunks left, and the chunk's contribution to that state.

    c, b [B, L, G, N]; x [B, L, G, R, P] (dt-scaled); g [B, L, G, R] float32; S0
    [B, G, R, N, P] float32. C B^T is formed once per group ([B, G, C, C]) and meets
    the per-head decay only in the product with it; the state is read with C per group
    and written with B per group, the per-head decays applied to x and to the output.
    """
    length = x.shape[1]
    chunk = min(chunk_size, length)
    dtype = x.dtype

    def body(S_BxGxRxNxP, xs):
        c_BxCxGxN, b_BxCxGxN, x_BxCxGxRxP, g_BxCxGxR = xs
        cum_BxCxGxR = jnp.cumsum(g_BxCxGxR, axis=1)  # restarts at each chunk
        cb_BxGxCxC = dot_f32("bign,bjgn->bgij", c_BxCxGxN, b_BxCxGxN)  # once per group
        a_BxGxRxCxC = cb_BxGxCxC[:, :, None] * _segment_decay(cum_BxCxGxR)
        out = dot_f32("bgrij,bjgrp->bigrp", a_BxGxRxCxC.astype(dtype), x_BxCxGxRxP)
        read = dot_f32("bign,bgrnp->bigrp", c_BxCxGxN, S_BxGxRxNxP.astype(dtype))
        out = out + jnp.exp(cum_BxCxGxR)[..., None] * read  # decay since the chunk start
        total_BxGxR = cum_BxCxGxR[:, -1]
        to_end = jnp.exp(total_BxGxR[:, None] - cum_BxCxGxR)[..., None]  # until chunk end
        x_end = (x_BxCxGxRxP.astype(F32) * to_end).astype(dtype)
        S_BxGxRxNxP = (jnp.exp(total_BxGxR)[..., None, None] * S_BxGxRxNxP
                       + dot_f32("bjgn,bjgrp->bgrnp", b_BxCxGxN, x_end))
        return S_BxGxRxNxP, out

    # [n, B, C, ...], zero-padded: zero b, x and log-gate leave the state as it is
    chunks = tuple(to_chunks(a, chunk) for a in (c, b, x, g))
    S, out_nxBxCxGxRxP = jax.lax.scan(body, S0, chunks)
    return from_chunks(out_nxBxCxGxRxP, length), S


def _grouped_parallel(c, b, x, g, S0, chunk_size):
    """The quadratic form: the whole sequence as one chunk (the L x L matrix)."""
    del chunk_size
    return _grouped_chunked(c, b, x, g, S0, x.shape[1])


def _grouped_token(S_BxGxRxNxP, c_BxGxN, b_BxGxN, x_BxGxRxP, g_BxGxR):
    """h = exp(g) h + B^T x, y = C h: one token (float32 state, read in float32)."""
    write = dot_f32("bgn,bgrp->bgrnp", b_BxGxN, x_BxGxRxP)
    S_BxGxRxNxP = jnp.exp(g_BxGxR.astype(F32))[..., None, None] * S_BxGxRxNxP + write
    return S_BxGxRxNxP, dot_f32("bgn,bgrnp->bgrp", c_BxGxN.astype(F32), S_BxGxRxNxP)


def _grouped_recurrent(c, b, x, g, S0, chunk_size):
    del chunk_size
    body = lambda S, xs: _grouped_token(S, *xs)
    _, out = jax.lax.scan(body, S0, tuple(jnp.moveaxis(a, 1, 0) for a in (c, b, x, g)))
    return jnp.moveaxis(out, 0, 1)


_GROUPED_FORMS = {Form.PARALLEL: _grouped_parallel, Form.CHUNKED: _grouped_chunked,
                  Form.RECURRENT: _grouped_recurrent}


def _by_group(a, groups):
    """[..., H, D] -> [..., G, H / G, D]: head h is in group h // (H / G), as Mamba2."""
    return a.reshape(*a.shape[:-2], groups, a.shape[-2] // groups, a.shape[-1])


@functools.partial(jax.jit, static_argnames=("form", "causal", "chunk_size"))
def grouped_ssd(C_BxLxGxN, B_BxLxGxN, x_BxLxHxP, g_BxLxH, initial_state=None, *,
                form: Form, causal: bool, chunk_size: int) -> jax.Array:
    """Mamba2's SSD with B and C shared by groups of heads, float32 [B, L, H, P].

    Per head h of group G(h) = h // (H / G) (Mamba2's layout: the heads of a group are
    consecutive) and token t, with x already scaled by dt and g = dt A <= 0:

        S_t = exp(g_{t,h}) S_{t-1} + B_{t,G(h)}^T x_{t,h}     [N, P], S_{-1} = initial_state
        y_{t,h} = C_{t,G(h)} S_t

    Forms (`Form`, the same numbers): `chunked` (the C x C product C B^T once per group and
    chunk, scaled by each head's decay; the state carried by `lax.scan`), `parallel` (one
    chunk of the whole length) and `recurrent` (`lax.scan` over tokens). Bidirectional
    (causal=False) as gated.py: fwd + rev - diag, the reverse pass over the reversed
    sequence with the gates shifted by one token, starting from a zero state (the initial
    state enters the forward pass only). Matmuls take the inputs' dtype (x's) with float32
    accumulation; the state and the decays are float32.

    Args:
      C_BxLxGxN, B_BxLxGxN: C and B per group, zero at masked positions.
      x_BxLxHxP: dt x per head, zero at masked positions; its dtype is the matmuls'.
      g_BxLxH: float log-gates dt A <= 0, 0 at masked positions (the state passes).
      initial_state: None (zero) or float, broadcastable to [B, H, N, P].
      form: a `Form`.
      causal: causal, or bidirectional (fwd + rev - diag).
      chunk_size: C of the chunked form.

    Raises:
      ValueError: if the groups do not divide the heads.
    """
    batch, _, heads, dim = x_BxLxHxP.shape
    c, b, x, g = _grouped_inputs(C_BxLxGxN, B_BxLxGxN, x_BxLxHxP, g_BxLxH)
    groups, d_state = c.shape[-2:]
    state_shape = (batch, groups, heads // groups, d_state, dim)
    zero_S0 = jnp.zeros(state_shape, F32)
    S0 = zero_S0 if initial_state is None else jnp.broadcast_to(
        initial_state.astype(F32), (batch, heads, d_state, dim)).reshape(state_shape)
    attend = functools.partial(_GROUPED_FORMS[Form(form)], chunk_size=chunk_size)
    out = attend(c, b, x, g, S0)
    if not causal:
        flip = lambda a: a[:, ::-1]
        out = out + flip(attend(flip(c), flip(b), flip(x), flip(next_gates(g)), zero_S0))
        out = out - _grouped_diagonal(c, b, x)
    return out.reshape(*out.shape[:2], heads, dim)


def _grouped_inputs(C_BxLxGxN, B_BxLxGxN, x_BxLxHxP, g_BxLxH):
    """(C, B in x's dtype, x [B, L, G, R, P], g [B, L, G, R] float32): the heads by group.

    Raises:
      ValueError: if the groups do not divide the heads.
    """
    heads, groups = x_BxLxHxP.shape[2], C_BxLxGxN.shape[-2]
    if heads % groups:
        raise ValueError(f"ngroups ({groups}) must divide the number of heads ({heads})")
    dtype = x_BxLxHxP.dtype
    g = g_BxLxH.astype(F32).reshape(*g_BxLxH.shape[:2], groups, heads // groups)
    return (C_BxLxGxN.astype(dtype), B_BxLxGxN.astype(dtype), _by_group(x_BxLxHxP, groups), g)


def _grouped_diagonal(c, b, x) -> jax.Array:
    """C_t . B_t dt x_t [B, L, G, R, P] float32: the term both directions include."""
    return jnp.sum(c.astype(F32) * b.astype(F32), -1)[..., None, None] * x.astype(F32)


def grouped_ssd_over_sequence(C_BxLxGxN, B_BxLxGxN, x_BxLxHxP, g_BxLxH, initial_state=None,
                              *, causal: bool, chunk_size: int, mesh=None) -> jax.Array:
    """`grouped_ssd` (any form) with the length split over the `seq` mesh axis: state
    passing (state_passing.py), as gated.py's `retain_over_sequence` with the grouped
    state [G, R, N, P]: each device runs the chunked form on its shard from a zero
    state, the (decay, state) summaries are all-gathered once, each device folds those
    before it (reverse pass: after it) into its incoming state, starting from
    `initial_state` on the forward pass, and adds C_t exp(cum_t) S_in. Arguments as
    `grouped_ssd`, except `initial_state`: None or [H, N, P] (one for every row);
    `mesh` None = the mesh in context."""
    heads, dim = x_BxLxHxP.shape[2:]
    c, b, x, g = _grouped_inputs(C_BxLxGxN, B_BxLxGxN, x_BxLxHxP, g_BxLxH)
    groups, d_state = c.shape[-2:]
    if initial_state is not None and initial_state.shape != (heads, d_state, dim):
        raise ValueError(f"initial_state must be [H, N, P] = {(heads, d_state, dim)}; "
                         f"got {initial_state.shape}")
    S_init = (None if initial_state is None else initial_state.astype(F32).reshape(
        groups, heads // groups, d_state, dim))
    kernel = functools.partial(_grouped_ssd_shard, S_init=S_init, chunk_size=chunk_size)
    out = map_over_sequence(kernel, c, b, x, g, None if causal else next_gates(g), mesh=mesh)
    return out.reshape(*out.shape[:2], heads, dim)


def _grouped_ssd_shard(c, b, x, g, g_next, *, S_init, chunk_size):
    """`grouped_ssd_over_sequence` on one device's shards [b, S, ...] (g_next None: causal)."""
    batch = x.shape[0]
    flip = lambda a: a[:, ::-1]
    inputs = (c, b, x, g)
    if g_next is not None:  # the batch stacked with its reversal, as gated.py
        inputs = tuple(jnp.concatenate([a, flip(r)], 0) for a, r in zip(inputs, (c, b, x, g_next)))
    cs, bs, xs, gs = inputs
    rows, _, groups, heads, dim = xs.shape
    zero_S = jnp.zeros_like(xs, F32, shape=(rows, groups, heads, cs.shape[-1], dim))
    out, S = grouped_chunked_with_state(cs, bs, xs, gs, zero_S, chunk_size)
    cum_BxSxGxR = jnp.cumsum(gs, axis=1)
    decay = jnp.exp(cum_BxSxGxR[:, -1])[..., None, None]  # the shard's transition
    empty = zero_S
    if S_init is not None:  # the learned initial state starts the forward pass only
        start = jnp.broadcast_to(S_init, (batch, *S_init.shape))
        empty = empty.at[:batch].add(start)
    S_in = incoming_states(gather_summaries((decay, S)), affine(lambda d, S: d * S), empty,
                           batch, bidirectional=g_next is not None)
    read = dot_f32("bign,bgrnp->bigrp", cs, S_in.astype(xs.dtype))
    out = out + jnp.exp(cum_BxSxGxR)[..., None] * read
    if g_next is None:
        return out
    return out[:batch] + flip(out[batch:]) - _grouped_diagonal(c, b, x)


def grouped_ssd_step(S_BxHxNxP, C_BxGxN, B_BxGxN, x_BxHxP, g_BxH):
    """One token of `grouped_ssd` (causal): (new float32 state, float32 output [B, H, P])."""
    batch, heads, d_state, dim = S_BxHxNxP.shape
    groups = C_BxGxN.shape[-2]
    S = S_BxHxNxP.reshape(batch, groups, heads // groups, d_state, dim)
    dtype = x_BxHxP.dtype
    S, y = _grouped_token(S, C_BxGxN.astype(dtype), B_BxGxN.astype(dtype),
                          _by_group(x_BxHxP, groups), g_BxH.reshape(batch, groups, -1))
    return S.reshape(S_BxHxNxP.shape), y.reshape(batch, heads, dim)
