"""The delta-rule core: deltanet and gated_deltanet.

Each form must match a float64 NumPy token-by-token recurrence written from the papers'
equations (Schlag et al., 2021; Yang, Kautz & Hatamizadeh, 2025), in outputs, and the
forms must agree with each other in gradients (inputs and gate parameters); a finite-
difference check of the NumPy reference ties those gradients to the equations. `step`
must equal the causal pass; the recurrent form is exactly causal; the bidirectional
decay is symmetric; 16K tokens stay finite with gates near 0 or 1; the state stays
bounded. Masking happens before the forms (masked inputs are replaced by neutral
constants), so its exactness, in values and gradients, is the mixer contract's
(tests/test_mixer_contract.py), with the default form's causality across chunks. "Relative" tolerances are relative to the largest
magnitude of the expected array.
"""

import functools

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import (
    assert_close_relative,
    check_no_future_leak,
    edge_mask,
    float64_by_name,
    float64_params,
    make_core,
    pure,
    random_qkv,
)
from flax import nnx

from lra.models import attention
from lra.models.attention import delta

# One shape for every test, so compiled forms are shared; CPU compile time dominates.
B, L, H, D = 4, 11, 2, 7
CHUNK = 4  # 11 tokens: two full chunks and a padded one
NAMES = ("deltanet", "gated_deltanet")
FORMS = ("chunked", "recurrent")


def _core(name, *, causal, form="chunked", length=L, chunk_size=CHUNK, **options):
    return make_core(name, num_heads=H, head_dim=D, max_len=length, causal=causal,
                     form=form, chunk_size=chunk_size, **options)


# --- the reference: the papers' recurrence, float64, token by token -------------------


