"""Linformer, Nystromformer, Synthesizer and memory-efficient attention.

Each family: the shared contract and mask-leak checks, a NumPy reference of its own
definition built from the module's parameters, option validation. Memory-efficient
attention must equal softmax in outputs and gradients.
"""

import functools

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
from jax.extend.core import jaxprs_in_params

from lra.models.attention import nystromformer

B, L, H, D, MAX_LEN = 3, 13, 2, 4, 16  # L < MAX_LEN: parameters are sliced

CONFIGS = {  # id -> (name, causal, options); small sizes so every code path runs
    "linformer": ("linformer", False, dict(proj_len=5)),
    "linformer_shared_kv": ("linformer", False, dict(proj_len=20, share_kv=True)),
    "synthesizer_dense": ("synthesizer", False, dict(mode="dense")),
    "synthesizer_dense_causal": ("synthesizer", True, dict(mode="dense", with_dot_product=True)),
    "synthesizer_random": ("synthesizer", False, dict(mode="random", with_dot_product=True)),
    "synthesizer_fixed_random": ("synthesizer", True, dict(mode="random", trainable_random=False)),
    "synthesizer_factorized": ("synthesizer", False, dict(mode="factorized_random", factor_rank=3)),
    "nystromformer": ("nystromformer", False, dict(num_landmarks=4, conv_kernel_size=3)),
    "nystromformer_small_l": ("nystromformer", False, dict(num_landmarks=32)),
    "memory_efficient": ("memory_efficient", False, dict(chunk_size=5, query_chunk_size=4)),
    "memory_efficient_causal": ("memory_efficient", True, dict(chunk_size=5, query_chunk_size=4)),
}
ONE_PER_FAMILY = ["linformer", "synthesizer_dense_causal", "nystromformer", "memory_efficient"]
SAME_CODE_PATH = {"linformer_shared_kv", "synthesizer_fixed_random"}  # as their neighbours
# synthesizer's defaults, whose masking the mixer contract checks (tests/test_mixer_contract.py)
DEFAULTS = {"synthesizer_dense"}
DROPOUT_RATE = 0.3  # one rate everywhere: jit caches are keyed on it


def _core(config_id, dropout_rate=0.0, **overrides):
    name, causal, options = CONFIGS[config_id]
    return make_core(name, num_heads=H, head_dim=D, max_len=MAX_LEN, causal=causal,
                     dropout_rate=dropout_rate, **{**options, **overrides})


@functools.partial(nnx.jit, static_argnames="deterministic")
def _jit_call(core, q, k, v, mask, deterministic):
    return core(q, k, v, mask, deterministic=deterministic)


class _Jitted(nnx.Module):
    """The core behind one jit (compiled once per configuration), for the eager checks."""

    def __init__(self, core):
        self.core = core

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        return _jit_call(self.core, q, k, v, mask, deterministic)


def _softmax_np(logits, allowed):
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore"):  # NaN rows where no key is allowed
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        return weights / weights.sum(-1, keepdims=True)


def _assert_real_close(out, expected, mask, atol):
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out, np.float64)[real], expected[real], atol=atol)


# --- contract and masking, every configuration --------------------------------


@pytest.mark.parametrize("config_id", [c for c in CONFIGS if c not in SAME_CODE_PATH | DEFAULTS])
def test_contract_and_no_mask_leak(config_id):
    core = _Jitted(_core(config_id))
    q, k, v = random_qkv((B, L, H, D), seed=1)
    mask = edge_mask(B, L, seed=1)
    check_contract(core, q, k, v, mask)
    check_contract(core, q, k, v, mask.at[0].set(False))  # a row with no real token
    check_no_mask_leak(core, q, k, v, mask)


def test_contract_and_no_mask_leak_with_dropout(config_id="synthesizer_dense_causal"):
    core = _core(config_id, dropout_rate=DROPOUT_RATE)  # eager: compiles the RNG only once
    q, k, v = random_qkv((B, L, H, D), seed=1)
    mask = edge_mask(B, L, seed=1)
    check_contract(core, q, k, v, mask, deterministic=False)
    check_no_mask_leak(core, q, k, v, mask, deterministic=False)


@pytest.mark.parametrize("config_id", ONE_PER_FAMILY)
def test_bfloat16_finite_and_no_mask(config_id):
    q, k, v = random_qkv((B, L, H, D), seed=2, dtype=jnp.bfloat16)
    core = _Jitted(_core(config_id))
    check_contract(core, q, k, v, edge_mask(B, L, seed=2))
    check_contract(core, q, k, v, None)


