"""FoX (Forgetting Attention, Lin et al., 2025): lra/models/attention/fox.py.

Both forms, causal and bidirectional, must match a float64 NumPy reference written here
from the paper's equation (explicit loops: the forget gate of every token from its raw
key, the decay of each query-key pair as a sum of log gates, a softmax per query), with
right padding; the blockwise form's gradients (inputs and gate parameters) must equal
the quadratic form's. With every gate at 1 the core is lra's softmax core. The blockwise
form's compiled memory grows about linearly with L, the quadratic form's about 4x per
doubling (XLA's memory analysis; compiled, never run). The shared checks (contract, no
mask leak with holes in the mask, no future leak) run on both forms. "Relative"
tolerances are relative to the largest magnitude of the expected array.
"""

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
    make_core,
    prefix_mask,
    pure,
    random_qkv,
)
from flax import nnx

from lra.bench.flops import compiled_peak
from lra.models import attention, mixers

# One shape for every test, so compiled forms are shared (`_Compiled`). Blocks of 4 keys
# and 8 queries: 13 tokens make 4 key blocks (the last padded) and 2 query blocks (padded).
B, L, H, D = 4, 13, 2, 4
CHUNK, QUERY_CHUNK = 4, 8
LENGTHS = (13, 7, 1, 10)  # right padding: full, about half, one real token, most
FORMS = ("blockwise", "quadratic")


def _apply(graphdef, state, q, k, v, mask, deterministic):
    return nnx.merge(graphdef, state, copy=True)(q, k, v, mask, deterministic=deterministic)


# Compiled once per core structure (graphdef) and input shapes; parameters are arguments.
_apply_jit = jax.jit(_apply, static_argnums=(0, 6))


class _Compiled(nnx.Module):
    """`core` with its forward pass compiled (`_apply_jit`), for the shared checks: they
    call a core eagerly, once per position for causality, and eagerly the blockwise
    form's scans are traced and compiled anew on every call (measured: 60 s for the
    future-leak check of 13 positions)."""

    def __init__(self, core):
        self.core = core

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        graphdef, state = nnx.split(self.core)
        return _apply_jit(graphdef, state, q, k, v, mask, deterministic)


def _core(*, causal, form="blockwise", gates="varied", **options):
    """A fox core with small blocks; `gates`: "varied" (gates spread over (0.08, 0.99), so
    the decay matters) or "one" (every gate 1 up to float32 rounding: log f ~ -4e-44)."""
    core = make_core("fox", num_heads=H, head_dim=D, max_len=L, causal=causal, form=form,
                     chunk_size=CHUNK, query_chunk_size=QUERY_CHUNK, **options)
    if gates == "varied":
        rng = np.random.default_rng(11)
        core.forget_w_HxD[...] = jnp.asarray(rng.normal(size=(H, D)) * 0.7, jnp.float32)
        core.forget_b_H[...] = jnp.asarray([1.5, -0.5], jnp.float32)
    else:
        core.forget_w_HxD[...] = jnp.zeros((H, D), jnp.float32)
        core.forget_b_H[...] = jnp.full((H,), 100.0, jnp.float32)
    return _Compiled(core)


def _gate_params(core):
    return (np.asarray(core.core.forget_w_HxD[...], np.float64),
            np.asarray(core.core.forget_b_H[...], np.float64))


# --- the reference: the paper's equation, float64, explicit loops ----------------------