def _reference(q, k, v, mask, params, causal):
    """o_i = q_i S_i (+ q_i R_i if bidirectional), float64, token by token.

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T with S [D_k, D_v],
    q, k unit vectors, b_t = sigmoid(w_b . k_raw + b_b); a_t = exp(-exp(a_log) *
    softplus(w_a . k_raw + dt_bias)) for the gated rule, else 1: a_t is the decay
    between tokens t - 1 and t. Masked tokens are skipped (the state is unchanged
    there, a = 1). R_i is the reverse-direction state built from tokens L-1 ... i+1 and
    carried to i: moving from token t + 1 to token t multiplies it by a_{t+1}, so a
    write decays over the gates between key and query on either side (Gated DeltaNet's
    decay, made symmetric as the gated cores' bidirectional form).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    mask = np.asarray(mask)
    unit = lambda x: x / np.linalg.norm(x)
    batch, length, heads, dim = q.shape
    out = np.zeros_like(v)

    def alpha(b, t, h):
        if "a_log_H" not in params or t == length or not mask[b, t]:
            return 1.0
        dt = np.logaddexp(0.0, k[b, t, h] @ params["alpha_w_HxD"][h] + params["dt_bias_H"][h])
        return np.exp(-np.exp(params["a_log_H"][h]) * dt)

    def write(S, b, t, h):
        kt = unit(k[b, t, h])
        beta = 1 / (1 + np.exp(-(k[b, t, h] @ params["beta_w_HxD"][h] + params["beta_b_H"][h])))
        return (np.eye(dim) - beta * np.outer(kt, kt)) @ S + beta * np.outer(kt, v[b, t, h])

    for b in range(batch):
        for h in range(heads):
            S = np.zeros((dim, dim))
            for t in range(length):
                if mask[b, t]:
                    S = write(alpha(b, t, h) * S, b, t, h)
                    out[b, t, h] = unit(q[b, t, h]) @ S
            if causal:
                continue
            R = np.zeros((dim, dim))
            for t in reversed(range(length)):
                R = alpha(b, t + 1, h) * R
                if mask[b, t]:
                    out[b, t, h] += unit(q[b, t, h]) @ R
                    R = write(R, b, t, h)
    return out


def _mask():
    """All real; one real token; random; right padded (8 real tokens)."""
    return edge_mask(B, L, seed=1).at[3].set(jnp.arange(L) < 8)


@functools.cache
def _grad_fn(name, causal, form):
    """(core, jitted (params, q, k, v, mask, weights) -> ((loss, out), grads)), built once."""
    core = _core(name, causal=causal, form=form)
    graphdef, params, rest = nnx.split(core, nnx.Param, ...)

    def loss(params, q, k, v, mask, weights):
        out = nnx.merge(graphdef, params, rest)(q, k, v, mask)
        return jnp.sum(out * weights), out

    return core, jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))


def _loss_and_grads(name, causal, form, q, k, v, mask, weights):
    core, fn = _grad_fn(name, causal, form)
    (loss, out), grads = fn(nnx.state(core, nnx.Param), q, k, v, mask, weights)
    return loss, out, grads


def _weights(seed=9):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, L, H, D)), jnp.float32)


# --- forms against the reference; gradients ---------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_forms_match_reference_and_agree_in_gradients(name, causal):
    q, k, v = random_qkv((B, L, H, D), seed=1)
    mask, weights = _mask(), _weights()
    real = np.asarray(mask)
    results = {form: _loss_and_grads(name, causal, form, q, k, v, mask, weights) for form in FORMS}
    expected = _reference(q, k, v, mask, float64_params(_grad_fn(name, causal, "chunked")[0]), causal)
    for form, (_, out, _) in results.items():
        assert_close_relative(np.asarray(out)[real], expected[real])
    grads, grads_recurrent = results["chunked"][2], results["recurrent"][2]
    for grad, grad_recurrent in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_recurrent)):
        assert_close_relative(grad, grad_recurrent, rtol=1e-4)
    assert len(jax.tree.leaves(grads[0])) == (5 if name == "gated_deltanet" else 2)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_finite_differences_of_the_reference(causal):
    """JAX gradients of the chunked gated form, masked, against central differences of
    the float64 NumPy recurrence along random directions, for inputs and parameters."""
    q, k, v = random_qkv((B, L, H, D), seed=11)
    mask, weights = _mask(), _weights(12)
    core = _grad_fn("gated_deltanet", causal, "chunked")[0]
    _, _, grads = _loss_and_grads("gated_deltanet", causal, "chunked", q, k, v, mask, weights)
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
def test_bidirectional_decay_is_symmetric(form):
    """One key and value d tokens before the query, or d tokens after it, every other
    token empty (zero key and value), gates that do not depend on the key: both give
    o = alpha^d beta (q . k) v, alpha^d the decay over the d gates between them."""
    core = _core("gated_deltanet", causal=False, form=form)
    core.alpha_w_HxD[...] = jnp.zeros_like(core.alpha_w_HxD[...])  # alpha: one per head
    core.beta_w_HxD[...] = jnp.zeros_like(core.beta_w_HxD[...])
    params = float64_params(core)
    alpha_H = np.exp(-np.exp(params["a_log_H"]) * np.logaddexp(0.0, params["dt_bias_H"]))
    beta_H = 1 / (1 + np.exp(-params["beta_b_H"]))
    rng = np.random.default_rng(14)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q_HxD, k_HxD, v_HxD = unit(rng.normal(size=(H, D))), unit(rng.normal(size=(H, D))), \
        rng.normal(size=(H, D))
    query = L // 2
    for distance in (1, 2, 4):
        outputs = []
        for key in (query - distance, query + distance):
            q, k, v = (np.zeros((1, L, H, D), np.float32) for _ in range(3))
            q[0, query], k[0, key], v[0, key] = q_HxD, k_HxD, v_HxD
            outputs.append(np.asarray(core(*map(jnp.asarray, (q, k, v)))[0, query], np.float64))
        scale_H = alpha_H**distance * beta_H * np.sum(q_HxD * k_HxD, -1)
        for out in outputs:
            np.testing.assert_allclose(out, scale_H[:, None] * v_HxD, rtol=1e-5, atol=1e-7)


# --- decoding, masks, causality ---------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_token_by_token_equals_causal_pass(name):
    core = _core(name, causal=True)
    q, k, v = random_qkv((B, L, H, D), seed=2)
    mask = edge_mask(B, L, seed=2)
    expected = core(q, k, v, mask)
    step = jax.jit(core.step)
    state, outputs = core.init_state(B), []
    for t in range(L):
        state, out = step(state, q[:, t], k[:, t], v[:, t], t, mask[:, t])
        outputs.append(out)
    assert state.S_BxHxDxD.shape == (B, H, D, D) and state.S_BxHxDxD.dtype == jnp.float32
    assert_close_relative(jnp.stack(outputs, 1), expected)


# The default (chunked) form's causality across chunks is the mixer contract's.
@pytest.mark.parametrize("name, form", [("deltanet", "recurrent")])
def test_causal_output_never_depends_on_later_tokens(name, form):
    core = _core(name, causal=True, form=form)
    q, k, v = random_qkv((B, L, H, D), seed=4)
    check_no_future_leak(core, q, k, v, edge_mask(B, L, seed=4))
    later = (jnp.arange(L) > 5)[None, :, None, None]
    out = core(q, k, v)
    out_changed = core(*(jnp.where(later, 50.0 * x[:, ::-1], x) for x in (q, k, v)))
    np.testing.assert_array_equal(np.asarray(out_changed)[:, :6], np.asarray(out)[:, :6])


# --- numerics: long sequences, extreme gates, bounded state ------------------------------


# Per head (gates are per head): beta ~ 1 and alpha ~ 1; beta ~ 0 and alpha ~ 0
# (log alpha ~ -6e4 a token); beta ~ 1 and alpha ~ 0.
EXTREME_GATES = {"beta_b_H": [12.0, -12.0, 12.0], "a_log_H": [-20.0, 8.0, 8.0],
                 "dt_bias_H": [-10.0, 20.0, 20.0]}


@pytest.mark.parametrize("name", NAMES)
def test_16k_tokens_finite_with_extreme_gates_and_forms_agree(name):
    length, heads, dim = 16_384, 3, 8
    cores = {form: make_core(name, num_heads=heads, head_dim=dim, max_len=length, causal=True,
                             form=form) for form in FORMS}
    for core in cores.values():
        core.beta_w_HxD[...] = jnp.zeros_like(core.beta_w_HxD[...])
        for param, values in EXTREME_GATES.items():
            if hasattr(core, param):
                getattr(core, param)[...] = jnp.asarray(values, jnp.float32)
    q, k, v = random_qkv((1, length, heads, dim), seed=6)
    # Eager calls: the core computes in float32, so both dtypes share one compiled form.
    out_low = cores["chunked"](*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out_low.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out_low, np.float32)).all()
    out = cores["chunked"](q, k, v)
    assert_close_relative(out, cores["recurrent"](q, k, v), rtol=1e-4)


@pytest.mark.parametrize("log_alpha", [None, -0.01])
def test_state_stays_bounded_over_4k_steps(log_alpha):
    """Unit keys and beta in (0, 1): every eigenvalue of I - beta k k^T is in [0, 1]."""
    steps, dim = 4096, 16
    rng = np.random.default_rng(8)
    k = rng.normal(size=(steps, 1, 1, dim))
    k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.float32)
    v = jnp.asarray(rng.normal(size=(steps, 1, 1, dim)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.01, 0.99, (steps, 1, 1)), jnp.float32)
    gate = None if log_alpha is None else jnp.full((steps, 1, 1), log_alpha, jnp.float32)

    def body(S, xs):
        S = delta.delta_update(S, *xs)
        return S, jnp.linalg.norm(S)

    xs = (k, v, beta, gate)
    _, norms = jax.jit(lambda xs: jax.lax.scan(body, jnp.zeros((1, 1, dim, dim)), xs))(xs)
    # Along k_t the stored value moves toward v_t (a convex combination), the rest of
    # S is unchanged: |S| stays at the scale of the values, sqrt(dim) * |v| ~ dim.
    assert float(norms.max()) < 2.0 * dim, float(norms.max())
    # Linear attention's sum of k v^T grows like sqrt(steps) instead.
    assert float(jnp.linalg.norm(jnp.einsum("tbhd,tbhe->de", k, v))) > 4.0 * dim


# --- chunk strategies, the triangular inverse, bfloat16 -------------------------------------


def _strategy_outputs_and_grads(core, q, k, v, mask):
    """(output, (dq, dk, dv)) of sum(output * fixed weights), compiled at a low XLA
    optimisation level (compile time dominates on the CPU)."""
    apply = pure(core, mask)
    weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        out = apply(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    (_, out), grads = fn.lower(q, k, v).compile({"xla_backend_optimization_level": 0})(q, k, v)
    return out, grads


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_chunk_strategies_agree_in_outputs_and_gradients(name, causal):
    """`batched` (terms of all chunks before the scan, the inverse by recursive halving)
    equals `scan` (forward substitution per chunk), with right padding and a padded last
    chunk of a chunk size that is not a power of two."""
    q, k, v = random_qkv((B, L, H, D), seed=4)
    results = {strategy: _strategy_outputs_and_grads(
        _core(name, causal=causal, chunk_size=3, chunk_strategy=strategy), q, k, v, _mask())
        for strategy in ("scan", "batched")}
    (out, grads), (out_scan, grads_scan) = results["batched"], results["scan"]
    assert_close_relative(out, out_scan)
    for grad, grad_scan in zip(grads, grads_scan):
        assert_close_relative(grad, grad_scan)


def _realistic_N(size, *, batch=8, dim=16, seed=0):
    """beta K K^T below the diagonal, unit keys sharing a direction (entries near 1)."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(batch, 1, dim)) + 0.5 * rng.normal(size=(batch, size, dim))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = rng.uniform(size=(batch, size, 1))
    return np.tril(beta * (k @ np.swapaxes(k, -1, -2)), -1).astype(np.float32)


