"""The linear-attention core shared by every kernelized family, and Linear Transformer.

With a feature map phi of queries and keys (shapes [B, L, H, F]), output i is

    out_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps),
    S_i = sum_j phi(k_j) v_j^T  [F, D],   z_i = sum_j phi(k_j)  [F],

summed over the real keys j (bidirectional) or the real keys j <= i (causal). The
cost is O(L F D) instead of O(L^2 D). Three forms compute the same numbers (`Form`):

  parallel   the L x L matrix phi(q) phi(k)^T, masked: the quadratic reference.
  chunked    per chunk of C tokens: the C x C masked matrix inside the chunk plus the
             state (S, z) of all earlier chunks, carried by `lax.scan` (the default).
  recurrent  `lax.scan` over tokens carrying (S, z); `init_state` / `step` do the same
             one token at a time, in constant memory, for decoding.

Keys can carry a log-scale: a feature map may return phi(k_j) = f_j * exp(s_j) as
(f_j, s_j), with s_j a stop-gradient number per key and head (Performer does, so
exp() never overflows). The core keeps the state at the scale exp(c) of the largest
s seen so far, as online softmax does, rescaling it when c grows; the causal pass
and `step` use the running maximum over keys j <= i, the bidirectional pass the
maximum over all real keys. A map without log-scales (None) skips the rescaling.

Short convolutions (option `short_conv`, short_conv.py; 0 = off, the default): a
depthwise causal convolution of that width plus SiLU on each of q, k and v, before the
feature map and before anything else; causal also when the core is bidirectional.
Decoding carries their last short_conv - 1 inputs in `State.conv`.

Masking: q, k and v are zeroed at masked positions before the feature map and phi(k)
is zeroed there after it, so masked keys contribute nothing (values and gradients)
and masked queries read finite numbers. S and z accumulate in float32; matmuls take
the input dtype (e.g. bfloat16) with float32 accumulation. eps keeps the
denominator away from zero (a query with no real key gets 0).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import F32, Choice, dot_f32, from_chunks, positive_int, to_chunks
from lra.models.attention import check_length
from lra.models.attention.sequence_parallel import map_over_sequence, splits_sequence
from lra.models.attention.short_conv import (
    History,
    convolve_qkv,
    empty_history,
    make_qkv_conv,
)
from lra.models.attention.state_passing import (
    fold_all,
    gather_summaries,
    incoming_state,
)

EPS = 1e-6  # added to the denominator phi(q_i) . z_i
_NEG = -1e30  # log-scale of a masked key and of an empty state: "no key yet"


def decode_keep(causal: bool, q_BxHxD: jax.Array, mask_B: jax.Array | None) -> jax.Array:
    """The keep mask [B, 1] of one decoded token; raises ValueError if not `causal`.

    The preamble of every recurrent core's `step` (this core, gated.py, delta.py).
    """
    if not causal:
        raise ValueError("step decodes causal attention; build the core with causal=True")
    batch = q_BxHxD.shape[0]
    return jnp.ones((batch, 1), bool) if mask_B is None else mask_B.astype(bool)[:, None]


class Form(Choice):
    """How the linear-attention core computes its output (all give the same numbers)."""

    PARALLEL = "parallel"  # quadratic masked matrix: the reference
    CHUNKED = "chunked"  # intra-chunk matmuls + inter-chunk state via lax.scan
    RECURRENT = "recurrent"  # lax.scan over tokens carrying the state


class State(NamedTuple):
    """Decoding state, float32: sum_j phi(k_j) v_j^T and sum_j phi(k_j) at scale exp(c);
    with short_conv > 0 also the short convolutions' last inputs (None when off)."""

    S_BxHxFxD: jax.Array
    z_BxHxF: jax.Array
    c_BxH: jax.Array  # log-scale of S and z: the largest key log-scale absorbed
    conv: History | None = None


