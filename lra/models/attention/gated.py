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
             inside the chunk (for per-channel gates by recursive halving: one
             matmul per block below the diagonal, `_intra_channels`), plus the state
             of all earlier chunks, carried by `lax.scan` (the default).
  recurrent  `lax.scan` over tokens; `init_state` / `step` decode one token at a time.

Chunk strategy (option `chunk_strategy`, `ChunkStrategy`; the chunked form only, the
same numbers either way):

  scan       each `lax.scan` step over the chunks computes its chunk's C x C part,
             then reads and updates the state: the step's arrays stay in cache.
  batched    the C x C parts, their products with V and the scaled q and k of all
             chunks are computed at once (batched over chunks) before the scan, which
             keeps only the state recurrence (one read, one update per chunk): fewer,
             larger kernels, for accelerators whose loop trips are costly.
  auto       (the default) `batched`, on every backend: measured on this project's
             CPU (forward + backward, 8 heads x 64, one quiet run, docs/benchmarks.md),
             batched / scan time was 1.05 and 1.01 for retnet, 0.82 and 0.94 for ssd,
             0.73 and 0.80 for gla at 4K and 16K, and on accelerators fewer, larger
             kernels are the point. (The delta rule's `auto` is `scan` on the CPU,
             where its row-by-row solve measured faster; delta.py.)

With `batched` the bidirectional form runs its two passes as one scan over the batch
stacked with its reversal (as delta.py), so its sequential depth is L / C, as causal.

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

Short convolutions (option `short_conv` of every family, short_conv.py; 0 = off, the
default): a depthwise causal convolution of that width plus SiLU on each of q, k and v
before anything else (the family's `gate`, scales and `finish` see the convolved q, k,
v); causal also when the core is bidirectional. Decoding carries their last
short_conv - 1 inputs in `State.conv`.

Masking: q, k, v are zeroed and the log-gate set to 0 (neutral: the state passes
unchanged) at masked positions before anything else, so a masked token changes no
real output nor gradient, in either direction; with right padding the reverse pass
starts with an empty state at the last real token. Matmuls take the input dtype with
float32 accumulation; the state is float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import F32, Choice, dot_f32, from_chunks, positive_int, to_chunks
from lra.models.attention.linear import Form, decode_keep
from lra.models.attention.sequence_parallel import map_over_sequence, splits_sequence
from lra.models.attention.short_conv import (
    History,
    convolve_qkv,
    empty_history,
    make_qkv_conv,
)
from lra.models.attention.state_passing import affine, gather_summaries, incoming_states

GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm's default, as RetNet's GroupNorm


class ChunkStrategy(Choice):
    """Where a chunked core computes the terms that do not depend on the carried state
    (module docstring); shared with the delta-rule core (delta.py)."""

    AUTO = "auto"  # the core's platform rule (gated: batched; delta rule: scan on cpu only)
    SCAN = "scan"  # inside the lax.scan step, one chunk at a time
    BATCHED = "batched"  # for all chunks at once before the scan; the scan carries S only


def resolve_chunk_strategy(strategy: str, *, batched_on_cpu: bool = False) -> ChunkStrategy:
    """`strategy` with `auto` resolved at trace time: `batched`, except `scan` when
    `jax.default_backend()` is "cpu" and not `batched_on_cpu` (whether the core measured
    faster batched on the CPU: the gated core did, the delta rule did not)."""
    strategy = ChunkStrategy(strategy)
    if strategy is ChunkStrategy.AUTO:
        cpu = jax.default_backend() == "cpu"
        return ChunkStrategy.SCAN if cpu and not batched_on_cpu else ChunkStrategy.BATCHED
    return strategy


class State(NamedTuple):
    """Decoding state, float32: S = sum_j decay(j..t) k_j^T v_j, [B, H, D(key), D(value)];
    with short_conv > 0 also the short convolutions' last inputs (None when off)."""

    S_BxHxDxD: jax.Array
    conv: History | None = None


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
        return dot_f32("bihd,bjhd->bhij", q_BxCxHxD, k_BxCxHxD) * decay_BxHxCxC
    return _intra_channels(q_BxCxHxD, k_BxCxHxD, cum_BxCxHxG)


