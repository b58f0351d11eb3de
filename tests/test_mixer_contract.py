"""The mixer contract, run on every name of the mixer registry (lra.models.mixers.NAMES).

Each mixer is built with its default options inside the encoder's pre-norm block, with the
MLP sub-block where the mixer's paper has one (`mixers.default_block_mlp`), in each
direction it can be built in: bidirectional always, causal unless the mixer refuses
`causal=True` (the registry's constructor raises a ValueError naming `causal`). Each case
runs the whole contract (tests/mixer_checks.py: shape, dtype, finite values; no leak from
right padding or holes, in values and gradients; independent batch rows; no future leak
when causal, exactly unless the mixer says `exactly_causal = False`; token-by-token
decoding equal to the full pass where the mixer decodes) and, separately, the dtype check
under JAX's 64-bit mode. A newly registered mixer is checked without a new test.

A toy mixer registered in the registry for one test shows that each clause can fail:
each of its `leak` settings breaks one clause, and the contract raises.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from mixer_checks import (
    check_dtypes_under_x64,
    check_mixer_contract,
    check_no_mask_leak,
    contract_mask,
    random_x,
)

from lra.models import encoder, mixers

# 72 tokens: more than one chunk or block of every chunked or blocked family's defaults
# (64, 50), so the contract crosses their boundaries.
B, L, E = 4, 72, 8
REFUSES_CAUSAL = "causal"  # a mixer that cannot be causal says so in its ValueError


def make_block(name, *, causal, **options):
    """Mixer `name` (default options unless given) in the encoder's pre-norm block, with
    the MLP sub-block if the mixer's paper has one."""
    return MixerInBlock(name, causal=causal, rngs=nnx.Rngs(params=0, dropout=1), **options)


class MixerInBlock(nnx.Module):
    """An `encoder.Block` seen as a mixer: `__call__`, and `decodes` / `init_state` /
    `step` from the mixer inside it."""

    def __init__(self, name, *, causal, rngs, **options):
        self.block = encoder.Block(
            emb_dim=E, qkv_dim=E, num_heads=2, mlp_dim=2 * E, max_len=L, dropout=0.0,
            attention_dropout=0.0, attention=name, attention_options=options, causal=causal,
            block_mlp=mixers.default_block_mlp(name), rngs=rngs)
        self.causal = causal
        self.exactly_causal = getattr(self.block.attention, "exactly_causal", True)

    def __call__(self, x, mask, *, deterministic):
        return self.block(x, mask, deterministic=deterministic)

    @property
    def decodes(self) -> bool:
        return getattr(self.block.attention, "decodes", False)

    def init_state(self, batch_size):
        return self.block.attention.init_state(batch_size)

    def step(self, state, x_BxE, mask_B, position):
        return self.block.step(state, x_BxE, mask_B, position)


def directions(name) -> tuple[str, ...]:
    """The directions mixer `name` can be built in: bidirectional, and causal unless its
    constructor refuses (tried abstractly: no parameters are computed)."""
    try:
        nnx.eval_shape(lambda: make_block(name, causal=True))
    except ValueError as error:
        if REFUSES_CAUSAL not in str(error):
            raise
        return ("bidirectional",)
    return ("bidirectional", "causal")


CASES = [(name, direction) for name in mixers.NAMES for direction in directions(name)]
IDS = [f"{name}-{direction}" for name, direction in CASES]


def run_contract(name, direction, **options):
    """The whole contract on mixer `name` in its block (see the module docstring)."""
    causal = direction == "causal"
    block = make_block(name, causal=causal, **options)
    future_rtol = 0.0 if block.exactly_causal else 1e-6  # FFT rounding: ~1e-7
    check_mixer_contract(block, random_x((B, L, E), seed=1), contract_mask(B, L),
                         causal=causal, future_rtol=future_rtol)


def test_every_registered_mixer_is_checked():
    checked = list(dict.fromkeys(name for name, _ in CASES))
    assert checked == list(mixers.NAMES)
    causal = sum(direction == "causal" for _, direction in CASES)
    print(f"\nmixer contract: {len(checked)} mixers ({len(mixers.ATTENTION_NAMES)} attention, "
          f"{len(mixers.SEQUENCE_NAMES)} sequence models), {len(CASES)} cases "
          f"({causal} causal)")


@pytest.mark.parametrize("name, direction", CASES, ids=IDS)
def test_mixer_contract(name, direction):
    run_contract(name, direction)


# Short convolutions of q, k, v (short_conv.py): one family of each core that has them,
# causal (the recall tasks' use), and one core in both directions; every core's
# bidirectional form with the convolution is checked in tests/test_short_conv.py.
SHORT_CONV_CASES = [("linear", "bidirectional"), ("linear", "causal"), ("gla", "causal"),
                    ("gated_deltanet", "causal")]


@pytest.mark.parametrize("name, direction", SHORT_CONV_CASES,
                         ids=[f"{name}-{direction}" for name, direction in SHORT_CONV_CASES])
def test_mixer_contract_with_short_conv(name, direction):
    run_contract(name, direction, short_conv=4)
    check_dtypes_under_x64(lambda: make_block(name, causal=direction == "causal", short_conv=4),
                           random_x((B, L, E), seed=2), contract_mask(B, L))


