"""Sequence parallelism of the linear-time mixers (issue 24): state passing over the `seq`
mesh axis (lra/models/attention/state_passing.py).

Every mixer of `sharding.SEQUENCE_PARALLEL_MIXERS` runs on 4 fake CPU devices with the
sequence split in 4 (a few in 2, beside a data axis of 2, at a length the split does not
divide) and is compared with the same computation on one device, in both directions:
in one direction as one layer (outputs and the gradients of the inputs and of every
parameter; the exact attentions' layers in tests/test_ring_attention.py), in the other
as a layer of a whole encoder of half the families (embeddings, norms, MLPs, pooling;
per-token outputs and every parameter's gradient). The inputs have right padding (one
row ending inside the first shard) and a row whose holes cover a whole shard; where the
family has them, short convolutions (their window crosses the shard boundaries) and
chunks shorter than a shard. The compiled program is checked for one all-gather of a
state summary per recurrence and for holding about a quarter of the activations per
device.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lra import models
from lra.models import mixers
from lra.models.pattern import LayerMixer
from lra.parallel import sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices")

EXACT = ("softmax", "memory_efficient")  # ring attention: tests/test_ring_attention.py
STATE_PASSING = [name for name in sharding.SEQUENCE_PARALLEL_MIXERS if name not in EXACT]
BATCH, LENGTH, EMB, HEADS = 4, 32, 8, 2


def make_mesh(data: int, seq: int) -> jax.sharding.Mesh:
    return sharding.make_mesh(data * seq, 1, seq)


def split_options(name: str, options: dict | None = None) -> dict:
    """The options that exercise the split: chunks of 4 tokens (2 per shard), short
    convolutions of width 4, each option's required value, and `options`."""
    options = {**{option: values[0] for option, values in
                  sharding.SEQUENCE_PARALLEL_MIXERS[name].items()}, **(options or {})}
    accepted = mixers.family_options(name)
    options.update({key: value for key, value in (("chunk_size", 4), ("short_conv", 4))
                    if key in accepted and key not in options})
    return options


def build(name: str, causal: bool, length: int = LENGTH, options: dict | None = None):
    """The mixer `name` with `split_options`."""
    return mixers.make(name, emb_dim=EMB, qkv_dim=EMB, num_heads=HEADS, max_len=length,
                       dropout=0.0, attention_dropout=0.0, causal=causal, dtype=jnp.float32,
                       rngs=nnx.Rngs(0), **split_options(name, options))


def inputs(length: int = LENGTH):
    """x and the output cotangent [B, L, E], and a mask [B, L]: rows of length L, L - 5
    and 3 (right padding; the last ends inside the first shard) and one with holes (every
    third position, and positions 5-17, which cover a whole shard of 8, are padding)."""
    x, cot = (jax.random.normal(key, (BATCH, length, EMB))
              for key in jax.random.split(jax.random.key(0), 2))
    pos = np.arange(length)
    holes = (pos % 3 != 1) & ((pos < 5) | (pos > 17))
    return x, cot, jnp.asarray(np.stack([pos < length, pos < length - 5, pos < 3, holes]))


def gradient_fn(mixer):
    """A jitted (params, x, cot, mask) -> ((loss, out), (d params, d x)) of sum(out * cot)."""
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)

    def loss(params, x, cot, mask):
        out = nnx.merge(graphdef, params, rest)(x, mask, deterministic=True)
        return jnp.sum(out * cot), out

    return params, jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def on_mesh(mesh, *arrays):
    return [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), "seq"))) for x in arrays]


def assert_trees_close(got, want, rel=1e-5):
    """got, want: (outputs, gradients). Every leaf's largest difference <= rel x (its
    largest |value| + the largest |value| of any gradient), all finite. The second term is
    there for gradients that are sums with cancellation: a key bias's gradient (softmax is
    invariant to it, FoX's nearly so) is rounding-accurate to the size of its terms, not to
    the size of its sum (measured: FoX's bidirectional key bias 2.7e-6 apart, its largest
    value 0.13)."""
    overall = max(np.abs(np.asarray(w, np.float64)).max() for w in jax.tree.leaves(want[1]))
    for path, g, w in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.isfinite(g).all(), path[0]
        error, scale = np.abs(g - w).max(), np.abs(w).max()
        assert error <= rel * (scale + overall), (
            f"{path[0]}: {error:.3g} > {rel} x ({scale:.3g} + {overall:.3g})")


def split_and_whole(name, causal, data, seq, length=LENGTH, options=None):
    """(outputs and gradients on the (data, seq) mesh, the same on one device)."""
    params, grad = gradient_fn(build(name, causal, length, options))
    x, cot, mask = inputs(length)
    (_, want), want_grads = grad(params, x, cot, mask)
    mesh = make_mesh(data, seq)
    with jax.set_mesh(mesh):
        (_, got), got_grads = grad(params, *on_mesh(mesh, x, cot, mask))
    return (got, got_grads), (want, want_grads)


