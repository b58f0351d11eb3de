"""RWKV-7 "Goose" time mixing: token shift, r/k/v/LoRA projections, the generalised delta rule.

Peng et al., 2025, "RWKV-7 "Goose" with Expressive Dynamic State Evolution"
(arXiv:2503.14456), Sec. 4 (the time-mixing block) and its equations for the state
update. Conventions transcribed from the authors' code, github.com/BlinkDL/RWKV-LM at
commit 524481d5099b38d9bc8ef1e89209161b86c8011b: RWKV-v7/rwkv_v7_demo.py
(`RWKV_Tmix_x070.forward`, the reference recurrence `RWKV7_OP`) and
RWKV-v7/train_temp/src/model.py (`RWKV_Tmix_x070.__init__`: the initialisation, the
LoRA ranks, the GroupNorm eps); cross-checked against flash-linear-attention,
github.com/fla-org/flash-linear-attention at commit
bc3b101dcb713ddc5bd8924b66754eb68b5ccf89: fla/layers/rwkv7.py (the decay written as
-0.6065306597126334 * sigmoid(.), the GroupNorm eps head_dim * 1e-5). The code here is
written from the paper's equations, not copied.

Per token t, with E the width (= the reference's dim_att), H = E / N heads of N =
head_dim channels, and x_{t-1} the previous real token's input (0 before the first):

    token shift   x^c_t = x_t + (x_{t-1} - x_t) * mu_c        c in {r, w, k, v, a, g}
    r_t = x^r W_r,  k_t = x^k W_k,  v_t = x^v W_v              (no bias)
    w_t = exp(-e^{-1/2} sigmoid(w0 + tanh(x^w W1) W2))         decay in (e^{-0.6065}, 1)
    a_t = sigmoid(a0 + (x^a A1) A2)                            in-context learning rate
    g_t = sigmoid(x^g G1) G2                                   output gate
    kappa_t = normalize_per_head(k_t * k_k)                    removal key, unit per head
                                                               (/ max(|.|, 1e-12), F.normalize)
    k~_t = k_t * (1 + (a_t - 1) * k_a)                          replacement key

(w = exp(-exp(-softplus(-d) - 1/2)) in the reference, the same number as
exp(-e^{-1/2} sigmoid(d)) since exp(-softplus(-d)) = sigmoid(d); only the log-decay
log w = -0.6065306597 sigmoid(d) is formed.) Per head, the paper's state S [N_v, N_k]
evolves as

    S_t = S_{t-1} (diag(w_t) - kappa_t^T (a_t * kappa_t)) + v_t^T k~_t,   o_t = S_t r_t^T.

This module stores S^T ([N_k, N_v], rows = keys, as delta.py) and uses row vectors:

    S_t = diag(w_t) S_{t-1} - (a_t * kappa_t)^T (kappa_t S_{t-1}) + k~_t^T v_t,  o_t = r_t S_t

(the removal reads the state before this token's decay, as the reference's
``state * w + state @ (-kk)^T (kk * a) + v^T k``). Then, per head, GroupNorm(H groups,
eps 64e-5, learned scale and bias) of o_t, plus the "bonus" (r_t . (k~_t * r_k)) v_t
(per head, r_k [H, N]), times g_t, and the output projection W_o (no bias).

Left out: the value residual (v mixed with the first layer's v through v0/v1/v2; the
mixer sees one layer only), and the channel-mix (RWKV's own MLP; the encoder's MLP
sub-block stands in for it, so `block_mlp` stays True).

Initialisation (train_temp/src/model.py), as the reference's first layer (layer_id = 0:
ratio_0_to_1 = 0, ratio_1_to_almost0 = 1): mu_c = 1 - (i / E)^p with p = 0.2 (r, g),
0.7 (k, v), 0.9 (w, a); with linear_i = i / (E - 1) - 1/2 and zigzag_i =
z |z|, z = ((i mod N) - (N - 1)/2) / ((N - 1)/2): w0 = -6 + 6 (i / (E - 1)) + 1/2 +
2.5 zigzag, a0 = -0.19 + 0.3 zigzag + 0.4 linear, k_k = 0.71 - 0.1 linear, k_a = 1.02,
r_k = -0.04; W1, A1, G1 = 0 and W2, A2, G2 orthogonal with gain 0.1 (times sqrt(rank /
E) when rank > E); LoRA ranks max(32, round(2.5 sqrt(E) / 32) 32) for w and a and
max(32, round(5 sqrt(E) / 32) 32) for g; W_r, W_v ~ U(+-0.5 / sqrt(E)), W_k ~ U(+-0.05 /
sqrt(E)); GroupNorm scale 1 (the reference's ((1 + layer_id) / n_layer)^0.7 for a
one-layer model), bias 0. One deviation: the reference zeroes W_o (the block starts as
the identity of the residual stream); here W_o has flax's default (LeCun normal, as the
other mixers' output projections), so that the mixer mixes from the first step and the
mixer contract can see it do so at initialisation. All are ordinary `nnx.Param`s
(weight decay as the repo's other parameters; the reference decays only its 2-D
``.weight`` matrices).

Forms (option `form`, `delta.Form`; the same numbers in outputs and gradients):

  recurrent  `lax.scan` over tokens with the update above; `init_state` / `step`
             decode one token at a time carrying S and the last real token's input.
  chunked    (default) the state-independent terms of a chunk of C tokens in WY/UT
             form with per-channel decays, the state carried by `lax.scan` over
             chunks. With g_i the within-chunk cumulative log-decay (inclusive), the
             removal read e_i = -kappa_i S_{i-1} satisfies
                 (I + A_b) E = -(kappa * exp(g_{i-1})) S_in - A_k V,
             A_k[i, j] = kappa_i diag(exp(g_{i-1} - g_j)) k~_j^T and A_b the same with
             b_j = a_j kappa_j (strictly lower triangular; `decayed_products` of
             kappa shifted one token back, then shifted down a row), solved by forward
             substitution (`delta.unit_lower_solve`): E = -(W S_in + U). Then
                 O = (r * exp(g)) S_in + P_k V + P_b E,
                 S_out = exp(g_C) S_in + (k~ * exp(g_C - g))^T V + (b * exp(g_C - g))^T E,
             P_k, P_b the inclusive decayed products of r with k~ and b.
             The four decayed products are one matmul each: RWKV-7's decay is bounded
             (log w >= -e^{-1/2} per token), so within a chunk the factors exp(g_i) <= 1
             and exp(-g_j) >= 1 stay within exp(+-0.61 C) (C <= MAX_CHUNK = 64: within
             exp(+-39), far from float32's limits) and their product is the decay
             exp(g_i - g_j) to float32 rounding; entry (i, j) reads tokens <= i only.
             (Unbounded gates, as KDA's, need `delta.decayed_products`'s recursive
             halving instead.) The other exponents are <= 0.
             Option `chunk_strategy` (gated.py's rule): `scan` forms each chunk's terms
             inside the scan step (the solve row by row), `batched` those of all chunks
             before the scan with the solve by `delta.inverse_solve` (log2 C levels of
             matmuls), so the scan holds only the state: sequential depth L / C instead
             of L; `auto` is `scan` on the cpu backend (measured: 311 vs 328 ms at 4K,
             1,319 vs 1,381 ms at 16K, the core forward + backward, 8 heads x 64) and
             `batched` elsewhere.

Bidirectional (causal=False): the forward (inclusive) pass plus an exclusive reverse
pass, as delta.py: the reverse pass runs the same recurrence from the last token to the
first, each token's decay taken from the token after it (so a write at j read at i
decays over (min(i, j), max(i, j)], symmetric) and output i reads the reverse state built
from tokens > i, carried across w_{i+1}. Token t's reverse removal reads the reverse
state before it crosses w_{t+1}, as the forward removal reads S before w_t. The token
shift stays causal (x_{t-1}), as RWKV's; the bonus term is added once.

Masking: padding is removed from the sequence. The token shift reads the previous *real*
token (each row's real tokens are gathered to the front, shifted, scattered back), so a
masked token's values never reach a real one; at masked positions r, k~, v, kappa and
a kappa are zero and w = 1 (log w = 0): a masked token writes nothing, removes nothing and
decays nothing, and `step` with mask False leaves the state unchanged. A real output
equals that of the sequence of its real tokens alone. Outputs at masked positions are
finite and meaningless.

Numerics: r, k, v, the output projection in the compute dtype with float32 parameters;
the LoRAs, the state (float32), the norm and the gate in float32; the result has x's
dtype. Dropout on the block's output.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lra import common
from lra.common import F32
from lra.models.attention.delta import Form, inverse_solve, unit_lower_solve
from lra.models.attention.gated import (
    ChunkStrategy,
    resolve_chunk_strategy,
    stack_directions,
    unstack_directions,
)
from lra.models.attention.sequence_parallel import map_over_sequence, splits_sequence
from lra.models.attention.state_passing import (
    gather_summaries,
    incoming_state,
    pass_matrix_states,
)
from lra.models.mixers import ssm

NORM_EPS = 64e-5  # the reference's GroupNorm eps (1e-5 * head_size_divisor^2, divisor 8)
NORMALIZE_EPS = 1e-12  # kappa = x / max(|x|, eps), torch's F.normalize default
LOG_DECAY_SCALE = math.exp(-0.5)  # log w = -e^{-1/2} sigmoid(.) = -0.6065306597...
MAX_CHUNK = 64  # decay factors within exp(+-LOG_DECAY_SCALE * MAX_CHUNK) (`decayed_products`)
_SHIFT_POWERS = (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)  # mu_c = 1 - (i/E)^p for r, w, k, v, a, g


class State(NamedTuple):
    """Decoding state, float32: per head the state S [B, H, N_k, N_v] and the last real
    token's input [B, E] (the token shift)."""

    S_BxHxNxN: jax.Array
    x_prev_BxE: jax.Array


