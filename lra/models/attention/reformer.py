"""Reformer LSH attention with shared query/key (Kitaev, Kaiser & Levskaya, 2020)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.common import positive_int
from lra.models.attention import check_length

# Logit of a masked or padding key (a masked query row with no real key averages these).
_MASKED = -1e9
# Logit of a key after the query (causal): below _MASKED, so never attended to at all.
_FUTURE = -2e9
# Logit of a query's own position (the paper's value): used only if nothing else is allowed.
_SELF = -1e5


class LSHRotations(nnx.Variable):
    """The fixed random rotations of angular LSH: drawn at init, never trained."""


class ReformerAttention(nnx.Module):
    """LSH attention with shared QK: sort by hash bucket, attend within chunks.

    Shared QK (the paper): the keys are the queries normalised to unit length,
    ``k_j = q_j / |q_j|``; the caller's ``k`` argument is ignored (for hashing and
    for logits) and ``v`` is used as given. Per head and hash round ``r``:

    1. The sequence is padded to ``P``, a multiple of ``2 * bucket_size``, so there
       are ``n = P / bucket_size`` buckets (an even number). Angular LSH:
       ``bucket_j = argmax([q_j R_r ; -q_j R_r])`` with ``R_r`` a fixed random
       Gaussian ``[D, n/2]`` matrix (the first ``n/2`` columns of rotations drawn
       at init for ``max_len``; per head and round). Masked and padding tokens get
       bucket ``n``, after every real bucket, so their vectors never move a real
       token.
    2. Tokens are sorted by ``(bucket, position)`` (a stable sort) and cut into
       ``n`` chunks of ``bucket_size``. Each chunk attends to itself and to the
       previous chunk; the first chunk's previous chunk is the last one
       (wrap-around, as in the authors' implementation). All real keys in the two
       chunks are attended to, keys from other buckets included (as in the
       authors' implementation; no extra same-bucket mask).
    3. ``logit_ij = q_i . k_j / sqrt(D)`` over real keys (and ``j <= i`` if causal);
       a query's own position gets the logit -1e5, so it is attended to only when
       no other key is allowed. Softmax in float32 gives ``out_r`` and ``lse_r``
       (the log-sum-exp of the allowed logits). A masked query row, which has no
       real key, averages the masked keys of its chunks (earlier ones if causal):
       finite, and never used for a real output.
    4. Outputs are un-sorted and rounds combined by their log-sum-exp:
       ``out = sum_r exp(lse_r - logsumexp_r(lse_r)) * out_r``.

    Causal use (``causal=True``) masks keys after the query inside the chunks. As in
    the paper, which past keys share a query's chunk depends on the hashes of all
    tokens, future ones included (no gradient flows through that choice).

    Cost: O(B H R L (bucket_size D + log L)) time and O(B H R L bucket_size)
    memory for R = num_hashes rounds, instead of O(B H L^2 D).

    Hash rounds, compared with trax (the authors' code) and LRA's port of it
    (lra_benchmarks/models/reformer/reformer_attention.py): there, the bucket ids of
    round r are offset by r * n and all R rounds are sorted as one sequence of R * L
    entries, cut into chunks and looked one chunk back over that whole sequence, so the
    chunk at the boundary between two rounds attends to keys hashed in the neighbouring
    round. Here each round is sorted and chunked on its own (its first chunk wraps to its
    own last chunk), so a chunk only ever holds one round's buckets. With R = 1 (LRA's
    setting) the two agree. Neither discounts a key that falls in a query's chunks in
    several rounds (the paper's optional correction for duplicates). LRA's port also
    multiplies the logits by sqrt(D) instead of dividing, draws its rotations from a fixed
    PRNGKey(0) and ignores the padding mask; those are bugs we do not copy.
    """

    # The keys are the normalised queries: the encoder builds no key projection for it.
    uses_keys = False

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_len: int,
        causal: bool = False,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
        num_hashes: int = 2,
        bucket_size: int = 64,
    ):
        self.num_hashes = positive_int("num_hashes", num_hashes)
        self.bucket_size = positive_int("bucket_size", bucket_size)
        self.max_len = max_len
        self.causal = causal
        max_buckets = 2 * math.ceil(max_len / (2 * self.bucket_size))
        self.rotations_HxRxDxN = LSHRotations(
            jax.random.normal(
                rngs.params(), (num_heads, self.num_hashes, head_dim, max_buckets // 2)
            )
        )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """q, v [B, L, H, D], mask [B, L] bool (True = real) -> [B, L, H, D].

        ``k`` is ignored: the keys are the normalised queries (shared QK).
        """
        del k  # shared QK
        batch, length = q.shape[:2]
        check_length("reformer", length, self.max_len)
        padded = 2 * self.bucket_size * math.ceil(length / (2 * self.bucket_size))
        real_BxL = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
        real_BxP = jnp.pad(real_BxL, ((0, 0), (0, padded - length)))
        q_BxHxPxD, v_BxHxPxD = (
            jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
            for x in (q, v)
        )
        num_buckets = padded // self.bucket_size
        rotations = self.rotations_HxRxDxN[...][..., : num_buckets // 2]
        buckets_BxHxRxP = hash_buckets(q_BxHxPxD, rotations, real_BxP)
        order_BxHxRxP = jnp.argsort(buckets_BxHxRxP, axis=-1, stable=True)
        out_BxHxRxPxD, lse_BxHxRxP = self._rounds(q_BxHxPxD, v_BxHxPxD, real_BxP,
                                                  order_BxHxRxP, deterministic)
        weights_BxHxRxP = jax.nn.softmax(lse_BxHxRxP, axis=2)
        out_BxHxPxD = jnp.einsum("bhrp,bhrpd->bhpd", weights_BxHxRxP, out_BxHxRxPxD)
        return out_BxHxPxD.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)

    def _rounds(self, q_BxHxPxD, v_BxHxPxD, real_BxP, order_BxHxRxP, deterministic):
        """Chunked attention in every round's sorted order; results in original order."""
        batch, heads, padded, dim = q_BxHxPxD.shape
        norm_BxHxPx1 = jax.lax.rsqrt(
            jnp.sum(jnp.square(q_BxHxPxD.astype(jnp.float32)), -1, keepdims=True) + 1e-12
        )
        keys_BxHxPxD = q_BxHxPxD * norm_BxHxPx1.astype(q_BxHxPxD.dtype)
        position_BxHxP = jnp.broadcast_to(jnp.arange(padded), (batch, heads, padded))
        real_BxHxP = jnp.broadcast_to(real_BxP[:, None], (batch, heads, padded))
        chunks = lambda x: _sorted_chunks(x, order_BxHxRxP, self.bucket_size)  # noqa: E731
        q_BxHxRxNxCxD, qpos_BxHxRxNxC = chunks(q_BxHxPxD), chunks(position_BxHxP)
        k_pair, v_pair, kpos_pair, real_pair = (
            _with_previous_chunk(chunks(x))
            for x in (keys_BxHxPxD, v_BxHxPxD, position_BxHxP, real_BxHxP)
        )
        logits_BxHxRxNxCx2C = jnp.einsum(
            "bhrncd,bhrnkd->bhrnck", q_BxHxRxNxCxD, k_pair, preferred_element_type=jnp.float32
        ) * (dim**-0.5)
        is_self = kpos_pair[..., None, :] == qpos_BxHxRxNxC[..., None]
        logits_BxHxRxNxCx2C = jnp.where(is_self, _SELF, logits_BxHxRxNxCx2C)
        logits_BxHxRxNxCx2C = jnp.where(real_pair[..., None, :], logits_BxHxRxNxCx2C, _MASKED)
        if self.causal:
            future = kpos_pair[..., None, :] > qpos_BxHxRxNxC[..., None]
            logits_BxHxRxNxCx2C = jnp.where(future, _FUTURE, logits_BxHxRxNxCx2C)
        lse_BxHxRxNxC = jax.nn.logsumexp(logits_BxHxRxNxCx2C, axis=-1)
        probs = jnp.exp(logits_BxHxRxNxCx2C - lse_BxHxRxNxC[..., None])
        probs = self.dropout(probs, deterministic=deterministic)
        out_BxHxRxNxCxD = jnp.einsum(
            "bhrnck,bhrnkd->bhrncd", probs.astype(v_pair.dtype), v_pair,
            preferred_element_type=jnp.float32,
        )
        undo_BxHxRxP = jnp.argsort(order_BxHxRxP, axis=-1)
        out_BxHxRxPxD = jnp.take_along_axis(
            out_BxHxRxNxCxD.reshape(order_BxHxRxP.shape + (dim,)), undo_BxHxRxP[..., None], 3
        )
        lse_BxHxRxP = jnp.take_along_axis(
            lse_BxHxRxNxC.reshape(order_BxHxRxP.shape), undo_BxHxRxP, 3
        )
        return out_BxHxRxPxD, lse_BxHxRxP


def hash_buckets(
    q_BxHxPxD: jax.Array, rotations_HxRxDxN: jax.Array, real_BxP: jax.Array
) -> jax.Array:
    """Angular LSH buckets ``argmax([xR; -xR])`` per round; masked tokens get 2N.

    Args:
      q_BxHxPxD: the vectors to hash (queries; hashing is scale invariant).
      rotations_HxRxDxN: random rotations, N = half the number of buckets.
      real_BxP: True at real tokens.

    Returns:
      int32 [B, H, R, P] bucket ids in [0, 2N], 2N for masked/padding tokens.
    """
    rotated_BxHxRxPxN = jnp.einsum(
        "bhpd,hrdn->bhrpn", q_BxHxPxD.astype(jnp.float32), rotations_HxRxDxN.astype(jnp.float32)
    )
    buckets = jnp.argmax(jnp.concatenate([rotated_BxHxRxPxN, -rotated_BxHxRxPxN], -1), -1)
    num_buckets = 2 * rotations_HxRxDxN.shape[-1]
    return jnp.where(real_BxP[:, None, None, :], buckets, num_buckets).astype(jnp.int32)


def _sorted_chunks(x_BxHxP: jax.Array, order_BxHxRxP: jax.Array, chunk: int) -> jax.Array:
    """[B, H, P, ...] -> [B, H, R, P / chunk, chunk, ...] in each round's sorted order."""
    batch, heads, rounds, padded = order_BxHxRxP.shape
    trailing = x_BxHxP.shape[3:]
    x_BxHxRxP = jnp.broadcast_to(x_BxHxP[:, :, None], order_BxHxRxP.shape + trailing)
    index = order_BxHxRxP.reshape(order_BxHxRxP.shape + (1,) * len(trailing))
    sorted_BxHxRxP = jnp.take_along_axis(x_BxHxRxP, index, axis=3)
    return sorted_BxHxRxP.reshape((batch, heads, rounds, padded // chunk, chunk) + trailing)


def _with_previous_chunk(x_BxHxRxNxC: jax.Array) -> jax.Array:
    """[B, H, R, N, C, ...] -> [B, H, R, N, 2C, ...]: each chunk, then the previous one
    (chunk N-1 for chunk 0)."""
    return jnp.concatenate([x_BxHxRxNxC, jnp.roll(x_BxHxRxNxC, 1, axis=3)], axis=4)
