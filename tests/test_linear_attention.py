"""The linear-attention core and its feature maps: linear, performer, cosformer, taylor.

Forms (parallel, chunked, recurrent) must agree in outputs and gradients; `step` token by
token must equal the causal pass; masks and causality must hold exactly in the forms and
kernels beyond each family's defaults (the defaults, across chunks, are the mixer
contract's: tests/test_mixer_contract.py); each family must match a naive float64 NumPy
reference of its own kernel. "Relative" tolerances below are relative to the largest
magnitude of the expected array.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import (
    assert_close_relative,
    check_contract,
    check_no_future_leak,
    check_no_mask_leak,
    edge_mask,
    key_pattern,
    make_core,
    outputs_and_grads,
    pure,
    random_qkv,
    reference_attention,
)

from lra.models import attention
from lra.models.attention import linear, performer

# Tests run eagerly on one shape [B, L, H, D], so the core's jitted forms compile once per
# (feature width F, causal, form) and are shared by every test and family (2-core budget).
# D = 7 gives two widths: F = 7 (linear: D; taylor projected to 2: 1 + 2 + 4) and
# F = 14 (cosformer: 2D; performer: 14 features).
B, L, H, D = 3, 11, 2, 7
CHUNK = 4  # 11 tokens: two full chunks and a padded one
FORMS = ("parallel", "chunked", "recurrent")
FAMILIES = {  # test name -> (attention name, options)
    "linear": ("linear", {}),
    "performer": ("performer", {"num_features": 14}),
    "cosformer": ("cosformer", {}),
    "taylor": ("taylor", {"feature_dim": 2}),
    "performer_relu": ("performer", {"num_features": 14, "kernel": "relu"}),
    # LRA's released Performer: relu(x) + 1e-3, no projection (F = D; num_features unused).
    "performer_generalized": ("performer", {"num_features": 14, "kernel": "generalized_relu"}),
    "taylor_full": ("taylor", {}),  # no projection: F = 1 + 7 + 49
}
MAIN = ("linear", "performer", "cosformer", "taylor")  # one entry per family
VARIANTS = ("performer_relu", "performer_generalized")  # other Performer kernels


def _core(family, *, causal, form="chunked", length=L, **overrides):
    name, options = FAMILIES[family]
    options = {"form": form, "chunk_size": CHUNK, **options, **overrides}
    return make_core(name, num_heads=H, head_dim=D, max_len=length, causal=causal, **options)


# --- the three forms, step, masks, causality ------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", [*MAIN, *VARIANTS])
def test_forms_agree_in_outputs_and_gradients(family, causal):
    q, k, v = random_qkv((B, L, H, D), seed=1)
    mask = edge_mask(B, L, seed=1)
    out, grads = outputs_and_grads(_core(family, causal=causal, form="parallel"), q, k, v, mask)
    for form in FORMS[1:]:
        core = _core(family, causal=causal, form=form)
        out_form, grads_form = outputs_and_grads(core, q, k, v, mask)
        assert_close_relative(out_form, out)
        for grad_form, grad in zip(grads_form, grads):
            assert_close_relative(grad_form, grad)


@pytest.mark.parametrize("family", MAIN)
def test_step_token_by_token_equals_causal_pass(family):
    core = _core(family, causal=True)
    q, k, v = random_qkv((B, L, H, D), seed=2)
    mask = edge_mask(B, L, seed=2)
    expected = core(q, k, v, mask)

    state, outputs = core.init_state(B), []
    for t in range(L):  # eager: the step's pieces compile once per shape, shared by families
        state, out = core.step(state, q[:, t], k[:, t], v[:, t], t, mask[:, t])
        outputs.append(out)
    assert_close_relative(jnp.stack(outputs, 1), expected)


# The masking happens before the forms; each form is checked for exactness on `linear`,
# the other kernels on the default form. Each family's defaults (chunked, its default
# kernel) are the mixer contract's (tests/test_mixer_contract.py).
@pytest.mark.parametrize(
    "family, form",
    [(f, "chunked") for f in VARIANTS] + [("linear", f) for f in FORMS[::2]],
)
@pytest.mark.parametrize("causal", [False, True])
def test_contract_and_no_mask_leak(family, causal, form):
    core = _core(family, causal=causal, form=form)
    q, k, v = random_qkv((B, L, H, D), seed=3)
    mask = edge_mask(B, L, seed=3)
    check_contract(core, q, k, v, mask)
    check_contract(core, q, k, v, mask.at[0].set(False))  # a row with no real token
    check_no_mask_leak(core, q, k, v, mask)


# Each family's default (chunked) form across chunks: the mixer contract.
@pytest.mark.parametrize("family, form", [("linear", f) for f in FORMS[::2]])
def test_causal_output_never_depends_on_later_tokens(family, form):
    core = _core(family, causal=True, form=form)
    q, k, v = random_qkv((B, L, H, D), seed=4)
    check_no_future_leak(core, q, k, v, edge_mask(B, L, seed=4))
    # Values too: later tokens changed (hugely) leave earlier outputs bit for bit.
    later = (jnp.arange(L) > 5)[None, :, None, None]
    out = core(q, k, v)
    out_changed = core(*(jnp.where(later, 50.0 * x[:, ::-1], x) for x in (q, k, v)))
    np.testing.assert_array_equal(np.asarray(out_changed)[:, :6], np.asarray(out)[:, :6])


# --- each family against a naive float64 reference of its kernel ---------------------


def _kernel_reference(weights, v, allowed, eps):
    """sum_j w_ij v_j / (sum_j w_ij + eps) over allowed (i, j); w [B, H, L, L]."""
    weights = np.where(allowed, weights, 0.0)
    num = np.einsum("bhqk,bkhd->bqhd", weights, np.asarray(v, np.float64))
    den = weights.sum(-1).transpose(0, 2, 1)[..., None]
    with np.errstate(invalid="ignore"):  # rows with no allowed key: NaN, never compared
        return num / (den + eps)


def _linear_weights(q, k, core):
    phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))  # elu(x) + 1
    return np.einsum("bqhd,bkhd->bhqk", phi(q), phi(k))


def _cosformer_weights(q, k, core):
    relu = np.maximum(q, 0.0), np.maximum(k, 0.0)
    theta = np.arange(q.shape[1]) * (math.pi / 2 / core.max_len)
    return np.einsum("bqhd,bkhd->bhqk", *relu) * np.cos(theta[:, None] - theta[None, :])


def _taylor_weights(q, k, core):
    if core.query_proj_HxDxP is not None:
        q = np.einsum("bqhd,hdp->bqhp", q, np.asarray(core.query_proj_HxDxP[...], np.float64))
        k = np.einsum("bkhd,hdp->bkhp", k, np.asarray(core.key_proj_HxDxP[...], np.float64))
    t = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return 1.0 + t + t**2 / 2.0


def _generalized_relu_weights(q, k, core):
    """LRA's generalized attention: phi(x) = relu(x) + 0.001 on raw q and k, no projection."""
    phi = lambda x: np.maximum(x, 0.0) + 0.001
    return np.einsum("bqhd,bkhd->bhqk", phi(q), phi(k))


