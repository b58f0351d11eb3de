"""Sparse-pattern attention families: local, sparse (fixed), Longformer, BigBird.

Each family is compared with `reference_attention` over an allowed pattern built here in
NumPy from the family's definition (independently of lra.models.attention.blocks), on
lengths that are not multiples of the block size, with prefix and non-prefix masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import (
    check_contract,
    check_no_future_leak,
    check_no_mask_leak,
    edge_mask,
    prefix_mask,
    pure,
    random_qkv,
    reference_attention,
)
from attention_checks import make_core as _make_core
from flax import nnx
from jax.extend.core import jaxprs_in_params

from lra.models import attention
from lra.models.attention import bigbird

B, L, H, D = 3, 29, 2, 4  # L is prime: no block size here divides it


class _Jitted(nnx.Module):
    """The core behind nnx.jit, so the shared checks run compiled (fast on 2 CPU cores)."""

    def __init__(self, core):
        self.core = core

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        return _jit_call(self.core, q, k, v, mask, deterministic)


@nnx.jit(static_argnames="deterministic")
def _jit_call(core, q, k, v, mask, deterministic):
    return core(q, k, v, mask, deterministic=deterministic)


def make_core(name, *, num_heads=2, head_dim=4, max_len=16, causal=False, dropout_rate=0.0,
              seed=0, **options):
    """`attention_checks.make_core`, jitted, with "rbg" keys: on CPU they compile about
    10x faster than threefry ones (dropout, BigBird's draw); threefry keys (the trainer's)
    are covered by `test_bigbird_random_blocks_fixed_per_layer`."""
    rngs = nnx.Rngs(params=jax.random.key(seed, impl="rbg"),
                    dropout=jax.random.key(seed + 1, impl="rbg"))
    return _Jitted(attention.make(
        name, num_heads=num_heads, head_dim=head_dim, max_len=max_len, causal=causal,
        dropout_rate=dropout_rate, rngs=rngs, **options))


# --- the patterns, from each family's definition ----------------------------------------


def local_pattern(length, block_size=50, overlap=False, causal=False):
    block = np.arange(length) // block_size
    allowed = np.abs(block[:, None] - block[None, :]) <= (1 if overlap else 0)
    return allowed & np.tri(length, dtype=bool) if causal else allowed


def sparse_pattern(length, block_size=50, num_summary=10, causal=False):
    pos = np.arange(length)
    same_block = pos[:, None] // block_size == pos[None, :] // block_size
    summary = pos % block_size >= block_size - num_summary
    allowed = same_block | summary[None, :]
    return allowed & np.tri(length, dtype=bool) if causal else allowed


def longformer_pattern(length, window=512, global_positions=(0,), causal=False):
    pos = np.arange(length)
    is_global = np.isin(pos, global_positions)
    allowed = (np.abs(pos[:, None] - pos[None, :]) <= window // 2) | is_global[:, None]
    allowed = allowed | is_global[None, :]
    return allowed & np.tri(length, dtype=bool) if causal else allowed


def bigbird_pattern(length, random_blocks_HxNxR, block_size=64):
    """[H, L, L]: window (3 blocks), global (first, last block) and random blocks."""
    n = -(-length // block_size)
    heads = random_blocks_HxNxR.shape[0]
    allowed_HxNxN = np.zeros((heads, n, n), bool)
    for h in range(heads):
        for qb in range(n):
            for kb in range(n):
                allowed_HxNxN[h, qb, kb] = (
                    qb in (0, n - 1) or kb in (0, n - 1) or abs(qb - kb) <= 1
                    or kb in random_blocks_HxNxR[h, qb]
                )
    block = np.arange(length) // block_size
    return allowed_HxNxN[:, block][:, :, block]


def pattern_of(name, core, length, causal, options):
    if name == "local":
        return local_pattern(length, causal=causal, **options)[None]
    if name == "sparse":
        return sparse_pattern(length, causal=causal, **options)[None]
    if name == "longformer":
        return longformer_pattern(length, causal=causal, **options)[None]
    random_blocks = np.asarray(core.core.random_blocks[...])
    return bigbird_pattern(length, random_blocks, options.get("block_size", 64))


def allowed_of(pattern, mask):
    return pattern[None] & np.asarray(mask)[:, None, None, :]


CASES = [
    ("local", dict(block_size=4), False),
    ("local", dict(block_size=7, overlap=True), False),
    ("local", dict(block_size=4), True),
    ("local", dict(block_size=5, overlap=True), True),
    ("sparse", dict(block_size=4, num_summary=1), False),
    ("sparse", dict(block_size=6, num_summary=2), False),
    ("sparse", dict(block_size=5, num_summary=2), True),
    ("longformer", dict(window=8), False),
    ("longformer", dict(window=6, global_positions=(0, 5, 17)), False),
    ("longformer", dict(window=4, global_positions=()), False),
    ("longformer", dict(window=8, global_positions=(3, 20)), True),
    ("longformer", dict(window=64, global_positions=(2,)), False),  # window > L
    ("bigbird", dict(block_size=4, num_random_blocks=1), False),
    ("bigbird", dict(block_size=4, num_random_blocks=2), False),
    ("bigbird", dict(block_size=3, num_random_blocks=2), False),
    ("bigbird", dict(block_size=6, num_random_blocks=2), False),  # fewer candidates than R
    ("bigbird", dict(block_size=16, num_random_blocks=1), False),  # N = 2: all global
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}{'-causal' if c else ''}"
       for n, o, c in CASES]


# --- agreement with the dense reference, masking -----------------------------------------


@pytest.mark.parametrize("name,options,causal", CASES, ids=IDS)
def test_matches_dense_reference_on_pattern(name, options, causal):
    core = make_core(name, num_heads=H, head_dim=D, max_len=L, causal=causal, **options)
    q, k, v = random_qkv((B, L, H, D), seed=1)
    pattern = pattern_of(name, core, L, causal, options)
    for label, mask in [("prefix", prefix_mask([L, 11, 1], L)), ("edge", edge_mask(B, L, 3))]:
        out = np.asarray(pure(core, mask)(q, k, v))
        assert np.isfinite(out).all(), label
        expected = reference_attention(q, k, v, allowed_of(pattern, mask))
        real = np.asarray(mask)
        np.testing.assert_allclose(out[real], expected[real], atol=2e-5, err_msg=label)


LEAK = (1, 3, 5, 6, 8, 10, 14, 15, 16)  # two per family (one causal), + BigBird edge cases


@pytest.mark.parametrize(
    "name,options,causal", [CASES[i] for i in LEAK], ids=[IDS[i] for i in LEAK]
)
def test_no_mask_leak(name, options, causal):
    core = make_core(name, num_heads=H, head_dim=D, max_len=L, causal=causal, **options)
    mask = edge_mask(B, L, seed=4)
    q, k, v = random_qkv((B, L, H, D), seed=2)
    check_contract(core, q, k, v, mask)
    check_no_mask_leak(core, q, k, v, mask)


FAMILY_CASES = [
    ("local", dict(block_size=4, overlap=True)),
    ("sparse", dict(block_size=4, num_summary=1)),
    ("longformer", dict(window=6, global_positions=(0, 9))),
    ("bigbird", dict(block_size=4, num_random_blocks=1)),
]


@pytest.mark.parametrize("name,options", FAMILY_CASES)
def test_bfloat16(name, options):
    core = make_core(name, num_heads=H, head_dim=D, max_len=L, **options)
    mask = edge_mask(B, L, seed=5)
    q, k, v = random_qkv((B, L, H, D), seed=5, dtype=jnp.bfloat16)
    out = check_contract(core, q, k, v, mask)
    pattern = pattern_of(name, core, L, False, options)
    expected = reference_attention(q, k, v, allowed_of(pattern, mask))
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out, np.float32)[real], expected[real], atol=0.1)


@pytest.mark.parametrize(
    "name,options",
    [("local", dict(block_size=3, overlap=True)), ("sparse", dict(block_size=3, num_summary=1)),
     ("longformer", dict(window=4, global_positions=(0, 6)))],
)
def test_causal_no_future_leak(name, options):
    core = make_core(name, num_heads=1, head_dim=D, max_len=11, causal=True, **options)
    q, k, v = random_qkv((2, 11, 1, D), seed=5)
    check_no_future_leak(core, q, k, v, prefix_mask([11, 8], 11))


@pytest.mark.parametrize("name", ["local", "sparse", "longformer", "bigbird"])
def test_defaults_match_reference(name):
    length = 331  # several blocks of the default sizes (50, 64); all in the 512 window
    core = make_core(name, num_heads=1, head_dim=D, max_len=length)
    q, k, v = random_qkv((2, length, 1, D), seed=6)
    out = np.asarray(pure(core, None)(q, k, v))  # mask=None: every token real
    pattern = pattern_of(name, core, length, False, {})
    expected = reference_attention(q, k, v, pattern[None])
    np.testing.assert_allclose(out, expected, atol=2e-5)


# --- dropout ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", FAMILY_CASES)
def test_dropout(name, options):
    core = make_core(name, num_heads=H, head_dim=D, max_len=L, dropout_rate=0.5, **options)
    q, k, v = random_qkv((B, L, H, D), seed=8)
    mask = edge_mask(B, L, seed=8)
    real = np.asarray(mask)
    kept = np.asarray(pure(core, mask, deterministic=True)(q, k, v))
    pattern = pattern_of(name, core, L, False, options)
    expected = reference_attention(q, k, v, allowed_of(pattern, mask))
    np.testing.assert_allclose(kept[real], expected[real], atol=2e-5)
    dropped = np.asarray(check_contract(core, q, k, v, mask, deterministic=False))
    assert not np.allclose(kept[real], dropped[real])
    check_no_mask_leak(core, q, k, v, mask, deterministic=False)


# --- memory: no L x L intermediate ------------------------------------------------------


@pytest.mark.parametrize(
    "name,options",
    [("local", dict(block_size=16, overlap=True)), ("sparse", dict(block_size=16, num_summary=1)),
     ("longformer", dict(window=32)), ("bigbird", dict(block_size=16, num_random_blocks=2))],
)
def test_no_quadratic_intermediate(name, options):
    length = 1024
    core = _make_core(name, num_heads=1, head_dim=D, max_len=length, **options)
    q, k, v = random_qkv((1, length, 1, D))
    mask = jnp.ones((1, length), bool)
    apply = pure(core, mask)
    loss = lambda q, k, v: jnp.sum(apply(q, k, v) ** 2)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for sub in jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    # The sparse pattern itself holds L * L * c / S = L * L / 16 pairs.
    assert max(sizes(jaxpr.jaxpr)) <= length * length // 8


# --- BigBird random blocks --------------------------------------------------------------


def test_bigbird_random_blocks_fixed_per_layer():
    core = _make_core("bigbird", num_heads=3, max_len=64, block_size=4, num_random_blocks=3)
    assert isinstance(core.random_blocks, bigbird.RandomBlocks)
    assert not jax.tree.leaves(nnx.state(core, nnx.Param))  # not trainable
    blocks_HxNxR = np.asarray(core.random_blocks[...])
    n = 16
    assert blocks_HxNxR.shape == (3, n, 3)
    for h in range(3):
        for qb in range(1, n - 1):
            drawn = blocks_HxNxR[h, qb]
            assert len(set(drawn)) == 3
            assert not set(drawn) & {0, n - 1, qb - 1, qb, qb + 1}
    same = _make_core("bigbird", num_heads=3, max_len=64, block_size=4, num_random_blocks=3)
    other = _make_core("bigbird", num_heads=3, max_len=64, block_size=4, num_random_blocks=3,
                      seed=5)
    np.testing.assert_array_equal(np.asarray(same.random_blocks[...]), blocks_HxNxR)
    assert not np.array_equal(np.asarray(other.random_blocks[...]), blocks_HxNxR)
    assert len({tuple(blocks_HxNxR[h].ravel()) for h in range(3)}) == 3  # per head
    # Init is traceable (the trainer initialises under eval_shape and jit).
    abstract = nnx.eval_shape(lambda: _make_core("bigbird", max_len=64, block_size=4))
    assert nnx.state(abstract, bigbird.RandomBlocks)["random_blocks"].shape == (2, 16, 3)


def test_bigbird_shorter_input_and_few_blocks():
    core = make_core("bigbird", num_heads=H, max_len=61, block_size=4, num_random_blocks=3)
    q, k, v = random_qkv((B, L, H, D), seed=9)  # 8 of the 16 blocks drawn for: some
    mask = edge_mask(B, L, seed=9)  # random blocks fall outside, or on the new last block
    out = np.asarray(pure(core, mask)(q, k, v))
    pattern = bigbird_pattern(L, np.asarray(core.core.random_blocks[...]), 4)
    expected = reference_attention(q, k, v, allowed_of(pattern, mask))
    real = np.asarray(mask)
    np.testing.assert_allclose(out[real], expected[real], atol=2e-5)
    with pytest.raises(ValueError, match="max_len"):
        core(*random_qkv((1, 62, H, D)))


# --- options ----------------------------------------------------------------------------


def test_default_options():
    assert attention.default_options("local") == {"block_size": 50, "overlap": False}
    assert attention.default_options("sparse") == {"block_size": 50, "num_summary": 10}
    assert attention.default_options("longformer") == {
        "window": 512, "global_positions": (0,), "global_projections": False}
    assert attention.default_options("bigbird") == {"block_size": 64, "num_random_blocks": 3}


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("local", dict(block_size=0), "block_size"),
        ("local", dict(block_size=2.5), "block_size"),
        ("local", dict(overlap="yes"), "overlap"),
        ("sparse", dict(block_size=-1), "block_size"),
        ("sparse", dict(num_summary=0), "num_summary"),
        ("sparse", dict(block_size=4, num_summary=5), "num_summary"),
        ("longformer", dict(window=7), "window"),
        ("longformer", dict(window=0), "window"),
        ("longformer", dict(global_positions=(0, 0)), "global_positions"),
        ("longformer", dict(global_positions=(-1,)), "global_positions"),
        ("longformer", dict(global_positions=(16,)), "global_positions"),
        ("longformer", dict(global_positions="0"), "global_positions"),
        ("longformer", dict(global_projections=1), "global_projections"),
        ("bigbird", dict(block_size=0), "block_size"),
        ("bigbird", dict(num_random_blocks=-1), "num_random_blocks"),
        ("bigbird", dict(num_random_blocks=True), "num_random_blocks"),
    ],
)
def test_bad_options_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_core(name, max_len=16, **options)


def test_bigbird_rejects_causal():
    with pytest.raises(ValueError, match="bigbird.*causal"):
        make_core("bigbird", causal=True)


def test_longformer_global_position_beyond_length_raises():
    core = make_core("longformer", max_len=16, window=4, global_positions=(0, 12))
    with pytest.raises(ValueError, match="global_positions"):
        core(*random_qkv((1, 10, 2, 4)))


# --- Longformer's separate global projections ----------------------------------------------


def longformer_global_reference(q, k, v, mask, maps, window, global_positions, causal):
    """Naive float64: non-global rows attend over the pattern with q, k, v as given; the
    rows of the global queries attend over every real (earlier, if causal) key with
    q A_q, k A_k, v A_v (A: [H, D, D] per head)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    a_q, a_k, a_v = (np.asarray(a, np.float64) for a in maps)
    pattern = longformer_pattern(q.shape[1], window, global_positions, causal)
    out = reference_attention(q, k, v, allowed_of(pattern[None], mask))
    project = lambda x, a: np.einsum("blhd,hde->blhe", x, a)
    full = np.tri(q.shape[1], dtype=bool) if causal else np.ones((q.shape[1],) * 2, bool)
    out_global = reference_attention(project(q, a_q), project(k, a_k), project(v, a_v),
                                     allowed_of(full[None], mask))
    out[:, list(global_positions)] = out_global[:, list(global_positions)]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_longformer_global_projections_match_naive_reference(causal):
    options = dict(window=6, global_positions=(0, 5, 17), global_projections=True)
    core = make_core("longformer", num_heads=H, head_dim=D, max_len=L, causal=causal, **options)
    inner = core.core
    maps = (inner.global_q_HxDxD[...], inner.global_k_HxDxD[...], inner.global_v_HxDxD[...])
    assert all(m.shape == (H, D, D) for m in maps)
    q, k, v = random_qkv((B, L, H, D), seed=11)
    for label, mask in [("prefix", prefix_mask([L, 11, 1], L)), ("edge", edge_mask(B, L, 3))]:
        out = np.asarray(pure(core, mask)(q, k, v))
        expected = longformer_global_reference(q, k, v, mask, maps, 6, (0, 5, 17), causal)
        real = np.asarray(mask)
        np.testing.assert_allclose(out[real], expected[real], atol=2e-5, err_msg=label)
    # The maps change the global rows only.
    plain = make_core("longformer", num_heads=H, head_dim=D, max_len=L, causal=causal,
                      window=6, global_positions=(0, 5, 17))
    out, out_plain = (np.asarray(c(q, k, v)) for c in (core, plain))
    others = np.setdiff1d(np.arange(L), (0, 5, 17))
    np.testing.assert_allclose(out[:, others], out_plain[:, others], atol=1e-6)
    assert not np.allclose(out[:, [0, 5, 17]], out_plain[:, [0, 5, 17]])


def test_longformer_global_projections_no_mask_or_future_leak():
    core = make_core("longformer", num_heads=H, head_dim=D, max_len=L, window=6,
                     global_positions=(0, 9), global_projections=True)
    mask = edge_mask(B, L, seed=4)
    q, k, v = random_qkv((B, L, H, D), seed=2)
    check_contract(core, q, k, v, mask)
    check_no_mask_leak(core, q, k, v, mask)
    causal = make_core("longformer", num_heads=1, head_dim=D, max_len=11, causal=True,
                       window=4, global_positions=(0, 6), global_projections=True)
    q, k, v = random_qkv((2, 11, 1, D), seed=5)
    check_no_future_leak(causal, q, k, v, prefix_mask([11, 8], 11))