def _absorb(state: State, kf_BxCxHxF, v_BxCxHxD, s_BxCxH) -> State:
    """Adds C keys (and their values) to the state, rescaling it to the new maximum."""
    if s_BxCxH is None:  # no log-scales: a plain sum
        kv_BxHxFxD = dot_f32("bchf,bchd->bhfd", kf_BxCxHxF.astype(v_BxCxHxD.dtype), v_BxCxHxD)
        z_BxHxF = state.z_BxHxF + kf_BxCxHxF.astype(F32).sum(1)
        return State(state.S_BxHxFxD + kv_BxHxFxD, z_BxHxF, state.c_BxH)
    c_BxH = jnp.maximum(state.c_BxH, s_BxCxH.max(1))
    decay_BxH = jnp.exp(state.c_BxH - c_BxH)
    kf_BxCxHxF = kf_BxCxHxF * jnp.exp(s_BxCxH - c_BxH[:, None])[..., None]
    kf_BxCxHxF = kf_BxCxHxF.astype(v_BxCxHxD.dtype)
    kv_BxHxFxD = dot_f32("bchf,bchd->bhfd", kf_BxCxHxF, v_BxCxHxD)
    S = state.S_BxHxFxD * decay_BxH[..., None, None] + kv_BxHxFxD
    z = state.z_BxHxF * decay_BxH[..., None] + kf_BxCxHxF.astype(F32).sum(1)
    return State(S, z, c_BxH)


def _read(state: State, qf_BxLxHxF) -> tuple[jax.Array, jax.Array]:
    """(phi(q) . S, phi(q) . z) for each query, at the state's scale exp(c); float32."""
    qf_BxLxHxF = qf_BxLxHxF.astype(F32)
    return dot_f32("blhf,bhfd->blhd", qf_BxLxHxF, state.S_BxHxFxD), dot_f32(
        "blhf,bhf->blh", qf_BxLxHxF, state.z_BxHxF
    )


def _quadratic(qf_BxLxHxF, kf_BxLxHxF, v_BxLxHxD, s_BxLxH, c_BxLxH, causal):
    """Masked matrix form: query i weighs key j by phi(q_i).phi(k_j) exp(s_j - c_i)."""
    length = qf_BxLxHxF.shape[1]
    a_BxHxLxL = dot_f32("bihf,bjhf->bhij", qf_BxLxHxF, kf_BxLxHxF)
    if s_BxLxH is None:  # no log-scales: only the causal mask
        if causal:
            a_BxHxLxL = jnp.where(jnp.tril(jnp.ones((length, length), bool)), a_BxHxLxL, 0.0)
        num_BxLxHxD = dot_f32("bhij,bjhd->bihd", a_BxHxLxL.astype(v_BxLxHxD.dtype), v_BxLxHxD)
        return num_BxLxHxD, a_BxHxLxL.sum(-1).transpose(0, 2, 1)
    log_BxHxLxL = s_BxLxH.transpose(0, 2, 1)[:, :, None, :] - c_BxLxH.transpose(0, 2, 1)[..., None]
    if causal:
        log_BxHxLxL = jnp.where(jnp.tril(jnp.ones((length, length), bool)), log_BxHxLxL, -jnp.inf)
    a_BxHxLxL = a_BxHxLxL * jnp.exp(log_BxHxLxL)
    num_BxLxHxD = dot_f32("bhij,bjhd->bihd", a_BxHxLxL.astype(v_BxLxHxD.dtype), v_BxLxHxD)
    return num_BxLxHxD, a_BxHxLxL.sum(-1).transpose(0, 2, 1)


def _parallel(qf, kf, v, s_BxLxH, causal, chunk_size):
    del chunk_size
    if s_BxLxH is None:
        c_BxLxH = None
    elif causal:
        c_BxLxH = jax.lax.cummax(s_BxLxH, axis=1)
    else:
        c_BxLxH = jnp.broadcast_to(s_BxLxH.max(1, keepdims=True), s_BxLxH.shape)
    return _quadratic(qf, kf, v, s_BxLxH, c_BxLxH, causal)