def _intra_channels(q_BxCxHxD, k_BxCxHxD, cum_BxCxHxD) -> jax.Array:
    """`_intra` for per-channel decays, by recursive halving (no [C, C, D] array).

    cum is non-increasing along the sequence (the log-gates are <= 0), so for a query i
    after a reference point r and a key j before it, exp(cum_i - cum_j) =
    exp(cum_i - r) exp(r - cum_j) with both factors <= 1. Split the chunk in halves:
    the (second half, first half) block is one matmul of q and k scaled with r = cum at
    the end of the first half; each half is split again, down to single tokens (the
    diagonal q_i . k_i). Every level scales each token once, so the elementwise work is
    C D log2(C) and the matmuls total less than C^2 D / 2 (GLA's secondary chunking
    needs [n, C, D] scaled copies instead). C is padded to a power of two with neutral
    tokens (zero q, k; gate 0).
    """
    batch, length, heads, dim = q_BxCxHxD.shape
    size = 1 << (length - 1).bit_length()  # the next power of two >= C
    pad = [(0, 0), (0, 0), (0, size - length), (0, 0)]
    to_BxHxCxD = lambda x: x.astype(F32).transpose(0, 2, 1, 3)
    q, k = (jnp.pad(to_BxHxCxD(x), pad) for x in (q_BxCxHxD, k_BxCxHxD))
    cum = jnp.pad(to_BxHxCxD(cum_BxCxHxD), pad, mode="edge")
    # the diagonal blocks of the C x C matrix, [B, H, size / half, half, half]: 1 token each
    blocks = jnp.sum(q * k, -1).reshape(batch, heads, size, 1, 1)
    half = 1
    while half < size:  # blocks of 2 * half tokens from pairs of blocks of half
        pairs = lambda x: x.reshape(batch, heads, size // (2 * half), 2, half, dim)
        q2, k2, cum2 = pairs(q), pairs(k), pairs(cum)
        r_BxHxNx1xD = cum2[:, :, :, 0, -1:]  # the end of each first half
        q_hat = q2[:, :, :, 1] * jnp.exp(cum2[:, :, :, 1] - r_BxHxNx1xD)
        k_hat = k2[:, :, :, 0] * jnp.exp(r_BxHxNx1xD - cum2[:, :, :, 0])
        below_BxHxNxSxS = jnp.einsum("bhnid,bhnjd->bhnij", q_hat, k_hat)
        a2 = blocks.reshape(batch, heads, size // (2 * half), 2, half, half)
        top = jnp.concatenate([a2[:, :, :, 0], jnp.zeros_like(below_BxHxNxSxS)], -1)
        bottom = jnp.concatenate([below_BxHxNxSxS, a2[:, :, :, 1]], -1)
        blocks = jnp.concatenate([top, bottom], -2)
        half *= 2
    return blocks.reshape(batch, heads, size, size)[:, :, :length, :length]


def _parallel(q, k, v, g_BxLxHxG, chunk_size, chunk_strategy=None):
    """Causal output from the L x L matrix (the quadratic reference)."""
    del chunk_size, chunk_strategy
    a_BxHxLxL = _intra(q, k, jnp.cumsum(g_BxLxHxG.astype(F32), axis=1))
    return dot_f32("bhij,bjhd->bihd", a_BxHxLxL.astype(v.dtype), v)


def _chunk_terms(q_BxCxHxD, k_BxCxHxD, v_BxCxHxD, g_BxCxHxG):
    """Everything of a chunk that does not depend on the incoming state.

    Args are one chunk per batch row, [B, C, H, ...] (B may stand for chunks x batch).

    Returns:
      (out [B, C, H, D] float32: the chunk's own C x C part applied to v; q_old: q
      decayed since the chunk's start; k_new: k decayed until its end (both v's dtype);
      decay [B, H, G, 1] float32: the whole chunk's decay), so that the output is
      out + q_old S and the next state decay * S + k_new^T v.
    """
    cum_BxCxHxG = jnp.cumsum(g_BxCxHxG.astype(F32), axis=1)  # restarts at each chunk
    a_BxHxCxC = _intra(q_BxCxHxD, k_BxCxHxD, cum_BxCxHxG)
    dtype = v_BxCxHxD.dtype
    out_BxCxHxD = dot_f32("bhij,bjhd->bihd", a_BxHxCxC.astype(dtype), v_BxCxHxD)
    q_old = (q_BxCxHxD * jnp.exp(cum_BxCxHxG)).astype(dtype)  # decay since chunk start
    total_BxHxG = cum_BxCxHxG[:, -1]
    k_new = (k_BxCxHxD * jnp.exp(total_BxHxG[:, None] - cum_BxCxHxG)).astype(dtype)
    return out_BxCxHxD, q_old, k_new, jnp.exp(total_BxHxG)[..., None]


def _state_step(S_BxHxDxD, q_old, k_new, v_BxCxHxD, decay_BxHxGx1):
    """The read of the incoming state and the state after the chunk."""
    out_BxCxHxD = dot_f32("bihd,bhde->bihe", q_old, S_BxHxDxD.astype(v_BxCxHxD.dtype))
    S_BxHxDxD = decay_BxHxGx1 * S_BxHxDxD + dot_f32("bjhd,bjhe->bhde", k_new, v_BxCxHxD)
    return S_BxHxDxD, out_BxCxHxD


def _chunked(q, k, v, g, chunk_size, chunk_strategy=ChunkStrategy.AUTO):
    """Causal outputs [B, L, H, D] float32 of the chunked form (`chunked_with_state`)."""
    return chunked_with_state(q, k, v, g, chunk_size, chunk_strategy)[0]


def chunked_with_state(q, k, v, g, chunk_size, chunk_strategy=ChunkStrategy.AUTO):
    """Causal outputs [B, L, H, D] and the final state [B, H, D, D], float32, from a zero
    state. The state of all earlier chunks carried by `lax.scan`, plus each chunk's own
    C x C part. With `scan` a step computes its chunk's part, reads the state and
    updates it; computing the C x C part inside the step (as linear.py does) keeps each
    step's arrays in cache on a CPU: batched over all chunks at once they are as long
    as the sequence (measured: 16K/4K time 4.3 instead of 5.4 for retnet). With
    `batched` every chunk's part is computed before the scan, batched over chunks, and
    the scan does only the read and the update (module docstring)."""
    batch, length, heads, dim = v.shape
    # zeros_like: inside shard_map the state varies over the mesh axes as v does
    S0 = jnp.zeros_like(v, F32, shape=(batch, heads, q.shape[-1], dim))
    # [N, B, C, ...], zero-padded: zero k, v and log-gate leave the state as it is
    xs = tuple(to_chunks(x, min(chunk_size, length)) for x in (q, k, v, g))
    n = xs[0].shape[0]
    if resolve_chunk_strategy(chunk_strategy) is ChunkStrategy.SCAN:
        def body(S_BxHxDxD, xs):
            own_BxCxHxD, q_old, k_new, decay = _chunk_terms(*xs)
            S_BxHxDxD, out_BxCxHxD = _state_step(S_BxHxDxD, q_old, k_new, xs[2], decay)
            return S_BxHxDxD, own_BxCxHxD + out_BxCxHxD

        S_BxHxDxD, out_NxBxCxHxD = jax.lax.scan(body, S0, xs)
    else:
        # batch x chunks as one axis, batch-major: a sharded batch stays on its devices
        merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch * n, *x.shape[2:])
        split = lambda x: jnp.moveaxis(x.reshape(batch, n, *x.shape[1:]), 1, 0)
        own, q_old, k_new, decay = map(split, _chunk_terms(*map(merge, xs)))
        body = lambda S, terms: _state_step(S, *terms)
        S_BxHxDxD, read_NxBxCxHxD = jax.lax.scan(body, S0, (q_old, k_new, xs[2], decay))
        out_NxBxCxHxD = own + read_NxBxCxHxD
    return from_chunks(out_NxBxCxHxD, length), S_BxHxDxD


def _recurrent_step(S_BxHxDxD, q_BxHxD, k_BxHxD, v_BxHxD, g_BxHxG):
    """S = diag(exp(g)) S + k^T v, o = q S: one token."""
    kv_BxHxDxD = dot_f32("bhd,bhe->bhde", k_BxHxD, v_BxHxD)
    S_BxHxDxD = jnp.exp(g_BxHxG.astype(F32))[..., None] * S_BxHxDxD + kv_BxHxDxD
    return S_BxHxDxD, dot_f32("bhd,bhde->bhe", q_BxHxD.astype(F32), S_BxHxDxD)


def _recurrent(q, k, v, g, chunk_size, chunk_strategy=None):
    del chunk_size, chunk_strategy
    batch, length, heads, dim = v.shape
    S0 = jnp.zeros((batch, heads, q.shape[-1], dim), F32)
    body = lambda S, xs: _recurrent_step(S, *xs)
    _, out = jax.lax.scan(body, S0, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g)))
    return jnp.moveaxis(out, 0, 1)


