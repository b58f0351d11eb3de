"""The gated linear-attention core (gated.py) and its families: retnet, gla, ssd.

Each family's forms (parallel, chunked, recurrent) must match a float64 NumPy recurrence
written from its paper's equations (outputs), agree with each other in gradients, decode
token by token like the causal pass, and stay finite at 16K tokens with gates near 0 and
near 1. Masking happens before the forms (masked inputs are zeroed, their gates neutral),
so its exactness in values and gradients is the mixer contract's, with causality across
chunks (tests/test_mixer_contract.py). "Relative" tolerances are relative to the largest
magnitude of the expected array.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import (
    assert_close_relative,
    edge_mask,
    make_core,
    outputs_and_grads,
    pure,
    random_qkv,
)

from lra.models import attention
from lra.models.attention import gated
from lra.models.attention.linear import Form

B, L, H, D = 3, 11, 2, 5
CHUNK = 4  # 11 tokens: two full chunks and a padded one
FORMS = ("parallel", "chunked", "recurrent")
FAMILIES = ("retnet", "gla", "ssd")


def _core(family, *, causal, form="chunked", length=L, **options):
    skip = {"d_skip": True} if family == "ssd" else {}  # exercise the D skip too
    options = {"form": form, "chunk_size": CHUNK, **skip, **options}
    return make_core(family, num_heads=H, head_dim=D, max_len=length, causal=causal, **options)


def _np(param):
    return np.asarray(param[...], np.float64)


# --- float64 NumPy references from the papers' equations ------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(x))


def _group_norm(o, core):
    mean = o.mean(-1, keepdims=True)
    var = ((o - mean) ** 2).mean(-1, keepdims=True)
    return (o - mean) / np.sqrt(var + 1e-5) * _np(core.norm.scale_HxD) + _np(core.norm.bias_HxD)


def _retnet_inputs(q, k, v, core):
    """RetNet: gamma_h = 1 - 2^(-5-h), keys scaled by D^-1/2."""
    gamma = 1.0 - 2.0 ** (-5.0 - np.arange(q.shape[2]))
    decay = np.broadcast_to(gamma[None, None, :, None], (*q.shape[:3], 1))
    return q, k / math.sqrt(q.shape[-1]), v, decay


def _retnet_post(o, q, k, v, core):
    return _group_norm(o, core)


def _gla_inputs(q, k, v, core):
    """GLA: alpha = sigmoid(k W1 W2 + b)^(1/tau) per key channel; q scaled by D^-1/2."""
    logits = np.einsum("blhd,hdr,hre->blhe", k, _np(core.gate_down_HxDxR), _np(core.gate_up_HxRxD))
    alpha = _sigmoid(logits + _np(core.gate_bias_HxD)) ** (1.0 / core.tau)
    return q / math.sqrt(q.shape[-1]), k, v, alpha


def _gla_post(o, q, k, v, core):
    gate = np.einsum("blhd,hde->blhe", q, _np(core.out_gate_HxDxD)) + _np(core.out_gate_bias_HxD)
    return _group_norm(o, core) * gate * _sigmoid(gate)


def _mamba2_inputs(q, k, v, core):
    """SSD: dt = softplus(x . w + dt_bias), a = exp(-dt exp(A_log)), input dt x (x = v)."""
    dt = _softplus(np.einsum("blhd,hd->blh", v, _np(core.dt_weight_HxD)) + _np(core.dt_bias_H))
    a = np.exp(-dt * np.exp(_np(core.A_log_H)))
    return q, k, v * dt[..., None], a[..., None]


def _mamba2_post(o, q, k, v, core):
    o = o if core.D_H is None else o + _np(core.D_H)[:, None] * v
    return o if core.norm is None else _group_norm(o, core)


REFERENCES = {
    "retnet": (_retnet_inputs, _retnet_post),
    "gla": (_gla_inputs, _gla_post),
    "ssd": (_mamba2_inputs, _mamba2_post),
}


def _reference(family, core, q, k, v, mask, causal):
    """Token by token: S_t = diag(a_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t (causal); or
    o_i = sum_j q_i diag(prod of a over (min(i,j), max(i,j)]) k_j^T v_j (bidirectional),
    over the real tokens only (masked tokens dropped from the sequence)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    inputs, post = REFERENCES[family]
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        real = np.flatnonzero(np.asarray(mask[b]))
        qb, kb, vb, a = inputs(q[b:b + 1, real], k[b:b + 1, real], v[b:b + 1, real], core)
        qb, kb, vb, a = qb[0], kb[0], vb[0], a[0]  # [T, H, D], a [T, H, G]
        o = np.zeros(qb.shape)
        if causal:
            S = np.zeros((q.shape[2], q.shape[3], q.shape[3]))
            for t in range(len(real)):
                S = a[t][..., None] * S + np.einsum("hd,he->hde", kb[t], vb[t])
                o[t] = np.einsum("hd,hde->he", qb[t], S)
        else:
            for i in range(len(real)):
                for j in range(len(real)):
                    lo, hi = min(i, j), max(i, j)
                    w = np.prod(a[lo + 1:hi + 1], axis=0)  # [H, G]
                    o[i] += np.einsum("hd,hd->h", qb[i] * w, kb[j])[:, None] * vb[j]
        out[b, real] = post(o[None], q[b:b + 1, real], k[b:b + 1, real], v[b:b + 1, real],
                            core)[0]
    return out


# Tests share one shape [B, L, H, D] and chunk, so the core's jitted forms compile once per
# (form, causal, gate width) and are reused by every test (2-core budget).
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_forms_match_numpy_recurrence_and_agree_in_gradients(family, causal):
    q, k, v = random_qkv((B, L, H, D), seed=1)
    mask = edge_mask(B, L, seed=1)
    real = np.asarray(mask)
    expected = None
    for form in ("recurrent", "chunked", "parallel"):
        core = _core(family, causal=causal, form=form)
        out, grads = outputs_and_grads(core, q, k, v, mask)
        if expected is None:  # parameters are the same for every form (same seed)
            expected = _reference(family, core, q, k, v, mask, causal)
            grads_recurrent = grads
        assert_close_relative(np.asarray(out)[real], expected[real])
        for grad, grad_recurrent in zip(grads, grads_recurrent):
            assert_close_relative(grad, grad_recurrent)


@pytest.mark.parametrize("family", FAMILIES)
def test_step_token_by_token_equals_causal_pass(family):
    core = _core(family, causal=True)
    q, k, v = random_qkv((B, L, H, D), seed=3)
    mask = edge_mask(B, L, seed=3)
    expected = core(q, k, v, mask)
    state, outputs = core.init_state(B), []
    for t in range(L):
        state, out = core.step(state, q[:, t], k[:, t], v[:, t], t, mask[:, t])
        outputs.append(out)
    assert_close_relative(jnp.stack(outputs, 1), expected)
    assert state.S_BxHxDxD.shape == (B, H, D, D) and state.S_BxHxDxD.dtype == jnp.float32


def test_right_padding_reverse_pass_starts_at_last_real_token():
    """Bidirectional, a prefix mask: the real outputs equal those of the unpadded row."""
    q, k, v = random_qkv((B, L, H, D), seed=6)
    mask = jnp.arange(L)[None, :] < jnp.asarray([L, 6, 9])[:, None]
    core = _core("gla", causal=False)
    padded = np.asarray(core(q, k, v, mask))
    short = np.asarray(core(q[1:2, :6], k[1:2, :6], v[1:2, :6]))
    assert_close_relative(padded[1, :6], short[0])


# --- numerics ---------------------------------------------------------------------------


def _extreme(family, near_one, *, heads=1, dim=8, length=16_384, **options):
    """A causal core whose gates sit near 1 (near_one) or near 0 (log-gate ~ -20 to -1500)."""
    if family == "retnet":
        options["gammas"] = (1.0 - 1e-7 if near_one else 1e-6,) * heads
    core = make_core(family, num_heads=heads, head_dim=dim, max_len=length, causal=True,
                     **options)
    if family == "gla":
        core.gate_bias_HxD.set_value(jnp.full((heads, dim), 30.0 if near_one else -300.0))
    elif family == "ssd":
        core.A_log_H.set_value(jnp.full((heads,), -20.0 if near_one else 5.0))
        core.dt_bias_H.set_value(jnp.full((heads,), -10.0 if near_one else 10.0))
    return core


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_16k_tokens_finite_with_gates_near_0_and_1(family):
    q, k, v = random_qkv((1, 16_384, 1, 8), seed=8, dtype=jnp.bfloat16)
    for near_one in (True, False):
        core = _extreme(family, near_one)
        for causal in (True, False):
            core.causal = causal
            out = core(q, k, v)  # the core's forms are jitted: compiled once per shape
            assert out.dtype == jnp.bfloat16 and out.shape == q.shape
            assert np.isfinite(np.asarray(out, np.float32)).all(), (near_one, causal)


@pytest.mark.parametrize("family", FAMILIES)
def test_extreme_gates_forms_agree(family):
    """Gates near 0 (log-gate down to -1500 per token) and near 1: finite and equal."""
    q, k, v = random_qkv((B, L, H, D), seed=9)
    mask = edge_mask(B, L, seed=9)
    for near_one in (True, False):
        # No GroupNorm: near-1 Mamba2 gates give outputs ~1e-7, whose rounding the norm
        # (eps 1e-5) would scale up; this test is about the gates.
        core = _extreme(family, near_one, heads=H, dim=D, length=L, chunk_size=CHUNK,
                        group_norm=False)
        results = []
        for form in ("recurrent", "chunked", "parallel"):
            core.form = Form(form)
            out, grads = outputs_and_grads(core, q, k, v, mask)
            assert all(np.isfinite(np.asarray(x)).all() for x in (out, *grads))
            results.append((out, grads))
        for out, grads in results[1:]:
            assert_close_relative(out, results[0][0], 1e-4)
            for grad, grad_recurrent in zip(grads, results[0][1]):
                assert_close_relative(grad, grad_recurrent, 1e-4)


# --- chunk strategies ------------------------------------------------------------------


def _strategy_outputs_and_grads(core, q, k, v, mask):
    """(output, (dq, dk, dv)) of sum(output * fixed weights), compiled at a low XLA
    optimisation level (compile time dominates on the CPU)."""
    apply = pure(core, mask)
    weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), q.dtype)

    def loss(q, k, v):
        out = apply(q, k, v)
        return jnp.sum(out * weights), out

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    (_, out), grads = fn.lower(q, k, v).compile({"xla_backend_optimization_level": 0})(q, k, v)
    return out, grads


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_strategies_agree_in_outputs_and_gradients(family, causal):
    """`batched` (every chunk's C x C part before the scan) equals `scan`, with masks
    that include right padding and a padded last chunk."""
    q, k, v = random_qkv((B, L, H, D), seed=4)
    mask = edge_mask(B, L, seed=4).at[2].set(jnp.arange(L) < 7)  # row 2: right padded
    results = {}
    for strategy in ("scan", "batched"):
        core = _core(family, causal=causal)
        core.chunk_strategy = gated.ChunkStrategy(strategy)  # ssd.py does not pass it yet
        results[strategy] = _strategy_outputs_and_grads(core, q, k, v, mask)
    (out, grads), (out_scan, grads_scan) = results["batched"], results["scan"]
    assert_close_relative(out, out_scan)
    for grad, grad_scan in zip(grads, grads_scan):
        assert_close_relative(grad, grad_scan)