def _empty_state(batch: int, heads: int, features: int, head_dim: int, like=None) -> State:
    """The state before any key; `like` (an array) makes it vary over the mesh axes that
    `like` does, inside `jax.shard_map`."""
    zeros = jnp.zeros if like is None else functools.partial(jnp.zeros_like, like)
    return State(
        zeros(shape=(batch, heads, features, head_dim), dtype=F32),
        zeros(shape=(batch, heads, features), dtype=F32),
        zeros(shape=(batch, heads), dtype=F32) + _NEG,
    )


def _scan(body, qf, kf, v, s, chunk: int):
    """Runs `body(state, (qf, kf, v, s) of one chunk)` over chunks of `chunk` tokens."""
    batch, length, heads, features = qf.shape
    xs = (*(to_chunks(x, chunk) for x in (qf, kf, v)),
          None if s is None else to_chunks(s, chunk, fill=_NEG))
    state, ys = jax.lax.scan(body, _empty_state(batch, heads, features, v.shape[-1], v), xs)
    return state, jax.tree.map(lambda y: from_chunks(y, length), ys)


def _chunked(qf, kf, v, s, causal, chunk_size):
    out, state = _chunked_with_state(qf, kf, v, s, causal, chunk_size)
    return out if causal else _read(state, qf)


def _chunked_with_state(qf, kf, v, s, causal, chunk_size):
    """The chunked form's (causal: (numerator, denominator); else None) and final state."""
    def body(state, xs):
        qc, kc, vc, sc_BxCxH = xs
        out = None
        if causal and sc_BxCxH is None:
            num, den = _quadratic(qc, kc, vc, None, None, causal=True)
            old_num, old_den = _read(state, qc)
            out = (num + old_num, den + old_den)
        elif causal:
            c_BxCxH = jnp.maximum(state.c_BxH[:, None], jax.lax.cummax(sc_BxCxH, axis=1))
            num, den = _quadratic(qc, kc, vc, sc_BxCxH, c_BxCxH, causal=True)
            old_num, old_den = _read(state, qc)
            decay_BxCxH = jnp.exp(state.c_BxH[:, None] - c_BxCxH)
            out = (num + old_num * decay_BxCxH[..., None], den + old_den * decay_BxCxH)
        return _absorb(state, kc, vc, sc_BxCxH), out

    state, out = _scan(body, qf, kf, v, s, min(chunk_size, qf.shape[1]))
    return out, state


def _recurrent(qf, kf, v, s, causal, chunk_size):
    del chunk_size

    def body(state, xs):
        state = _absorb(state, *xs[1:])
        return state, (_read(state, xs[0]) if causal else None)

    state, out = _scan(body, qf, kf, v, s, 1)
    return out if causal else _read(state, qf)


_FORMS = {Form.PARALLEL: _parallel, Form.CHUNKED: _chunked, Form.RECURRENT: _recurrent}


@functools.partial(jax.jit, static_argnames=("form", "causal", "chunk_size"))
def _attend(qf, kf, v, s, *, form: Form, causal: bool, chunk_size: int) -> jax.Array:
    """Output (float32) from features; jitted so eager calls reuse the compiled form."""
    num_BxLxHxD, den_BxLxH = _FORMS[form](qf, kf, v, s, causal, chunk_size)
    return num_BxLxHxD / (den_BxLxH[..., None] + EPS)


def attend_over_sequence(qf, kf, v, s, *, causal: bool, chunk_size: int, mesh=None):
    """`_attend` (any form) with the length split over the `seq` mesh axis: state passing.

    Each device runs the chunked form on its shard; the final states (S, z at scale
    exp(c)) of all devices are all-gathered once and merged at the larger scale. Causal:
    each device adds the merged state of the devices before it to its numerators and
    denominators, both brought to the scale max(c_in, c_t) (c_t the running maximum of
    its own keys' log-scales); bidirectional: every query reads the merge of all.
    No transition: linear attention's state only accumulates (state_passing.py).
    """
    kernel = functools.partial(_attend_shard, causal=causal, chunk_size=chunk_size)
    return map_over_sequence(kernel, qf, kf, v, s, mesh=mesh)