@pytest.mark.parametrize("size", [64, 12])
def test_unit_lower_inverse_matches_solve_and_its_gradient_the_textbook_one(size):
    N_xCxC = _realistic_N(size)
    identity = np.broadcast_to(np.eye(size, dtype=np.float32), N_xCxC.shape)
    inverse = np.asarray(delta.unit_lower_inverse(N_xCxC + np.triu(np.ones((size, size)))))
    assert_close_relative(inverse, delta.unit_lower_solve(N_xCxC, identity))
    A_xCxC = np.eye(size) + N_xCxC.astype(np.float64)
    assert_close_relative(inverse, np.linalg.inv(A_xCxC))
    # d/dN of sum(G * A^-1) = tril(-A^-T G A^-T, -1), from solve_triangular in float32
    G_xCxC = np.random.default_rng(1).normal(size=N_xCxC.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda N: jnp.sum(G_xCxC * delta.unit_lower_inverse(N))))(N_xCxC)
    A32 = jnp.asarray(A_xCxC, jnp.float32)
    solve = lambda B, trans: jax.scipy.linalg.solve_triangular(A32, B, lower=True, trans=trans)
    AtG_xCxC = solve(G_xCxC, 1)  # A^-T G
    AtGAt_xCxC = jnp.swapaxes(solve(jnp.swapaxes(AtG_xCxC, -1, -2), 0), -1, -2)  # A^-T G A^-T
    expected = -np.tril(AtGAt_xCxC, -1)
    assert_close_relative(grad, expected, 1e-4)


