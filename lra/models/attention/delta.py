"""The delta rule: DeltaNet and Gated DeltaNet on one core.

DeltaNet (Schlag, Irie & Schmidhuber, 2021, "Linear Transformers Are Secretly Fast
Weight Programmers") keeps a fast-weight state S [D, D] that maps keys to values and,
at each token, replaces the value stored under the key instead of adding to it:

    S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,   o_t = S_t q_t

in the paper's column convention. This module stores S^T ([D_k, D_v], rows = keys) and
uses row vectors, so the same rule reads

    S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,   o_t = q_t S_t,

where alpha_t = 1 for DeltaNet and alpha_t in (0, 1) for Gated DeltaNet (Yang, Kautz &
Hatamizadeh, 2025, "Gated Delta Networks"). q and k are L2-normalised, so with beta_t
in (0, 1) the eigenvalues of I - beta_t k_t^T k_t lie in [0, 1] and S stays bounded.

Per-channel decays (Kimi Delta Attention, kda.py): the core also takes a log-gate per
key channel, alpha_t in (0, 1)^D, which scales the rows of S before the erase:

    S_t = (I - beta_t k_t^T k_t) Diag(alpha_t) S_{t-1} + beta_t k_t^T v_t.

For one number per head Diag(alpha_t) = alpha_t I commutes with the erase, so this is
the rule above; `delta_rule` takes either shape of log-gates.

Gates. The core receives only q, k, v, so the gates are read, per head, from the raw
key k_t (before its L2 normalisation, whose norm it would otherwise discard) with the
family's own D -> 1 projections:

    beta_t = sigmoid(k_t . w_beta[h] + b_beta[h]),
    log alpha_t = -exp(a_log[h]) * softplus(k_t . w_alpha[h] + dt_bias[h])

(Gated DeltaNet's Mamba2-style parameterisation; a_log = log U(1, 16) and
softplus(dt_bias) log-uniform in [1e-3, 1e-1] at initialisation). Gates stay in log
space; only exponentials of non-positive sums of log-gates are taken.

Forms (`Form`, all the same numbers in outputs and gradients; no quadratic form
exists):

  chunked    (Yang et al., 2024, "Parallelizing Linear Transformers with the Delta
             Rule over Sequence Length"). A `lax.scan` over chunks of C tokens
             carries S; each step takes one chunk's K, V, beta and within-chunk
             cumulative log-gates g (gamma = exp(g)) and forms the UT transform
             T = (I + tril(diag(beta) (K K^T * Gamma), -1))^-1 diag(beta) by forward
             substitution (`unit_lower_solve`), W = T diag(gamma) K, U = T V and
             P = tril(Q K^T * Gamma), where Gamma_ij = exp(g_i - g_j) for i >= j (0
             above the diagonal) is a segment sum, never a difference of large
             numbers; then U' = U - W S, O = diag(gamma) Q S + P U',
             S <- gamma_C S + (K * exp(g_C - g))^T U'.
             Memory O(L (C + D)) per head: no L x L array.
             Chunk strategy (option `chunk_strategy`, gated.py's `ChunkStrategy`):
             `scan` forms each chunk's T, W, U, P inside the scan step, T by a
             row-by-row forward substitution (C sequential steps per chunk, each way);
             `batched` forms them for all chunks at once before the scan, T as the
             explicit inverse (I + N)^-1 by recursive halving (`unit_lower_inverse`:
             log2 C levels of batched matmuls, no row loop), so only the state
             recurrence (U' = U - W S, the read and the update: L / C steps) stays
             sequential; `auto` (the default) is `scan` when `jax.default_backend()` is
             "cpu" at trace time and `batched` on any other backend (gpu, tpu). On a
             CPU `scan` is faster: batched / scan time (forward + backward, 8 heads x
             64, one quiet run, docs/benchmarks.md) 1.19 and 1.28 for deltanet, 1.48
             and 1.38 for gated_deltanet at 4K and 16K; kda 0.95 and 0.97 (kept with
             its family). The same numbers to
             float32 rounding.
  recurrent  `lax.scan` over tokens; `init_state` / `step` decode one token at a time
             in O(1) memory with the same update.

Bidirectional (causal=False, LRA's encoder): o_i = q_i S->_i + alpha_{i+1} q_i S<-_{i+1},
the causal (inclusive) forward pass plus a reverse pass that reads its state *before*
absorbing token i, i.e. the state built from tokens L-1, ..., i+1 only. Each token's
write so reaches every output exactly once and the diagonal is never counted twice.
(For linear attention this equals forward + reverse - diagonal; for the delta rule
"token i's own contribution" is not separable, since token i also erases along k_i,
so the exclusive reverse pass is the exact way to avoid the double count.)

Decays are symmetric, as in the gated cores (gated.py): between positions i and j a
write decays by the product of the gates over (min(i, j), max(i, j)], whichever side of
the query the key is. alpha_m is the gate between tokens m-1 and m, so the reverse pass
applies alpha_{m+1} when it moves from token m+1 to token m (its gates are shifted by
one token), and the read at i crosses the last gate, alpha_{i+1}, from i+1 to i:

    S<-_m = alpha_{m+1} (I - beta_m k_m^T k_m) S<-_{m+1} + beta_m k_m^T v_m
    (alpha_L = 1, S<-_L = 0).

Without the shift and the last factor a key d tokens after the query would decay d - 1
times and one d tokens before it d times. It is computed as one causal pass over the
batch stacked with its reversal, in which the reversed copy carries the shifted gates and
the queries shifted by one token, scaled by their gate alpha_{i+1}.

Short convolutions (option `short_conv`, short_conv.py; 0 = off, the default): a
depthwise causal convolution of that width plus SiLU on each of q, k and v before
anything else (the gates read the convolved raw key; then the L2 normalisation), as
DeltaNet's and Gated DeltaNet's layers in flash-linear-attention; causal also when the
core is bidirectional. Decoding carries their last short_conv - 1 inputs in `State.conv`.

Masking: q, k and v are zeroed at masked positions, beta = 0 and alpha = 1 there, so
a masked token adds no write and no decay in either direction (between two real tokens
the decay is the product of the real tokens' gates between them; with right padding the
reverse pass starts at the last real token) and its values change nothing, outputs or
gradients; masked queries read 0.

Precision: the state, the gates, their cumulative sums, the triangular solve or
inverse, its product with the right-hand side and W S are float32 whatever the input
dtype. q, k and v reach the core in their input dtype (e.g. bfloat16): the chunk's
Q K^T and K K^T products and the output-only products (the read of the state and
P U') take that dtype with float32 accumulation; everything else is float32. The
families return q's dtype.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import F32, Choice, dot_f32, from_chunks, positive_int, to_chunks
from lra.models.attention.gated import (
    ChunkStrategy,
    resolve_chunk_strategy,
    stack_directions,
    unstack_directions,
)
from lra.models.attention.linear import decode_keep
from lra.models.attention.sequence_parallel import map_over_sequence, splits_sequence
from lra.models.attention.short_conv import (
    History,
    convolve_qkv,
    empty_history,
    make_qkv_conv,
)
from lra.models.attention.ssd import mamba2_init
from lra.models.attention.state_passing import pass_matrix_states

NORM_EPS = 1e-6  # q / sqrt(|q|^2 + eps): a zero (masked) vector stays zero, finite gradient


class Form(Choice):
    """How the delta-rule core computes its output (both give the same numbers)."""

    CHUNKED = "chunked"  # UT transform per chunk + inter-chunk state via lax.scan
    RECURRENT = "recurrent"  # lax.scan over tokens carrying the state


class State(NamedTuple):
    """Decoding state, float32: the fast weights mapping keys to values; with
    short_conv > 0 also the short convolutions' last inputs (None when off)."""

    S_BxHxDxD: jax.Array
    conv: History | None = None


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / sqrt(|x|^2 + NORM_EPS) over the last axis."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + NORM_EPS)


