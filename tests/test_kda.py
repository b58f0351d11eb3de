"""Kimi Delta Attention (kda): the delta rule with a decay per key channel.

Each form must match a float64 NumPy token-by-token recurrence written here from the
Kimi Linear report's equation (S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} +
beta_t k_t v_t^T, o_t = q_t S_t with q scaled by D^-1/2, as fla's naive KDA), causal
and bidirectional, with masks, in outputs; the forms must agree in gradients (inputs and
gate parameters), and the JAX gradients must match central differences of the NumPy
reference. `step` must equal the causal pass (with short convolutions); the
bidirectional decay is symmetric channel by channel; masks leak nothing and the causal
form sees no later token (the shared mixer contract, with short chunks and short
convolutions; tests/test_mixer_contract.py runs it with the defaults); 1K tokens with
gates near 0 and 1, mixed within one head and within one channel over time, stay finite
and the forms agree; bfloat16 inputs give bfloat16 outputs; the state stays bounded over
4096 steps. "Relative" tolerances are relative to the largest magnitude of the expected
array.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import (
    assert_close_relative,
    edge_mask,
    float64_by_name,
    float64_params,
    make_core,
    outputs_and_input_grads,
    random_qkv,
)
from flax import nnx
from mixer_checks import (
    check_no_future_leak_in,
    check_no_mask_gradient_leak,
    check_no_mask_values_leak,
    check_rows_independent,
    check_sees_later_tokens,
    check_shape_dtype_finite,
    check_step_equals_full_pass,
    contract_mask,
    make_mixer,
    probe,
    random_x,
)

from lra.models import attention

# One shape for every test, so compiled forms are shared; CPU compile time dominates.
B, L, H, D = 4, 11, 2, 5
CHUNK = 3  # 11 tokens: three full chunks and a padded one; 3 is not a power of two
FORMS = ("chunked", "recurrent")
QUICK_COMPILE = {"xla_backend_optimization_level": 0}
GATE_PARAMS = {"beta_w_HxD", "beta_b_H", "alpha_w_HxDxD", "dt_bias_HxD", "a_log_H"}


def _core(*, causal, form="chunked", length=L, **options):
    return make_core("kda", num_heads=H, head_dim=D, max_len=length, causal=causal,
                     form=form, chunk_size=CHUNK, **options)


# --- the reference: the report's recurrence, float64, token by token ----------------------


def _softplus(x):
    return np.logaddexp(0.0, x)


def _reference(q, k, v, mask, params, causal):
    """o_i = q_i S_i (+ q_i R_i if bidirectional), float64, token by token.

    Per head h, from the raw key k_t: beta_t = sigmoid(k_t . w_b + b_b), alpha_t[d] =
    exp(-exp(a_log) softplus((k_t W_a)[d] + dt_bias[d])), the decay of channel d between
    tokens t - 1 and t; q_t, k_t unit vectors, q_t then scaled by D^-1/2, and

        S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T

    (S [D_k, D_v]). Masked tokens are skipped: S is unchanged there (no write, no decay).
    R_i is the reverse-direction state built from tokens L-1 ... i+1 and carried to i:
    moving from token t + 1 to token t multiplies its rows by alpha_{t+1}, so a write
    decays, channel by channel, over the gates between key and query on either side.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    mask = np.asarray(mask)
    unit = lambda x: x / np.linalg.norm(x)
    batch, length, heads, dim = q.shape
    out = np.zeros_like(v)

    def alpha(b, t, h):  # [D]
        if t == length or not mask[b, t]:
            return np.ones(dim)
        f = k[b, t, h] @ params["alpha_w_HxDxD"][h] + params["dt_bias_HxD"][h]
        return np.exp(-np.exp(params["a_log_H"][h]) * _softplus(f))

    def write(S, b, t, h):  # S already decayed
        kt = unit(k[b, t, h])
        logit = k[b, t, h] @ params["beta_w_HxD"][h] + params["beta_b_H"][h]
        beta = 1 / (1 + np.exp(-logit))
        return (np.eye(dim) - beta * np.outer(kt, kt)) @ S + beta * np.outer(kt, v[b, t, h])

    for b in range(batch):
        for h in range(heads):
            read = lambda t, S: unit(q[b, t, h]) / np.sqrt(dim) @ S  # noqa: B023
            S = np.zeros((dim, dim))
            for t in range(length):
                if mask[b, t]:
                    S = write(np.diag(alpha(b, t, h)) @ S, b, t, h)
                    out[b, t, h] = read(t, S)
            if causal:
                continue
            R = np.zeros((dim, dim))
            for t in reversed(range(length)):
                R = np.diag(alpha(b, t + 1, h)) @ R
                if mask[b, t]:
                    out[b, t, h] += read(t, R)
                    R = write(R, b, t, h)
    return out