def _reference(q, k, v, mask, w_HxD, b_H, causal):
    """o_i = sum_j softmax_j(q_i . k_j / sqrt(D) + d_ij) v_j over real (earlier) keys j.

    f_t = sigmoid(k_t . w_h + b_h) per head from the raw key, log f_t = 0 at masked t;
    d_ij = sum of log f_l for l in (min(i, j), max(i, j)] (causal: only j <= i, so
    l = j+1..i as in the paper). NaN rows where a query has no allowed key.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    mask = np.asarray(mask, bool)
    batch, length, heads, dim = q.shape
    out = np.full(q.shape, np.nan)
    for b in range(batch):
        for h in range(heads):
            log_f = np.zeros(length)
            for t in range(length):
                if mask[b, t]:
                    log_f[t] = -np.logaddexp(0.0, -(k[b, t, h] @ w_HxD[h] + b_H[h]))
            for i in range(length):
                logits = np.full(length, -np.inf)
                for j in range(length):
                    if not mask[b, j] or (causal and j > i):
                        continue
                    decay = sum(log_f[l] for l in range(min(i, j) + 1, max(i, j) + 1))
                    logits[j] = q[b, i, h] @ k[b, j, h] / np.sqrt(dim) + decay
                if np.isinf(logits).all():
                    continue
                weights = np.exp(logits - logits.max())
                out[b, i, h] = (weights / weights.sum()) @ v[b, :, h]
    return out


def test_reference_is_the_paper_equation_on_a_hand_example():
    """One head, 3 tokens, q = 0: the weights are the decays alone. Causal, the last query
    weighs keys 0, 1, 2 by f1 f2, f2, 1; bidirectional, the first query weighs them by 1,
    f1, f1 f2 (gates over (min, max])."""
    f = np.array([0.3, 0.5, 0.25])
    q = np.zeros((1, 3, 1, 3))
    v = np.eye(3)[None, :, None, :]  # the output is the weights
    k = np.zeros((1, 3, 1, 3))  # the gate logit k_t . w + b = logit(f_t): w = e_0, b = 0
    k[0, :, 0, 0] = np.log(f / (1 - f))
    w_HxD, zero_b = np.array([[1.0, 0.0, 0.0]]), np.zeros(1)
    mask = np.ones((1, 3), bool)
    causal = _reference(q, k, v, mask, w_HxD, zero_b, causal=True)[0, 2, 0]
    np.testing.assert_allclose(causal, np.array([f[1] * f[2], f[2], 1]) / (f[1] * f[2] + f[2] + 1))
    bidirectional = _reference(q, k, v, mask, w_HxD, zero_b, causal=False)[0, 0, 0]
    np.testing.assert_allclose(bidirectional, np.array([1, f[1], f[1] * f[2]]) / (1 + f[1] + f[1] * f[2]))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_matches_numpy_reference_with_right_padding(form, causal):
    q, k, v = random_qkv((B, L, H, D), seed=1)
    mask = prefix_mask(LENGTHS, L)
    core = _core(causal=causal, form=form)
    out = np.asarray(core(q, k, v, mask))
    expected = _reference(q, k, v, mask, *_gate_params(core), causal)
    real = np.asarray(mask)
    assert_close_relative(out[real], expected[real], rtol=1e-5)
    # the decay matters here: plain softmax attention is far from it
    plain = np.asarray(make_core("softmax", num_heads=H, head_dim=D, max_len=L,
                                 causal=causal)(q, k, v, mask))
    assert np.abs(plain[real] - expected[real]).max() > 0.05


def _outputs_and_grads(core, q, k, v, mask):
    """Output and the gradients of sum(output * fixed weights) with respect to q, k, v
    and the gate parameters (w, b)."""
    graphdef, params, rest = nnx.split(core.core, nnx.Param, ...)
    weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)

    def loss(params, q, k, v):
        out = nnx.merge(graphdef, params, rest)(q, k, v, mask)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(
        params, q, k, v)
    return out, (grads[0]["forget_w_HxD"][...], grads[0]["forget_b_H"][...], *grads[1:])


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_gradients_equal_quadratic(causal):
    q, k, v = random_qkv((B, L, H, D), seed=2)
    mask = prefix_mask(LENGTHS, L)
    out_b, grads_b = _outputs_and_grads(_core(causal=causal), q, k, v, mask)
    out_q, grads_q = _outputs_and_grads(_core(causal=causal, form="quadratic"), q, k, v, mask)
    real = np.asarray(mask)
    assert_close_relative(out_b[real], out_q[real], rtol=1e-5)
    for name, grad_b, grad_q in zip(("w", "b", "q", "k", "v"), grads_b, grads_q):
        assert np.isfinite(np.asarray(grad_b)).all(), name
        assert_close_relative(grad_b, grad_q, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_gates_at_one_give_softmax_attention(form, causal):
    """log f = 0: no decay, the bias is the only difference from lra's softmax core."""
    q, k, v = random_qkv((B, L, H, D), seed=3)
    mask = prefix_mask(LENGTHS, L)
    out = np.asarray(_core(causal=causal, form=form, gates="one")(q, k, v, mask))
    plain = np.asarray(make_core("softmax", num_heads=H, head_dim=D, max_len=L,
                                 causal=causal)(q, k, v, mask))
    real = np.asarray(mask)
    assert_close_relative(out[real], plain[real], rtol=1e-6)


# --- the shared checks --------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_contract_and_no_mask_leak_with_holes(form, causal):
    q, k, v = random_qkv((B, L, H, D), seed=4)
    mask = edge_mask(B, L, seed=4)  # holes, one real token, none at 0
    core = _core(causal=causal, form=form)
    check_contract(core, q, k, v, mask)
    check_contract(core, *(x.astype(jnp.bfloat16) for x in (q, k, v)), mask)
    check_no_mask_leak(core, q, k, v, mask)