def delta_update(S_BxHxDxD, k_BxHxD, v_BxHxD, beta_BxH, log_alpha_BxH):
    """One token: S <- (I - beta k^T k) Diag(alpha) S + beta k^T v.

    log_alpha: [B, H] (one decay per head), [B, H, D] (one per key channel: row d of S
    decays by alpha[d]) or None (alpha = 1).
    """
    if log_alpha_BxH is not None:
        alpha = jnp.exp(log_alpha_BxH)
        per_head = alpha.ndim == beta_BxH.ndim
        S_BxHxDxD = S_BxHxDxD * (alpha[..., None, None] if per_head else alpha[..., :, None])
    kS_BxHxD = jnp.einsum("bhd,bhde->bhe", k_BxHxD, S_BxHxDxD)
    error_BxHxD = beta_BxH[..., None] * (v_BxHxD - kS_BxHxD)
    return S_BxHxDxD + k_BxHxD[..., :, None] * error_BxHxD[..., None, :]


def _recurrent(q, k, v, beta, log_alpha, chunk_size, chunk_strategy=None):
    """Inclusive causal outputs by `lax.scan` over tokens; inputs [B, L, H, ...]."""
    del chunk_size, chunk_strategy
    batch, _, heads, dim = q.shape

    def body(S_BxHxDxD, xs):
        q_BxHxD, k_BxHxD, v_BxHxD, beta_BxH, log_alpha_BxH = xs
        S_BxHxDxD = delta_update(S_BxHxDxD, k_BxHxD, v_BxHxD, beta_BxH, log_alpha_BxH)
        return S_BxHxDxD, jnp.einsum("bhd,bhde->bhe", q_BxHxD, S_BxHxDxD)

    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
    S0 = jnp.zeros((batch, heads, dim, v.shape[-1]), F32)
    _, out_LxBxHxD = jax.lax.scan(body, S0, tuple(map(time_major, (q, k, v, beta, log_alpha))))
    return jnp.moveaxis(out_LxBxHxD, 0, 1)