def _performer_weights(q, k, core):
    """Unbiased FAVOR+ estimate with the core's vectors, in float64 via log-sum-exp."""
    w = np.asarray(core.w_MxD[...], np.float64)

    def log_features(x):  # [B, L, H, D] -> [B, H, L, m]
        x = x / x.shape[-1] ** 0.25
        return np.einsum("blhd,md->bhlm", x, w) - 0.5 * (x**2).sum(-1).transpose(0, 2, 1)[..., None]

    logits = log_features(q)[:, :, :, None, :] + log_features(k)[:, :, None, :, :]
    top = logits.max(-1, keepdims=True)
    return (np.exp(top[..., 0]) * np.exp(logits - top).sum(-1)) / w.shape[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "family, weights_fn, rtol",
    [
        ("linear", _linear_weights, 1e-5),
        ("cosformer", _cosformer_weights, 1e-5),
        ("taylor", _taylor_weights, 1e-5),
        ("taylor_full", _taylor_weights, 1e-5),
        # Performer adds eps at its stabilised scale, the reference adds none.
        ("performer", _performer_weights, 1e-5),
        ("performer_generalized", _generalized_relu_weights, 1e-5),
    ],
)
def test_matches_naive_reference(family, weights_fn, rtol, causal):
    core = _core(family, causal=causal)
    q, k, v = random_qkv((B, L, H, D), seed=5)
    mask = edge_mask(B, L, seed=5)
    out = np.asarray(core(q, k, v, mask))
    q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
    eps = 0.0 if family == "performer" else linear.EPS
    expected = _kernel_reference(weights_fn(q64, k64, core), v, key_pattern(mask, causal), eps)
    real = np.asarray(mask)
    assert_close_relative(out[real], expected[real], rtol)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_stabiliser_handles_large_inputs(causal):
    """Norms where exp(w.x - |x|^2/2) over- or underflows: finite, forms still agree."""
    q, k, v = random_qkv((B, L, H, D), seed=6)
    q, k = 12.0 * q, 12.0 * k * jnp.arange(1, L + 1)[None, :, None, None] / L
    mask = edge_mask(B, L, seed=6)
    out, grads = outputs_and_grads(_core("performer", causal=causal, form="parallel"), q, k, v, mask)
    assert all(np.isfinite(np.asarray(x)).all() for x in (out, *grads))
    for form in FORMS[1:]:
        core = _core("performer", causal=causal, form=form)
        out_form, grads_form = outputs_and_grads(core, q, k, v, mask)
        assert_close_relative(out_form, out)
        for grad_form, grad in zip(grads_form, grads):  # exponents ~100: more rounding
            assert_close_relative(grad_form, grad, rtol=1e-4)


