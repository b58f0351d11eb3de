"""Gated DeltaProduct (gated_deltaproduct): n_h delta-rule steps per token.

Each form must match a float64 NumPy loop written here from the paper's equations
(S_{t,0} = alpha_t S_{t-1}; S_{t,j} = (I - beta_{t,j} k_{t,j} k_{t,j}^T) S_{t,j-1} +
beta_{t,j} k_{t,j} v_{t,j}^T for j = 1..n_h; o_t = q_t S_{t,n_h} with q scaled by D^-1/2),
token by token with the n_h steps inside, causal and bidirectional (the reverse pass:
each token's steps in reverse order, gates shifted by one token), with masks, in
outputs; the forms must agree in gradients. n_h = 1 (beta in (0, 1)) must be
`gated_deltanet` with the same parameters (times D^-1/2, its q is not scaled). `step`
must equal the causal pass (with short convolutions); masks leak nothing and the causal
form sees no later token (the shared mixer contract, with short chunks and short
convolutions; tests/test_mixer_contract.py runs it with the defaults); the state stays
bounded over 4096 steps with beta in (0, 2). "Relative" tolerances are relative to the
largest magnitude of the expected array.
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
NH = 3  # Householder steps per token: 33 expanded positions
CHUNK = 4  # expanded positions per chunk: chunks split tokens' steps
FORMS = ("chunked", "recurrent")
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def _core(*, causal, form="chunked", num_householder=NH, **options):
    return make_core("gated_deltaproduct", num_heads=H, head_dim=D, max_len=L, causal=causal,
                     form=form, chunk_size=CHUNK, num_householder=num_householder, **options)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _reference(q, k, v, mask, p, causal, num_householder=NH, neg_eigval=True):
    """The paper's recurrence, float64, token by token, n_h steps per token.

    Per head h, from the raw key k_t and value v_t: step j's key and value are k_t, v_t
    for j = 1 and k_t W_k[h, j], v_t W_v[h, j] after; beta_{t,j} = sigmoid(k_t . w_b[h, j]
    + b_b[h, j]) (x 2 with negative eigenvalues); alpha_t = exp(-exp(a_log) softplus(
    k_t . w_a + dt_bias)); keys and q unit vectors, q then scaled by D^-1/2. Masked
    tokens are skipped (no write, no decay). Bidirectional: R, built from tokens L-1 ...
    t+1, is multiplied by alpha_{t+1} when moving to token t, read by q_t, then takes
    token t's steps in the order n_h, ..., 1.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    mask = np.asarray(mask)
    unit = lambda x: x / np.linalg.norm(x)
    batch, length, heads, dim = q.shape
    out = np.zeros_like(v)

    def alpha(b, t, h):
        if t == length or not mask[b, t]:
            return 1.0
        a = k[b, t, h] @ p["alpha_w_HxD"][h] + p["dt_bias_H"][h]
        return np.exp(-np.exp(p["a_log_H"][h]) * _softplus(a))

    def step(S, b, t, h, j):
        if j == 0:
            kj, vj = k[b, t, h], v[b, t, h]
            logit = k[b, t, h] @ p["beta_w_HxD"][h] + p["beta_b_H"][h]
        else:
            kj, vj = k[b, t, h] @ p["key_w_HxNxDxD"][h, j - 1], \
                v[b, t, h] @ p["value_w_HxNxDxD"][h, j - 1]
            logit = k[b, t, h] @ p["beta_w_HxNxD"][h, j - 1] + p["beta_b_HxN"][h, j - 1]
        beta = (2.0 if neg_eigval else 1.0) / (1 + np.exp(-logit))
        kj = unit(kj)
        return (np.eye(dim) - beta * np.outer(kj, kj)) @ S + beta * np.outer(kj, vj)

    for b in range(batch):
        for h in range(heads):
            read = lambda t, S: unit(q[b, t, h]) / np.sqrt(dim) @ S  # noqa: B023
            S = np.zeros((dim, dim))
            for t in range(length):
                if mask[b, t]:
                    S = alpha(b, t, h) * S
                    for j in range(num_householder):
                        S = step(S, b, t, h, j)
                    out[b, t, h] = read(t, S)
            if causal:
                continue
            R = np.zeros((dim, dim))
            for t in reversed(range(length)):
                R = alpha(b, t + 1, h) * R
                if mask[b, t]:
                    out[b, t, h] += read(t, R)
                    for j in reversed(range(num_householder)):
                        R = step(R, b, t, h, j)
    return out


def _mask():
    """All real; one real token; random; right padded (7 real tokens)."""
    return edge_mask(B, L, seed=1).at[3].set(jnp.arange(L) < 7)


def _inputs(seed):
    q, k, v = random_qkv((B, L, H, D), seed=seed)
    return q, 2.0 * k, v


def _weights(seed=9):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, L, H, D)), jnp.float32)


@functools.cache
def _grad_fn(causal, form):
    """(core, compiled (params, q, k, v, mask, weights) -> ((loss, out), grads))."""
    core = _core(causal=causal, form=form)
    core.dt_bias_H[...] = core.dt_bias_H[...] + 4.0  # faster decays
    graphdef, params, rest = nnx.split(core, nnx.Param, ...)

    def loss(params, q, k, v, mask, weights):
        out = nnx.merge(graphdef, params, rest)(q, k, v, mask)
        return jnp.sum(out * weights), out

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))
    q = jnp.zeros((B, L, H, D), jnp.float32)
    return core, fn.lower(params, q, q, q, _mask(), q).compile(QUICK_COMPILE)


