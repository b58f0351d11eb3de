"""LRU (lra/models/mixers/lru.py) against a float64 NumPy recurrence from the LRU paper.

The layer must match the reference token-by-token recurrence in each direction
(lambda = exp(-exp(nu_log) + i exp(theta_log)), x_k = lambda x_{k-1} + gamma (B u_k),
y = Re(C x) + D u, then the output gate with the tanh-approximated GELU of S5's code)
and finite differences of it, initialise lambda on the ring of Lemma 2 with
gamma = sqrt(1 - |lambda|^2), and stay finite at 16K bfloat16 tokens. Masks, causality
and decoding (the mixer contract) are tests/test_mixer_contract.py. "Relative"
tolerances are relative to the largest magnitude of the expected array.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import assert_close_relative
from flax import nnx
from mixer_checks import make_mixer, pure, random_x
from ssm_reference import (
    complex_param,
    edge_mask,
    finite_difference_grad,
    output_gate,
    param,
)

from lra.models import mixers
from lra.models.mixers import ssm

B, L, E, N = 3, 11, 6, 8


def _lru(causal, *, emb_dim=E, length=L, **options):
    # a wide ring (r_min 0.5) keeps every state's contribution visible over 11 tokens
    options = {"state_size": N, "r_min": 0.5, "r_max": 0.99, **options}
    return make_mixer("lru", emb_dim=emb_dim, max_len=length, causal=causal, **options)


def _eigenvalues(model):
    return np.exp(-np.exp(param(model.nu_log_N)) + 1j * np.exp(param(model.theta_log_N)))


# --- the float64 reference ---------------------------------------------------------------


def _reference(model, x, mask):
    """Loop over tokens: x_k = lambda x_{k-1} + gamma (B u_k) (u = 0 where masked),
    readout Re(C x_k); the reverse direction runs from the last token with C_bwd."""
    u = np.asarray(x, np.float64) * np.asarray(mask, np.float64)[..., None]  # [B, L, E]
    lam = _eigenvalues(model)  # [N]
    gamma = np.exp(param(model.gamma_log_N))
    B_NxE = complex_param(model.B_NxEx2)
    readouts = [(complex_param(model.C_fwd), range(u.shape[1]))]
    if model.C_bwd is not None:
        readouts.append((complex_param(model.C_bwd), reversed(range(u.shape[1]))))
    y = u * param(model.D_E)
    for C_ExN, tokens in readouts:
        state = np.zeros((u.shape[0], lam.size), complex)
        for k in tokens:
            state = lam * state + gamma * (u[:, k] @ B_NxE.T)
            y[:, k] += (state @ C_ExN.T).real
    return output_gate(y, model.gate, approximate_gelu=True)  # S5's / minimal-LRU's nn.gelu


@pytest.mark.parametrize("activation", ["full_glu", "half_glu1"])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_numpy_recurrence(causal, activation):
    model = _lru(causal, activation=activation, seed=1)
    x, mask = random_x((B, L, E), seed=1), edge_mask(B, L)
    assert (model.C_bwd is None) == causal
    expected = _reference(model, x, mask)
    real = np.asarray(mask)
    assert_close_relative(np.asarray(model(x, mask, deterministic=True))[real], expected[real])


@pytest.mark.parametrize("causal", [True, False])
def test_input_gradient_matches_finite_differences_of_reference(causal):
    shape = (2, 5, 3)
    model = _lru(causal, emb_dim=3, length=5, state_size=4, seed=4)
    x, weights = random_x(shape, seed=4), np.random.default_rng(5).normal(size=shape)
    mask = jnp.asarray([[True] * 5, [False, True, False, True, False]])
    loss = lambda x: np.sum(_reference(model, x, mask) * weights * np.asarray(mask)[..., None])
    expected = finite_difference_grad(loss, np.asarray(x, np.float64))
    apply = pure(model, mask)
    grad = jax.grad(lambda x: jnp.sum(apply(x) * jnp.asarray(weights, jnp.float32)
                                      * mask[..., None]))(x)
    assert_close_relative(grad, expected, 1e-4)


# --- decoding (its equality with the full pass: the mixer contract) ---------------------


def test_decoding_state_and_only_causal_layers_decode():
    x, mask = random_x((B, L, E), seed=7), edge_mask(B, L)
    model = _lru(True, seed=7)
    assert model.decodes and model.init_state(B).shape == (B, N)
    with pytest.raises(ValueError, match="causal=True"):
        _lru(False).step(_lru(False).init_state(B), x[:, 0], mask[:, 0], 0)


def test_right_padding_reverse_direction_starts_at_last_real_token():
    """Bidirectional, a prefix mask: the real outputs equal those of the unpadded row."""
    x = random_x((B, L, E), seed=8)
    mask = jnp.arange(L)[None, :] < jnp.asarray([L, 6, 9])[:, None]
    model = _lru(False, seed=8)
    padded = np.asarray(model(x, mask, deterministic=True))
    short = np.asarray(model(x[1:2, :6], None, deterministic=True))
    assert_close_relative(padded[1, :6], short[0])


def test_bfloat16_16k_tokens_finite_with_pathx_ring():
    """PathX's ring (|lambda| in [0.999, 0.9999], phase <= pi/10): memory over 16K tokens."""
    x = random_x((1, 16_384, 4), seed=9, dtype=jnp.bfloat16)
    for causal in (True, False):
        model = _lru(causal, emb_dim=4, length=16_384, r_min=0.999, r_max=0.9999,
                     max_phase=math.pi / 10, dtype=jnp.bfloat16)
        out = model(x, None, deterministic=True)
        assert out.dtype == jnp.bfloat16 and out.shape == x.shape
        assert np.isfinite(np.asarray(out, np.float32)).all(), causal
        assert np.abs(np.asarray(out, np.float32)).max() > 0


