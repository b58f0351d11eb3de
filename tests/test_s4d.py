"""S4D (lra/models/mixers/s4d.py) against a float64 NumPy recurrence from the S4D paper.

Both forms (conv, recurrent) must match the reference token-by-token recurrence in each
direction (ZOH: dA = exp(dt A), dB = (exp(dt A) - 1) / A B, y = 2 Re(C x) + D u, then
the output gate with S4's exact GELU), agree with each other in outputs and gradients,
match finite differences of the reference, and stay finite at 16K bfloat16 tokens; the
recurrent form is exactly causal. The mixer contract at the default options (masks,
causality of the conv form up to FFT rounding, decoding) is tests/test_mixer_contract.py.
"Relative" tolerances are relative to the largest magnitude of the expected array.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import assert_close_relative
from flax import nnx
from mixer_checks import check_no_future_leak, make_mixer, pure, random_x
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


def _s4d(causal, form="conv", *, emb_dim=E, length=L, **options):
    options = {"state_size": N, "form": form, **options}
    return make_mixer("s4d", emb_dim=emb_dim, max_len=length, causal=causal, **options)


# --- the float64 reference ---------------------------------------------------------------


def _reference(model, x, mask):
    """Loop over tokens: x_k = dA x_{k-1} + dB u_k (u = 0 where masked), readout
    2 Re(C x_k); the reverse direction runs from the last token with C_bwd."""
    u = np.asarray(x, np.float64) * np.asarray(mask, np.float64)[..., None]  # [B, L, E]
    A = -np.exp(param(model.log_A_real_ExP)) + 1j * param(model.A_imag_ExP)  # [E, P]
    dt = np.exp(param(model.log_dt_E))[:, None]
    dA = np.exp(dt * A)
    dB = (dA - 1.0) / A * complex_param(model.B_ExPx2)
    readouts = [(complex_param(model.C_fwd), range(u.shape[1]))]
    if model.C_bwd is not None:
        readouts.append((complex_param(model.C_bwd), reversed(range(u.shape[1]))))
    y = u * param(model.D_E)
    for C, tokens in readouts:
        state = np.zeros((u.shape[0], *A.shape), complex)
        for k in tokens:
            state = dA * state + dB * u[:, k, :, None]
            y[:, k] += 2.0 * np.sum(C * state, axis=-1).real
    return output_gate(y, model.gate, approximate_gelu=False)  # S4's nn.GELU(): exact


def _outputs_and_input_grad(model, x, mask, weights):
    apply = pure(model, mask)
    loss = lambda x: jnp.sum(apply(x) * weights * mask[..., None])
    return np.asarray(apply(x), np.float64), np.asarray(jax.grad(loss)(x), np.float64)


@pytest.mark.parametrize("form", ["conv", "recurrent"])
@pytest.mark.parametrize("causal", [True, False])
def test_forms_match_numpy_recurrence(causal, form):
    model = _s4d(causal, form, seed=1)
    x, mask = random_x((B, L, E), seed=1), edge_mask(B, L)
    assert (model.C_bwd is None) == causal
    expected = _reference(model, x, mask)
    real = np.asarray(mask)
    assert_close_relative(np.asarray(model(x, mask, deterministic=True))[real], expected[real])


def _parameter_grads(model, x, mask, weights):
    """The gradient of the same loss with respect to every parameter, by path."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, rest, copy=True)(x, mask, deterministic=True)
        return jnp.sum(out * weights * mask[..., None])

    grads = nnx.to_flat_state(jax.grad(loss)(params))
    return {path: np.asarray(value[...], np.float64) for path, value in grads}


@pytest.mark.parametrize("causal", [True, False])
def test_conv_and_recurrent_agree_in_outputs_and_gradients(causal):
    """Outputs, input gradients and parameter gradients (the kernel's too)."""
    x, mask = random_x((B, L, E), seed=2), edge_mask(B, L)
    weights = random_x((B, L, E), seed=3)
    conv, recurrent = _s4d(causal, "conv", seed=2), _s4d(causal, "recurrent", seed=2)
    for got, want in zip(_outputs_and_input_grad(conv, x, mask, weights),
                         _outputs_and_input_grad(recurrent, x, mask, weights)):
        assert_close_relative(got, want)
    conv_grads = _parameter_grads(conv, x, mask, weights)
    recurrent_grads = _parameter_grads(recurrent, x, mask, weights)
    assert conv_grads.keys() == recurrent_grads.keys()
    assert ("log_dt_E",) in conv_grads and ("B_ExPx2",) in conv_grads
    for path, grad in conv_grads.items():
        assert_close_relative(grad, recurrent_grads[path])


@pytest.mark.parametrize("causal", [True, False])
def test_input_gradient_matches_finite_differences_of_reference(causal):
    shape = (2, 5, 3)
    model = _s4d(causal, emb_dim=3, length=5, state_size=4, seed=4, dt_min=0.05, dt_max=0.5)
    x, weights = random_x(shape, seed=4), np.random.default_rng(5).normal(size=shape)
    mask = jnp.asarray([[True] * 5, [False, True, False, True, False]])
    loss = lambda x: np.sum(_reference(model, x, mask) * weights * np.asarray(mask)[..., None])
    expected = finite_difference_grad(loss, np.asarray(x, np.float64))
    _, grad = _outputs_and_input_grad(model, x, mask, jnp.asarray(weights, jnp.float32))
    assert_close_relative(grad, expected, 1e-4)


# --- causality and decoding (the contract runs the default conv form) ----------------