@pytest.mark.parametrize("config_id", ["linformer", "synthesizer_dense_causal"])
def test_dropout_on_probabilities(config_id):
    core = _core(config_id, dropout_rate=DROPOUT_RATE)  # eager: compiles the RNG only once
    q, k, v = random_qkv((B, L, H, D), seed=3)
    mask = edge_mask(B, L, seed=3)
    kept, dropped = core(q, k, v, mask), core(q, k, v, mask, deterministic=False)
    assert np.isfinite(np.asarray(dropped)).all()
    assert not np.allclose(np.asarray(kept), np.asarray(dropped))


@pytest.mark.parametrize("config_id", ["nystromformer", "memory_efficient"])
def test_dropout_accepted_and_ignored(config_id):
    """No explicit probabilities: the documented choice is no dropout at all."""
    core = _core(config_id, dropout_rate=DROPOUT_RATE)
    assert not any(isinstance(node, nnx.Dropout) for _, node in nnx.iter_graph(core))


@pytest.mark.parametrize("config_id", ["synthesizer_dense_causal", "memory_efficient_causal"])
def test_causal_no_future_leak(config_id):
    q, k, v = random_qkv((2, 7, H, D), seed=4)
    # Every row real: a masked row with no real earlier key averages all L values (as softmax).
    mask = edge_mask(2, 7, seed=4).at[1].set(True)
    check_no_future_leak(_Jitted(_core(config_id)), q, k, v, mask)


@pytest.mark.parametrize("config_id", CONFIGS)
def test_longer_than_max_len_raises(config_id):
    q, k, v = random_qkv((1, MAX_LEN + 1, H, D))
    with pytest.raises(ValueError, match="max_len"):
        _core(config_id)(q, k, v)


@pytest.mark.parametrize("name", ["linformer", "nystromformer"])
def test_encoder_only_families_reject_causal(name):
    with pytest.raises(ValueError, match=name):
        make_core(name, causal=True)


@pytest.mark.parametrize("name, options, option", [
    ("linformer", dict(proj_len=0), "proj_len"),
    ("linformer", dict(share_kv="yes"), "share_kv"),
    ("nystromformer", dict(num_landmarks=0), "num_landmarks"),
    ("nystromformer", dict(pinv_iterations=-1), "pinv_iterations"),
    ("nystromformer", dict(conv_kernel_size=4), "conv_kernel_size"),
    ("synthesizer", dict(mode="dense_random"), "mode.*'dense'.*'random'.*'factorized_random'"),
    ("synthesizer", dict(factor_rank=0), "factor_rank"),
    ("synthesizer", dict(with_dot_product=1), "with_dot_product"),
    ("synthesizer", dict(trainable_random=None), "trainable_random"),
    ("memory_efficient", dict(chunk_size=0), "chunk_size"),
    ("memory_efficient", dict(query_chunk_size=2.5), "query_chunk_size"),
])
def test_bad_options_raise(name, options, option):
    with pytest.raises(ValueError, match=option):
        make_core(name, **options)


# --- linformer -------------------------------------------------------------------


@pytest.mark.parametrize("config_id", ["linformer", "linformer_shared_kv"])
def test_linformer_matches_numpy_reference(config_id):
    core = _core(config_id)
    q, k, v = (np.asarray(x, np.float64) for x in random_qkv((B, L, H, D), seed=5))
    mask = np.asarray(edge_mask(B, L, seed=5))
    e = np.asarray(core.e_NxP[...], np.float64)[:L]
    f = e if core.f_NxP is None else np.asarray(core.f_NxP[...], np.float64)[:L]
    real = mask[:, :, None, None]
    k_proj = np.einsum("blhd,lp->bphd", np.where(real, k, 0), e)
    v_proj = np.einsum("blhd,lp->bphd", np.where(real, v, 0), f)
    weights = _softmax_np(np.einsum("blhd,bphd->bhlp", q, k_proj) / np.sqrt(D), True)
    expected = np.einsum("bhlp,bphd->blhd", weights, v_proj)
    out = _Jitted(core)(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask))
    _assert_real_close(out, expected, mask, atol=1e-5)


# --- synthesizer -----------------------------------------------------------------