# --- initialisation, parameters and options -----------------------------------------


def _ks_uniform(samples, lo, hi):
    """Kolmogorov-Smirnov distance between the samples and U[lo, hi]."""
    s = np.sort((samples - lo) / (hi - lo))
    n = s.size
    return max(np.max(np.arange(1, n + 1) / n - s), np.max(s - np.arange(n) / n))


@pytest.mark.parametrize("r_min, r_max, max_phase",
                         [(0.4, 0.8, math.pi / 10), (0.9, 0.999, 2 * math.pi),
                          (0.999, 0.9999, math.pi / 10)])
def test_ring_initialisation_and_gamma(r_min, r_max, max_phase):
    """Lemma 2: lambda uniform on the ring r_min <= |lambda| <= r_max (|lambda|^2 uniform in
    [r_min^2, r_max^2]), phase uniform in [0, max_phase]; gamma = sqrt(1 - |lambda|^2)."""
    size = 4096
    model = _lru(False, state_size=size, r_min=r_min, r_max=r_max, max_phase=max_phase)
    lam = _eigenvalues(model)
    radius, phase = np.abs(lam), np.exp(param(model.theta_log_N))
    assert (radius >= r_min * (1 - 1e-6)).all() and (radius <= r_max * (1 + 1e-6)).all()
    assert (phase >= 0).all() and (phase <= max_phase * (1 + 1e-6)).all()
    np.testing.assert_allclose(np.angle(lam) % (2 * np.pi), phase % (2 * np.pi), atol=1e-5)
    bound = 1.63 / math.sqrt(size)  # KS critical value at the 1% level
    assert _ks_uniform(radius**2, r_min**2, r_max**2) < bound
    assert _ks_uniform(phase, 0.0, max_phase) < bound
    np.testing.assert_allclose(np.exp(param(model.gamma_log_N)), np.sqrt(1 - radius**2),
                               rtol=1e-5)


def test_B_C_D_scales():
    """Appendix A: B parts N(0, 1/(2E)) (Glorot, times 2 for the real part), C parts
    N(0, 1/N), D N(0, 1)."""
    emb_dim, size = 64, 512
    model = _lru(False, emb_dim=emb_dim, state_size=size)
    B_NxE, C_ExN = complex_param(model.B_NxEx2), complex_param(model.C_fwd)
    assert B_NxE.shape == (size, emb_dim) and C_ExN.shape == (emb_dim, size)
    for part in (B_NxE.real, B_NxE.imag):
        assert abs(part.std() * math.sqrt(2 * emb_dim) - 1) < 0.03
    for part in (C_ExN.real, C_ExN.imag):
        assert abs(part.std() * math.sqrt(size) - 1) < 0.03
    assert abs(param(model.D_E).std() - 1) < 0.3


def test_ssm_parameters_are_ssm_params():
    model = _lru(False)
    ssm_names = {path[-1] for path, _ in nnx.to_flat_state(nnx.state(model, ssm.SsmParam))}
    assert ssm_names == {"nu_log_N", "theta_log_N", "gamma_log_N", "B_NxEx2"}
    for variable in (model.C_fwd, model.C_bwd, model.D_E, model.gate.out1.kernel):
        assert type(variable) is nnx.Param


def test_options_and_defaults():
    assert mixers.default_options("lru") == {
        "state_size": 256, "r_min": 0.9, "r_max": 0.999, "max_phase": 2 * math.pi,
        "bidirectional": True, "activation": "full_glu"}
    assert "lru" in mixers.SEQUENCE_NAMES and not mixers.is_attention("lru")
    x = random_x((B, L, E), seed=10)
    outs = [_lru(False, seed=10, bidirectional=b)(x, None, deterministic=True)
            for b in (True, False)]
    assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1]))
    assert _lru(True, bidirectional=True).C_bwd is None  # causal implies one direction


@pytest.mark.parametrize(
    "options, setting",
    [
        ({"state_size": 0}, "state_size"),
        ({"state_size": 2.5}, "state_size"),
        ({"r_min": 0.9, "r_max": 0.5}, "r_min and r_max"),
        ({"r_min": -0.1}, "r_min and r_max"),
        ({"r_max": 1.0}, "r_min and r_max"),
        ({"r_min": None}, "r_min must be a number"),
        ({"max_phase": 0.0}, "max_phase"),
        ({"max_phase": 7.0}, "max_phase"),
        ({"bidirectional": 1}, "bidirectional"),
        ({"activation": "relu"}, "activation"),
        ({"bogus": 1}, "bogus.*state_size"),
    ],
)
def test_bad_options_raise(options, setting):
    with pytest.raises(ValueError, match=setting):
        _lru(False, **options)