def test_auto_chunk_strategy_follows_the_platform_rule():
    """auto: batched for the gated core everywhere; scan on a CPU where a core measured
    faster so (the delta rule passes batched_on_cpu=False)."""
    expected = "scan" if jax.default_backend() == "cpu" else "batched"
    assert gated.resolve_chunk_strategy("auto") == expected
    assert gated.resolve_chunk_strategy("auto", batched_on_cpu=True) == "batched"
    assert gated.resolve_chunk_strategy("batched") == "batched"
    assert _core("retnet", causal=True).chunk_strategy == "auto"
    assert _core("gla", causal=True, chunk_strategy="scan").chunk_strategy == "scan"


# --- options, initialisation ----------------------------------------------------------


def test_options_and_defaults():
    assert attention.default_options("retnet") == {
        "gammas": (), "group_norm": True, "form": "chunked", "chunk_size": 64,
        "chunk_strategy": "auto", "short_conv": 0}
    assert attention.default_options("gla") == {
        "rank": 16, "tau": 16.0, "output_gate": True, "group_norm": True,
        "form": "chunked", "chunk_size": 64, "chunk_strategy": "auto", "short_conv": 0}
    assert attention.default_options("ssd") == {
        "d_skip": False, "group_norm": True, "form": "chunked", "chunk_size": 64,
        "chunk_strategy": "auto", "short_conv": 0}


