"""The Forgetting Transformer's attention (FoX): softmax attention with a forget gate.

Lin, Nikishin, He & Courville, ICLR 2025, "Forgetting Transformer: Softmax Attention
with a Forget Gate" (arXiv:2503.02130), Forgetting Attention: per head, a scalar forget
gate f_t = sigmoid(w_f . x_t + b_f) in (0, 1) per token, and

    o_i = sum_{j <= i} softmax_j(q_i . k_j / sqrt(D) + d_ij) v_j,
    d_ij = sum_{l = j+1}^{i} log f_l = c_i - c_j,   c_t = sum_{l <= t} log f_l,

i.e. the unnormalised weight exp(q_i . k_j / sqrt(D)) of key j is multiplied by the
product of the gates of the tokens after it, up to and including the query's own gate
f_i; key j's own gate f_j is not in it, so d_ii = 0.

Conventions transcribed from the authors' code, zhixuan-lin/forgetting-transformer at
commit 883f260c636e87971339749b0d8310004794a5cc:
  - src/forgetting_transformer/model/forgetting_transformer/
    modeling_forgetting_transformer.py (`ForgettingAttentionLayer`, the default
    `fgate_type="full"`): the gate is `fgate_proj = nn.Linear(hidden_size, num_heads,
    bias=True)` and log f = `logsigmoid(fgate_logit.float())` (float32, never the log of
    a rounded sigmoid); the softmax scale is `sm_scale = 1 / sqrt(head_dim)` on q . k,
    the decay is added unscaled; every `nn.Linear` is initialised N(0, initializer_range)
    with a zero bias (`_init_weights`), initializer_range = 0.02 in
    configs/model/forgetting_transformer.py. So f is about sigmoid(0) = 1/2 at
    initialisation.
  - src/forgetting_transformer/ops/forgetting_attention.py: `log_lambda =
    cumsum(log_fgate)` in float32 and `decay_bias = log_lambda[i] - log_lambda[j]` added
    to the scaled logits (so the sum includes f_i and excludes f_j); padding (left padding
    there, `seq_start`) gets log f = 0 and its keys are excluded.
  - the same layer's `fgate_bias_init` (used there with the data-independent gates,
    `fgate_type="bias_only"` / `"fixed"`): decay times T log-spaced over the heads from
    `decay_time_min` to `decay_time_max` (`torch.linspace` of their logs) and
    b_f = -log(expm1(1 / T)), so that log sigmoid(b_f) = -1 / T: a token T positions
    away starts decayed by about e^-1. Here the options `decay_time_min` /
    `decay_time_max` (both 0, the default: off, b_f = 0 as the default gate).
The same in flash-linear-attention (fla-org/flash-linear-attention at commit
bc3b101dcb713ddc5bd8924b66754eb68b5ccf89): fla/ops/forgetting_attn/naive.py (q * scale
k^T + gc_i - gc_j with gc = cumsum(g), lower triangle) and fla/layers/forgetting_attn.py
(`f_proj = nn.Linear(hidden_size, num_heads, bias=True)`, g = logsigmoid(f_proj(x))).
No code is copied from either.

Where lra differs. The core receives only q, k, v (the registry's contract), so the gate
is read, per head h, from the raw key of that head with the family's own D -> 1
projection, as delta.py reads Gated DeltaNet's gates:

    log f_t = log_sigmoid(k_t . w_f[h] + b_f[h])   (parameters `forget_w_HxD`, `forget_b_H`)

with the authors' initialisation (w_f ~ N(0, 0.02^2), b_f = 0, or b_f from decay times
when `decay_time_min` / `decay_time_max` are set). Since k_t = x_t W_k[h],
this is the paper's gate restricted to (and sharing parameters with) the head's key
projection; with `positions=rope` it reads the rotated key, which the core receives.

Bidirectional (causal=False, LRA's encoder; not in the paper), defined here with
symmetric decays as the gated cores (gated.py, delta.py) and LION: between query i and
key j the bias is the sum of log f over the positions (min(i, j), max(i, j)]:

    d_ij = c_i - c_j (j <= i),   d_ij = c_j - c_i (j > i),   i.e. d_ij = -|c_i - c_j|,

so a key d tokens after the query is decayed by the gates of the d tokens up to and
including it, as one d tokens before it is by the gates of the d tokens up to and
including the query; d_ii = 0 and d_ij = d_ji. Every key is visible.

Forms (option `form`; both the same numbers, outputs and gradients):

  blockwise  (default) exact and O(L) memory: memory_efficient's online softmax
             (`blockwise_attention`) with a `BlockBias` that forms c_i - c_j for the
             block pair in hand only, from the cumulative log-gates c [B, L, H] (no L x L
             array, forward or backward). memory_efficient visits every key block for
             every query block, also those entirely after the queries under causal, so
             does this form (their logits are masked). No explicit probabilities:
             attention dropout is refused (`dropout_rate > 0` raises).
  quadratic  the full [B, L, H, L] logits + decay, masked, float32 softmax: the
             reference; dropout on the probabilities as `softmax`'s explicit path.

Sequence parallelism (a mesh in context whose `seq` axis has n > 1 devices,
`config.mesh_seq`; blockwise form only): each device keeps its L/n queries; the
cumulative log-gates cross the split as a state (each device's sum of log f, one
all-gather, the earlier devices' sums added: `state_passing`), then keys, values, mask
and c are all-gathered whole and the local queries run the blockwise form against them
(`blockwise_attention` with the queries' offset). Per device: O(L) keys, values and
gates, logits of one (Q, C) block pair at a time; every device visits every key block
(the unsplit blockwise form does too). The transposes of the gathers reduce-scatter the
key, value and gate gradients. Not a ring: no `kv_strategy` applies.

Masking: log f = 0 at masked positions (no decay: the decay between two real tokens is
the sum of the real tokens' gates between them) and masked keys get a large negative
logit (`MASKED_LOGIT`, after the bias), so their q, k, v change no real output or
gradient; a query row with no allowed key (only ever a masked row) gets the plain
average of all L values, finite, as `softmax` and `memory_efficient`.

Numerics: the gate, c and the softmax statistics are float32; the output has q's dtype.
c is a plain float32 cumulative sum, as in the authors' kernel, so a bias c_i - c_j far
into a long sequence carries an absolute error of about 6e-8 |c_i| (e.g. 6e-4 when the
gates have summed to -1e4).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import F32, MASKED_LOGIT, Choice, positive_int, real_number
from lra.models.attention import check_length, state_passing
from lra.models.attention.memory_efficient import BlockBias, blockwise_attention
from lra.models.attention.sequence_parallel import (
    SEQ_AXIS,
    map_over_sequence,
    splits_sequence,
)
from lra.models.attention.softmax import kv_cache_shapes

GATE_INIT_STD = 0.02  # the authors' initializer_range: w_f ~ N(0, 0.02^2), b_f = 0


class Form(Choice):
    """How the FoX core computes its output (both give the same numbers)."""

    BLOCKWISE = "blockwise"  # online softmax over key blocks, bias per block pair, O(L)
    QUADRATIC = "quadratic"  # the full L x L logits (the reference)


def decay_time_bias(num_heads: int, decay_time_min: float, decay_time_max: float) -> jax.Array:
    """b_f [H] with log sigmoid(b_f) = -1 / T_h, T_h log-spaced over the heads from
    decay_time_min to decay_time_max (the authors' `fgate_bias_init`)."""
    log_times_H = jnp.linspace(math.log(decay_time_min), math.log(decay_time_max), num_heads,
                               dtype=F32)
    return -jnp.log(jnp.expm1(1.0 / jnp.exp(log_times_H)))


def decay_bias(
    cum_BxQxH: jax.Array,
    cum_BxCxH: jax.Array,
    qpos_Q: jax.Array,
    kpos_C: jax.Array,
    *,
    causal: bool,
) -> jax.Array:
    """The decay d_ij of queries i and keys j from cumulative log-gates: [B, Q, H, C].

    Causal: c_i - c_j (only ever read for j <= i). Bidirectional: c_i - c_j for j <= i,
    c_j - c_i for j > i (the sum of log f over (min(i, j), max(i, j)]). A `BlockBias`
    function for `blockwise_attention`, and the whole matrix for the quadratic form.
    """
    diff_BxQxHxC = cum_BxQxH[..., None] - jnp.swapaxes(cum_BxCxH, 1, 2)[:, None]
    if causal:
        return diff_BxQxHxC
    later_QxC = kpos_C[None, :] > qpos_Q[:, None]
    return jnp.where(later_QxC[None, :, None, :], -diff_BxQxHxC, diff_BxQxHxC)


def _quadratic(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cum_BxLxH: jax.Array,
    keep_BxL: jax.Array,
    causal: bool,
    drop: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """softmax(q k^T / sqrt(D) + d) v over the whole L x L matrix -> float32 [B, L, H, D]."""
    length, dim = q.shape[1], q.shape[3]
    positions_L = jnp.arange(length)
    logits_BxLxHxL = jnp.einsum("bqhd,bkhd->bqhk", q, k, preferred_element_type=F32) * (
        dim**-0.5)
    logits_BxLxHxL = logits_BxLxHxL + decay_bias(
        cum_BxLxH, cum_BxLxH, positions_L, positions_L, causal=causal)
    allowed = keep_BxL[:, None, None, :]
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None, :, None, :]
    logits_BxLxHxL = jnp.where(allowed, logits_BxLxHxL, MASKED_LOGIT)
    probs_BxLxHxL = drop(jax.nn.softmax(logits_BxLxHxL, axis=-1))
    return jnp.einsum("bqhk,bkhd->bqhd", probs_BxLxHxL.astype(v.dtype), v,
                      preferred_element_type=F32)


class FoxAttention(nnx.Module):
    """Forgetting Attention (Lin et al., 2025): softmax attention whose logits carry the
    sum of log forget gates between query and key (module docstring).

    Options: `form` (blockwise | quadratic), `chunk_size` (C, keys per block of the
    blockwise form), `query_chunk_size` (Q, queries per block) and `decay_time_min` /
    `decay_time_max` (the gate bias's initial decay times in tokens, log-spaced over the
    heads; both 0 = off: b_f = 0). Parameters: per head, the forget gate's projection of
    the raw key (`forget_w_HxD`, `forget_b_H`).
    `dropout_rate` is dropout on the probabilities in the quadratic form; the blockwise
    form has no explicit probabilities and refuses dropout_rate > 0.
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
        form: str = "blockwise",
        chunk_size: int = 128,
        query_chunk_size: int = 1024,
        decay_time_min: float = 0.0,
        decay_time_max: float = 0.0,
    ):
        """Builds the forget gate's parameters.

        Raises:
          ValueError: for a bad option value (decay times: both 0, or 0 < min <= max),
            or dropout_rate > 0 with form='blockwise'.
        """
        self.num_heads, self.head_dim, self.max_len = num_heads, head_dim, max_len
        self.causal = causal
        self.form = Form(form)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.query_chunk_size = positive_int("query_chunk_size", query_chunk_size)
        if self.form is Form.BLOCKWISE and dropout_rate > 0:
            raise ValueError(
                f"fox: form='blockwise' has no explicit attention probabilities, so no "
                f"attention dropout; got dropout_rate={dropout_rate} (set the attention "
                f"dropout, config.model.attention_dropout, to 0, or use form='quadratic')")
        times = (real_number("decay_time_min", decay_time_min),
                 real_number("decay_time_max", decay_time_max))
        if times != (0.0, 0.0) and not 0 < times[0] <= times[1]:
            raise ValueError(f"decay_time_min and decay_time_max must be both 0 (off) or "
                             f"0 < decay_time_min <= decay_time_max; got {times}")
        init = nnx.initializers.normal(GATE_INIT_STD)
        self.forget_w_HxD = nnx.Param(init(rngs.params(), (num_heads, head_dim), F32))
        self.forget_b_H = nnx.Param(jnp.zeros((num_heads,), F32) if times == (0.0, 0.0)
                                    else decay_time_bias(num_heads, *times))
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def log_forget(self, k_BxLxHxD: jax.Array) -> jax.Array:
        """log f [B, L, H] (float32, < 0) from the raw keys."""
        logit_BxLxH = jnp.einsum("blhd,hd->blh", k_BxLxHxD.astype(F32), self.forget_w_HxD[...])
        return jax.nn.log_sigmoid(logit_BxLxH + self.forget_b_H[...])

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """q, k, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D].

        Raises:
          ValueError: if L > max_len.
        """
        batch, length = q.shape[:2]
        check_length("fox", length, self.max_len)
        keep_BxL = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
        log_f_BxLxH = jnp.where(keep_BxL[..., None], self.log_forget(k), 0.0)
        if self.form is Form.BLOCKWISE and splits_sequence():
            out = map_over_sequence(functools.partial(self._over_gathered_keys, length=length),
                                    q, k, v, keep_BxL, log_f_BxLxH)
            return out.astype(q.dtype)
        cum_BxLxH = jnp.cumsum(log_f_BxLxH, axis=1)
        if self.form is Form.QUADRATIC:
            if self.dropout.rate > 0 and not deterministic:
                drop = functools.partial(self.dropout, deterministic=False)
            else:
                drop = lambda probs: probs
            out = _quadratic(q, k, v, cum_BxLxH, keep_BxL, self.causal, drop)
        else:
            bias = BlockBias(functools.partial(decay_bias, causal=self.causal),
                             cum_BxLxH, cum_BxLxH)
            out = blockwise_attention(q, k, v, keep_BxL, causal=self.causal,
                                      chunk_size=self.chunk_size,
                                      query_chunk_size=self.query_chunk_size, bias=bias)
        return out.astype(q.dtype)

    def _over_gathered_keys(self, q_BxSxHxD, k_BxSxHxD, v_BxSxHxD, keep_BxS, log_f_BxSxH, *,
                            length: int) -> jax.Array:
        """The blockwise form on one device's S queries of a sequence split over `seq`
        (inside `jax.shard_map`; module docstring, "Sequence parallelism")."""
        cum_local_BxSxH = jnp.cumsum(log_f_BxSxH, axis=1)
        gathered_NxBxH = state_passing.gather_summaries(cum_local_BxSxH[:, -1])
        earlier_BxH = state_passing.incoming_state(
            gathered_NxBxH, jnp.add, jnp.zeros_like(cum_local_BxSxH[:, -1]))
        cum_BxSxH = cum_local_BxSxH + earlier_BxH[:, None]
        k_BxLxHxD, v_BxLxHxD, keep_BxL, cum_BxLxH = (
            jax.lax.all_gather(x, SEQ_AXIS, axis=1, tiled=True)
            for x in (k_BxSxHxD, v_BxSxHxD, keep_BxS, cum_BxSxH))
        bias = BlockBias(functools.partial(decay_bias, causal=self.causal), cum_BxSxH, cum_BxLxH)
        return blockwise_attention(
            q_BxSxHxD, k_BxLxHxD, v_BxLxHxD, keep_BxL, causal=self.causal,
            chunk_size=self.chunk_size, query_chunk_size=self.query_chunk_size, bias=bias,
            query_offset=state_passing.shard_offset(q_BxSxHxD.shape[1]), key_length=length)

    def kv_cache(self, batch_size: int) -> tuple[jax.ShapeDtypeStruct, ...]:
        """What causal decoding would carry (there is no `step`): the keys and values of
        every earlier token, up to max_len, as `softmax`, and their log forget gates
        [B, max_len, H] float32 (the authors' and fla's caches hold k, v and log f)."""
        keys, values = kv_cache_shapes(batch_size, self.max_len, self.num_heads, self.head_dim)
        return keys, values, jax.ShapeDtypeStruct((batch_size, self.max_len, self.num_heads), F32)
