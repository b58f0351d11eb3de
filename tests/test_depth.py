"""lra.bench's sequential depth: the counting rules, real mixers' forms, the bench records."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lra.bench import depth, output
from lra.bench import layers as bench
from lra.models import attention


def _scan(length):
    """c -> c after a scan of `length` steps with a plain body."""
    return lambda c: jax.lax.scan(lambda c, x: (c * x + 1.0, None), c, jnp.ones(length))[0]


def test_a_scan_counts_its_length():
    assert depth.sequential_depth(_scan(7), 1.0) == 7


def test_nested_scans_multiply():
    """A scan of 100 steps inside a scan of 3: 300 sequential steps."""
    outer = lambda c: jax.lax.scan(lambda c, x: (_scan(100)(c) * x, None), c, jnp.ones(3))[0]
    assert depth.sequential_depth(outer, 1.0) == 300


def test_sequential_scans_add():
    assert depth.sequential_depth(lambda c: _scan(4)(_scan(7)(c)), 1.0) == 11


def test_cond_takes_the_deepest_branch():
    fn = lambda c, p: jax.lax.cond(p, _scan(3), _scan(9), c)
    assert depth.sequential_depth(fn, 1.0, True) == 9
    switch = lambda c, i: jax.lax.switch(i, [_scan(2), _scan(12), lambda c: c], c)
    assert depth.sequential_depth(switch, 1.0, 0) == 12


def test_fori_loop_with_static_bounds():
    assert depth.sequential_depth(
        lambda c: jax.lax.fori_loop(2, 8, lambda i, c: c * 2.0, c), 1.0) == 6
    # Bounds traced inside a jit: a while loop whose bounds are literals of the caller.
    inner = jax.jit(lambda c, n: jax.lax.fori_loop(0, n, lambda i, c: _scan(3)(c), c))
    assert depth.sequential_depth(lambda c: inner(c, 5), 1.0) == 15
    counted = lambda c: jax.lax.while_loop(lambda s: s[0] < 10,
                                           lambda s: (s[0] + 1, s[1] * 2.0), (0, c))
    assert depth.sequential_depth(counted, 1.0) == 10


def test_a_jitted_inner_function_is_looked_through():
    assert depth.sequential_depth(jax.jit(lambda c: _scan(7)(jax.jit(_scan(2))(c))), 1.0) == 9


def test_a_data_dependent_while_loop_is_unknown():
    doubling = lambda c: jax.lax.while_loop(lambda c: c < 100.0, lambda c: c * 2.0, c)
    assert depth.sequential_depth(doubling, 1.0) is None
    assert depth.sequential_depth(lambda c: _scan(3)(doubling(c)), 1.0) is None
    dynamic = lambda c, n: jax.lax.fori_loop(0, n, lambda i, c: c * 2.0, c)
    assert depth.sequential_depth(dynamic, 1.0, 5) is None


def test_forward_and_backward_are_counted_apart():
    def loss(x):  # a nonlinear scan: its backward is a reversed scan of the same length
        return jax.lax.scan(lambda c, a: (jnp.sin(c) * a, None), jnp.sum(x), jnp.ones(7))[0]

    assert depth.forward_backward_depth(loss, jnp.ones(3)) == (7, 7)
    # Rematerialised: the backward pass recomputes the forward scan first.
    assert depth.forward_backward_depth(jax.checkpoint(loss), jnp.ones(3)) == (7, 14)


def test_a_pallas_grid_is_parallel_unless_declared_sequential():
    pl = pytest.importorskip("jax.experimental.pallas")
    tpu = pytest.importorskip("jax.experimental.pallas.tpu")

    def kernel(x_ref, o_ref):
        o_ref[...] = _scan(3)(x_ref[...])

    def call(**options):  # a grid of 4 x 5 blocks, traced only
        spec = pl.BlockSpec((8, 8), lambda i, j: (i, 0))
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((32, 8), jnp.float32),
                              grid=(4, 5), in_specs=[spec], out_specs=spec, interpret=True,
                              **options)

    x = jnp.ones((32, 8))
    assert depth.sequential_depth(call(), x) == 3
    semantics = tpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    assert depth.sequential_depth(call(compiler_params=semantics), x) == 5 * 3


def _mixer_depths(name, length, **options):
    module = attention.make(name, num_heads=2, head_dim=8, max_len=length, causal=True,
                            rngs=nnx.Rngs(0), **options)
    graphdef, state = nnx.split(module)

    def loss(q, k, v):
        return jnp.sum(nnx.merge(graphdef, state)(q, k, v, None, deterministic=True))

    x = jax.ShapeDtypeStruct((1, length, 2, 8), jnp.float32)
    return depth.forward_backward_depth(loss, x, x, x)


def test_recurrent_linear_attention_is_as_deep_as_the_sequence():
    forward, backward = _mixer_depths("linear", 256, form="recurrent")
    assert forward == 256 and backward >= 256


def test_chunked_linear_attention_is_shallow():
    length, chunk = 256, 32
    bound = length // chunk + 8 * math.log2(chunk)
    forward, backward = _mixer_depths("linear", length, form="chunked", chunk_size=chunk)
    assert length // chunk <= forward <= bound
    assert backward <= 2 * bound


def test_bench_records_carry_depths():
    tiny = ["--heads", "2", "--head_dim", "8", "--repeats", "1", "--matmul_size", "64",
            "--no_baseline", "--scopes", "layer"]
    records = bench.main(["--attention", "linear:form=recurrent", "--lengths", "32", *tiny])
    (record,) = records
    assert (record["depth_forward"], record["depth_backward"]) == (32, 32)
    assert "Sequential depth (forward / backward)" in output.markdown(records)
    assert "| linear:form=recurrent | 32 / 32 |" in output.markdown(records)


def test_the_step_scope_counts_every_layer():
    settings = bench.Settings(step_layers=2, step_emb_dim=16, step_qkv_dim=16, step_heads=2,
                              step_mlp_dim=32, step_dropout=0.0)
    program = bench.PROGRAMS["step"]("linear:form=recurrent", 32, settings)
    loss, inputs = program.loss(*program.make_args())
    forward, backward = depth.forward_backward_depth(loss, *inputs)
    assert forward == 2 * 32 and backward >= 2 * 32


@pytest.mark.parametrize("scope", ["layer", "step"])
def test_depth_table_layout(scope):
    records = [{"attention": a, "scope": scope, "length": n, "depth_forward": f,
                "depth_backward": b} for a, n, f, b in
               [("x", 1024, 16, 16), ("x", 2048, 32, None), ("y", 1024, 1024, 2048)]]
    assert output.depth_markdown(records).splitlines()[2:] == [
        "| attention | 1K | 2K |", "|---|---|---|", "| x | 16 / 16 | 32 / ? |",
        "| y | 1,024 / 2,048 |  |"]


def test_depth_only_traces_without_compiling_or_timing(tmp_path):
    records = bench.main(["--attention", "linear:form=recurrent", "--no_baseline", "--causal",
                          "--lengths", "64", "--scopes", "layer", "--depth_only",
                          "--heads", "2", "--head_dim", "8", "--out", str(tmp_path)])
    (record,) = records
    assert (record["depth_forward"], record["time_ms"], record["peak_bytes"]) == (64, None, None)
    text = (tmp_path / "bench.md").read_text()
    assert "Sequential depth" in text and "| linear:form=recurrent | 64 / 64 |" in text
