"""Sequence parallelism of exact attention (issue 24): ring and all-gather attention over a
`seq` mesh axis equal the single-device softmax (xla path), outputs and gradients; the
compiled programs hold the collectives they should; the attention modules switch to it
inside a mesh with a `seq` axis and change nothing without one.

Rows cover right padding (lengths L, L - 5, 3), a row with no real token, left padding
(causal rows with no allowed key) and holes.
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

from lra.models import attention
from lra.models.attention import sequence_parallel
from lra.parallel import ring

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices")

AXES = ("data", "fsdp", "seq")
BATCH, LENGTH, HEADS, DIM = 6, 32, 2, 8


def make_mesh(data: int, seq: int, axes=AXES) -> jax.sharding.Mesh:
    shape = (data, 1, seq) if len(axes) == 3 else (data, seq)
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                         devices=jax.devices()[: data * seq])


def inputs(length: int = LENGTH):
    """q, k, v, the output cotangent [B, L, H, D] and the mask [B, L]."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cot = (jax.random.normal(key, (BATCH, length, HEADS, DIM)) for key in keys)
    pos = np.arange(length)
    mask = np.stack([pos < length, pos < length - 5, pos < 3, pos < 0, pos >= 10, pos % 3 != 1])
    return q, k, v, cot, jnp.asarray(mask)


def on_mesh(mesh, *arrays):
    """Arrays placed as the trainer's batches: batch over (data, fsdp), length over seq."""
    return [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), "seq"))) for x in arrays]


def outputs_and_grads(attend, q, k, v, cot, mask):
    """attend(q, k, v, mask) and the gradients of sum(out * cot) w.r.t. q, k, v."""
    def loss(q, k, v, cot, mask):
        out = attend(q, k, v, mask)
        return jnp.sum(out * cot), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = grad(q, k, v, cot, mask)
    return (out, *grads)


def core(name: str, causal: bool, length: int = LENGTH, **options):
    return attention.make(name, num_heads=HEADS, head_dim=DIM, max_len=length, causal=causal,
                          rngs=nnx.Rngs(0), **options)


_REFERENCE = {}


def reference(causal: bool):
    """Output and q, k, v gradients of the single-device softmax (xla path)."""
    if causal not in _REFERENCE:
        _REFERENCE[causal] = outputs_and_grads(core("softmax", causal), *inputs())
    return _REFERENCE[causal]


def assert_close(got, want, label="", rel=1e-5):
    """Largest difference <= rel x the largest |want| (every value finite)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), label
    error, scale = np.abs(got - want).max(), np.abs(want).max()
    assert error <= rel * scale, f"{label}: max error {error:.3g} > {rel} x {scale:.3g}"


# key_chunk 3 folds a block of 8 (seq 4) or 16 (seq 2) keys in chunks of 3, the last
# padded; under the striped causal layout each query tile's leading keys are chunked.
@pytest.mark.parametrize("kv_strategy, layout, data, seq, causal, key_chunk", [
    ("ring", "contiguous", 1, 4, True, None),
    ("ring", "contiguous", 1, 4, False, None),
    ("ring", "striped", 1, 4, True, None),
    ("ring", "striped", 1, 4, False, None),
    ("ring", "contiguous", 2, 2, True, None),
    ("ring", "contiguous", 2, 2, False, None),
    ("ring", "striped", 2, 2, True, None),
    ("ring", "contiguous", 1, 4, True, 3),
    ("ring", "contiguous", 2, 2, False, 3),
    ("ring", "striped", 1, 4, True, 3),
    ("all_gather", "contiguous", 1, 4, True, None),
    ("all_gather", "contiguous", 1, 4, False, None),
    ("all_gather", "striped", 1, 4, True, None),
    ("all_gather", "contiguous", 2, 2, True, None),
])
def test_sequence_parallel_attention_equals_softmax(kv_strategy, layout, data, seq, causal,
                                                    key_chunk):
    mesh = make_mesh(data, seq)
    arrays = inputs()
    if layout == "striped":
        arrays = [ring.to_striped(x, seq) for x in arrays]

    def attend(q, k, v, mask):
        return ring.ring_attention_sharded(q, k, v, mask, causal=causal, mesh=mesh,
                                           kv_strategy=kv_strategy, layout=layout,
                                           key_chunk=key_chunk)

    got = outputs_and_grads(attend, *on_mesh(mesh, *arrays))
    if layout == "striped":
        got = [ring.from_striped(x, seq) for x in got]
    for name, g, want in zip(("output", "dq", "dk", "dv"), got, reference(causal)):
        assert_close(g, want, name)


def test_striped_causal_ring_costs_each_device_about_half_the_blocks():
    """The ring moves in lock step, so a step costs what its busiest device computes.
    Contiguous and causal, the last device attends every block whole (the others skip
    the blocks after their queries); striped, every block is about half allowed and each
    device computes only each query tile's allowed prefix (4 tiles: 10 of 16 tile
    products). Counted per device from the traced matrix products, a `cond` at its dearer
    branch (`lra.bench.flops.dot_flops`)."""
    from lra.bench.flops import dot_flops

    mesh = make_mesh(1, 4)
    q, k, v, _, mask = inputs(64)

    def per_device_flops(layout):
        return dot_flops(lambda q, k, v, mask: ring.ring_attention_sharded(
            q, k, v, mask, causal=True, mesh=mesh, layout=layout), q, k, v, mask)

    ratio = per_device_flops("striped") / per_device_flops("contiguous")
    assert 0.5 < ratio < 0.66, ratio


@pytest.mark.parametrize("kv_strategy, present, absent", [
    ("ring", "collective-permute", "all-gather"),
    ("all_gather", "all-gather", "collective-permute"),
])
def test_compiled_program_holds_the_strategy_collective(kv_strategy, present, absent):
    mesh = make_mesh(2, 2)
    q, k, v, _, mask = on_mesh(mesh, *inputs())
    attend = jax.jit(lambda q, k, v, mask: ring.ring_attention_sharded(
        q, k, v, mask, causal=True, mesh=mesh, kv_strategy=kv_strategy))
    text = attend.lower(q, k, v, mask).compile().as_text()
    assert present in text and absent not in text


@pytest.mark.parametrize("name, kv_strategy", [
    ("softmax", "ring"), ("softmax", "all_gather"), ("memory_efficient", "ring")])
def test_module_under_a_seq_mesh_equals_the_module_without(name, kv_strategy):
    """memory_efficient's ring folds its blocks of 16 keys 5 at a time (its chunk_size)."""
    mesh = make_mesh(2, 2)
    module = core(name, causal=True, **({"chunk_size": 5} if name == "memory_efficient" else {}))
    with jax.set_mesh(mesh), sequence_parallel.use_kv_strategy(kv_strategy):
        got = outputs_and_grads(module, *on_mesh(mesh, *inputs()))
        q, k, v, _, mask = on_mesh(mesh, *inputs())
        text = jax.jit(lambda *args: module(*args)).lower(q, k, v, mask).compile().as_text()
    for label, g, want in zip(("output", "dq", "dk", "dv"), got, reference(causal=True)):
        assert_close(g, want, label)
    collective = "collective-permute" if kv_strategy == "ring" else "all-gather"
    assert collective in text


