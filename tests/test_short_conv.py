"""Short convolutions of q, k and v (option `short_conv`, lra/models/attention/short_conv.py)
on the linear, gated and delta-rule cores.

The convolution must match a float64 NumPy loop written from its definition,
y_t = silu(sum_{i<w} W[i] x_{t-w+1+i}) with zeros before the start; each core must compute
exactly what it computes without the option on the convolved (masked-to-zero) q, k, v,
in both directions (the convolution stays causal in a bidirectional core); a masked
token's values change no real output or gradient; decoding token by token equals the
full pass; and short_conv=0 (the default) reproduces the outputs from before the option
existed (digests recorded from that code).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from attention_checks import (
    assert_close_relative,
    check_no_mask_leak,
    make_core,
    random_qkv,
)
from flax import nnx
from mixer_checks import (
    check_step_equals_full_pass,
    contract_mask,
    make_mixer,
    random_x,
)

from lra.models import attention
from lra.models.attention.short_conv import QkvShortConvolution, ShortConvolution

B, L, H, D = 2, 12, 2, 4
LINEAR = ("linear", "performer", "cosformer", "taylor")
GATED = ("retnet", "gla", "ssd")
DELTA = ("deltanet", "gated_deltanet")
FAMILIES = LINEAR + GATED + DELTA
ONE_PER_CORE = ("linear", "gla", "gated_deltanet")
# Row 0 all real; row 1 a hole at 4 and right padding from 9.
MASK = np.arange(L)[None] < np.array([[L], [9]])
MASK[1, 4] = False


def naive_short_conv(x_BxLxC, kernel_WxC):
    """y_t = silu(sum_{i=0}^{w-1} W[i] x_{t-w+1+i}), x_s = 0 for s < 0; float64 loops."""
    x, kernel = np.asarray(x_BxLxC, np.float64), np.asarray(kernel_WxC, np.float64)
    width, length = kernel.shape[0], x.shape[1]
    y = np.zeros_like(x)
    for t in range(length):
        for i in range(width):
            s = t - width + 1 + i
            if s >= 0:
                y[:, t] += kernel[i] * x[:, s]
    return y / (1.0 + np.exp(-y))


def naive_qkv(conv: QkvShortConvolution, inputs, mask):
    """The core's convolved q, k, v by `naive_short_conv`: masked positions are zeroed
    before and after."""
    keep = np.asarray(mask)[..., None]
    outputs = []
    for layer, x_BxLxHxD in zip((conv.q, conv.k, conv.v), inputs):
        x_BxLxC = np.where(keep, np.asarray(x_BxLxHxD).reshape(B, L, H * D), 0.0)
        y_BxLxC = np.where(keep, naive_short_conv(x_BxLxC, layer.kernel_WxC[...]), 0.0)
        outputs.append(y_BxLxC.reshape(B, L, H, D).astype(np.float32))
    return outputs


@pytest.mark.parametrize("width", [1, 2, 4])
def test_convolution_matches_the_definition(width):
    conv = ShortConvolution(6, width, rngs=nnx.Rngs(0))
    x = random_x((B, L, 6), seed=1)
    empty = np.zeros((B, width - 1, 6), np.float32)
    y, history = conv(x, empty)
    assert_close_relative(y, naive_short_conv(x, conv.kernel_WxC[...]), 1e-6)
    np.testing.assert_array_equal(history, np.asarray(x)[:, L - width + 1:])
    # Two halves, the history carried across, give the whole.
    first, carried = conv(x[:, :5], empty)
    second, _ = conv(x[:, 5:], carried)
    assert_close_relative(np.concatenate([first, second], 1), y, 1e-6)


def test_initialisation_is_torch_conv1d_default():
    """U(-1/sqrt(w), 1/sqrt(w)) for a depthwise kernel of width w (fan-in w)."""
    kernel = np.asarray(ShortConvolution(4096, 4, rngs=nnx.Rngs(0)).kernel_WxC[...])
    assert kernel.shape == (4, 4096) and kernel.dtype == np.float32
    assert np.abs(kernel).max() <= 0.5 and np.abs(kernel).max() > 0.49
    np.testing.assert_allclose(kernel.std(), 0.5 / np.sqrt(3), rtol=0.02)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", FAMILIES)
def test_core_runs_on_the_convolved_inputs(name, causal):
    """The core with short_conv=4 equals the same core without it on the naive
    convolutions of q, k, v (causal ones, also in a bidirectional core)."""
    core = make_core(name, num_heads=H, head_dim=D, max_len=L, causal=causal, short_conv=4)
    plain = nnx.clone(core)
    plain.qkv_conv = None
    qkv = random_qkv((B, L, H, D), seed=2)
    out = np.asarray(core(*qkv, MASK))
    expected = np.asarray(plain(*naive_qkv(core.qkv_conv, qkv, MASK), MASK))
    assert_close_relative(out[MASK], expected[MASK], 1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", ONE_PER_CORE)
def test_masked_values_change_nothing(name, causal):
    """Noise at masked q, k, v (the hole at 4, read by the windows of tokens 5 to 7, and
    the right padding) moves no real output, and real outputs have exactly zero gradient
    there (tests/attention_checks.py). The whole mixer contract with short_conv=4, one
    family per core, is in tests/test_mixer_contract.py."""
    core = make_core(name, num_heads=H, head_dim=D, max_len=L, causal=causal, short_conv=4)
    check_no_mask_leak(core, *random_qkv((B, L, H, D), seed=3), jnp.asarray(MASK))


@pytest.mark.parametrize("name", ONE_PER_CORE)
def test_decoding_equals_the_full_pass(name):
    mixer = make_mixer(name, max_len=24, causal=True, short_conv=4)
    state = mixer.init_state(4)
    assert [x.shape for x in state.conv] == [(4, 3, 8)] * 3
    check_step_equals_full_pass(mixer, random_x((4, 24, 8), seed=4), contract_mask(4, 24))


# Digests of the outputs at real positions of each family with its defaults, recorded from
# the code before the option existed (the same `digest` there, without `short_conv`).
BEFORE = {
    ('linear', False): (-0.4598849169303625, 8.13929113933968),
    ('linear', True): (9.336378737423518, 7.883608796882417),
    ('performer', False): (2.292777381762532, 8.864193514218671),
    ('performer', True): (10.478441274391837, 7.121317584198561),
    ('cosformer', False): (1.7494789176776306, 9.107724236492235),
    ('cosformer', True): (16.118636379247597, 7.288051847730629),
    ('taylor', False): (2.8016351413468494, 8.855600669986176),
    ('taylor', True): (7.835523160066032, 7.8842430124731475),
    ('retnet', False): (17.18182771467965, 3.3854434171159893),
    ('retnet', True): (12.190806797470604, 10.432261960293587),
    ('gla', False): (5.48594493894039, -1.4129719733662605),
    ('gla', True): (-5.191275647838205, 0.5424006185856483),
    ('ssd', False): (3.926258166263323, 15.604871659292337),
    ('ssd', True): (12.288686779952743, 9.384593829585757),
    ('deltanet', False): (13.180542547962652, 2.6205296244037166),
    ('deltanet', True): (5.783182044823309, 7.112537553559091),
    ('gated_deltanet', False): (12.565514605907962, 3.36725932358988),
    ('gated_deltanet', True): (6.296464321543219, 6.291976350059385),
}


def digest(core):
    """Two fixed random projections of the outputs at real positions."""
    rand = lambda shape, seed: np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    q, k, v = (rand((B, L, H, D), seed) for seed in (1, 2, 3))
    out = np.asarray(core(q, k, v, MASK), np.float64)
    real = MASK[..., None, None]
    return tuple(float(np.sum(np.where(real, out, 0) * rand(out.shape, seed))) for seed in (4, 5))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", FAMILIES)
def test_off_reproduces_the_outputs_from_before(name, causal):
    core = attention.make(name, num_heads=H, head_dim=D, max_len=L, causal=causal,
                          rngs=nnx.Rngs(0), short_conv=0)
    assert core.qkv_conv is None
    np.testing.assert_allclose(digest(core), BEFORE[(name, causal)], rtol=1e-5, atol=1e-5)
    if causal:
        assert core.init_state(B).conv is None  # the state's arrays are those from before


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_has_the_option_off_by_default(name):
    assert attention.default_options(name)["short_conv"] == 0


@pytest.mark.parametrize("value", [-1, 2.0, True, "4", None])
def test_bad_widths_name_the_option(value):
    for name in ONE_PER_CORE:
        with pytest.raises(ValueError, match="short_conv must be an integer >= 0"):
            make_core(name, short_conv=value)