_FORMS = {Form.PARALLEL: _parallel, Form.CHUNKED: _chunked, Form.RECURRENT: _recurrent}


@functools.partial(jax.jit, static_argnames=("form", "causal", "chunk_size", "chunk_strategy"))
def retain(q, k, v, g_BxLxHxG, *, form: Form, causal: bool, chunk_size: int,
           chunk_strategy: str = ChunkStrategy.AUTO) -> jax.Array:
    """The gated linear attention of gated inputs, float32 [B, L, H, D].

    Args:
      q, k, v: [B, L, H, D], zero at masked positions.
      g_BxLxHxG: float log-gates <= 0 (G = 1: per head; G = D: per key channel), 0 at
        masked positions.
      form: a `Form`.
      causal: causal, or bidirectional as fwd + rev - diag (module docstring).
      chunk_size: C of the chunked form.
      chunk_strategy: a `ChunkStrategy` of the chunked form (`auto` resolved here, at
        trace time: `batched`; module docstring).
    """
    strategy = resolve_chunk_strategy(chunk_strategy, batched_on_cpu=True)
    attend = functools.partial(_FORMS[form], chunk_size=chunk_size, chunk_strategy=strategy)
    if causal:
        return attend(q, k, v, g_BxLxHxG)
    g_next = next_gates(g_BxLxHxG)
    flip = lambda x: x[:, ::-1]
    if form == Form.CHUNKED and strategy is ChunkStrategy.BATCHED:
        # one scan over the batch stacked with its reversal (half the sequential steps)
        both = stack_directions
        out = attend(both(q, q), both(k, k), both(v, v), both(g_BxLxHxG, g_next))
        fwd_BxLxHxD, rev_BxLxHxD = unstack_directions(out)
    else:
        fwd_BxLxHxD = attend(q, k, v, g_BxLxHxG)
        rev_BxLxHxD = flip(attend(flip(q), flip(k), flip(v), flip(g_next)))
    return fwd_BxLxHxD + rev_BxLxHxD - _diagonal(q, k, v)