def _normalize(x):
    """x / max(|x|, NORMALIZE_EPS) over the last axis (0 stays 0, finite gradient)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True),
                                         NORMALIZE_EPS ** 2))


# --- the core: the generalised delta rule, inputs [B, L, H, N] ----------------------------


def wkv_update(S_BxHxNxN, k_BxHxN, v_BxHxN, kappa_BxHxN, b_BxHxN, log_w_BxHxN):
    """One token: S <- diag(w) S - b^T (kappa S) + k^T v (rows = keys)."""
    read_BxHxN = jnp.einsum("bhd,bhde->bhe", kappa_BxHxN, S_BxHxNxN)
    return (jnp.exp(log_w_BxHxN)[..., None] * S_BxHxNxN
            - b_BxHxN[..., :, None] * read_BxHxN[..., None, :]
            + k_BxHxN[..., :, None] * v_BxHxN[..., None, :])


def _recurrent(r, k, v, kappa, b, log_w, chunk_size, chunk_strategy=None):
    """Inclusive causal outputs by `lax.scan` over tokens."""
    del chunk_size, chunk_strategy
    batch, _, heads, dim = r.shape

    def body(S, xs):
        r_t, *rest = xs
        S = wkv_update(S, *rest)
        return S, jnp.einsum("bhd,bhde->bhe", r_t, S)

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    S0 = jnp.zeros((batch, heads, dim, v.shape[-1]), F32)
    _, out = jax.lax.scan(body, S0, tuple(map(time_major, (r, k, v, kappa, b, log_w))))
    return jnp.moveaxis(out, 0, 1)


def _shift_up(x_xCxN):
    """x[i + 1] at row i, zero in the last row."""
    return jnp.pad(x_xCxN[..., 1:, :], [(0, 0)] * (x_xCxN.ndim - 2) + [(0, 1), (0, 0)])


def _shift_down(x_xCxN):
    """x[i - 1] at row i, zero in the first row."""
    return jnp.pad(x_xCxN[..., :-1, :], [(0, 0)] * (x_xCxN.ndim - 2) + [(1, 0), (0, 0)])


def decayed_products(a_xCxN, b_xCxN, log_w_xCxN):
    """M[i, j] = sum_n a_i[n] b_j[n] exp(sum of log_w over (j, i]) for j <= i, 0 above:
    [..., C, N] (a and b may have extra leading axes) -> [..., C, C].

    One matmul: with g the inclusive cumulative log-decay the decay is exp(g_i) exp(-g_j).
    RWKV-7's per-token log-decay is >= -LOG_DECAY_SCALE, so both factors lie within
    exp(+-LOG_DECAY_SCALE * C) (module docstring); row i reads tokens <= i only.
    """
    size = log_w_xCxN.shape[-2]
    g_xCxN = jnp.cumsum(log_w_xCxN, -2)
    M = jnp.einsum("...in,...jn->...ij", a_xCxN * jnp.exp(g_xCxN), b_xCxN * jnp.exp(-g_xCxN))
    return jnp.where(jnp.tril(jnp.ones((size, size), bool)), M, 0.0)


def _chunk_terms(r, k, v, kappa, b, log_w, solve=unit_lower_solve):
    """A chunk's state-independent terms; inputs [..., C, N] float32 (one chunk [B, H, C,
    N], or all chunks at once [n, B, H, C, N]; module docstring). `solve(N, R)` gives
    (I + N)^-1 R: `delta.unit_lower_solve` (row by row) or `delta.inverse_solve`.

    Returns (r_read, P_k, P_b, W, U, k_write, b_write, decay) with E = -(W S + U),
    O = r_read S + P_k V + P_b E and S_next = decay * S + k_write^T V + b_write^T E.
    """
    g = jnp.cumsum(log_w, -2)  # over [0, i]
    g_before = jnp.cumsum(_shift_down(log_w), -2)  # over [0, i - 1]
    tail = jnp.flip(jnp.cumsum(jnp.flip(_shift_up(log_w), -2), -2), -2)  # over (i, C)
    # M[i, j] = sum_d a_i b_j exp(sum of log_w over (j, i]) for j <= i (0 above).
    kappa_next = _shift_up(kappa)  # at row i - 1: kappa_i, so (j, i - 1] decays
    M = decayed_products(jnp.stack([kappa_next, kappa_next, r, r]),
                         jnp.stack([k, b, k, b]), log_w)
    A_k, A_b = _shift_down(M[0]), _shift_down(M[1])  # strictly lower triangular
    rhs = jnp.concatenate([kappa * jnp.exp(g_before), A_k @ v], -1)
    X = solve(A_b, rhs)  # (I + A_b)^-1 rhs
    dim = k.shape[-1]
    decay = jnp.exp(g[..., -1, :])[..., None]
    return (r * jnp.exp(g), M[2], M[3], X[..., :dim], X[..., dim:],
            k * jnp.exp(tail), b * jnp.exp(tail), decay)


def _chunked(r, k, v, kappa, b, log_w, chunk_size, chunk_strategy=ChunkStrategy.SCAN):
    """Inclusive causal outputs [B, L, H, N_v] float32 (`chunked_with_state`)."""
    return chunked_with_state(r, k, v, kappa, b, log_w, chunk_size, chunk_strategy)[0]


def chunked_with_state(r, k, v, kappa, b, log_w, chunk_size, chunk_strategy=ChunkStrategy.SCAN,
                       initial_state=None):
    """Inclusive causal outputs [B, L, H, N_v] and the final state [B, H, N, N_v], float32,
    from `initial_state` (None: zero), chunk by chunk (module docstring): `scan` forms
    each chunk's terms inside the scan step, `batched` those of all chunks before the
    scan (the triangular solve by `delta.inverse_solve`, no row loop), which then
    carries only the state."""
    batch, length, heads, dim = r.shape
    chunk = min(chunk_size, length)

    def chunks(x):  # [B, L, H, N] -> [n, B, H, C, N]; padding = neutral tokens
        return jnp.swapaxes(common.to_chunks(x, chunk), 2, 3)

    def state_step(S, terms):
        r_read, P_k, P_b, W, U, k_write, b_write, decay, V = terms
        E = -(W @ S + U)
        out = r_read @ S + P_k @ V + P_b @ E
        S = (decay * S + jnp.einsum("bhcd,bhce->bhde", k_write, V)
             + jnp.einsum("bhcd,bhce->bhde", b_write, E))
        return S, out

    S0 = (jnp.zeros_like(v, F32, shape=(batch, heads, dim, v.shape[-1]))
          if initial_state is None else initial_state.astype(F32))
    xs = tuple(map(chunks, (r, k, v, kappa, b, log_w)))
    if resolve_chunk_strategy(chunk_strategy) is ChunkStrategy.SCAN:
        body = lambda S, xs: state_step(S, (*_chunk_terms(*xs), xs[2]))
        S, out = jax.lax.scan(body, S0, xs)
    else:
        terms = (*_chunk_terms(*xs, solve=inverse_solve), xs[2])
        S, out = jax.lax.scan(state_step, S0, terms)
    return common.from_chunks(jnp.swapaxes(out, 2, 3), length), S


_FORMS = {Form.CHUNKED: _chunked, Form.RECURRENT: _recurrent}


@functools.partial(jax.jit, static_argnames=("form", "causal", "chunk_size", "chunk_strategy"))
def wkv(r, k, v, kappa, b, log_w, *, form: Form, causal: bool, chunk_size: int,
        chunk_strategy: str = ChunkStrategy.AUTO):
    """The generalised delta rule's outputs o_t = r_t S_t (module docstring).

    Args:
      r, k, v, kappa, b: [B, L, H, N] float32 (receptance, replacement key, value,
        removal key, a * removal key), zero at masked positions.
      log_w: [B, L, H, N] log-decays <= 0, zero at masked positions.
      form: a `delta.Form`.
      causal: inclusive causal pass if True, else forward + exclusive reverse.
      chunk_size: C of the chunked form.
      chunk_strategy: `gated.ChunkStrategy` of the chunked form (`auto`: `scan` on the
        cpu backend, `batched` elsewhere, resolved at trace time, as the delta rule).

    Returns:
      [B, L, H, N] float32.
    """
    run = functools.partial(_FORMS[Form(form)],
                            chunk_strategy=resolve_chunk_strategy(chunk_strategy))
    if causal:
        return run(r, k, v, kappa, b, log_w, chunk_size)
    r_prev, log_w_next = _reverse_inputs(r, log_w)
    both = stack_directions
    out = run(both(r, r_prev), both(k, k), both(v, v), both(kappa, kappa), both(b, b),
              both(log_w, log_w_next), chunk_size)
    return _add_reverse(*unstack_directions(out))


def _reverse_inputs(r, log_w):
    """The reverse pass's queries and log-decays, in forward order: at j the query
    w_j * r_{j-1} (its read lands at j - 1 and crosses the decay between j - 1 and j),
    the decay log w_{j+1} (0 after the last token)."""
    r_prev = jnp.pad(r[:, :-1], [(0, 0), (1, 0), (0, 0), (0, 0)]) * jnp.exp(log_w)
    return r_prev, jnp.pad(log_w[:, 1:], [(0, 0), (0, 1), (0, 0), (0, 0)])


def _add_reverse(forward, reverse):
    """Forward outputs plus the exclusive reverse pass's (`reverse` at j: w_j r_{j-1} R_j,
    the read for token j - 1)."""
    return forward + jnp.pad(reverse[:, 1:], [(0, 0), (0, 1), (0, 0), (0, 0)])


def wkv_over_sequence(r, k, v, kappa, b, log_w, *, causal: bool, chunk_size: int,
                      chunk_strategy: str = ChunkStrategy.AUTO, mesh=None):
    """`wkv` (any form: the same numbers) with the length split over the `seq` mesh axis,
    by state passing: each shard's affine map S -> M S + W from its chunked pass with
    augmented values, one all-gather of the (M, W), each device's incoming state folded
    from those before it (reverse pass: after it; `state_passing.pass_matrix_states`).
    Arguments as `wkv`, global [B, L, ...]; `mesh` None = the mesh in context."""
    run = functools.partial(chunked_with_state, chunk_size=chunk_size,
                            chunk_strategy=resolve_chunk_strategy(chunk_strategy))

    def kernel(r, k, v, kappa, b, log_w, r_prev, log_w_next):
        reverse = None if r_prev is None else (r_prev, k, v, kappa, b, log_w_next)
        return pass_matrix_states(run, (r, k, v, kappa, b, log_w), reverse, value_index=2,
                                  key_dim=k.shape[-1])

    if causal:
        return map_over_sequence(kernel, r, k, v, kappa, b, log_w, None, None, mesh=mesh)[0]
    r_prev, log_w_next = _reverse_inputs(r, log_w)  # shifts across the shards
    return _add_reverse(*map_over_sequence(kernel, r, k, v, kappa, b, log_w, r_prev,
                                           log_w_next, mesh=mesh))


# --- the mixer ---------------------------------------------------------------------------


def _lora_rank(emb_dim: int, factor: float) -> int:
    """The reference's suggested LoRA rank: max(32, round(factor sqrt(E) / 32) 32)."""
    return max(32, int(round(factor * math.sqrt(emb_dim) / 32) * 32))