def _mask():
    """All real; one real token; random; right padded (7 real tokens)."""
    return edge_mask(B, L, seed=1).at[3].set(jnp.arange(L) < 7)


def _inputs(seed):
    """q, k, v with the keys' gate pre-activations spread out: per-channel decays from
    near 1 to near 0 in every head (the initial dt alone keeps them all near 1)."""
    q, k, v = random_qkv((B, L, H, D), seed=seed)
    return q, 2.0 * k, v


@functools.cache
def _grad_fn(causal, form):
    """(core, compiled (params, q, k, v, mask, weights) -> ((loss, out), grads)), built
    once per core, without XLA's backend optimisations (as mixer_checks.py: compiling is
    most of these tests' time, and they compare numbers, not speed)."""
    core = _core(causal=causal, form=form)
    core.dt_bias_HxD[...] = core.dt_bias_HxD[...] + 4.0  # faster decays: alpha in (0.01, 1)
    graphdef, params, rest = nnx.split(core, nnx.Param, ...)

    def loss(params, q, k, v, mask, weights):
        out = nnx.merge(graphdef, params, rest)(q, k, v, mask)
        return jnp.sum(out * weights), out

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))
    q = jnp.zeros((B, L, H, D), jnp.float32)
    compiled = fn.lower(params, q, q, q, _mask(), q).compile(QUICK_COMPILE)
    return core, compiled


def _loss_and_grads(causal, form, q, k, v, mask, weights):
    core, fn = _grad_fn(causal, form)
    (loss, out), grads = fn(nnx.state(core, nnx.Param), q, k, v, mask, weights)
    return loss, out, grads


def _weights(seed=9):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, L, H, D)), jnp.float32)