def stack_directions(forward: jax.Array, backward: jax.Array) -> jax.Array:
    """One batch [2B, L, ...] for one pass over both directions: row 2b is forward[b],
    row 2b + 1 is backward[b] (the reverse pass's inputs, in forward order) flipped
    along L.

    Interleaved, not concatenated: when the batch is sharded over devices each device
    keeps exactly its own rows, while [forward; backward] would move rows between
    devices (collective-permutes in the compiled step, and all-gathers of the whole
    batch after the chunk reshapes). Inside `jax.shard_map` (one device's rows) the
    state-passing kernels concatenate instead: there nothing moves, and
    `state_passing.incoming_states` takes the two halves.
    """
    return jnp.stack([forward, backward[:, ::-1]], 1).reshape(-1, *forward.shape[1:])


def unstack_directions(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`stack_directions`' rows split back: (forward [B, L, ...], reverse pass [B, L, ...]
    in forward order)."""
    pairs = out.reshape(-1, 2, *out.shape[1:])
    return pairs[:, 0], pairs[:, 1, ::-1]


def next_gates(g_BxLxHxG: jax.Array) -> jax.Array:
    """The reverse pass's log-gates: position m carries g_{m+1}, 0 after the last token."""
    return jnp.concatenate([g_BxLxHxG[:, 1:], jnp.zeros_like(g_BxLxHxG[:, :1])], axis=1)