@pytest.mark.parametrize("name, direction", CASES, ids=IDS)
def test_dtypes_stay_float32_under_x64(name, direction):
    check_dtypes_under_x64(lambda: make_block(name, causal=direction == "causal"),
                           random_x((B, L, E), seed=2), contract_mask(B, L))


# --- a toy mixer that breaks one clause at a time ----------------------------------------


# leak -> (direction, what the contract reports): the clause that catches it.
LEAKS = {
    "padding": ("bidirectional", "Not equal to tolerance"),  # outputs moved by padding
    "holes": ("bidirectional", "Not equal to tolerance"),
    "gradient": ("bidirectional", "at a masked input"),
    "future": ("causal", "at a later input"),
    "decode": ("causal", "Not equal to tolerance"),  # step against the full pass
}


class ToyMixer(nnx.Module):
    """x W + the mean of x over the real tokens (those up to i if causal); `leak` breaks
    the contract: "padding" averages over every position, "holes" over the first
    sum(mask) positions (right padding only is handled), "gradient" adds
    x - stop_gradient(x) at masked positions (0 in value, 1 in gradient), "future" averages
    over the whole row even when causal, "decode" forgets earlier tokens in `step`, "x64"
    has a parameter of the default float dtype."""

    def __init__(self, *, emb_dim, max_len, causal, dropout, dtype, rngs, leak="none"):
        del max_len, dropout, dtype
        self.causal, self.leak = causal, leak
        self.w = nnx.Param(jax.random.normal(rngs.params(), (emb_dim, emb_dim), jnp.float32)
                          / emb_dim)
        self.b = nnx.Param(jnp.zeros((emb_dim,), None if leak == "x64" else jnp.float32))

    def _counted(self, x, mask):
        length = x.shape[1]
        if self.leak == "padding":
            return jnp.ones(mask.shape, x.dtype)[..., None]
        if self.leak == "holes":
            mask = jnp.arange(length)[None] < jnp.sum(mask, 1, keepdims=True)
        return mask.astype(x.dtype)[..., None]

    def __call__(self, x, mask, *, deterministic):
        del deterministic
        counted = self._counted(x, mask)
        if self.causal and self.leak != "future":
            total, count = jnp.cumsum(x * counted, 1), jnp.cumsum(counted, 1)
        else:
            total, count = (jnp.sum(v, 1, keepdims=True) for v in (x * counted, counted))
        y = x @ self.w[...] + self.b[...] + total / jnp.maximum(count, 1.0)
        if self.leak == "gradient":
            y = y + jnp.sum(jnp.where(mask[..., None], 0.0, x - jax.lax.stop_gradient(x)), 1,
                            keepdims=True)
        return y

    @property
    def decodes(self):
        return self.causal

    def init_state(self, batch_size):
        return (jnp.zeros((batch_size, self.w.shape[0]), jnp.float32),
                jnp.zeros((batch_size, 1), jnp.float32))

    def step(self, state, x_BxE, mask_B, position):
        del position
        keep = mask_B[:, None].astype(x_BxE.dtype)
        total, count = state if self.leak != "decode" else (0.0, 0.0)
        total, count = total + keep * x_BxE, count + keep
        y = x_BxE @ self.w[...] + self.b[...] + total / jnp.maximum(count, 1.0)
        return (total, count), y


@pytest.fixture
def toy(monkeypatch):
    """Registers `ToyMixer` as the sequence model "toy" (this module as its file)."""
    monkeypatch.setitem(sys.modules, f"{mixers.__name__}.toy_contract", sys.modules[__name__])
    monkeypatch.setitem(mixers._SEQUENCE_MODELS, "toy", "toy_contract:ToyMixer")
    monkeypatch.setattr(mixers, "SEQUENCE_NAMES", mixers.SEQUENCE_NAMES + ("toy",))
    monkeypatch.setattr(mixers, "NAMES", mixers.NAMES + ("toy",))
    return "toy"


def test_toy_mixer_without_leak_passes(toy):
    assert directions(toy) == ("bidirectional", "causal")
    for direction in directions(toy):
        run_contract(toy, direction)
    check_dtypes_under_x64(lambda: make_block(toy, causal=True), random_x((B, L, E)),
                           contract_mask(B, L))


@pytest.mark.parametrize("leak", LEAKS)
def test_leaky_toy_mixer_is_caught(toy, leak):
    direction, report = LEAKS[leak]
    with pytest.raises(AssertionError, match=report):
        run_contract(toy, direction, leak=leak)


def test_hole_leak_passes_right_padding_alone(toy):
    """Why the contract's mask has holes: with right padding only (the registry-wide check
    before the contract) the "holes" toy passes."""
    right_padding = jnp.arange(L)[None] < jnp.asarray([[L], [7], [9], [1]])
    check_no_mask_leak(make_block(toy, causal=False, leak="holes"), random_x((B, L, E)),
                       right_padding)
    with pytest.raises(AssertionError):
        run_contract(toy, "bidirectional", leak="holes")


def test_float64_parameter_under_x64_is_caught(toy):
    with pytest.raises(AssertionError):
        check_dtypes_under_x64(lambda: make_block(toy, causal=False, leak="x64"),
                               random_x((B, L, E)), contract_mask(B, L))
