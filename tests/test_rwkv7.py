"""RWKV-7 time mixing (lra/models/mixers/rwkv7.py), the mixer `rwkv7`.

The core (`rwkv7.wkv`) must match a float64 NumPy token-by-token loop written here from
the paper's equation in its column convention (S_t = S_{t-1} (diag(w_t) - kappa_t^T (a_t
kappa_t)) + v_t^T k~_t, o_t = S_t r_t^T), both forms, causal and bidirectional (the
module's definition), with right padding and holes; the chunked and recurrent forms must
agree in gradients. The whole mixer must match a float64 NumPy forward written here from
the reference's `RWKV_Tmix_x070.forward` (token shift, LoRAs, kappa, k~, GroupNorm, bonus,
gate); its forms must agree; `step` must equal the causal pass; the state stays bounded
over 4096 random steps. The LoRAs' zero-initialised down-projections (and the output projection
and r_k) are randomised first, so that every path carries signal. "Relative"
tolerances are relative to the largest magnitude of the expected array.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import check_mixer_contract, contract_mask, make_mixer, random_x

from lra.models.attention.delta import Form
from lra.models.mixers import rwkv7

B, L, H, N = 3, 11, 2, 4
E = H * N
CHUNK = 3  # 11 tokens: three full chunks and a padded one
# Compiling is most of these tests' time; they compare numbers, not speed (as test_kda.py).
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def assert_close_relative(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


def _mask():
    """Row 0 all real; row 1 right padding (7 real); row 2 holes and right padding."""
    mask = np.ones((B, L), bool)
    mask[1, 7:] = False
    mask[2, [0, 4, 5, 9, 10]] = False
    return jnp.asarray(mask)


# --- the core against the paper's recurrence --------------------------------------------


def _core_inputs(seed, mask):
    """r, k~, v, kappa (unit per head), a in (0, 1), log w in (-2, 0): [B, L, H, N] float32,
    zero (log w = 0) at masked positions, as the mixer prepares them."""
    rng = np.random.default_rng(seed)
    r, k, v, kappa = (rng.normal(size=(B, L, H, N)) for _ in range(4))
    kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)
    a = rng.uniform(size=(B, L, H, N))
    log_w = -rng.uniform(0.0, 2.0, size=(B, L, H, N))
    keep = np.asarray(mask)[..., None, None]
    r, k, v, kappa, a, log_w = (np.where(keep, x, 0.0).astype(np.float32)
                                for x in (r, k, v, kappa, a, log_w))
    return r, k, v, kappa, a, log_w


def _reference_core(r, k, v, kappa, a, log_w, mask, causal):
    """float64, per head, in the paper's column convention (S [N_v, N_k]).

    Masked tokens are skipped (no write, removal or decay). Bidirectional: plus the
    reverse state R built from tokens L-1 ... i+1; moving from token t + 1 to token t
    crosses w_{t+1}, and token t's removal reads R before that decay, as the forward
    removal reads S before w_t; output i reads R after crossing w_{i+1}.
    """
    r, k, v, kappa, a, log_w = (np.asarray(x, np.float64) for x in (r, k, v, kappa, a, log_w))
    mask = np.asarray(mask)
    out = np.zeros_like(v)

    def w(b, t, h):  # the decay between tokens t - 1 and t; 1 past the end or if masked
        return np.ones(N) if t == L or not mask[b, t] else np.exp(log_w[b, t, h])

    def transition(b, t, h, decay):
        return np.diag(decay) - np.outer(kappa[b, t, h], a[b, t, h] * kappa[b, t, h])

    for b in range(B):
        for h in range(H):
            S = np.zeros((N, N))
            for t in range(L):
                if mask[b, t]:
                    S = S @ transition(b, t, h, w(b, t, h)) + np.outer(v[b, t, h], k[b, t, h])
                    out[b, t, h] = S @ r[b, t, h]
            if causal:
                continue
            R = np.zeros((N, N))
            for t in reversed(range(L)):
                if mask[b, t]:
                    out[b, t, h] += R @ np.diag(w(b, t + 1, h)) @ r[b, t, h]
                    R = (R @ transition(b, t, h, w(b, t + 1, h))
                         + np.outer(v[b, t, h], k[b, t, h]))
                else:
                    R = R @ np.diag(w(b, t + 1, h))
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_core_matches_the_papers_recurrence(form, causal):
    mask = _mask()
    r, k, v, kappa, a, log_w = _core_inputs(0, mask)
    out = rwkv7.wkv(*map(jnp.asarray, (r, k, v, kappa, a * kappa, log_w)), form=Form(form),
                    causal=causal, chunk_size=CHUNK)
    expected = _reference_core(r, k, v, kappa, a, log_w, mask, causal)
    real = np.asarray(mask)
    assert_close_relative(np.asarray(out)[real], expected[real], 1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_core_forms_and_chunk_strategies_agree_in_gradients(causal):
    """chunked with its terms in the scan (`scan`) or before it (`batched`, the triangular
    solve by the explicit inverse) and recurrent: the same gradients."""
    mask = _mask()
    inputs = tuple(map(jnp.asarray, _core_inputs(1, mask)))
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(B, L, H, N)), jnp.float32)
    variants = [(Form.CHUNKED, "scan"), (Form.CHUNKED, "batched"), (Form.RECURRENT, "auto")]

    def loss(variant, r, k, v, kappa, a, log_w):
        form, strategy = variant
        out = rwkv7.wkv(r, k, v, kappa, a * kappa, log_w, form=form, causal=causal,
                        chunk_size=CHUNK, chunk_strategy=strategy)
        return jnp.sum(out * weights)

    every = lambda *inputs: [jax.grad(functools.partial(loss, variant),
                                      argnums=tuple(range(6)))(*inputs) for variant in variants]
    grads = jax.jit(every).lower(*inputs).compile(compiler_options=QUICK_COMPILE)(*inputs)
    for scan, batched, recurrent in zip(*grads, strict=True):
        assert np.all(np.isfinite(scan)) and np.all(np.isfinite(batched))
        assert_close_relative(scan, recurrent, 1e-5)
        assert_close_relative(batched, recurrent, 1e-5)


# --- the whole mixer -----------------------------------------------------------------------


def _mixer(*, causal, form="chunked", seed=0, fast_decay=True):
    """The mixer with its zero-initialised weights randomised (module docstring); with
    `fast_decay`, w0 raised by 3 so that w spreads over (0.55, 1) (else the reference's
    initial decays, most near 1)."""
    mixer = make_mixer("rwkv7", emb_dim=E, max_len=L, causal=causal, seed=seed,
                       head_dim=N, decay_rank=3, a_rank=3, gate_rank=5, form=form,
                       chunk_size=CHUNK)
    rng = np.random.default_rng(seed + 10)
    for param, scale in ((mixer.w1, 1.0), (mixer.a1, 1.0), (mixer.g1, 1.0),
                         (mixer.output.kernel, 0.3), (mixer.r_k_HxN, 0.5)):
        param[...] = jnp.asarray(rng.normal(size=param[...].shape) * scale, jnp.float32)
    if fast_decay:
        mixer.w0_E[...] = mixer.w0_E[...] + 3.0
    return mixer


def _np(param):
    return np.asarray(param[...], np.float64)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _reference_mixer(mixer, x, mask):
    """Causal forward in float64 from the reference's `RWKV_Tmix_x070.forward` (no value
    residual), row by row over each row's real tokens (the module's masking)."""
    x, mask = np.asarray(x, np.float64), np.asarray(mask)
    mix = _np(mixer.shift_mix_6xE)
    W = {name: _np(getattr(mixer, name).kernel) for name in ("receptance", "key", "value",
                                                            "output")}
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        real = np.flatnonzero(mask[b])
        xs = x[b, real]
        prev = np.concatenate([np.zeros((1, E)), xs[:-1]])
        xr, xw, xk, xv, xa, xg = (xs + (prev - xs) * mix[c] for c in range(6))
        r, k, v = xr @ W["receptance"], xk @ W["key"], xv @ W["value"]
        d = _np(mixer.w0_E) + np.tanh(xw @ _np(mixer.w1)) @ _np(mixer.w2)
        w = np.exp(-np.exp(-np.logaddexp(0.0, -d) - 0.5))  # the reference's soft clamp
        a = _sigmoid(_np(mixer.a0_E) + (xa @ _np(mixer.a1)) @ _np(mixer.a2))
        g = _sigmoid(xg @ _np(mixer.g1)) @ _np(mixer.g2)
        kk = (k * _np(mixer.k_k_E)).reshape(-1, H, N)
        kk = kk / np.linalg.norm(kk, axis=-1, keepdims=True)
        k = k * (1 + (a - 1) * _np(mixer.k_a_E))
        heads = lambda z: z.reshape(-1, H, N)
        r, k, v, w, a = map(heads, (r, k, v, w, a))
        o = np.zeros((len(real), H, N))
        for h in range(H):
            S = np.zeros((N, N))
            for t in range(len(real)):
                S = (S @ (np.diag(w[t, h]) - np.outer(kk[t, h], a[t, h] * kk[t, h]))
                     + np.outer(v[t, h], k[t, h]))
                o[t, h] = S @ r[t, h]
        mean = o.mean(-1, keepdims=True)
        var = ((o - mean) ** 2).mean(-1, keepdims=True)
        o = ((o - mean) / np.sqrt(var + 64e-5)).reshape(-1, E)
        o = o * _np(mixer.norm_scale_E) + _np(mixer.norm_bias_E)
        bonus = np.sum(r * k * _np(mixer.r_k_HxN), -1, keepdims=True) * v
        out[b, real] = ((o + bonus.reshape(-1, E)) * g) @ W["output"]
    return out


def test_chunked_form_is_exact_at_the_largest_chunk_and_the_fastest_decay():
    """The chunked form factors each decay as exp(g_i) exp(-g_j) within a chunk, valid
    because RWKV-7's log-decay is >= -e^{-1/2}: at that bound over a whole chunk of
    MAX_CHUNK tokens (factors up to exp(+-39)), outputs and gradients still equal the
    recurrent form's; a larger chunk is refused."""
    length, chunk = 2 * rwkv7.MAX_CHUNK, rwkv7.MAX_CHUNK
    rng = np.random.default_rng(7)
    r, k, v, kappa = (jnp.asarray(rng.normal(size=(1, length, 1, N)), jnp.float32)
                      for _ in range(4))
    kappa = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
    log_w = jnp.full((1, length, 1, N), -rwkv7.LOG_DECAY_SCALE, jnp.float32)

    def loss(form, r, k, v, kappa):
        out = rwkv7.wkv(r, k, v, kappa, 0.5 * kappa, log_w, form=form, causal=True,
                        chunk_size=chunk)
        return jnp.sum(out * jnp.cos(jnp.arange(length))[None, :, None, None]), out

    run = lambda form: jax.grad(functools.partial(loss, form), argnums=(0, 1, 2, 3),
                                has_aux=True)(r, k, v, kappa)
    (grads_c, out_c), (grads_r, out_r) = run(Form.CHUNKED), run(Form.RECURRENT)
    assert_close_relative(out_c, out_r, 1e-5)
    for chunked, recurrent in zip(grads_c, grads_r, strict=True):
        assert_close_relative(chunked, recurrent, 1e-5)
    with pytest.raises(ValueError, match="chunk_size=128: at most 64"):
        make_mixer("rwkv7", emb_dim=E, max_len=L, causal=True, head_dim=N,
                   chunk_size=2 * rwkv7.MAX_CHUNK)