def _uniform(bound: float):
    return lambda key, shape, dtype=F32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Rwkv7TimeMix(nnx.Module):
    """RWKV-7's time-mixing block (module docstring): x [B, L, E], mask [B, L] -> [B, L, E]."""

    block_mlp = True  # RWKV's channel-mix MLP: the encoder's MLP sub-block stands in for it

    def __init__(
        self,
        *,
        emb_dim: int,
        max_len: int,
        causal: bool,
        dropout: float,
        dtype: Any,
        rngs: nnx.Rngs,
        head_dim: int = 64,
        decay_rank: int = 0,
        a_rank: int = 0,
        gate_rank: int = 0,
        form: str = "chunked",
        chunk_size: int = 64,
        chunk_strategy: str = "auto",
    ):
        """Builds the block.

        Args:
          emb_dim: E, the input and output width (the reference's n_embd = dim_att).
          max_len: unused (no length limit); part of the contract.
          causal: if True, output t sees tokens <= t only (and `step` decodes).
          dropout: rate of the dropout on the block's output.
          dtype: compute dtype of r, k, v and the output projection.
          rngs: streams ``params`` and ``dropout``.
          head_dim: N, channels per head (the reference's head_size 64); clipped to E,
            must divide E.
          decay_rank, a_rank, gate_rank: the LoRA ranks of w, a and g; 0 = the
            reference's suggestion for E (module docstring).
          form: "chunked" or "recurrent".
          chunk_size: C of the chunked form, at most MAX_CHUNK.
          chunk_strategy: "auto", "scan" or "batched" (`wkv`; gated.py's rule).

        Raises:
          ValueError: naming the option, for a bad option value.
        """
        del max_len
        head_dim = min(common.positive_int("head_dim", head_dim), emb_dim)
        if emb_dim % head_dim:
            raise ValueError(f"head_dim ({head_dim}) must divide emb_dim ({emb_dim})")
        self.form = Form(form)
        self.chunk_size = common.positive_int("chunk_size", chunk_size)
        self.chunk_strategy = ChunkStrategy(chunk_strategy).value
        if self.chunk_size > MAX_CHUNK:
            raise ValueError(f"chunk_size={chunk_size}: at most {MAX_CHUNK}, so that the "
                             "chunked form's decay factors stay within float32's range")
        ranks = {"decay_rank": (decay_rank, 2.5), "a_rank": (a_rank, 2.5),
                 "gate_rank": (gate_rank, 5.0)}
        rank = {name: _lora_rank(emb_dim, factor) if value == 0
                else common.positive_int(name, value) for name, (value, factor) in ranks.items()}
        self.emb_dim, self.causal, self.dtype = emb_dim, bool(causal), dtype
        self.head_dim, self.num_heads = head_dim, emb_dim // head_dim
        E, N = emb_dim, head_dim

        i = jnp.arange(E, dtype=F32)
        ratio = i / E
        self.shift_mix_6xE = nnx.Param(
            jnp.stack([1.0 - ratio ** p for p in _SHIFT_POWERS]))
        linear = i / max(E - 1, 1) - 0.5
        z = ((i % N) - (N - 1) / 2) / max((N - 1) / 2, 1e-9) if N > 1 else jnp.zeros_like(i)
        zigzag = z * jnp.abs(z)
        self.w0_E = nnx.Param(-6.0 + 6.0 * (i / max(E - 1, 1)) + 0.5 + 2.5 * zigzag)
        self.a0_E = nnx.Param(-0.19 + 0.3 * zigzag + 0.4 * linear)
        self.k_k_E = nnx.Param(0.71 - 0.1 * linear)
        self.k_a_E = nnx.Param(jnp.full((E,), 1.02, F32))
        self.r_k_HxN = nnx.Param(jnp.full((self.num_heads, N), -0.04, F32))

        def lora(rank_):
            gain = 0.1 * (math.sqrt(rank_ / E) if rank_ > E else 1.0)
            down = nnx.Param(jnp.zeros((E, rank_), F32))
            up = nnx.Param(nnx.initializers.orthogonal(gain)(rngs.params(), (rank_, E), F32))
            return down, up

        self.w1, self.w2 = lora(rank["decay_rank"])
        self.a1, self.a2 = lora(rank["a_rank"])
        self.g1, self.g2 = lora(rank["gate_rank"])

        linear_layer = lambda init: nnx.Linear(E, E, use_bias=False, dtype=dtype,
                                               kernel_init=init, rngs=rngs)
        self.receptance = linear_layer(_uniform(0.5 / math.sqrt(E)))
        self.key = linear_layer(_uniform(0.05 / math.sqrt(E)))
        self.value = linear_layer(_uniform(0.5 / math.sqrt(E)))
        self.output = nnx.Linear(E, E, use_bias=False, dtype=dtype, rngs=rngs)  # not 0
        self.norm_scale_E = nnx.Param(jnp.ones((E,), F32))
        self.norm_bias_E = nnx.Param(jnp.zeros((E,), F32))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    @property
    def decodes(self) -> bool:
        """True if the block decodes token by token (`init_state` / `step`): causal."""
        return self.causal

    # --- pieces shared by __call__ and step ------------------------------------------

    def _heads(self, x_xE):
        return x_xE.reshape(*x_xE.shape[:-1], self.num_heads, self.head_dim)

    def _features(self, x_xE, x_prev_xE, keep_x):
        """r, k~, v, kappa, a kappa, log w [.., H, N] and the gate g [.., E], float32;
        zero (log w = 0) where `keep` is False."""
        x, x_prev = x_xE.astype(F32), x_prev_xE.astype(F32)
        mix = self.shift_mix_6xE[...]
        xr, xw, xk, xv, xa, xg = (x + (x_prev - x) * mix[c] for c in range(6))
        project = lambda layer, u: layer(u.astype(self.dtype)).astype(F32)
        r, k, v = project(self.receptance, xr), project(self.key, xk), project(self.value, xv)
        d = self.w0_E[...] + jnp.tanh(xw @ self.w1[...]) @ self.w2[...]
        log_w = -LOG_DECAY_SCALE * jax.nn.sigmoid(d)
        a = jax.nn.sigmoid(self.a0_E[...] + (xa @ self.a1[...]) @ self.a2[...])
        g = jax.nn.sigmoid(xg @ self.g1[...]) @ self.g2[...]
        kappa = _normalize(self._heads(k * self.k_k_E[...]))
        k = k * (1.0 + (a - 1.0) * self.k_a_E[...])
        keep = keep_x[..., None, None]
        zero = lambda u: jnp.where(keep, u, 0.0)
        r, k, v, a, log_w = (zero(self._heads(u)) for u in (r, k, v, a, log_w))
        kappa = zero(kappa)
        return r, k, v, kappa, a * kappa, log_w, g

    def _finish(self, o_xHxN, r, k, v, g, deterministic):
        mean = jnp.mean(o_xHxN, -1, keepdims=True)
        var = jnp.mean(jnp.square(o_xHxN - mean), -1, keepdims=True)
        o = (o_xHxN - mean) * jax.lax.rsqrt(var + NORM_EPS)
        o = o.reshape(*o.shape[:-2], self.emb_dim) * self.norm_scale_E[...] + self.norm_bias_E[...]
        bonus = jnp.sum(r * k * self.r_k_HxN[...], -1, keepdims=True) * v
        y = (o + bonus.reshape(o.shape)) * g
        return self.dropout(self.output(y.astype(self.dtype)), deterministic=deterministic)

    @staticmethod
    def _previous_real(x_BxLxE, keep_BxL, entering_BxE=None):
        """Each real token's previous real token's input, zero at masked positions: the
        token shift over the real tokens only. The first real token's previous one is
        `entering_BxE` (None: 0, the sequence's start)."""
        u, order_BxL = ssm.real_tokens_first(x_BxLxE, keep_BxL)
        entering = jnp.zeros_like(u[:, :1]) if entering_BxE is None else entering_BxE[:, None]
        u_prev = jnp.concatenate([entering.astype(u.dtype), u[:, :-1]], 1)
        x_prev = ssm.take_rows(u_prev, jnp.argsort(order_BxL, axis=1))
        return jnp.where(keep_BxL[..., None], x_prev, 0.0)

    @classmethod
    def _previous_real_shard(cls, x_BxSxE, keep_BxS):
        """`_previous_real` on one device's shard [b, S, E] of a sequence split over `seq`:
        the token entering the shard is the last real token of the devices before it,
        however many padded positions lie between (each device's last real token and
        whether it has one are all-gathered and folded in device order, as state
        passing)."""
        u, _ = ssm.real_tokens_first(x_BxSxE, keep_BxS)
        count_B = jnp.sum(keep_BxS, axis=1)
        last_BxE = ssm.take_rows(u, jnp.maximum(count_B - 1, 0)[:, None])[:, 0]
        fold = lambda entering, summary: jnp.where(summary[1][:, None], summary[0], entering)
        entering_BxE = incoming_state(gather_summaries((last_BxE, count_B > 0)), fold,
                                      jnp.zeros_like(last_BxE))
        return cls._previous_real(x_BxSxE, keep_BxS, entering_BxE)

    # --- the contract -------------------------------------------------------------------

    def __call__(self, x_BxLxE: jax.Array, mask_BxL: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """x [B, L, E], mask [B, L] bool (True = real) -> [B, L, E] in x's dtype."""
        keep_BxL = (jnp.ones(x_BxLxE.shape[:2], bool) if mask_BxL is None
                    else mask_BxL.astype(bool))
        x = ssm.masked(x_BxLxE, keep_BxL)
        split = splits_sequence()  # the sequence split over the `seq` mesh axis
        x_prev = (map_over_sequence(self._previous_real_shard, x, keep_BxL) if split
                  else self._previous_real(x, keep_BxL))
        r, k, v, kappa, b, log_w, g = self._features(x, x_prev, keep_BxL)
        if split:
            o = wkv_over_sequence(r, k, v, kappa, b, log_w, causal=self.causal,
                                  chunk_size=self.chunk_size, chunk_strategy=self.chunk_strategy)
        else:
            o = wkv(r, k, v, kappa, b, log_w, form=self.form, causal=self.causal,
                    chunk_size=self.chunk_size, chunk_strategy=self.chunk_strategy)
        return self._finish(o, r, k, v, g, deterministic).astype(x_BxLxE.dtype)

    def init_state(self, batch_size: int) -> State:
        """The empty decoding state (zero S, zero previous token)."""
        return State(jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim), F32),
                     jnp.zeros((batch_size, self.emb_dim), F32))

    def step(self, state: State, x_BxE: jax.Array, mask_B: jax.Array | None,
             position: int) -> tuple[State, jax.Array]:
        """Decodes one token; applied to tokens 0, 1, ... it gives the causal `__call__`
        outputs (at real tokens).

        Args:
          state: from `init_state` or the previous step.
          x_BxE: the token's input.
          mask_B: bool, False where the token is padding (the state passes unchanged;
            the output there is finite and meaningless).
          position: unused (the block is time-invariant).

        Returns:
          (new state, output [B, E] in x's dtype).

        Raises:
          ValueError: if the block is not causal.
        """
        del position
        if not self.causal:
            raise ValueError("step decodes a causal rwkv7 block; build it with causal=True")
        keep_B, x = ssm.step_input(x_BxE, mask_B)
        r, k, v, kappa, b, log_w, g = self._features(x, state.x_prev_BxE, keep_B)
        S = wkv_update(state.S_BxHxNxN, k, v, kappa, b, log_w)
        o = jnp.einsum("bhd,bhde->bhe", r, S)
        new_state = State(jnp.where(keep_B[:, None, None, None], S, state.S_BxHxNxN),
                          jnp.where(keep_B[:, None], x.astype(F32), state.x_prev_BxE))
        return new_state, self._finish(o, r, k, v, g, True).astype(x_BxE.dtype)