def _synthetic_logits_np(core, q):
    """The paper's per-mode logits from the module's parameters, float64, [B|1, H, L, L]."""
    n = q.shape[1]

    def param(name):
        return np.asarray(getattr(core, name)[...], np.float64)

    if core.mode.value == "dense":  # B_i = W2 relu(W1 x_i + b1) + b2, per head
        hidden = np.maximum(np.einsum("blhd,hde->blhe", q, param("w1_HxDxD")) + param("b1_HxD"), 0)
        return (np.einsum("blhe,hek->bhlk", hidden, param("w2_HxDxN")[:, :, :n])
                + param("b2_HxN")[None, :, None, :n])
    if core.mode.value == "random":
        return param("r_HxNxN")[None, :, :n, :n]
    return np.einsum("hqr,hkr->hqk", param("r1_HxNxR")[:, :n], param("r2_HxNxR")[:, :n])[None]


@pytest.mark.parametrize("config_id", [c for c in CONFIGS if c.startswith("synthesizer")])
def test_synthesizer_matches_numpy_reference(config_id):
    core = _core(config_id)
    q, k, v = (np.asarray(x, np.float64) for x in random_qkv((B, L, H, D), seed=6))
    mask = np.asarray(edge_mask(B, L, seed=6))
    logits = _synthetic_logits_np(core, q)
    if core.with_dot_product:
        logits = logits + np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    weights = _softmax_np(logits, key_pattern(mask, core.causal))
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    out = _Jitted(core)(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask))
    _assert_real_close(out, expected, mask, atol=1e-5)


def test_synthesizer_fixed_random_is_not_a_param():
    assert not nnx.state(_core("synthesizer_fixed_random"), nnx.Param)
    assert len(nnx.state(_core("synthesizer_random"), nnx.Param)) == 1


# --- nystromformer ---------------------------------------------------------------


def _landmarks_np(x, mask, num_landmarks):
    """Means of x [B, L, H, D] over the real tokens of np.array_split segments."""
    segments = np.array_split(np.arange(x.shape[1]), min(num_landmarks, x.shape[1]))
    means = np.zeros((x.shape[0], len(segments)) + x.shape[2:])
    valid = np.zeros((x.shape[0], len(segments)), bool)
    for b in range(x.shape[0]):
        for j, segment in enumerate(segments):
            real = segment[mask[b, segment]]
            if real.size:
                means[b, j], valid[b, j] = x[b, real].mean(0), True
    return means, valid


def _pinv_np(a, iterations):
    """The paper's iteration, written from its equations, float64."""
    z = a.T / (np.abs(a).sum(0).max() * np.abs(a).sum(1).max())
    eye = np.eye(len(a))
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _nystrom_np(q, k, v, mask, num_landmarks, iterations):
    """Per example and head: F A^+ B v using only the landmarks that have real tokens."""
    q_land, valid = _landmarks_np(q, mask, num_landmarks)
    k_land, _ = _landmarks_np(k, mask, num_landmarks)
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        lv, real = valid[b], mask[b]
        for h in range(q.shape[2]):
            ql, kl = q_land[b, lv, h], k_land[b, lv, h]
            f = _softmax_np(q[b, :, h] @ kl.T / np.sqrt(D), True)
            a = _softmax_np(ql @ kl.T / np.sqrt(D), True)
            bk = _softmax_np(ql @ k[b, real, h].T / np.sqrt(D), True)
            out[b, :, h] = f @ _pinv_np(a, iterations) @ bk @ v[b, real, h]
    return out


@pytest.mark.parametrize("length, num_landmarks", [(13, 4), (13, 5), (12, 4), (6, 8)])
def test_nystromformer_landmarks_match_numpy(length, num_landmarks):
    q, k, _ = random_qkv((B, length, H, D), seed=7)
    mask = np.asarray(edge_mask(B, length, seed=7))
    q_land, k_land, valid = nystromformer.landmarks(q, k, jnp.asarray(mask), num_landmarks)
    for got, x in ((q_land, q), (k_land, k)):
        expected, expected_valid = _landmarks_np(np.asarray(x, np.float64), mask, num_landmarks)
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(valid), expected_valid)
    assert not np.asarray(valid).all()  # edge_mask leaves a segment without a real token