def _diagonal(q, k, v) -> jax.Array:
    """q_i . k_i v_i [B, L, H, D] float32: the term both directions include."""
    return jnp.sum(q.astype(F32) * k.astype(F32), -1)[..., None] * v.astype(F32)


def retain_over_sequence(q, k, v, g_BxLxHxG, *, causal: bool, chunk_size: int,
                         chunk_strategy: str = ChunkStrategy.AUTO, mesh=None) -> jax.Array:
    """`retain` with the length split over the `seq` mesh axis, by state passing.

    Each device runs the chunked form on its shard from a zero state, the (decay, state)
    summaries of all devices are all-gathered once, each device folds those before it
    (reverse pass: after it) into its incoming state S_in, and adds q_t exp(cum_t) S_in,
    cum_t the log-gates summed from its shard's start (state_passing.py). The same
    numbers as `retain` in any form. Arguments as `retain`, global [B, L, ...];
    `mesh` None = the mesh in context.
    """
    strategy = resolve_chunk_strategy(chunk_strategy, batched_on_cpu=True)
    g_next = None if causal else next_gates(g_BxLxHxG)  # a shift across the shards
    kernel = functools.partial(_retain_shard, chunk_size=chunk_size, chunk_strategy=strategy)
    return map_over_sequence(kernel, q, k, v, g_BxLxHxG, g_next, mesh=mesh)


def _retain_shard(q, k, v, g, g_next, *, chunk_size, chunk_strategy):
    """`retain_over_sequence` on one device's shards [b, S, ...] (g_next None: causal)."""
    batch = q.shape[0]
    flip = lambda x: x[:, ::-1]
    inputs = (q, k, v, g)
    if g_next is not None:  # the batch stacked with its reversal, as `retain`
        inputs = tuple(jnp.concatenate([x, flip(y)], 0)
                       for x, y in zip(inputs, (q, k, v, g_next)))
    qs, ks, vs, gs = inputs
    local_BxSxHxD, S_BxHxDxD = chunked_with_state(qs, ks, vs, gs, chunk_size, chunk_strategy)
    cum_BxSxHxG = jnp.cumsum(gs.astype(F32), axis=1)
    decay_BxHxGx1 = jnp.exp(cum_BxSxHxG[:, -1])[..., None]  # the shard's transition
    gathered = gather_summaries((decay_BxHxGx1, S_BxHxDxD))
    fold = affine(lambda decay, S: decay * S)
    S_in = incoming_states(gathered, fold, jnp.zeros_like(S_BxHxDxD), batch,
                           bidirectional=g_next is not None)
    dtype = vs.dtype
    read = dot_f32("bshd,bhde->bshe", (qs * jnp.exp(cum_BxSxHxG)).astype(dtype),
                   S_in.astype(dtype))
    out = local_BxSxHxD + read
    if g_next is None:
        return out
    return out[:batch] + flip(out[batch:]) - _diagonal(q, k, v)


@jax.custom_vjp
def scale_and_shift(y, scale, bias):
    """y * scale + bias, with scale and bias broadcast over y's leading axes.

    The same numbers as the plain expression; only the gradient differs in how it is
    computed: the sums of dy * y and dy over the leading axes are matmuls with a ones
    row, which XLA's CPU backend runs far faster than the column reductions it makes of
    the plain expression's gradient (measured at B=1, L=4K, H=8, D=64: the whole
    GroupNorm's forward + backward 38.6 ms -> 4.8 ms).
    """
    return y * scale + bias


def _scale_and_shift_fwd(y, scale, bias):
    return y * scale + bias, (y, scale)


def _scale_and_shift_bwd(residuals, dout):
    y, scale = residuals
    rows = lambda x: x.reshape(-1, scale.size)
    ones_1xN = jnp.ones((1, rows(dout).shape[0]), dout.dtype)
    dscale = (ones_1xN @ rows(dout * y)).reshape(scale.shape)
    dbias = (ones_1xN @ rows(dout)).reshape(scale.shape)
    return dout * scale, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