def _segsum(log_alpha_xC):
    """[..., C] -> [..., C, C]: sum of log_alpha over (j, i] at (i, j) for i >= j, else -inf.

    Built as a cumulative sum of a masked matrix (as Mamba2's SSD), so small gate
    differences are never the difference of two large cumulative sums.
    """
    size = log_alpha_xC.shape[-1]
    x_xCxC = jnp.broadcast_to(log_alpha_xC[..., :, None], (*log_alpha_xC.shape, size))
    x_xCxC = jnp.where(jnp.tril(jnp.ones((size, size), bool), -1), x_xCxC, 0.0)
    seg_xCxC = jnp.cumsum(x_xCxC, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((size, size), bool)), seg_xCxC, -jnp.inf)


def decayed_products(a_xCxD, b_xCxD, log_alpha_xCxD):
    """M[i, j] = sum_d a_i[d] b_j[d] exp(log_alpha_{j+1}[d] + ... + log_alpha_i[d]) for
    j <= i, 0 above the diagonal: [..., C, D] (a may have extra leading axes) -> [..., C, C].

    The per-channel decays of a chunk without a [C, C, D] array, by recursive halving:
    for i in the second half of a block and j in its first, the decay splits at the
    block's midpoint r into exp(sum over (r, i]) exp(sum over (j, r]), both <= 1, so the
    (second half, first half) block is one matmul of a and b each scaled by its factor;
    each half is split again down to single tokens (the diagonal, a_i . b_i). The
    exponents are sums of the log-gates over those ranges, never differences of two
    cumulative sums (which would lose a small decay next to a large one). C is padded to
    a power of two with neutral tokens (zero a, b; log-gate 0).
    """
    length, dim = a_xCxD.shape[-2:]
    size = 1 << (length - 1).bit_length()  # the next power of two >= C
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, size - length), (0, 0)])
    a, b, log_alpha = pad(a_xCxD), pad(b_xCxD), pad(log_alpha_xCxD)
    lead = a.shape[:-2]
    blocks = jnp.sum(a * b, -1)[..., None, None]  # [..., size, 1, 1]: the diagonal
    half = 1
    while half < size:  # blocks of 2 * half tokens from pairs of blocks of half
        pairs = (size // (2 * half), 2, half, dim)
        a2, b2, log_alpha2 = (x.reshape(*x.shape[:-2], *pairs) for x in (a, b, log_alpha))
        into_xNxSxD = jnp.cumsum(log_alpha2[..., 1, :, :], -2)  # (r, i]
        after_j = jnp.pad(log_alpha2[..., 0, 1:, :], [(0, 0)] * (log_alpha2.ndim - 3)
                          + [(0, 1), (0, 0)])  # log_alpha_{j+1}, 0 after r
        out_of_xNxSxD = jnp.flip(jnp.cumsum(jnp.flip(after_j, -2), -2), -2)  # (j, r]
        below = jnp.einsum("...id,...jd->...ij", a2[..., 1, :, :] * jnp.exp(into_xNxSxD),
                           b2[..., 0, :, :] * jnp.exp(out_of_xNxSxD))
        previous = blocks.reshape(*lead, size // (2 * half), 2, half, half)
        top = jnp.concatenate([previous[..., 0, :, :], jnp.zeros_like(below)], -1)
        bottom = jnp.concatenate([below, previous[..., 1, :, :]], -1)
        blocks = jnp.concatenate([top, bottom], -2)
        half *= 2
    return blocks.reshape(*lead, size, size)[..., :length, :length]


def _forward_substitution(N_xCxC, R_xCxE):
    """X with (I + N) X = R for strictly lower triangular N, one row at a time.

    A `fori_loop` over the C rows (row i needs rows < i only). The entries of N on and
    above the diagonal are ignored.
    """
    N_xCxC, R_xCxE = jnp.asarray(N_xCxC), jnp.asarray(R_xCxE)
    size = N_xCxC.shape[-1]

    def row(i, X_xCxE):
        below_C = jnp.arange(size) < i
        N_i_xC = jnp.where(below_C, N_xCxC[..., i, :], 0.0)
        x_i_xE = R_xCxE[..., i, :] - jnp.einsum("...j,...je->...e", N_i_xC, X_xCxE)
        return X_xCxE.at[..., i, :].set(x_i_xE)

    return jax.lax.fori_loop(0, size, row, jnp.zeros_like(R_xCxE))


@jax.custom_vjp
def unit_lower_solve(N_xCxC, R_xCxE):
    """X = (I + tril(N, -1))^-1 R, batched over leading axes.

    Written by hand rather than with `jax.scipy.linalg.solve_triangular`: on XLA's CPU
    backend the batched triangular solve of a batch sharded over several devices
    deadlocks in its gradient (a collective whose rendezvous never completes), and the
    loop costs the same C^2 E multiply-adds. The gradient is the textbook one (dR =
    (I + N)^-T dX, dN = -tril(dR X^T, -1)), solved by the same loop on the flipped
    transpose, so no loop is differentiated and no per-row residuals are stored.
    """
    return _forward_substitution(N_xCxC, R_xCxE)


def _unit_lower_solve_fwd(N_xCxC, R_xCxE):
    X_xCxE = _forward_substitution(N_xCxC, R_xCxE)
    return X_xCxE, (N_xCxC, X_xCxE)


def _unit_lower_solve_bwd(residuals, dX_xCxE):
    N_xCxC, X_xCxE = residuals
    size = N_xCxC.shape[-1]
    # (I + N)^T is upper triangular; reversing rows and columns makes it lower.
    flipped_N = jnp.flip(jnp.swapaxes(N_xCxC, -1, -2), (-2, -1))
    dR_xCxE = jnp.flip(_forward_substitution(flipped_N, jnp.flip(dX_xCxE, -2)), -2)
    strict_CxC = jnp.tril(jnp.ones((size, size), bool), -1)
    dN_xCxC = jnp.where(strict_CxC, -jnp.einsum("...ie,...je->...ij", dR_xCxE, X_xCxE), 0.0)
    return dN_xCxC, dR_xCxE


unit_lower_solve.defvjp(_unit_lower_solve_fwd, _unit_lower_solve_bwd)


def unit_lower_inverse(N_xCxC):
    """(I + tril(N, -1))^-1, batched over leading axes, without a row loop.

    Recursive halving of the unit lower triangular A = I + N into blocks

        A = [[A11, 0], [A21, A22]],   A^-1 = [[A11^-1, 0], [-A22^-1 A21 A11^-1, A22^-1]],

    where A11 and A22 are inverted together (stacked on a new leading axis) by the same
    rule, down to 1 x 1 blocks (1). Each of the log2 C levels is two batched matmuls, so
    the depth is O(log C) and the gradient is that of plain matmuls (no custom rule).
    Numerically it is forward substitution by blocks: no powers of N are formed (the
    Neumann product (I - N)(I + N^2)(I + N^4)... would be, and loses precision when N
    has entries near 1). C is padded to a power of two with identity rows. The matmuls
    run at the highest precision (no TF32 or bfloat16 passes on accelerators). Entries
    of N on and above the diagonal are ignored.
    """
    N_xCxC = jnp.asarray(N_xCxC)
    length = N_xCxC.shape[-1]
    size = 1 << (length - 1).bit_length()  # the next power of two >= C
    strict_CxC = jnp.tril(jnp.ones((length, length), bool), -1)
    N_xCxC = jnp.where(strict_CxC, N_xCxC, jnp.zeros((), N_xCxC.dtype))
    pad = [(0, 0)] * (N_xCxC.ndim - 2) + [(0, size - length)] * 2
    return _halving_inverse(jnp.pad(N_xCxC, pad))[..., :length, :length]


def _halving_inverse(N_xSxS):
    """`unit_lower_inverse` of a strictly lower triangular N whose size is a power of 2."""
    size = N_xSxS.shape[-1]
    if size == 1:
        return jnp.ones_like(N_xSxS)
    half = size // 2
    diagonal_xSxS = jnp.stack([N_xSxS[..., :half, :half], N_xSxS[..., half:, half:]], -3)
    inverses = _halving_inverse(diagonal_xSxS)  # [..., 2, half, half]
    top, bottom = inverses[..., 0, :, :], inverses[..., 1, :, :]
    matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    below = -matmul(bottom, matmul(N_xSxS[..., half:, :half], top))
    upper = jnp.concatenate([top, jnp.zeros_like(top)], -1)
    return jnp.concatenate([upper, jnp.concatenate([below, bottom], -1)], -2)


def inverse_solve(N_xCxC, R_xCxE):
    """X = (I + tril(N, -1))^-1 R through the explicit inverse (no row loop)."""
    return jnp.einsum("...ij,...je->...ie", unit_lower_inverse(N_xCxC), R_xCxE)


def _chunk_terms(q, k, v, beta, log_alpha, solve=unit_lower_solve):
    """Everything a chunk needs that does not depend on the incoming state.

    Args are [..., B, H, C, ...] (one chunk of C tokens; any leading axes, e.g. all
    chunks at once), q, k, v in the input dtype, beta and log_alpha float32; log_alpha
    [B, H, C] (per head), [B, H, C, D] (per key channel) or None. `solve(N, R)` gives
    (I + N)^-1 R: `unit_lower_solve` or `inverse_solve`.

    Returns:
      (q_read [.., C, D], P [.., C, C], W [.., C, D], U [.., C, D], k_write [.., C, D],
      decay [B, H, 1 | D, 1]) with O = q_read S + P (U - W S) and
      S_next = decay * S + k_write^T (U - W S).
    """
    size, dim = q.shape[-2], q.shape[-1]
    strict_CxC = jnp.tril(jnp.ones((size, size), bool), -1)
    kk_xCxC = dot_f32("...id,...jd->...ij", k, k)  # input dtype, float32 accumulation
    qk_xCxC = dot_f32("...id,...jd->...ij", q, k)
    q, k, v = (x.astype(F32) for x in (q, k, v))
    if log_alpha is None:  # DeltaNet: no decay
        gamma_k, q_read, k_write = k, q, k
        P_xCxC = jnp.where(jnp.tril(jnp.ones((size, size), bool)), qk_xCxC, 0.0)
        decay = jnp.ones((*q.shape[:-2], 1, 1), F32)
    elif log_alpha.ndim == q.ndim:  # one decay per key channel (KDA)
        g_xCxD = jnp.cumsum(log_alpha, -2)  # log gamma_i = sum of log_alpha over [0, i]
        after_xCxD = jnp.pad(log_alpha[..., 1:, :], [(0, 0)] * (q.ndim - 2) + [(0, 1), (0, 0)])
        tail_xCxD = jnp.flip(jnp.cumsum(jnp.flip(after_xCxD, -2), -2), -2)  # over (j, C)
        kk_xCxC = decayed_products(k, k, log_alpha)
        P_xCxC = decayed_products(q, k, log_alpha)
        gamma_k, q_read = jnp.exp(g_xCxD) * k, jnp.exp(g_xCxD) * q
        k_write = k * jnp.exp(tail_xCxD)
        decay = jnp.exp(g_xCxD[..., -1, :])[..., None]
    else:
        gamma_xCxC = jnp.exp(_segsum(log_alpha))  # gamma_i / gamma_j, 0 above the diagonal
        kk_xCxC = kk_xCxC * gamma_xCxC
        gamma_xC = jnp.exp(jnp.cumsum(log_alpha, -1))  # gamma_i = prod_{m <= i} alpha_m
        gamma_k, q_read = gamma_xC[..., None] * k, gamma_xC[..., None] * q
        k_write = k * gamma_xCxC[..., -1, :, None]  # gamma_C / gamma_j
        P_xCxC = qk_xCxC * gamma_xCxC
        decay = gamma_xC[..., -1, None, None]
    N_xCxC = jnp.where(strict_CxC, beta[..., :, None] * kk_xCxC, 0.0)
    rhs_xCx2D = beta[..., None] * jnp.concatenate([v, gamma_k], -1)
    X_xCx2D = solve(N_xCxC, rhs_xCx2D)  # (I + N)^-1 rhs
    value_dim = v.shape[-1]  # D, or more for the state passing's augmented values
    return q_read, P_xCxC, X_xCx2D[..., value_dim:], X_xCx2D[..., :value_dim], k_write, decay


def _chunked(q, k, v, beta, log_alpha, chunk_size, chunk_strategy=ChunkStrategy.AUTO):
    """Inclusive causal outputs [B, L, H, D] float32 (`chunked_with_state`)."""
    return chunked_with_state(q, k, v, beta, log_alpha, chunk_size, chunk_strategy)[0]


def chunked_with_state(q, k, v, beta, log_alpha, chunk_size,
                       chunk_strategy=ChunkStrategy.AUTO, initial_state=None):
    """Inclusive causal outputs [B, L, H, D_v] and the final state [B, H, D, D_v], float32,
    from `initial_state` (None: zero). Inclusive causal outputs by the UT transform per chunk; inputs [B, L, H, ...].

    `scan`: one chunk per `lax.scan` step, its terms included (forward substitution,
    C rows one after another): the step's arrays stay in cache (measured on a CPU
    against computing the terms of all chunks at once before the scan: deltanet
    192 -> 122 ms at 4K, 936 -> 495 ms at 16K). `batched`: the terms of all chunks at
    once, with the triangular inverse by recursive halving, then a scan that carries
    only the state (module docstring).
    """
    batch, length, heads, dim = q.shape
    chunk = min(chunk_size, length)
    dtype = q.dtype

    def chunks(x):  # [B, L, H, ...] -> [N, B, H, C, ...]; padding = identity tokens
        return jnp.swapaxes(to_chunks(x, chunk), 2, 3)

    def state_step(S_BxHxDxD, terms):
        q_read, P_xCxC, W, U, k_write, decay_BxHxDx1 = terms
        U = U - jnp.einsum("bhcd,bhde->bhce", W, S_BxHxDxD)
        # output-only products in the input dtype, float32 accumulation
        out_BxHxCxD = dot_f32("bhcd,bhde->bhce", q_read.astype(dtype),
                              S_BxHxDxD.astype(dtype)) + dot_f32(
            "bhij,bhje->bhie", P_xCxC.astype(dtype), U.astype(dtype))
        S_BxHxDxD = decay_BxHxDx1 * S_BxHxDxD + jnp.einsum(
            "bhcd,bhce->bhde", k_write, U)
        return S_BxHxDxD, out_BxHxCxD

    S0 = (jnp.zeros_like(v, F32, shape=(batch, heads, dim, v.shape[-1]))
          if initial_state is None else initial_state.astype(F32))
    xs = tuple(None if x is None else chunks(x) for x in (q, k, v, beta, log_alpha))
    if resolve_chunk_strategy(chunk_strategy) is ChunkStrategy.SCAN:
        body = lambda S, xs: state_step(S, _chunk_terms(*xs))
        S_BxHxDxD, out_NxBxHxCxD = jax.lax.scan(body, S0, xs)
    else:  # every chunk's terms before the scan, batched over the chunk axis
        terms = _chunk_terms(*xs, solve=inverse_solve)
        S_BxHxDxD, out_NxBxHxCxD = jax.lax.scan(state_step, S0, terms)
    return from_chunks(jnp.swapaxes(out_NxBxHxCxD, 2, 3), length), S_BxHxDxD


_FORMS = {Form.CHUNKED: _chunked, Form.RECURRENT: _recurrent}


@functools.partial(jax.jit, static_argnames=("form", "causal", "chunk_size", "chunk_strategy"))
def delta_rule(q, k, v, beta, log_alpha, *, form: Form, causal: bool, chunk_size: int,
               chunk_strategy: str = ChunkStrategy.AUTO):
    """Delta-rule outputs from prepared inputs (see the module docstring).

    Args:
      q, k: [B, L, H, D] float32 or bfloat16 (one dtype for q, k, v), L2-normalised,
        zero at masked positions.
      v: [B, L, H, D], zero at masked positions.
      beta: [B, L, H] in [0, 1], 0 at masked positions.
      log_alpha: [B, L, H] (per head) or [B, L, H, D] (per key channel) <= 0, 0 at
        masked positions; None for alpha = 1.
      form: a `Form`.
      causal: inclusive causal pass if True, else forward + exclusive reverse with
        symmetric decays (module docstring).
      chunk_size: C in the chunked form.
      chunk_strategy: a `ChunkStrategy` of the chunked form (`auto` resolved at trace
        time from `jax.default_backend()`: `scan` on cpu, else `batched`).

    Returns:
      [B, L, H, D] float32.
    """
    run = functools.partial(_FORMS[form],
                            chunk_strategy=resolve_chunk_strategy(chunk_strategy))
    if causal:
        return run(q, k, v, beta, log_alpha, chunk_size)
    q_prev, log_alpha_next = _reverse_inputs(q, log_alpha)

    def both(forward, backward):  # the batch stacked with its reversal
        return None if forward is None else stack_directions(forward, backward)

    out = run(both(q, q_prev), both(k, k), both(v, v), both(beta, beta),
              both(log_alpha, log_alpha_next), chunk_size)
    forward_BxLxHxD, reverse_BxLxHxD = unstack_directions(out)  # at j: alpha_j q_{j-1} S<-_j
    return forward_BxLxHxD + jnp.pad(reverse_BxLxHxD[:, 1:], [(0, 0), (0, 1), (0, 0), (0, 0)])


def delta_rule_over_sequence(q, k, v, beta, log_alpha, *, causal: bool, chunk_size: int,
                             chunk_strategy: str = ChunkStrategy.AUTO, mesh=None):
    """`delta_rule` (any form) with the length split over the `seq` mesh axis: state passing.

    A shard's effect on the state is the affine map S -> M S + W, with M the product of
    its tokens' transitions alpha_t (I - beta_t k_t^T k_t) [D, D] and W its final state
    from zero. Each device runs the chunked form once on its shard with augmented values
    [v | 0] from the initial state [0 | I] (D x (D_v + D)): by linearity the outputs are
    [q_t W_t | q_t M_t] and the final state [W | M]. The (M, W) of all devices are
    all-gathered once; each device folds those before it (reverse pass: after it) into
    its incoming state S_in and adds (q_t M_t) S_in (`state_passing.pass_matrix_states`). The augmented
    values double the state's width on each shard. Arguments as `delta_rule`, global
    [B, L, ...]; `mesh` None = the mesh in context.
    """
    strategy = resolve_chunk_strategy(chunk_strategy)
    kernel = functools.partial(_delta_rule_shard, chunk_size=chunk_size, chunk_strategy=strategy)
    if causal:
        return map_over_sequence(kernel, q, k, v, beta, log_alpha, None, None, mesh=mesh)[0]
    q_prev, log_alpha_next = _reverse_inputs(q, log_alpha)  # shifts across the shards
    forward_BxLxHxD, reverse_BxLxHxD = map_over_sequence(
        kernel, q, k, v, beta, log_alpha, q_prev, log_alpha_next, mesh=mesh)
    return forward_BxLxHxD + jnp.pad(reverse_BxLxHxD[:, 1:], [(0, 0), (0, 1), (0, 0), (0, 0)])


def _delta_rule_shard(q, k, v, beta, log_alpha, q_prev, log_alpha_next, *, chunk_size,
                      chunk_strategy):
    """`delta_rule_over_sequence` on one device's shards [b, S, ...]: (forward outputs,
    the reverse pass's in forward order, as `delta_rule` before its shift; None if causal)."""
    run = functools.partial(chunked_with_state, chunk_size=chunk_size,
                            chunk_strategy=chunk_strategy)
    reverse = None if q_prev is None else (q_prev, k, v, beta, log_alpha_next)
    return pass_matrix_states(run, (q, k, v, beta, log_alpha), reverse, value_index=2,
                              key_dim=k.shape[-1])


def _reverse_inputs(q, log_alpha):
    """The reverse pass's queries and log-gates (module docstring), in forward order.

    At position j the query is alpha_j q_{j-1} (its read lands at j - 1 and crosses the
    gate between j - 1 and j); the log-gate is log alpha_{j+1}, 0 after the last token.
    """
    q_prev = jnp.pad(q[:, :-1], [(0, 0), (1, 0), (0, 0), (0, 0)])  # q_prev[j] = q[j - 1]
    if log_alpha is None:
        return q_prev, None
    log_alpha_next = jnp.pad(log_alpha[:, 1:], [(0, 0), (0, 1)] + [(0, 0)] * (log_alpha.ndim - 2))
    alpha = jnp.exp(log_alpha)  # per head [B, L, H] or per key channel [B, L, H, D]
    q_prev = q_prev * (alpha[..., None] if alpha.ndim == 3 else alpha)
    return q_prev.astype(q.dtype), log_alpha_next


class DeltaNetAttention(nnx.Module):
    """DeltaNet (Schlag et al., 2021; chunked as Yang et al., 2024): the delta rule.

    Options: `form` (chunked | recurrent), `chunk_size` (tokens per chunk in the
    chunked form; any L, padded internally), `chunk_strategy` (auto | scan | batched:
    module docstring) and `short_conv` (width of the short convolutions of q, k, v;
    0 = off). Parameters: per head, the beta projection
    of the raw key (`beta_w_HxD`, `beta_b_H`). `dropout_rate` is accepted and not
    applied (no attention probabilities). Causal cores decode with `init_state` /
    `step`.
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
        form: str = "chunked",
        chunk_size: int = 64,
        chunk_strategy: str = "auto",
        short_conv: int = 0,
    ):
        del dropout_rate  # no probabilities to drop
        self.num_heads, self.head_dim, self.max_len = num_heads, head_dim, max_len
        self.causal = causal
        self.form = Form(form)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.chunk_strategy = ChunkStrategy(chunk_strategy)
        init = nnx.initializers.normal(1.0 / math.sqrt(head_dim))
        self.beta_w_HxD = nnx.Param(init(rngs.params(), (num_heads, head_dim), F32))
        self.beta_b_H = nnx.Param(jnp.zeros((num_heads,), F32))
        self._init_gate(rngs)
        self.qkv_conv = make_qkv_conv(short_conv, num_heads=num_heads, head_dim=head_dim,
                                      rngs=rngs)

    def _init_gate(self, rngs: nnx.Rngs) -> None:
        """Parameters of the decay alpha (none: alpha = 1)."""
        del rngs

    def log_alpha(self, k_BxLxHxD: jax.Array) -> jax.Array | None:
        """log alpha [B, L, H] (or [B, L, H, D]: per key channel) from raw float32 keys;
        None means alpha = 1."""
        del k_BxLxHxD

    def beta(self, k_BxLxHxD: jax.Array) -> jax.Array:
        """beta [B, L, H] in (0, 1) from raw float32 keys."""
        logit_BxLxH = jnp.einsum("blhd,hd->blh", k_BxLxHxD, self.beta_w_HxD[...])
        return jax.nn.sigmoid(logit_BxLxH + self.beta_b_H[...])

    def _prepare(self, q, k, v, keep_BxL):
        """float32 inputs of `delta_rule`: masked, normalised, with the gates."""
        keep = keep_BxL[:, :, None, None]
        q, k, v = (jnp.where(keep, x.astype(F32), 0.0) for x in (q, k, v))
        beta_BxLxH = jnp.where(keep_BxL[..., None], self.beta(k), 0.0)
        log_alpha_BxLxH = self.log_alpha(k)  # [B, L, H] or [B, L, H, D] (per channel)
        if log_alpha_BxLxH is not None:
            keep = keep_BxL.reshape(keep_BxL.shape + (1,) * (log_alpha_BxLxH.ndim - 2))
            log_alpha_BxLxH = jnp.where(keep, log_alpha_BxLxH, 0.0)
        return l2_normalize(q), l2_normalize(k), v, beta_BxLxH, log_alpha_BxLxH

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        """q, k, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D]."""
        del deterministic  # no dropout (see the class docstring)
        keep_BxL = jnp.ones(q.shape[:2], bool) if mask is None else mask.astype(bool)
        (q, k, v), _ = convolve_qkv(self.qkv_conv, q, k, v, keep_BxL)
        q_, k_, v_, beta, log_alpha = self._prepare(q, k, v, keep_BxL)  # float32
        q_, k_, v_ = (x.astype(q.dtype) for x in (q_, k_, v_))  # the input dtype
        options = dict(causal=self.causal, chunk_size=self.chunk_size,
                       chunk_strategy=self.chunk_strategy)
        if splits_sequence():  # the sequence split over the `seq` mesh axis
            out = delta_rule_over_sequence(q_, k_, v_, beta, log_alpha, **options)
        else:
            out = delta_rule(q_, k_, v_, beta, log_alpha, form=self.form, **options)
        return out.astype(q.dtype)

    def init_state(self, batch_size: int) -> State:
        """The empty decoding state (float32, constant size in the sequence length)."""
        S_BxHxDxD = jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim), F32)
        return State(S_BxHxDxD, empty_history(self.qkv_conv, batch_size))

    def step(self, state, q_BxHxD, k_BxHxD, v_BxHxD, position, mask_B=None):
        """Decodes one token: updates the fast weights with it, reads its output.

        Applied to tokens 0, 1, ... it gives the causal `__call__` outputs.

        Args:
          state: from `init_state` or the previous step.
          q_BxHxD, k_BxHxD, v_BxHxD: the token's query, key and value.
          position: int index of the token (unused: the delta rule has no positions).
          mask_B: bool, False where the token is padding (the state skips it).

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
        q, k, v, beta, log_alpha = self._prepare(q, k, v, keep_Bx1)
        log_alpha_BxH = None if log_alpha is None else log_alpha[:, 0]
        S_BxHxDxD = delta_update(state.S_BxHxDxD, k[:, 0], v[:, 0], beta[:, 0], log_alpha_BxH)
        out_BxHxD = jnp.einsum("bhd,bhde->bhe", q[:, 0], S_BxHxDxD)
        return State(S_BxHxDxD, conv), out_BxHxD.astype(q_BxHxD.dtype)


class GatedDeltaNetAttention(DeltaNetAttention):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2025): the delta rule with a decay.

    alpha_t = exp(-exp(a_log) softplus(k_t . w_alpha + dt_bias)) per head, from the raw
    key (parameters `alpha_w_HxD`, `dt_bias_H`, `a_log_H`, initialised as Mamba2's);
    otherwise as `DeltaNetAttention` (options `form`, `chunk_size`, `chunk_strategy`,
    `short_conv`).
    """

    def _init_gate(self, rngs: nnx.Rngs) -> None:
        heads, dim = self.num_heads, self.head_dim
        init = nnx.initializers.normal(1.0 / math.sqrt(dim))
        self.alpha_w_HxD = nnx.Param(init(rngs.params(), (heads, dim), F32))
        a_log_H, dt_bias_H = mamba2_init(rngs.params(), heads)
        self.a_log_H, self.dt_bias_H = nnx.Param(a_log_H), nnx.Param(dt_bias_H)

    def log_alpha(self, k_BxLxHxD):
        logit_BxLxH = jnp.einsum("blhd,hd->blh", k_BxLxHxD, self.alpha_w_HxD[...])
        dt_BxLxH = jax.nn.softplus(logit_BxLxH + self.dt_bias_H[...])
        return -jnp.exp(self.a_log_H[...]) * dt_BxLxH
