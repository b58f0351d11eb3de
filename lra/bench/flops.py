"""What `lra.bench` counts besides time: matmul FLOPs from the jaxpr, XLA's cost and
memory analyses of a compiled program, and the device's large-matmul FLOP/s."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core


def dot_flops(fn: Callable, *args) -> int:
    """FLOPs of the matrix products `fn(*args)` performs (2 per multiply-add), from its jaxpr.

    A scan body counts `length` times, a cond its most expensive branch, a while-loop body
    once (its trip count is unknown before running). XLA's cost analysis, by contrast,
    counts every loop body once, which undercounts chunked and recurrent forms.

    Args:
      fn: a function of arrays (jitted or not).
      *args: arrays or `jax.ShapeDtypeStruct`s to trace it with.
    """
    return _jaxpr_dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_dot_flops(jaxpr: jax_core.Jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            depth = math.prod(lhs_shape[axis] for axis in contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * depth
            continue
        inner = [_jaxpr_dot_flops(sub) for sub in _subjaxprs(eqn.params)]
        if not inner:
            continue
        if eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(inner)
        elif eqn.primitive.name == "cond":
            total += max(inner)
        else:
            total += sum(inner)
    return total


def _subjaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax_core.Jaxpr):
                yield item


def matmul_flops_per_s(size: int, dtype: str, repeats: int) -> float:
    """FLOP/s of a [size, size] @ [size, size] matmul on the default device (median)."""
    keys = jax.random.split(jax.random.key(1), 2)
    a, b = (jax.random.normal(key, (size, size), dtype) for key in keys)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(compiled(a, b))
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(compiled(a, b))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def cost_flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def compiled_peak(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