def test_mixer_matches_the_reference_forward():
    mixer, mask = _mixer(causal=True, form="recurrent"), _mask()
    x = random_x((B, L, E), seed=3)
    out = nnx.jit(lambda mixer, x, mask: mixer(x, mask))(mixer, x, mask)
    real = np.asarray(mask)
    assert_close_relative(np.asarray(out)[real], _reference_mixer(mixer, x, mask)[real], 1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mixer_forms_agree(causal):
    x, mask = random_x((B, L, E), seed=4), _mask()
    chunked = _mixer(causal=causal, form="chunked")(x, mask)
    recurrent = _mixer(causal=causal, form="recurrent")(x, mask)
    real = np.asarray(mask)
    assert_close_relative(np.asarray(chunked)[real], np.asarray(recurrent)[real], 1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mixer_contract_with_every_path_active(causal):
    """Masks leak nothing (values, gradients), rows are independent, the causal form sees
    no later token and `step` equals the full pass, with the gates w, a and g depending on
    the input (the default mixer's LoRA down-projections are zero at initialisation, so in
    tests/test_mixer_contract.py they do not)."""
    length = 16
    mixer = _mixer(causal=causal)
    check_mixer_contract(mixer, random_x((4, length, E), seed=5), contract_mask(4, length),
                         causal=causal)


def test_state_stays_bounded_over_4096_steps():
    """With the reference's slow initial decays (w up to 0.9975), large random inputs:
    the removal keeps S from growing with the number of writes."""
    mixer = _mixer(causal=True, form="recurrent", fast_decay=False)
    x = random_x((2, 4096, E), seed=6) * 3.0
    graphdef, state = nnx.split(mixer)

    @jax.jit
    def run(state, x):
        mixer = nnx.merge(graphdef, state)

        def body(carry, x_BxE):
            carry, _ = mixer.step(carry, x_BxE, None, 0)
            return carry, jnp.sqrt(jnp.sum(jnp.square(carry.S_BxHxNxN), (-2, -1)))

        _, norms = jax.lax.scan(body, mixer.init_state(2), jnp.moveaxis(x, 1, 0))
        return norms

    norms = np.asarray(run(state, x))  # [4096, B, H]
    assert np.all(np.isfinite(norms))
    assert norms[2048:].max() <= 2.0 * norms[:2048].max()