def test_recurrent_form_is_exactly_causal_and_only_causal_layers_decode():
    """The conv form says it is causal only up to FFT rounding (the contract then allows
    1e-6 of the largest gradient); the recurrent form is exactly causal."""
    x, mask = random_x((B, L, E), seed=7), edge_mask(B, L)
    model = _s4d(True, "recurrent", seed=7)
    assert model.exactly_causal and not _s4d(True, "conv").exactly_causal
    check_no_future_leak(model, x, mask)
    assert model.decodes and model.init_state(B).shape == (B, E, N // 2)
    with pytest.raises(ValueError, match="causal=True"):
        _s4d(False).step(_s4d(False).init_state(B), x[:, 0], mask[:, 0], 0)


def test_right_padding_reverse_direction_starts_at_last_real_token():
    """Bidirectional, a prefix mask: the real outputs equal those of the unpadded row."""
    x = random_x((B, L, E), seed=8)
    mask = jnp.arange(L)[None, :] < jnp.asarray([L, 6, 9])[:, None]
    model = _s4d(False, seed=8)
    padded = np.asarray(model(x, mask, deterministic=True))
    short = np.asarray(model(x[1:2, :6], None, deterministic=True))
    assert_close_relative(padded[1, :6], short[0])


@pytest.mark.parametrize("form", ["conv", "recurrent"])
def test_bfloat16_16k_tokens_finite(form):
    x = random_x((1, 16_384, 4), seed=9, dtype=jnp.bfloat16)
    for causal in (True, False):
        model = _s4d(causal, form, emb_dim=4, length=16_384, dtype=jnp.bfloat16)
        out = model(x, None, deterministic=True)
        assert out.dtype == jnp.bfloat16 and out.shape == x.shape
        assert np.isfinite(np.asarray(out, np.float32)).all(), causal
        assert np.abs(np.asarray(out, np.float32)).max() > 0


# --- initialisation, parameters and options -----------------------------------------


def test_lin_and_inv_eigenvalues_follow_the_paper():
    """S4D-Lin A_n = -1/2 + i pi n; S4D-Inv A_n = -1/2 + i N/pi (N/(2n+1) - 1), n < N/2."""
    size = 16
    n = np.arange(size // 2)
    formulas = {"lin": -0.5 + 1j * np.pi * n,
                "inv": -0.5 + 1j * size / np.pi * (size / (2 * n + 1) - 1)}
    for init, want in formulas.items():
        model = _s4d(False, state_size=size, init=init)
        A = -np.exp(param(model.log_A_real_ExP)) + 1j * param(model.A_imag_ExP)
        assert A.shape == (E, size // 2)
        np.testing.assert_allclose(A, np.broadcast_to(want, A.shape), rtol=1e-6)
    np.testing.assert_array_equal(complex_param(model.B_ExPx2), 1.0)  # B = 1


def test_dt_log_uniform_and_C_D_scales():
    model = _s4d(False, emb_dim=512, state_size=64, dt_min=1e-3, dt_max=1e-1)
    log_dt = param(model.log_dt_E)
    assert (log_dt >= math.log(1e-3) - 1e-6).all() and (log_dt <= math.log(1e-1) + 1e-6).all()
    # log-uniform: mean and std of U[log 1e-3, log 1e-1] (std = width / sqrt(12))
    width = math.log(100.0)
    assert abs(log_dt.mean() - math.log(1e-2)) < 0.1 * width
    assert abs(log_dt.std() - width / math.sqrt(12)) < 0.1 * width / math.sqrt(12)
    C = complex_param(model.C_fwd)
    assert abs(np.mean(np.abs(C) ** 2) - 1.0) < 0.05  # complex standard normal
    assert abs(param(model.D_E).std() - 1.0) < 0.15


def test_ssm_parameters_are_ssm_params():
    model = _s4d(False)
    ssm_names = {path[-1] for path, _ in nnx.to_flat_state(nnx.state(model, ssm.SsmParam))}
    assert ssm_names == {"log_dt_E", "log_A_real_ExP", "A_imag_ExP", "B_ExPx2"}
    for variable in (model.C_fwd, model.C_bwd, model.D_E, model.gate.out1.kernel):
        assert type(variable) is nnx.Param


def test_options_and_defaults():
    assert mixers.default_options("s4d") == {
        "state_size": 64, "init": "lin", "form": "conv", "dt_min": 0.001, "dt_max": 0.1,
        "bidirectional": True, "activation": "full_glu"}
    assert "s4d" in mixers.SEQUENCE_NAMES and not mixers.is_attention("s4d")
    x = random_x((B, L, E), seed=10)
    for option, values in [("init", ("lin", "inv")), ("activation", ("full_glu", "gelu"))]:
        outs = [_s4d(False, seed=10, **{option: v})(x, None, deterministic=True)
                for v in values]
        assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1])), option


@pytest.mark.parametrize(
    "options, setting",
    [
        ({"state_size": 0}, "state_size"),
        ({"state_size": 7}, "state_size must be even"),
        ({"init": "legs"}, "init must be one of 'lin', 'inv'"),
        ({"form": "scan"}, "form must be one of 'conv', 'recurrent'"),
        ({"dt_min": 0.0}, "dt_min"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
        ({"dt_max": "big"}, "dt_max"),
        ({"bidirectional": "yes"}, "bidirectional"),
        ({"activation": "relu"}, "activation"),
        ({"bogus": 1}, "bogus.*state_size"),
    ],
)
def test_bad_options_raise(options, setting):
    with pytest.raises(ValueError, match=setting):
        _s4d(False, **options)