@pytest.mark.parametrize("num_landmarks, iterations", [(4, 6), (5, 3), (32, 6)])
def test_nystromformer_matches_numpy_reference(num_landmarks, iterations):
    core = _core("nystromformer_small_l", num_landmarks=num_landmarks, pinv_iterations=iterations)
    q, k, v = (np.asarray(x, np.float64) for x in random_qkv((B, L, H, D), seed=8))
    mask = np.asarray(edge_mask(B, L, seed=8))
    out = _Jitted(core)(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(mask))
    _assert_real_close(out, _nystrom_np(q, k, v, mask, num_landmarks, iterations), mask, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_nystromformer_small_length_is_softmax(masked):
    """L <= num_landmarks: F A^+ B = S S^+ S = S, up to the pseudo-inverse's error."""
    q, k, v = random_qkv((B, L, H, D), seed=9)
    mask = edge_mask(B, L, seed=9) if masked else prefix_mask([L] * B, L)
    expected = reference_attention(q, k, v, key_pattern(mask))
    errors = {}
    for iterations in (6, 30):
        out = _Jitted(_core("nystromformer_small_l", pinv_iterations=iterations))(q, k, v, mask)
        errors[iterations] = np.abs(np.asarray(out) - expected)[np.asarray(mask)].max()
    assert errors[6] < 0.1 and errors[30] < 1e-4, errors


def test_nystromformer_pseudo_inverse_converges():
    a = np.asarray(jax.nn.softmax(jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6)))))
    z = np.asarray(nystromformer.pseudo_inverse(jnp.asarray(a, jnp.float32), 30))
    np.testing.assert_allclose(z, np.linalg.pinv(a), atol=1e-3)
    for a_i, z_i in zip(a, np.asarray(nystromformer.pseudo_inverse(jnp.asarray(a), 2))):
        np.testing.assert_allclose(z_i, _pinv_np(a_i, 2), atol=1e-5)


def test_nystromformer_conv_skip_matches_numpy():
    with_conv = _core("nystromformer")  # conv_kernel_size=3
    without = _core("nystromformer", conv_kernel_size=0)
    q, k, v = random_qkv((B, L, H, D), seed=10)
    mask = edge_mask(B, L, seed=10)
    skip = np.asarray(_Jitted(with_conv)(q, k, v, mask) - _Jitted(without)(q, k, v, mask))
    kernel = np.asarray(with_conv.conv_HxK[...], np.float64)  # [H, K]
    v_pad = np.pad(np.where(np.asarray(mask)[:, :, None, None], np.asarray(v, np.float64), 0),
                   [(0, 0), (1, 1), (0, 0), (0, 0)])
    expected = sum(kernel[None, None, :, t, None] * v_pad[:, t:t + L] for t in range(3))
    np.testing.assert_allclose(skip, expected, atol=1e-5)


# --- memory-efficient --------------------------------------------------------------


@pytest.mark.parametrize("causal, masked, options", [
    (False, True, dict(chunk_size=5, query_chunk_size=4)),  # L = 13: both padded
    (True, True, dict(chunk_size=5, query_chunk_size=4)),
    (True, False, dict(chunk_size=3)),
    (False, True, dict()),  # default chunks, clipped to L
])
def test_memory_efficient_equals_softmax_with_gradients(causal, masked, options):
    q, k, v = random_qkv((B, L, H, D), seed=11)
    mask = edge_mask(B, L, seed=11) if masked else None
    real = jnp.ones((B, L), bool) if mask is None else mask
    weights = jnp.asarray(np.random.default_rng(12).normal(size=(B, L, H, D)), jnp.float32)

    def value_and_grads(core):
        def loss(q, k, v):
            out = core(q, k, v, mask)
            return jnp.sum(out * weights * real[:, :, None, None]), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out), grads = value_and_grads(
        make_core("memory_efficient", head_dim=D, max_len=MAX_LEN, causal=causal, **options))
    (_, expected), expected_grads = value_and_grads(
        make_core("softmax", head_dim=D, max_len=MAX_LEN, causal=causal))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)  # masked rows too
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), atol=1e-5)


def _largest_intermediate(jaxpr):
    """The most elements of any value made in `jaxpr`, nested jaxprs (scan, remat) included."""
    sizes = [0]
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(var.aval.shape)) for var in eqn.outvars]
        sizes += [_largest_intermediate(sub) for sub in jaxprs_in_params(eqn.params)]
    return max(sizes)


@pytest.mark.parametrize("causal", [False, True])
def test_memory_efficient_gradient_stores_no_quadratic_array(causal):
    length, chunk = 64, 8
    q, k, v = random_qkv((1, length, 1, D))
    core = make_core("memory_efficient", num_heads=1, head_dim=D, max_len=length, causal=causal,
                     chunk_size=chunk, query_chunk_size=chunk)
    grad = jax.grad(lambda q, k, v: jnp.sum(core(q, k, v) ** 2), argnums=(0, 1, 2))
    largest = _largest_intermediate(jax.make_jaxpr(grad)(q, k, v).jaxpr)
    assert largest <= length * chunk, largest  # softmax would hold length ** 2