scale_and_shift.defvjp(_scale_and_shift_fwd, _scale_and_shift_bwd)


class GroupNorm(nnx.Module):
    """Per-head normalisation over D (GroupNorm with one group per head), learned affine."""

    def __init__(self, num_heads: int, head_dim: int):
        self.scale_HxD = nnx.Param(jnp.ones((num_heads, head_dim), F32))
        self.bias_HxD = nnx.Param(jnp.zeros((num_heads, head_dim), F32))

    def __call__(self, x_BxLxHxD: jax.Array) -> jax.Array:
        x = x_BxLxHxD.astype(F32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)
        return scale_and_shift(y, self.scale_HxD[...], self.bias_HxD[...])


class GatedAttention(nnx.Module):
    """The gated linear-attention core; a family subclasses it and defines its gate.

    A subclass implements `gate` (its scales, log-gates and input transform) and may
    override `finish` (post-processing of the float32 output); it has its own
    keyword-only constructor (the registry reads its options from it) that calls
    this one, passing on the options `form`, `chunk_size`, `chunk_strategy` and
    `short_conv`. The core
    gives `__call__` (the registry contract, computed in `form`) and, for causal cores,
    `init_state` / `step`. No attention probabilities exist, so `dropout_rate` is
    accepted (the registry contract) and not applied.
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
        short_conv: int,
        rngs: nnx.Rngs,
        chunk_strategy: str = "auto",
    ):
        self.num_heads, self.head_dim, self.max_len = num_heads, head_dim, max_len
        self.causal = causal
        self.form = Form(form)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.chunk_strategy = ChunkStrategy(chunk_strategy)
        self.norm = GroupNorm(num_heads, head_dim) if group_norm else None
        self.qkv_conv = make_qkv_conv(short_conv, num_heads=num_heads, head_dim=head_dim,
                                      rngs=rngs)

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
        q, k, v = (jnp.where(keep, x, jnp.zeros((), x.dtype)).astype(F32) for x in (q, k, v))
        qg, kg, vg, g_BxLxHxG = self.gate(q, k, v)
        g_BxLxHxG = jnp.where(keep, g_BxLxHxG, 0.0)  # masked: neutral, the state passes
        return q, k, v, (qg, jnp.where(keep, kg, 0.0), jnp.where(keep, vg, 0.0), g_BxLxHxG)

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        """q, k, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D]."""
        del deterministic  # no dropout (see the class docstring)
        keep_BxL = jnp.ones(q.shape[:2], bool) if mask is None else mask.astype(bool)
        (q, k, v), _ = convolve_qkv(self.qkv_conv, q, k, v, keep_BxL)
        q32, k32, v32, (qg, kg, vg, g) = self._gated(q, k, v, keep_BxL)
        qg, kg, vg = (x.astype(q.dtype) for x in (qg, kg, vg))
        options = dict(causal=self.causal, chunk_size=self.chunk_size,
                       chunk_strategy=self.chunk_strategy)
        if splits_sequence():  # the sequence split over the `seq` mesh axis
            out = retain_over_sequence(qg, kg, vg, g, **options)
        else:
            out = retain(qg, kg, vg, g, form=self.form, **options)
        return self.finish(out, q32, k32, v32).astype(q.dtype)

    def init_state(self, batch_size: int) -> State:
        """The empty decoding state (float32, constant size in the sequence length)."""
        S_BxHxDxD = jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim), F32)
        return State(S_BxHxDxD, empty_history(self.qkv_conv, batch_size))

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
        (q, k, v), conv = convolve_qkv(self.qkv_conv, *map(token, (q_BxHxD, k_BxHxD, v_BxHxD)),
                                       keep_Bx1, state.conv)
        q32, k32, v32, (qg, kg, vg, g) = self._gated(q, k, v, keep_Bx1)
        qg, kg, vg = (x[:, 0].astype(q_BxHxD.dtype) for x in (qg, kg, vg))
        S, out_BxHxD = _recurrent_step(state.S_BxHxDxD, qg, kg, vg, g[:, 0])
        out = self.finish(out_BxHxD[:, None], q32, k32, v32)
        return State(S, conv), out[:, 0].astype(q_BxHxD.dtype)
