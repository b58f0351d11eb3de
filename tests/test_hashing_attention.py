"""Hashing and sorting attention: Reformer (LSH, shared QK) and Sinkhorn (block sorting).

Each family is compared with a naive reference written here from the family's
definition (see the class docstrings), plus the shared contract and mask-leak checks.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import (
    check_contract,
    check_no_future_leak,
    check_no_mask_leak,
    edge_mask,
    key_pattern,
    make_core,
    prefix_mask,
    random_qkv,
    reference_attention,
)
from flax import nnx

from lra.models.attention import reformer, sinkhorn

# Small sizes so every path is non-trivial: 18 and 32 tokens, buckets/blocks of 4
# (18 is padded to 24), 2 heads of width 4. Tests share these configurations and
# shapes so that one jit compilation serves several tests (2 CPU cores).
H, D, MAX_LEN, SIZE = 2, 4, 40, 4


def _mask(kind, batch, length):
    if kind == "edge":
        return edge_mask(batch, length)
    if kind == "prefix":
        return prefix_mask([length, 1, length - 5][:batch], length)
    return jnp.ones((batch, length), bool)


@nnx.jit(static_argnames="deterministic")
def _call(core, q, k, v, mask, deterministic):
    return core(q, k, v, mask, deterministic=deterministic)


class _Compiled(nnx.Module):
    """The same core called through one jit, the mask an argument (not a constant).

    The shared checks call the core eagerly (op by op), which is slow for these
    families; this wrapper changes nothing else.
    """

    def __init__(self, core):
        self.core = core

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        return _call(self.core, q, k, v, mask, deterministic)


def _reformer(causal=False, **options):
    options = dict(bucket_size=SIZE, num_hashes=3, dropout_rate=0.3) | options
    return _Compiled(make_core("reformer", max_len=MAX_LEN, causal=causal, **options))


def _sinkhorn(**options):
    options = dict(block_size=SIZE, hidden_dim=8, dropout_rate=0.3) | options
    return _Compiled(make_core("sinkhorn", max_len=MAX_LEN, **options))


# --- reformer -----------------------------------------------------------------


def _reformer_reference(core, q, v, mask, causal):
    """Dense float64 attention restricted to each round's chunk pattern, combined by lse.

    NaN at masked query rows (not compared).
    """
    rotations = np.asarray(core.rotations_HxRxDxN[...], np.float64)
    batch, length, heads, dim = q.shape
    size = core.bucket_size
    padded = 2 * size * math.ceil(length / (2 * size))
    num_buckets = padded // size
    pad = ((0, 0), (0, padded - length))
    q, v = (np.pad(np.asarray(x, np.float64), pad + ((0, 0), (0, 0))) for x in (q, v))
    real = np.pad(np.asarray(mask), pad)
    later = np.arange(padded)[None, :] > np.arange(padded)[:, None]
    out = np.zeros_like(q)
    for b, h in itertools.product(range(batch), range(heads)):
        qh, vh = q[b, :, h], v[b, :, h]
        keys = qh / np.maximum(np.linalg.norm(qh, axis=1, keepdims=True), 1e-30)
        logits = np.where(np.eye(padded, dtype=bool), -1e5, qh @ keys.T / np.sqrt(dim))
        outs, lses = [], []
        for rotation in rotations[h, :, :, : num_buckets // 2]:
            bucket = np.argmax(np.concatenate([qh @ rotation, -qh @ rotation], 1), 1)
            bucket[~real[b]] = num_buckets  # masked tokens sort after all real ones
            chunk_of = np.empty(padded, int)
            chunk_of[np.argsort(bucket, kind="stable")] = np.arange(padded) // size
            same = chunk_of[None, :] == chunk_of[:, None]
            previous = chunk_of[None, :] == (chunk_of[:, None] - 1) % num_buckets
            allowed = (same | previous) & real[b][None, :] & ~(causal & later)
            masked_logits = np.where(allowed, logits, -np.inf)
            top = masked_logits.max(1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                lses.append(top + np.log(np.exp(masked_logits - top).sum(1, keepdims=True)))
                outs.append(np.exp(masked_logits - lses[-1]) @ vh)
        with np.errstate(invalid="ignore"):
            weights = np.exp(np.stack(lses) - np.stack(lses).max(0))
            out[b, :, h] = (weights / weights.sum(0) * np.stack(outs)).sum(0)
    return out[:, :length]


@pytest.mark.parametrize("length", [18, 32])
@pytest.mark.parametrize("causal", [False, True])
def test_reformer_matches_naive_reference(length, causal):
    core = _reformer(causal)
    q, k, v = random_qkv((3, length, H, D), seed=length)
    for mask in (_mask("edge", 3, length), _mask("prefix", 3, length), _mask("", 3, length)):
        out = core(q, k, v, mask)
        expected = _reformer_reference(core.core, q, v, mask, causal)
        real = np.asarray(mask)
        np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=2e-5)


def test_reformer_is_dense_when_one_chunk_pair_covers_all():
    """Two chunks attending to each other: softmax over all real keys but self."""
    core = _Compiled(make_core("reformer", max_len=8, bucket_size=4))
    q, k, v = random_qkv((3, 8, H, D), seed=3)
    mask = edge_mask(3, 8)
    keys = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    allowed = key_pattern(mask) & ~np.eye(8, dtype=bool)
    only_self = ~allowed.any(-1, keepdims=True)
    allowed = allowed | (only_self & np.eye(8, dtype=bool))
    expected = reference_attention(q, keys, v, allowed)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(core(q, k, v, mask))[real], expected[real], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_contract_and_no_mask_leak(causal):
    core = _reformer(causal)
    q, k, v = random_qkv((3, 18, H, D), seed=1)
    for mask in (_mask("edge", 3, 18), _mask("prefix", 3, 18)):
        check_contract(core, q, k, v, mask)
        check_no_mask_leak(core, q, k, v, mask)
        if not causal:  # the dropout path, once
            check_contract(core, q, k, v, mask, deterministic=False)
            check_no_mask_leak(core, q, k, v, mask, deterministic=False)
    if not causal:
        check_contract(core, *random_qkv((3, 18, H, D), dtype=jnp.bfloat16), mask)


def test_reformer_causal_no_future_leak():
    core = _Compiled(make_core("reformer", max_len=10, causal=True, bucket_size=2))
    check_no_future_leak(core, *random_qkv((3, 10, H, D), seed=2), edge_mask(3, 10))


def test_reformer_shared_qk_ignores_k_and_uses_dropout():
    core = _reformer()
    q, k, v = random_qkv((3, 18, H, D), seed=4)
    all_real = _mask("", 3, 18)
    out = core(q, k, v, all_real)
    np.testing.assert_array_equal(out, core(q, k * 3.0 + 1.0, v, all_real))
    assert not np.allclose(out, core(q, k, v, all_real, deterministic=False))
    np.testing.assert_allclose(core(q, k, v), out, atol=1e-6)  # mask=None: all real


def test_reformer_rotations_are_fixed_random_state():
    """Drawn from the params stream at init (not from the data), stored, not trained."""
    core = _reformer().core
    rotations = core.rotations_HxRxDxN
    assert isinstance(rotations, reformer.LSHRotations)
    assert rotations[...].shape == (H, 3, D, 5)  # max_len 40 -> 10 buckets -> 5 columns
    assert not jax.tree.leaves(nnx.state(core, nnx.Param))  # nothing trainable
    same = _reformer().core
    other = make_core("reformer", max_len=MAX_LEN, bucket_size=SIZE, num_hashes=3, seed=5)
    np.testing.assert_array_equal(rotations[...], same.rotations_HxRxDxN[...])
    assert not np.allclose(rotations[...], other.rotations_HxRxDxN[...])


@pytest.mark.parametrize(
    "option, value",
    [("num_hashes", 0), ("num_hashes", 1.5), ("bucket_size", -4), ("bucket_size", True)],
)
def test_reformer_options_validated(option, value):
    with pytest.raises(ValueError, match=option):
        make_core("reformer", **{option: value})
    with pytest.raises(ValueError, match="max_len"):  # traced once: no compilation
        _reformer()(*random_qkv((1, MAX_LEN + 1, H, D)))


# --- sinkhorn -----------------------------------------------------------------


def _sinkhorn_reference(q, k, v, mask, p, size):
    """Per query block: softmax over its real keys and the P-mixed partner tokens."""
    q, k, v, p = (np.asarray(x, np.float64) for x in (q, k, v, p))
    batch, length, heads, dim = q.shape
    num_blocks = p.shape[-1]
    pad = ((0, 0), (0, num_blocks * size - length), (0, 0), (0, 0))
    q, k, v = (np.pad(x, pad) for x in (q, k, v))
    real = np.pad(np.asarray(mask), ((0, 0), (0, num_blocks * size - length)))
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            blocks = [slice(j * size, (j + 1) * size) for j in range(num_blocks)]
            for i, rows in enumerate(blocks):
                weight = sum(p[b, h, i, j] * real[b, cols] for j, cols in enumerate(blocks))
                safe = np.where(weight > 0, weight, 1.0)[:, None]
                mixed_k, mixed_v = (
                    sum(p[b, h, i, j] * real[b, cols, None] * x[b, cols, h]
                        for j, cols in enumerate(blocks)) / safe
                    for x in (k, v)
                )
                local = np.where(real[b, rows], q[b, rows, h] @ k[b, rows, h].T, -np.inf)
                with np.errstate(divide="ignore"):
                    partner = q[b, rows, h] @ mixed_k.T + np.sqrt(dim) * np.log(weight)
                logits = np.concatenate([local, partner], 1) / np.sqrt(dim)
                probs = np.exp(logits - logits.max(1, keepdims=True))
                probs /= probs.sum(1, keepdims=True)
                out[b, rows, h] = probs @ np.concatenate([v[b, rows, h], mixed_v])
    return out[:, :length]


@pytest.mark.parametrize("length", [18, 32])
def test_sinkhorn_matches_naive_reference(length):
    core = _sinkhorn()
    q, k, v = random_qkv((3, length, H, D), seed=length)
    for mask in (_mask("edge", 3, length), _mask("prefix", 3, length), _mask("", 3, length)):
        out = core(q, k, v, mask)
        p = _sort(core.core, k, mask)[1]
        assert p.shape == (3, H, math.ceil(length / SIZE), math.ceil(length / SIZE))
        expected = _sinkhorn_reference(q, k, v, mask, p, SIZE)
        real = np.asarray(mask)
        np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=2e-5)


@nnx.jit
def _sort(core, k, mask):
    return core.sort_logits(k, mask), core.sort_matrix(k, mask)


@nnx.jit
def _attend(core, q, k, v, mask, p):
    return core.attend(q, k, v, mask, p)


def _permutations(batch, num_blocks, seed=0):
    rng = np.random.default_rng(seed)
    perms = np.stack([[rng.permutation(num_blocks) for _ in range(H)] for _ in range(batch)])
    return perms, np.eye(num_blocks)[perms]  # P[b, h, i, perm[b, h, i]] = 1


def test_permute_blocks_with_permutation_matrix_is_exact():
    perms, p = _permutations(2, 5)
    x = np.random.default_rng(1).normal(size=(2, H, 5, 4, D)).astype(np.float32)
    out = np.asarray(sinkhorn.permute_blocks(jnp.asarray(p, jnp.float32), jnp.asarray(x)))
    expected = np.take_along_axis(x, perms[:, :, :, None, None], axis=2)
    np.testing.assert_array_equal(out, expected)
    uniform = np.asarray(sinkhorn.permute_blocks(jnp.full((2, H, 5, 5), 0.2), jnp.asarray(x)))
    assert not np.allclose(uniform, expected)  # the pitfall (sum of all blocks) differs


def test_sinkhorn_hard_permutation_is_local_plus_permuted_block():
    core = _sinkhorn().core
    q, k, v = random_qkv((3, 18, H, D), seed=6)
    perms, p = _permutations(3, 5, seed=2)
    block = np.arange(18) // SIZE
    partner = np.take_along_axis(perms, block[None, None, :].repeat(3, 0), axis=2)
    allowed = (block[None, None, None, :] == block[None, None, :, None]) | (
        block[None, None, None, :] == partner[..., None])
    for mask in (_mask("edge", 3, 18), _mask("prefix", 3, 18)):
        out = _attend(core, q, k, v, mask, jnp.asarray(p, jnp.float32))
        expected = reference_attention(q, k, v, allowed & key_pattern(mask))
        real = np.asarray(mask)
        np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=1e-5)


def test_sinkhorn_low_temperature_approaches_best_permutation():
    """At low temperature P tends to the permutation that maximises sum_i R[i, pi(i)]."""
    core = _sinkhorn(temperature=0.005, sinkhorn_iters=1000).core
    core.b2_HxM[...] = core.b2_HxM[...] + 3.0  # stay in the ReLU's linear part: no ties
    core.w2_HxKxM[...] = core.w2_HxKxM[...] * 3.0
    _, k, _ = random_qkv((2, 24, H, D), seed=5)
    logits, p = (np.asarray(x) for x in _sort(core, k, None))
    perms = np.array(list(itertools.permutations(range(6))))
    scores = logits[..., np.arange(6), perms].sum(-1)  # [B, H, 6!]
    top2 = np.sort(scores, -1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 0.1  # a clear best permutation
    best = np.eye(6)[perms[scores.argmax(-1)]]
    np.testing.assert_allclose(p, best, atol=0.02)
    soft = _sort(_sinkhorn().core, k, None)[1]  # default temperature: doubly stochastic
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(soft.sum(-2), 1.0, atol=1e-5)
    assert np.asarray(soft).max() < 0.9


def test_sinkhorn_contract_and_no_mask_leak():
    core = _sinkhorn()
    q, k, v = random_qkv((3, 18, H, D), seed=8)
    for mask in (_mask("edge", 3, 18), _mask("prefix", 3, 18)):
        for deterministic in (True, False):
            check_contract(core, q, k, v, mask, deterministic)
            check_no_mask_leak(core, q, k, v, mask, deterministic)
    check_contract(core, *random_qkv((3, 18, H, D), dtype=jnp.bfloat16), mask)


@nnx.jit
def _sort_net_grads(core, q, k, v):
    return nnx.grad(lambda core: jnp.sum(core(q, k, v) ** 2))(core)


def test_sinkhorn_sort_net_gets_gradients_and_mask_none_is_all_real():
    q, k, v = random_qkv((3, 18, H, D), seed=9)
    core = _sinkhorn(dropout_rate=0.0)
    grads = _sort_net_grads(core.core, q, k, v)
    assert np.abs(np.asarray(grads.w2_HxKxM[...])).sum() > 0
    np.testing.assert_allclose(core(q, k, v), core(q, k, v, _mask("", 3, 18)), atol=1e-6)


@pytest.mark.parametrize(
    "option, value",
    [("block_size", 0), ("sinkhorn_iters", 0), ("sinkhorn_iters", 2.0), ("temperature", 0.0),
     ("temperature", -1.0), ("temperature", "hot"), ("hidden_dim", 0)],
)
def test_sinkhorn_options_validated(option, value):
    with pytest.raises(ValueError, match=option):
        make_core("sinkhorn", **{option: value})


def test_sinkhorn_causal_and_too_long_raise():
    with pytest.raises(ValueError, match="sinkhorn"):
        make_core("sinkhorn", causal=True)
    with pytest.raises(ValueError, match="max_len"):
        _sinkhorn()(*random_qkv((1, MAX_LEN + 1, H, D)))