@pytest.mark.parametrize("form", FORMS)
def test_no_future_leak(form):
    q, k, v = random_qkv((B, L, H, D), seed=5)
    mask = prefix_mask((13, 9, 2, 12), L)
    check_no_future_leak(_core(causal=True, form=form), q, k, v, mask)


def test_quadratic_dropout_on_probabilities_keeps_the_mask():
    """Dropout changes outputs only when not deterministic; with one dropout pattern,
    values at masked positions still change no real output."""
    q, k, v = random_qkv((B, L, H, D), seed=6)
    mask = edge_mask(B, L, seed=6)
    core = _core(causal=False, form="quadratic", dropout_rate=0.5)
    kept = np.asarray(core(q, k, v, mask, deterministic=True))
    np.testing.assert_array_equal(kept, np.asarray(_core(causal=False, form="quadratic")(
        q, k, v, mask)))
    dropped = pure(core, mask, deterministic=False)
    assert not np.allclose(kept, np.asarray(dropped(q, k, v)))
    noise = lambda x, seed: jnp.where(mask[:, :, None, None], x, x + 10.0 * jnp.asarray(
        np.random.default_rng(seed).normal(size=x.shape), x.dtype))
    real = np.asarray(mask)
    np.testing.assert_array_equal(np.asarray(dropped(noise(q, 1), noise(k, 2), noise(v, 3)))[real],
                                  np.asarray(dropped(q, k, v))[real])


def test_blockwise_refuses_dropout():
    with pytest.raises(ValueError, match="fox.*blockwise.*dropout.*quadratic"):
        _core(causal=False, dropout_rate=0.1)


# --- registry and state size ---------------------------------------------------------


def test_registered_with_its_options():
    assert "fox" in attention.NAMES
    assert attention.default_options("fox") == {
        "form": "blockwise", "chunk_size": 128, "query_chunk_size": 1024,
        "decay_time_min": 0.0, "decay_time_max": 0.0}
    with pytest.raises(ValueError, match="form.*'blockwise'.*'quadratic'"):
        _core(causal=False, form="flash")
    for times in ((0.0, 8.0), (8.0, 4.0), (-1.0, 4.0)):
        with pytest.raises(ValueError, match="decay_time_min.*decay_time_max"):
            make_core("fox", decay_time_min=times[0], decay_time_max=times[1])


def test_gate_initialisation():
    """The authors' defaults: w ~ N(0, 0.02^2), b = 0 (f ~ 1/2); with decay times, b such
    that log sigmoid(b) = -1/T for T log-spaced over the heads (`fgate_bias_init`)."""
    core = make_core("fox", num_heads=4, head_dim=64, max_len=16)
    assert abs(float(jnp.std(core.forget_w_HxD[...])) - 0.02) < 0.003
    np.testing.assert_array_equal(core.forget_b_H[...], 0.0)
    core = make_core("fox", num_heads=4, head_dim=64, max_len=16, decay_time_min=2.0,
                     decay_time_max=256.0)
    np.testing.assert_allclose(np.asarray(jax.nn.log_sigmoid(core.forget_b_H[...])),
                               -1.0 / np.array([2.0, 10.079, 50.797, 256.0]), rtol=1e-4)


def test_state_size_is_a_kv_cache_with_log_gates():
    size = mixers.state_size("fox", emb_dim=16, qkv_dim=16, num_heads=2, max_len=64)
    assert size == mixers.StateSize((2 * 64 * 16 + 64 * 2) * 4, True)


# --- memory ---------------------------------------------------------------------------


def _compiled_peak(form, length, grad):
    """Compiled peak bytes (arguments + outputs + temporaries) of one head of width 16,
    bidirectional, default blocks; the gradient of sum(output) if `grad`."""
    core = make_core("fox", num_heads=1, head_dim=16, max_len=length, form=form)
    apply = pure(core, None)
    fn = jax.grad(lambda q, k, v: jnp.sum(apply(q, k, v)), (0, 1, 2)) if grad else apply
    x = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
    return compiled_peak(jax.jit(fn).lower(x, x, x).compile())


def test_blockwise_memory_grows_linearly_quadratic_does_not():
    """Blockwise with its gradient (the forward pass included), quadratic forward only.
    Measured (CPU, 1 head, D = 16): blockwise 4.5 -> 6.1 MB (x1.35; forward alone 2.7 ->
    3.6 MB), quadratic 51 -> 202 MB (x3.98)."""
    blockwise = _compiled_peak("blockwise", 4096, True) / _compiled_peak("blockwise", 2048, True)
    assert blockwise < 2.6, blockwise
    quadratic = _compiled_peak("quadratic", 4096, False) / _compiled_peak("quadratic", 2048, False)
    assert quadratic > 3.5, quadratic