# Every family of SEQUENCE_PARALLEL_MIXERS (the exact attentions included) is a layer of one
# of two whole encoders, one causal and one bidirectional, taken alternately
# (`test_an_encoder_of_every_family_...`), and runs as one layer here in the other
# direction, so every family is split in both directions, once in a whole encoder; the
# exact attentions' layers in both directions: tests/test_ring_attention.py. The Mamba2
# block's layer runs in both directions in its own test below. Three cases run on
# (data 2, seq 2) at length 30, which `seq` does not divide (each shard of 15 tokens is
# padded inside to 16); the others on (data 1, seq 4) at length 32.
FAMILIES = tuple(sharding.SEQUENCE_PARALLEL_MIXERS)
ENCODERS = {True: FAMILIES[0::2], False: FAMILIES[1::2]}
TWO_BY_TWO = (("performer", True), ("gated_deltanet", False), ("s5", False))
CASES = [(name, causal) for name in STATE_PASSING if name != "mamba2" for causal in (True, False)
         if name not in ENCODERS[causal] or (name, causal) in TWO_BY_TWO]


@pytest.mark.parametrize("name, causal", CASES,
                         ids=[f"{n}-{'causal' if c else 'bidirectional'}" for n, c in CASES])
def test_mixer_over_a_split_sequence_equals_the_whole(name, causal):
    if (name, causal) in TWO_BY_TWO:
        got, want = split_and_whole(name, causal, data=2, seq=2, length=LENGTH - 2)
    else:
        got, want = split_and_whole(name, causal, data=1, seq=4)
    assert_trees_close(got, want)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mamba2_block_with_groups_a_learned_initial_state_and_holes(causal):
    """The Mamba2 block's convolution window crosses shards over padded positions (the
    holes row: a shard with no real token), its grouped SSD starts from a learned state."""
    got, want = split_and_whole("mamba2", causal, data=1, seq=4,
                                options={"ngroups": 2, "learnable_init_states": True,
                                         "head_dim": 4, "d_state": 16})
    assert_trees_close(got, want)


# Small enough for the Mamba2 block at width 8 (its own test above covers its groups).
MAMBA2_OPTIONS = {"head_dim": 4, "d_state": 16}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_an_encoder_of_every_family_over_a_split_sequence_equals_the_whole(causal):
    """An encoder whose layers are half the families in turn (`ENCODERS`), with
    embeddings, norms, MLPs and pooling, on (data 1, seq 4): its per-token outputs and
    the gradients of every parameter equal the unsplit encoder's (right padding and the
    holes row of `inputs`), to `assert_trees_close`'s bound (softmax's key bias has a zero
    gradient but for rounding)."""
    pattern = [LayerMixer(name, split_options(name, MAMBA2_OPTIONS if name == "mamba2"
                                              else None), True)
               for name in ENCODERS[causal]]
    encoder = models.Encoder(
        vocab_size=10, max_len=LENGTH, num_layers=len(pattern), emb_dim=EMB, qkv_dim=EMB,
        num_heads=HEADS, mlp_dim=EMB, dropout=0.0, attention_dropout=0.0,
        pooling="last" if causal else "mean", positions="sinusoidal",
        attention=pattern[0].name, attention_options=pattern[0].options, causal=causal,
        pattern=pattern, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    _, cot, mask = inputs()
    tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, 10)

    def loss(params, tokens, mask):
        out = nnx.merge(graphdef, params, rest).tokens(tokens, mask)
        return jnp.sum(out * cot), out

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, want), want_grads = grad(params, tokens, mask)
    mesh = make_mesh(1, 4)
    with jax.set_mesh(mesh):
        (_, got), got_grads = grad(params, *on_mesh(mesh, tokens, mask))
    assert_trees_close((got, got_grads), (want, want_grads))


def _compiled(name, causal, length, mesh=None):
    params, grad = gradient_fn(build(name, causal, length))
    x, cot, mask = inputs(length)
    if mesh is None:
        return grad.lower(params, x, cot, mask).compile()
    with jax.set_mesh(mesh):
        return grad.lower(params, *on_mesh(mesh, x, cot, mask)).compile()


@pytest.mark.parametrize("name, gathers", [("gated_deltanet", 1), ("s5", 2)])
def test_a_device_holds_about_a_quarter_of_the_activations_and_gathers_only_states(
        name, gathers):
    """XLA's memory analysis of the bidirectional forward + backward pass, 4 rows and
    L = 512: per device, the split program's temporaries are at most 0.4 of the whole
    program's (a quarter, plus the gathered states and the replicated parameters'
    gradients). Its forward pass all-gathers one raveled state summary per recurrence
    ([4 devices, its size]; the gated delta rule stacks both directions in one, S5 scans
    each direction) and nothing of the sequence; the backward pass reduce-scatters (or
    all-reduces) their gradients."""
    length = 512
    whole = _compiled(name, False, length).memory_analysis().temp_size_in_bytes
    split = _compiled(name, False, length, make_mesh(1, 4))
    assert split.memory_analysis().temp_size_in_bytes <= 0.4 * whole, (
        split.memory_analysis().temp_size_in_bytes, whole)
    text = split.as_text()
    lines = [line for line in text.splitlines() if re.search(r" all-gather(-start)?\(", line)]
    assert len(lines) == gathers, lines
    assert all(re.search(r"= \w+\[4,\d+\]", line) for line in lines), lines
    assert "reduce-scatter" in text or "all-reduce" in text