def _merge(state: State, other: State) -> State:
    """Two states' sums at the larger of their scales (the fold of `attend_over_sequence`)."""
    c_BxH = jnp.maximum(state.c_BxH, other.c_BxH)
    mine, theirs = jnp.exp(state.c_BxH - c_BxH), jnp.exp(other.c_BxH - c_BxH)
    return State(state.S_BxHxFxD * mine[..., None, None] + other.S_BxHxFxD * theirs[..., None, None],
                 state.z_BxHxF * mine[..., None] + other.z_BxHxF * theirs[..., None], c_BxH)


def _attend_shard(qf, kf, v, s, *, causal, chunk_size):
    """`attend_over_sequence` on one device's shards [b, S, ...]."""
    out, state = _chunked_with_state(qf, kf, v, s, causal, min(chunk_size, qf.shape[1]))
    gathered = gather_summaries(state)
    empty = jax.tree.map(jnp.zeros_like, state)._replace(c_BxH=state.c_BxH * 0 + _NEG)
    if not causal:
        num_BxSxHxD, den_BxSxH = _read(fold_all(gathered, _merge, empty), qf)
        return num_BxSxHxD / (den_BxSxH[..., None] + EPS)
    incoming = incoming_state(gathered, _merge, empty)
    num_BxSxHxD, den_BxSxH = out
    own_c_BxSxH = (jnp.full(den_BxSxH.shape, _NEG, F32) if s is None
                   else jax.lax.cummax(s, axis=1))  # the scale of the shard's own sums
    c_BxSxH = jnp.maximum(own_c_BxSxH, incoming.c_BxH[:, None])
    own, old = jnp.exp(own_c_BxSxH - c_BxSxH), jnp.exp(incoming.c_BxH[:, None] - c_BxSxH)
    old_num, old_den = _read(incoming, qf)
    num_BxSxHxD = num_BxSxHxD * own[..., None] + old_num * old[..., None]
    den_BxSxH = den_BxSxH * own + old_den * old
    return num_BxSxHxD / (den_BxSxH[..., None] + EPS)