def test_unit_lower_inverse_gradient_matches_finite_differences():
    N_xCxC = _realistic_N(6, batch=2, dim=4, seed=2)
    jax.test_util.check_grads(delta.unit_lower_inverse, (N_xCxC,), order=1, modes=["rev"],
                              atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("strategy", ["scan", "batched"])
def test_bfloat16_inputs_close_to_float32(strategy):
    """bfloat16 q, k, v (float32 state and accumulation): bfloat16-sized differences."""
    q, k, v = random_qkv((B, L, H, D), seed=5)
    core = _core("gated_deltanet", causal=False, chunk_size=3, chunk_strategy=strategy)
    expected = core(q, k, v, _mask())
    low = core(*(x.astype(jnp.bfloat16) for x in (q, k, v)), _mask())
    assert low.dtype == jnp.bfloat16
    assert_close_relative(np.asarray(low, np.float32), expected, 2e-2)


def test_auto_chunk_strategy_and_bad_value():
    expected = "scan" if jax.default_backend() == "cpu" else "batched"
    assert delta.resolve_chunk_strategy("auto") == expected
    assert _core("deltanet", causal=True).chunk_strategy == "auto"
    with pytest.raises(ValueError, match="chunk_strategy.*'auto'.*'scan'.*'batched'"):
        make_core("deltanet", chunk_strategy="loop")


# --- options and registry ------------------------------------------------------------------


def test_options_and_defaults():
    for name in NAMES:
        assert attention.default_options(name) == {"form": "chunked", "chunk_size": 64,
                                                   "chunk_strategy": "auto", "short_conv": 0}


@pytest.mark.parametrize(
    "options, setting",
    [({"form": "parallel"}, "form.*'chunked'.*'recurrent'"), ({"chunk_size": 0}, "chunk_size")],
)
def test_bad_options_raise(options, setting):
    with pytest.raises(ValueError, match=setting):
        make_core("gated_deltanet", **options)


def test_step_needs_causal():
    core = make_core("deltanet")
    x = jnp.ones((1, 2, 4))
    with pytest.raises(ValueError, match="causal=True"):
        core.step(core.init_state(1), x, x, x, 0)


def test_unit_lower_solve_matches_numpy_and_finite_differences():
    rng = np.random.default_rng(0)
    N_xCxC = rng.normal(size=(4, 2, 8, 8)).astype(np.float32) * 0.5
    R_xCxE = rng.normal(size=(4, 2, 8, 3)).astype(np.float32)
    A_xCxC = np.eye(8) + np.tril(N_xCxC, -1).astype(np.float64)  # entries on/above: ignored
    np.testing.assert_allclose(delta.unit_lower_solve(N_xCxC, R_xCxE),
                               np.linalg.solve(A_xCxC, R_xCxE), rtol=1e-4, atol=1e-5)
    jax.test_util.check_grads(delta.unit_lower_solve, (N_xCxC[0, 0], R_xCxE[0, 0]), order=1,
                              modes=["rev"], atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (the CPU test setup's)")
def test_unit_lower_solve_gradient_on_a_batch_sharded_over_the_devices():
    """jax.scipy's batched triangular solve deadlocked here on 4 CPU devices."""
    mesh = jax.make_mesh((4,), ("data",))
    rng = np.random.default_rng(1)
    N_xCxC = rng.normal(size=(8, 16, 16)).astype(np.float32) * 0.3
    R_xCxE = rng.normal(size=(8, 16, 4)).astype(np.float32)
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    loss = lambda N, R: jnp.sum(delta.unit_lower_solve(N, R) ** 2)
    grads = jax.jit(jax.grad(loss, (0, 1)))(*(jax.device_put(x, sharded) for x in (N_xCxC, R_xCxE)))
    A_xCxC = np.eye(16) + np.tril(N_xCxC, -1).astype(np.float64)
    X_xCxE = np.linalg.solve(A_xCxC, R_xCxE)
    dR_xCxE = np.linalg.solve(np.swapaxes(A_xCxC, -1, -2), 2 * X_xCxE)  # A^-T dL/dX
    np.testing.assert_allclose(grads[1], dR_xCxE, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(grads[0], -np.tril(dR_xCxE @ np.swapaxes(X_xCxE, -1, -2), -1),
                               rtol=1e-3, atol=1e-4)