def test_length_that_seq_does_not_divide_is_padded_inside():
    length = LENGTH - 2
    module = core("memory_efficient", causal=True, length=length)
    arrays = inputs(length)
    want = outputs_and_grads(core("softmax", causal=True, length=length), *arrays)
    with jax.set_mesh(make_mesh(1, 4)):
        got = outputs_and_grads(module, *arrays)
    for label, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        assert_close(g, w, label)


@pytest.mark.parametrize("name", ["softmax", "memory_efficient"])
@pytest.mark.parametrize("axes", [AXES, ("data", "fsdp")])
def test_without_a_split_sequence_the_module_traces_as_before(name, axes):
    module = core(name, causal=True)
    q, k, v, _, mask = inputs()
    def jaxpr():  # without the mesh in context, which jaxprs print, and line breaks
        text = "".join(str(jax.make_jaxpr(lambda *args: module(*args))(q, k, v, mask)).split())
        return re.sub(r"ctx_mesh=Mesh\((?:[^()]|\([^()]*\))*\)", "", text)

    before = jaxpr()
    with jax.set_mesh(make_mesh(4, 1, axes)):  # no seq axis, or one of size 1
        assert not sequence_parallel.splits_sequence()
        assert jaxpr() == before


def test_striped_order_puts_token_t_on_shard_t_mod_n():
    tokens = jnp.arange(2 * 12).reshape(2, 12)
    striped = ring.to_striped(tokens, 4)
    shards = striped.reshape(2, 4, 3)
    assert (shards[0, 1] == jnp.array([1, 5, 9])).all()
    assert all((shards[:, i] == tokens[:, i::4]).all() for i in range(4))
    assert (ring.from_striped(striped, 4) == tokens).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        ring.to_striped(jnp.zeros((2, 10)), 4)


def test_bad_settings_are_refused():
    q, k, v, _, mask = inputs(LENGTH - 2)
    with pytest.raises(ValueError, match="kv_strategy must be one of 'ring', 'all_gather'"):
        with sequence_parallel.use_kv_strategy("bogus"):
            pass
    with pytest.raises(ValueError, match="striped layout needs a length divisible"):
        ring.ring_attention_sharded(q, k, v, mask, causal=True, mesh=make_mesh(1, 4),
                                    layout="striped")
    with pytest.raises(ValueError, match="needs a mesh axis 'seq'"):
        ring.ring_attention_sharded(q, k, v, mask, causal=True,
                                    mesh=make_mesh(4, 1, ("data", "fsdp")))