# --- forms against the reference; gradients ---------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_forms_match_reference_and_agree_in_gradients(causal):
    q, k, v = _inputs(seed=1)
    mask, weights = _mask(), _weights()
    real = np.asarray(mask)
    params = float64_params(_grad_fn(causal, "chunked")[0])
    alpha = np.exp(-np.exp(params["a_log_H"])[:, None] * _softplus(
        np.einsum("blhd,hde->blhe", np.asarray(k, np.float64), params["alpha_w_HxDxD"])
        + params["dt_bias_HxD"]))
    assert alpha[real].min() < 0.1 and alpha[real].max() > 0.9  # the decays really differ
    results = {form: _loss_and_grads(causal, form, q, k, v, mask, weights) for form in FORMS}
    expected = _reference(q, k, v, mask, params, causal)
    for _, out, _ in results.values():
        assert_close_relative(np.asarray(out)[real], expected[real])
    grads, grads_recurrent = results["chunked"][2], results["recurrent"][2]
    for grad, grad_recurrent in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_recurrent)):
        assert_close_relative(grad, grad_recurrent, rtol=1e-4)
    assert set(float64_by_name(grads[0])) == GATE_PARAMS


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_finite_differences_of_the_reference(causal):
    """JAX gradients of the chunked form, masked, against central differences of the
    float64 NumPy recurrence along random directions, for inputs and gate parameters."""
    q, k, v = _inputs(seed=11)
    mask, weights = _mask(), _weights(12)
    core = _grad_fn(causal, "chunked")[0]
    _, _, grads = _loss_and_grads(causal, "chunked", q, k, v, mask, weights)
    arrays = {"q": q, "k": k, "v": v}
    arrays = {**{n: np.asarray(x, np.float64) for n, x in arrays.items()}, **float64_params(core)}
    grads = {"q": grads[1], "k": grads[2], "v": grads[3], **float64_by_name(grads[0])}
    weights = np.asarray(weights, np.float64)

    def loss(a):
        params = {n: x for n, x in a.items() if n not in ("q", "k", "v")}
        return np.sum(_reference(a["q"], a["k"], a["v"], mask, params, causal) * weights)

    rng, eps = np.random.default_rng(13), 1e-6
    for name, x in arrays.items():
        direction = rng.normal(size=x.shape)
        plus, minus = ({**arrays, name: x + sign * eps * direction} for sign in (1, -1))
        numeric = (loss(plus) - loss(minus)) / (2 * eps)
        analytic = np.sum(np.asarray(grads[name], np.float64) * direction)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("form", FORMS)
def test_bidirectional_decay_is_symmetric_per_channel(form):
    """One key and value d tokens before the query, or d tokens after it, every other
    token empty, gates that do not depend on the key: both give
    o = beta D^-1/2 sum_c q[c] k[c] alpha[c]^d v, each channel decayed by its own gate
    over the d gates between them."""
    core = _core(causal=False, form=form)
    core.alpha_w_HxDxD[...] = jnp.zeros_like(core.alpha_w_HxDxD[...])
    core.beta_w_HxD[...] = jnp.zeros_like(core.beta_w_HxD[...])
    core.dt_bias_HxD[...] = jnp.linspace(-3.0, 2.0, H * D).reshape(H, D)
    params = float64_params(core)
    alpha_HxD = np.exp(-np.exp(params["a_log_H"])[:, None] * _softplus(params["dt_bias_HxD"]))
    assert alpha_HxD.min() < 0.01 and alpha_HxD.max() > 0.5
    beta_H = 1 / (1 + np.exp(-params["beta_b_H"]))
    rng = np.random.default_rng(14)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q_HxD, k_HxD, v_HxD = unit(rng.normal(size=(H, D))), unit(rng.normal(size=(H, D))), \
        rng.normal(size=(H, D))
    query = L // 2
    for distance in (1, 2, 4):
        scale_H = beta_H * np.sum(q_HxD * k_HxD * alpha_HxD**distance, -1) / np.sqrt(D)
        for key in (query - distance, query + distance):
            q, k, v = (np.zeros((1, L, H, D), np.float32) for _ in range(3))
            q[0, query], k[0, key], v[0, key] = q_HxD, k_HxD, v_HxD
            out = np.asarray(core(*map(jnp.asarray, (q, k, v)))[0, query], np.float64)
            np.testing.assert_allclose(out, scale_H[:, None] * v_HxD, rtol=1e-5, atol=1e-7)


# --- decoding, masks, causality ---------------------------------------------------------


def test_step_token_by_token_equals_causal_pass():
    """Against the chunked form, with short convolutions (their history in the state)."""
    core = _core(causal=True, short_conv=3)
    q, k, v = _inputs(seed=2)
    mask = edge_mask(B, L, seed=2)
    expected = core(q, k, v, mask)
    step = jax.jit(core.step)
    state, outputs = core.init_state(B), []
    for t in range(L):
        state, out = step(state, q[:, t], k[:, t], v[:, t], t, mask[:, t])
        outputs.append(out)
    assert state.S_BxHxDxD.shape == (B, H, D, D) and state.S_BxHxDxD.dtype == jnp.float32
    real = np.asarray(mask)
    assert_close_relative(np.asarray(jnp.stack(outputs, 1))[real], np.asarray(expected)[real])
    # bfloat16 inputs: cast to float32 inside (the same compiled core), bfloat16 out.
    low = core(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask)
    assert low.dtype == jnp.bfloat16
    assert_close_relative(np.asarray(low, np.float32)[real], np.asarray(expected)[real],
                          rtol=2e-2)