@pytest.mark.parametrize("causal", [True, False])
def test_forms_match_reference_and_agree_in_gradients(causal):
    q, k, v = _inputs(seed=1)
    mask, weights = _mask(), _weights()
    real = np.asarray(mask)
    results = {}
    for form in FORMS:
        core, fn = _grad_fn(causal, form)
        results[form] = fn(nnx.state(core, nnx.Param), q, k, v, mask, weights)
    params = float64_params(_grad_fn(causal, "chunked")[0])
    expected = _reference(q, k, v, mask, params, causal)
    for (_, out), _ in results.values():
        assert_close_relative(np.asarray(out)[real], expected[real])
    grads, grads_recurrent = results["chunked"][1], results["recurrent"][1]
    for grad, grad_recurrent in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_recurrent)):
        assert_close_relative(grad, grad_recurrent, rtol=1e-4)
    assert set(float64_by_name(grads[0])) == set(params)  # every parameter gets a gradient
    assert all(np.abs(g).max() > 0 for g in float64_by_name(grads[0]).values())


@pytest.mark.parametrize("causal", [True, False])
def test_one_householder_step_is_gated_deltanet(causal):
    """n_h = 1, beta in (0, 1): the parameters are gated_deltanet's, and with the same
    values the output is gated_deltanet's times D^-1/2 (the q scale)."""
    core = _core(causal=causal, num_householder=1, allow_neg_eigval=False)
    other = make_core("gated_deltanet", num_heads=H, head_dim=D, max_len=L, causal=causal,
                      chunk_size=CHUNK, seed=5)
    assert set(float64_params(core)) == set(float64_params(other))
    nnx.update(core, nnx.state(other, nnx.Param))
    q, k, v = _inputs(seed=3)
    mask, real = _mask(), np.asarray(_mask())
    expected = np.asarray(other(q, k, v, mask)) * D**-0.5
    assert_close_relative(np.asarray(core(q, k, v, mask))[real], expected[real])


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
    with pytest.raises(ValueError, match="causal"):
        _core(causal=False).step(core.init_state(B), q[:, 0], k[:, 0], v[:, 0], 0)


@pytest.mark.parametrize("form, causal", [("chunked", False), ("recurrent", True)])
def test_contract_with_short_chunks_and_short_convolutions(form, causal):
    """mixer_checks.py's contract, part by part (as tests/test_kda.py; masked values may
    move real outputs by float noise only, atol 1e-6, with short convolutions)."""
    mixer = make_mixer("gated_deltaproduct", max_len=16, causal=causal, form=form,
                       chunk_size=5, short_conv=2)
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


@pytest.mark.parametrize("causal", [True, False])
def test_chunk_strategies_agree_in_outputs_and_gradients(causal):
    """`batched` (all chunks' terms before the scan, delta.py's triangular inverse by
    recursive halving) equals `scan` (forward substitution per chunk), right padding
    included; chunks split tokens' steps."""
    q, k, v = _inputs(seed=6)
    results = {strategy: outputs_and_input_grads(
        _core(causal=causal, chunk_strategy=strategy), q, k, v, _mask())
        for strategy in ("scan", "batched")}
    (out, grads), (out_scan, grads_scan) = results["batched"], results["scan"]
    assert_close_relative(out, out_scan)
    for grad, grad_scan in zip(grads, grads_scan):
        assert_close_relative(grad, grad_scan)


def test_state_stays_bounded_over_4k_steps():
    """`step` over 4096 random tokens, beta in (0, 2), decays that barely act: each step
    maps the value stored along the unit key k to (1 - beta) (k S) + beta v with
    |1 - beta| < 1, so |S| stays at the scale of the values."""
    steps, heads, dim = 4096, 2, 16
    core = make_core("gated_deltaproduct", num_heads=heads, head_dim=dim, max_len=steps,
                     causal=True)
    core.dt_bias_H[...] = jnp.full((heads,), -30.0)  # alpha ~ 1
    q, k, v = random_qkv((steps, 1, heads, dim), seed=8)
    graphdef, state = nnx.split(core)

    def body(S, xs):
        S, _ = nnx.merge(graphdef, state).step(S, *xs, 0)
        return S, jnp.linalg.norm(S.S_BxHxDxD, axis=(-2, -1))

    _, norms = jax.jit(lambda xs: jax.lax.scan(body, core.init_state(1), xs))((q, k, v))
    assert np.isfinite(np.asarray(norms)).all()
    assert float(norms.max()) < 4.0 * dim, float(norms.max())


def test_options_parameters_and_dtype():
    assert attention.default_options("gated_deltaproduct") == {
        "num_householder": 2, "allow_neg_eigval": True, "form": "chunked", "chunk_size": 64,
        "chunk_strategy": "auto", "short_conv": 0}
    core = _core(causal=False)
    shapes = {name: x.shape for name, x in float64_params(core).items()}
    assert shapes == {"beta_w_HxD": (H, D), "beta_b_H": (H,), "alpha_w_HxD": (H, D),
                      "dt_bias_H": (H,), "a_log_H": (H,), "beta_w_HxNxD": (H, NH - 1, D),
                      "beta_b_HxN": (H, NH - 1), "key_w_HxNxDxD": (H, NH - 1, D, D),
                      "value_w_HxNxDxD": (H, NH - 1, D, D)}
    q, k, v = _inputs(seed=4)
    low = core(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert low.dtype == jnp.bfloat16 and np.isfinite(np.asarray(low, np.float32)).all()
    for bad in ({"num_householder": 0}, {"allow_neg_eigval": "yes"}, {"form": "parallel"}):
        with pytest.raises(ValueError):
            make_core("gated_deltaproduct", **bad)