@pytest.mark.parametrize(
    "name, options, setting",
    [
        ("retnet", {"form": "scan"}, "form.*'parallel'.*'chunked'.*'recurrent'"),
        ("retnet", {"gammas": (0.5,)}, "gammas"),
        ("gla", {"rank": 0}, "rank"),
        ("gla", {"tau": 0.0}, "tau"),
        ("gla", {"chunk_strategy": "loop"}, "chunk_strategy.*'auto'.*'scan'.*'batched'"),
        ("ssd", {"chunk_size": 0}, "chunk_size"),
        ("ssd", {"bogus": 1}, "bogus.*d_skip"),
    ],
)
def test_bad_options_raise(name, options, setting):
    with pytest.raises(ValueError, match=setting):
        make_core(name, **options)


def test_retnet_schedule_and_mamba2_init():
    core = make_core("retnet", num_heads=4)
    np.testing.assert_allclose(np.exp(core.log_gamma_H), [1 - 2.0**-5, 1 - 2.0**-6,
                                                          1 - 2.0**-7, 1 - 2.0**-8])
    core = make_core("ssd", num_heads=64)
    a = np.exp(_np(core.A_log_H))
    dt = _softplus(_np(core.dt_bias_H))
    assert (a >= 1).all() and (a <= 16).all() and a.std() > 1
    np.testing.assert_array_less(0.001 * (1 - 1e-5), dt)
    np.testing.assert_array_less(dt, 0.1 * (1 + 1e-5))
    assert np.log(dt).std() > 0.5  # log-uniform, not a constant