# The default options (the chunked form) run the whole mixer contract in both directions
# (tests/test_mixer_contract.py: 72 tokens, two chunks of 64); here the same contract
# with short convolutions, in the bidirectional chunked form with short chunks and in
# the causal recurrent form.
@pytest.mark.parametrize("form, causal", [("chunked", False), ("recurrent", True)])
def test_contract_with_short_chunks_and_short_convolutions(form, causal):
    """mixer_checks.py's contract, part by part, on the kda mixer: no leak from masked
    tokens (right padding and holes) in values or gradients, independent rows, no future
    leak when causal (else some output sees a later token), step = full pass when causal.

    Masked values may move real outputs by float noise only (atol 1e-6; the gradient
    check stays exact): with short convolutions the probe's one program, in which the
    plain pass is fused with its gradients and the perturbed pass is not, rounds the
    two apart by ~1e-7 (measured for gla and gated_deltanet too, not for this mixer
    jitted alone, where both inputs give identical real outputs).
    """
    mixer = make_mixer("kda", max_len=16, causal=causal, form=form, chunk_size=5,
                       short_conv=2)
    x, mask = random_x((4, 16, 8), seed=3), contract_mask(4, 16)
    result = probe(mixer, x, mask)
    check_shape_dtype_finite(result, x, mask)
    check_no_mask_values_leak(result, mask, atol=1e-6)
    check_rows_independent(result)
    check_no_mask_gradient_leak(result, mask)
    if causal:
        check_no_future_leak_in(result, mask)
        check_step_equals_full_pass(mixer, x, mask, full=result.out)
    else:
        check_sees_later_tokens(result, mask)


# --- numerics: long sequences, extreme gates, bounded state ------------------------------


def test_1k_tokens_finite_with_extreme_per_channel_gates_and_forms_agree():
    """Within each head, channels with alpha ~ 1 (log alpha ~ -1e-9), alpha ~ 0 (log alpha
    ~ -6e4) and channels whose gate swings between the two from token to token (a small
    decay right after a huge one: the chunked form must not take it as a difference of
    large cumulative sums)."""
    length, heads, dim = 1024, 2, 6
    cores = {form: make_core("kda", num_heads=heads, head_dim=dim, max_len=length,
                             causal=True, form=form) for form in FORMS}
    swing = np.zeros((dim, dim), np.float32)
    swing[:, 4:] = 10.0  # channels 4, 5: pre-activations ~ N(0, 10^2 |k|^2) per token
    for core in cores.values():
        core.beta_w_HxD[...] = jnp.zeros_like(core.beta_w_HxD[...])
        core.beta_b_H[...] = jnp.asarray([12.0, -12.0])  # beta ~ 1, beta ~ 0
        core.a_log_H[...] = jnp.asarray([8.0, 8.0])
        core.alpha_w_HxDxD[...] = jnp.broadcast_to(jnp.asarray(swing), (heads, dim, dim))
        core.dt_bias_HxD[...] = jnp.asarray([[-30.0, -30.0, 20.0, 20.0, 0.0, 0.0]] * heads)
    q, k, v = random_qkv((1, length, heads, dim), seed=6)
    log_alpha = np.asarray(cores["chunked"].log_alpha(k))
    assert log_alpha[..., 0].max() > -1e-9 and log_alpha[..., 2].max() < -1e4
    assert (log_alpha[..., 4] > -1e-3).any() and (log_alpha[..., 4] < -1e3).any()
    outputs = {}
    for form, core in cores.items():
        graphdef, state = nnx.split(core)
        run = jax.jit(lambda state, q, k, v: nnx.merge(graphdef, state)(q, k, v))  # noqa: B023
        outputs[form] = run.lower(state, q, k, v).compile(QUICK_COMPILE)(state, q, k, v)
    assert np.isfinite(np.asarray(outputs["chunked"])).all()
    assert_close_relative(outputs["chunked"], outputs["recurrent"], rtol=1e-4)