def test_performer_approaches_softmax_as_features_grow():
    """Mean error over 3 draws. Inputs at half scale: the estimator's variance grows as
    exp(|q + k|^2 / sqrt(D)), so at unit scale it needs far more features to converge."""
    errors = {16: [], 1024: []}
    for seed in range(3):
        q, k, v = random_qkv((B, L, H, D), seed=seed)
        q, k, mask = 0.5 * q, 0.5 * k, edge_mask(B, L, seed)
        expected = reference_attention(q, k, v, key_pattern(mask))
        for m, error in errors.items():
            core = make_core("performer", head_dim=D, num_features=m, form="parallel", seed=seed)
            error.append(np.abs(np.asarray(core(q, k, v, mask)) - expected)[np.asarray(mask)].mean())
    assert np.mean(errors[1024]) < 0.4 * np.mean(errors[16]), errors


# --- precision and long sequences -----------------------------------------------------


@pytest.mark.parametrize("family", MAIN)
def test_bfloat16_16k_tokens_finite(family):
    length = 16_384  # default options: Performer with 256 features, Taylor with F = 273
    core = make_core(family, num_heads=1, head_dim=16, max_len=length, causal=True)
    q, k, v = random_qkv((1, length, 1, 16), seed=6, dtype=jnp.bfloat16)
    out = jax.jit(pure(core, None))(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("family", MAIN)
def test_bfloat16_close_to_float32(family):
    core = _core(family, causal=True)
    q, k, v = random_qkv((B, L, H, D), seed=7)
    mask = edge_mask(B, L, seed=7)
    low = core(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask)
    high = core(q, k, v, mask)
    assert_close_relative(np.asarray(low, np.float32), high, rtol=3e-2)


def test_state_is_float32_under_bfloat16():
    core = _core("linear", causal=True)
    state = core.init_state(2)
    x = jnp.ones((2, H, D), jnp.bfloat16)
    state, out = core.step(state, x, x, x, 0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    assert out.dtype == jnp.bfloat16
    assert state.S_BxHxFxD.shape == (2, H, D, D)


# --- options, registry, Performer's random features -----------------------------------


def test_options_and_defaults():
    common = {"form": "chunked", "chunk_size": 64, "short_conv": 0}
    assert attention.default_options("linear") == common
    assert attention.default_options("cosformer") == common
    assert attention.default_options("taylor") == {"feature_dim": 0, **common}
    assert attention.default_options("performer") == {
        "kernel": "softmax", "num_features": 256, **common}


@pytest.mark.parametrize(
    "name, options, setting",
    [
        ("linear", {"form": "scan"}, "form.*'parallel'.*'chunked'.*'recurrent'"),
        ("linear", {"chunk_size": 0}, "chunk_size"),
        ("performer", {"kernel": "cosine"}, "kernel.*'softmax'.*'relu'"),
        ("performer", {"num_features": 0}, "num_features"),
        ("taylor", {"feature_dim": -1}, "feature_dim"),
        ("cosformer", {"bogus": 1}, "bogus.*form"),
    ],
)
def test_bad_options_raise(name, options, setting):
    with pytest.raises(ValueError, match=setting):
        make_core(name, **options)


def test_step_needs_causal_and_cosformer_needs_max_len():
    core = make_core("linear")
    x = jnp.ones((1, 2, 4))
    with pytest.raises(ValueError, match="causal=True"):
        core.step(core.init_state(1), x, x, x, 0)
    q = jnp.ones((1, 17, 2, 4))
    with pytest.raises(ValueError, match="max_len=16"):
        make_core("cosformer", max_len=16)(q, q, q)


def test_dropout_rate_accepted_not_applied():
    core = _core("linear", causal=False, dropout_rate=0.5)
    q, k, v = random_qkv((B, L, H, D))
    np.testing.assert_array_equal(core(q, k, v, deterministic=False), core(q, k, v))


def test_performer_features_from_rng_redrawn_only_when_asked():
    core, same, other = (_core("performer", causal=False, seed=s) for s in (0, 0, 1))
    w = np.asarray(core.w_MxD[...])
    assert w.shape == (14, D)
    np.testing.assert_array_equal(np.asarray(same.w_MxD[...]), w)
    assert not np.allclose(np.asarray(other.w_MxD[...]), w)
    block = w[:D] / np.linalg.norm(w[:D], axis=1, keepdims=True)
    np.testing.assert_allclose(block @ block.T, np.eye(D), atol=1e-5)  # orthogonal block
    q, k, v = random_qkv((B, L, H, D))
    out = core(q, k, v)
    core(q * 3, k, v)
    np.testing.assert_array_equal(np.asarray(core.w_MxD[...]), w)  # data never redraws
    core.redraw(jax.random.key(5))
    assert not np.allclose(np.asarray(core.w_MxD[...]), w)
    assert not np.allclose(core(q, k, v), out)
    np.testing.assert_array_equal(performer.orthogonal_features(jax.random.key(5), 14, D),
                                  core.w_MxD[...])


def test_performer_generalized_relu_has_no_random_features():
    core = _core("performer_generalized", causal=True)
    assert core.w_MxD is None and core.num_features == D  # F = D whatever num_features says
    core.redraw(jax.random.key(0))  # nothing to redraw
    assert core.init_state(2).S_BxHxFxD.shape == (2, H, D, D)
    q, k, v = random_qkv((B, L, H, D), seed=6)
    other = _core("performer_generalized", causal=True, num_features=3, seed=1)
    np.testing.assert_array_equal(np.asarray(core(q, k, v)), np.asarray(other(q, k, v)))