def test_step_needs_causal_and_options_change_outputs():
    core = make_core("gla")
    x = jnp.ones((1, 2, 4))
    with pytest.raises(ValueError, match="causal=True"):
        core.step(core.init_state(1), x, x, x, 0)
    q, k, v = random_qkv((B, L, H, D), seed=10)
    for family, option in [("retnet", "group_norm"), ("gla", "output_gate"),
                           ("ssd", "d_skip")]:
        on = _core(family, causal=True, **{option: True})(q, k, v)
        off = _core(family, causal=True, **{option: False})(q, k, v)
        assert not np.allclose(np.asarray(on), np.asarray(off)), (family, option)


def test_scale_and_shift_gradient_equals_the_plain_expressions():
    """Its custom VJP against autodiff of y * scale + bias."""
    from lra.models.attention.gated import scale_and_shift

    rng = np.random.default_rng(3)
    y, dout = (jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32) for _ in range(2))
    scale, bias = (jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(2))
    plain = lambda y, s, b: y * s + b
    for fn in (scale_and_shift, plain):
        np.testing.assert_allclose(fn(y, scale, bias), plain(y, scale, bias), rtol=1e-6)
    ours = jax.vjp(scale_and_shift, y, scale, bias)[1](dout)
    expected = jax.vjp(plain, y, scale, bias)[1](dout)
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