def test_state_stays_bounded_over_4k_steps():
    """`step` (the recurrent update) over 4096 random tokens, with the core's own gates
    and some channels that barely decay: Diag(alpha) only shrinks rows of S, and with
    unit keys and beta in (0, 1) the erase-and-write moves the value stored along k_t
    toward v_t (a convex combination), so |S| stays at the scale of the values."""
    steps, heads, dim = 4096, 2, 16
    core = make_core("kda", num_heads=heads, head_dim=dim, max_len=steps, causal=True)
    dt_bias = np.asarray(core.dt_bias_HxD[...]).copy()
    dt_bias[:, : dim // 2] = -30.0  # half the channels: alpha ~ 1
    core.dt_bias_HxD[...] = jnp.asarray(dt_bias)
    q, k, v = random_qkv((steps, 1, heads, dim), seed=8)
    graphdef, state = nnx.split(core)

    def body(S, xs):
        S, _ = nnx.merge(graphdef, state).step(S, *xs, 0)
        return S, jnp.linalg.norm(S.S_BxHxDxD, axis=(-2, -1))

    _, norms = jax.jit(lambda xs: jax.lax.scan(body, core.init_state(1), xs))((q, k, v))
    assert np.isfinite(np.asarray(norms)).all()
    assert float(norms.max()) < 2.0 * dim, float(norms.max())
    # Without the erase, the sum of k v^T over barely decaying channels grows instead.
    unit_k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    growth = jnp.einsum("tbhd,tbhe->hde", unit_k[..., : dim // 2], v)
    assert float(jnp.linalg.norm(growth, axis=(-2, -1)).min()) > 2.0 * dim


@pytest.mark.parametrize("causal", [True, False])
def test_chunk_strategies_agree_in_outputs_and_gradients(causal):
    """`batched` (all chunks' terms before the scan, delta.py's triangular inverse by
    recursive halving) equals `scan` (forward substitution per chunk), right padding
    included."""
    q, k, v = _inputs(seed=6)
    results = {strategy: outputs_and_input_grads(
        _core(causal=causal, chunk_strategy=strategy), q, k, v, _mask())
        for strategy in ("scan", "batched")}
    (out, grads), (out_scan, grads_scan) = results["batched"], results["scan"]
    assert_close_relative(out, out_scan)
    for grad, grad_scan in zip(grads, grads_scan):
        assert_close_relative(grad, grad_scan)


# --- options and registry ------------------------------------------------------------------


def test_options_parameters_and_dtype():
    assert attention.default_options("kda") == {"form": "chunked", "chunk_size": 64,
                                                "chunk_strategy": "auto", "short_conv": 0}
    core = _core(causal=False)
    shapes = {name: x.shape for name, x in float64_params(core).items()}
    assert shapes == {"beta_w_HxD": (H, D), "beta_b_H": (H,), "alpha_w_HxDxD": (H, D, D),
                      "dt_bias_HxD": (H, D), "a_log_H": (H,)}
    params = float64_params(core)
    assert np.all((np.exp(params["a_log_H"]) >= 1) & (np.exp(params["a_log_H"]) <= 16))
    dt = _softplus(params["dt_bias_HxD"])  # Mamba2's dt, one per key channel
    assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5)))
    with pytest.raises(ValueError, match="form"):
        make_core("kda", form="parallel")