class KernelizedAttention(nnx.Module):
    """The linear-attention core; a family subclasses it and defines its feature map.

    A subclass implements `num_features` (F) and `features`, sets `positional = True`
    if the map uses token positions, and has its own keyword-only constructor (the
    registry reads the family's options from it) that calls this one, or inherits it. The core gives
    `__call__` (the registry contract, computed in the form `form`) and, for causal
    cores, `init_state` / `step` to decode token by token.

    No attention probabilities exist, so `dropout_rate` is accepted (the registry
    contract) and not applied.
    """

    positional = False  # True if `features` uses positions, which must stay < max_len

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_len: int,
        causal: bool = False,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
        form: str = "chunked",
        chunk_size: int = 64,
        short_conv: int = 0,
    ):
        """The registry constructor of every kernelized family (options: form, chunk_size,
        short_conv).

        A family with options of its own defines a constructor that adds them and calls
        this one; a family without (linear, cosformer) inherits it as it is.
        """
        del dropout_rate  # no probabilities to drop
        self.num_heads, self.head_dim, self.max_len = num_heads, head_dim, max_len
        self.causal = causal
        self.form = Form(form)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.qkv_conv = make_qkv_conv(short_conv, num_heads=num_heads, head_dim=head_dim,
                                      rngs=rngs)

    @property
    def num_features(self) -> int:
        """F, the width of phi."""
        raise NotImplementedError

    def features(
        self, x_BxLxHxD: jax.Array, positions_BxL: jax.Array, *, query: bool
    ) -> tuple[jax.Array, jax.Array | None]:
        """The feature map of queries (query=True) or keys.

        Args:
          x_BxLxHxD: float32 queries or keys (zero at masked positions).
          positions_BxL: int token indices (B may be 1), for position-aware maps.
          query: whether x holds queries.

        Returns:
          phi [B, L, H, F] and, optionally, a stop-gradient log-scale [B, L, H] by which
          phi is to be multiplied as exp() (keys only; None means 0).
        """
        raise NotImplementedError

    def _phi(self, q, k, v, keep_BxL, positions_BxL):
        keep = keep_BxL[:, :, None, None]
        q, k, v = (jnp.where(keep, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
        qf, _ = self.features(q.astype(F32), positions_BxL, query=True)
        kf, s = self.features(k.astype(F32), positions_BxL, query=False)
        kf = jnp.where(keep, kf, 0.0).astype(q.dtype)
        if s is not None:  # masked keys get the "no key" scale; maps without scales skip it
            s = jnp.where(keep_BxL[..., None], jax.lax.stop_gradient(s), _NEG)
        return qf.astype(q.dtype), kf, v, s

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        """q, k, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D]."""
        del deterministic  # no dropout (see the class docstring)
        batch, length = q.shape[:2]
        if self.positional:
            check_length(type(self).__name__, length, self.max_len)
        keep_BxL = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
        positions_1xL = jnp.arange(length)[None]
        (q, k, v), _ = convolve_qkv(self.qkv_conv, q, k, v, keep_BxL)
        qf, kf, v_, s = self._phi(q, k, v, keep_BxL, positions_1xL)
        if splits_sequence():  # the sequence split over the `seq` mesh axis
            out = attend_over_sequence(qf, kf, v_, s, causal=self.causal,
                                       chunk_size=self.chunk_size)
        else:
            out = _attend(qf, kf, v_, s, form=self.form, causal=self.causal,
                          chunk_size=self.chunk_size)
        return out.astype(q.dtype)

    def init_state(self, batch_size: int) -> State:
        """The empty decoding state (float32, constant size in the sequence length)."""
        state = _empty_state(batch_size, self.num_heads, self.num_features, self.head_dim)
        return state._replace(conv=empty_history(self.qkv_conv, batch_size))

    def step(self, state, q_BxHxD, k_BxHxD, v_BxHxD, position, mask_B=None):
        """Decodes one token: adds its key and value to `state`, reads its output.

        Applied to tokens 0, 1, ... it gives the causal `__call__` outputs.

        Args:
          state: from `init_state` or the previous step.
          q_BxHxD, k_BxHxD, v_BxHxD: the token's query, key and value.
          position: int index of the token in the sequence (scalar or [B]).
          mask_B: bool, False where the token is padding (the state skips it).

        Returns:
          (new state, output [B, H, D] in q's dtype).

        Raises:
          ValueError: if the core is not causal.
        """
        keep_Bx1 = decode_keep(self.causal, q_BxHxD, mask_B)
        batch = q_BxHxD.shape[0]
        positions_Bx1 = jnp.broadcast_to(jnp.reshape(jnp.asarray(position), (-1, 1)), (batch, 1))
        token = lambda x_BxHxD: x_BxHxD[:, None]
        (q, k, v), conv = convolve_qkv(
            self.qkv_conv, token(q_BxHxD), token(k_BxHxD), token(v_BxHxD), keep_Bx1, state.conv)
        qf, kf, v, s = self._phi(q, k, v, keep_Bx1, positions_Bx1)
        state = _absorb(state, kf, v, s)._replace(conv=conv)
        num, den = _read(state, qf)
        return state, (num / (den[..., None] + EPS)).astype(q_BxHxD.dtype)[:, 0]


class LinearAttention(KernelizedAttention):
    """Linear Transformer (Katharopoulos et al., 2020): phi(x) = elu(x) + 1, F = D.

    Options: `form` (parallel | chunked | recurrent), `chunk_size` (tokens per
    chunk in the chunked form; any L, padded internally) and `short_conv` (width of the
    short convolutions of q, k, v; 0 = off). `dropout_rate` is accepted and not applied
    (no attention probabilities).
    """

    @property
    def num_features(self) -> int:
        return self.head_dim

    def features(self, x_BxLxHxD, positions_BxL, *, query):
        del positions_BxL, query
        return jax.nn.elu(x_BxLxHxD) + 1.0, None
