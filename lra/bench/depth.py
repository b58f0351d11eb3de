"""Sequential depth: how many loop iterations a program runs one after another.

On an accelerator every iteration of a `lax.scan`, `while_loop` or `fori_loop` is a
sequential step (a kernel launch, or one trip of a loop of small kernels), so the number of
such iterations on a program's critical path matters as much as its FLOPs: a recurrent form
of length L runs L steps however little each one computes.

Definition, on a jaxpr (`jaxpr_depth`):

  depth(jaxpr)  = the sum of depth(eqn) over its equations
  plain primitive             0
  scan                        length * max(1, depth(body)); with `unroll=u`,
                              ceil(length / u) * max(1, u * depth(body)) (its loop trips)
  while                       trips * max(1, depth(cond) + depth(body)) when the trip count
                              is static: the cond is `counter < bound`, the body adds 1 to
                              the counter, and counter's start and bound are known integers
                              (literals, constants, or simple integer arithmetic on them,
                              followed into jit calls: the fori_loop pattern; a fori_loop
                              with concrete bounds is a scan in JAX already); else unknown
  cond / switch               the max over its branches
  pallas_call                 its grid is parallel (counted 0), except the dimensions its
                              compiler params declare "arbitrary"/"sequential" (Mosaic's
                              `dimension_semantics`): the product of those grid sizes times
                              max(1, depth(kernel)); no such declaration: depth(kernel)
  any other equation with     the sum of the depths of the jaxprs in its params (jit/pjit,
  sub-jaxprs                  closed_call, custom_jvp_call, custom_vjp_call, remat,
                              shard_map, ...)

"Unknown" (a while loop whose trip count depends on data) is None, and makes every sum,
product and max that contains it None.

Why a sum: equations of a jaxpr are composed sequentially, so a loop that follows another
waits for it. Two loops with no data dependence between them could overlap on a device that
runs them concurrently, so the sum is an upper bound on the critical path, exact for a
chain of dependent loops (a layer's loops over its sequence, the backward after the
forward).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

# Integer arithmetic followed to find static loop bounds: name -> function of the values.
_ARITHMETIC = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "max": max,
               "min": min, "neg": operator.neg, "convert_element_type": lambda x: x}
# Calls whose sub-jaxpr's inputs are the equation's inputs, in order.
_CALLS = {"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
_SEQUENTIAL_SEMANTICS = ("arbitrary", "sequential")


def sequential_depth(fn: Callable, *args) -> int | None:
    """The sequential depth of `fn(*args)` (see the module docstring); None = unknown.

    Args:
      fn: a function of arrays (jitted or not); it is only traced.
      *args: arrays or `jax.ShapeDtypeStruct`s to trace it with.
    """
    return jaxpr_depth(jax.make_jaxpr(fn)(*args))


def forward_backward_depth(loss_fn: Callable, *args) -> tuple[int | None, int | None]:
    """(forward, backward) sequential depths of a scalar `loss_fn(*args)`.

    forward = the depth of `loss_fn`; backward = the depth of the backward pass alone: the
    function `jax.vjp(loss_fn, *args)` returns, applied to a cotangent. Nothing is run:
    the residuals the backward pass reads are abstract (`jax.eval_shape`).
    """
    forward = sequential_depth(loss_fn, *args)
    out, pullback = jax.eval_shape(lambda *xs: jax.vjp(loss_fn, *xs), *args)
    cotangent = jax.ShapeDtypeStruct(out.shape, out.dtype)
    return forward, sequential_depth(lambda vjp, ct: vjp(ct), pullback, cotangent)


def jaxpr_depth(jaxpr: jax_core.Jaxpr | jax_core.ClosedJaxpr,
                known: dict | None = None) -> int | None:
    """The sequential depth of a jaxpr; None = unknown.

    Args:
      jaxpr: a `Jaxpr` or `ClosedJaxpr`.
      known: integer values of some of its variables (inputs the caller knows), used to
        find static while-loop trip counts.
    """
    known = dict(known or {})
    if isinstance(jaxpr, jax_core.ClosedJaxpr):
        for var, const in zip(jaxpr.jaxpr.constvars, jaxpr.consts):
            if (value := _integer(const)) is not None:
                known[var] = value
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        depth = _eqn_depth(eqn, known)
        if depth is None:
            return None
        total += depth
        _fold(eqn, known)
    return total


def _eqn_depth(eqn, known: dict) -> int | None:
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        body = _depth(params["jaxpr"], eqn.invars[:params["num_consts"]], known)
        if body is None:
            return None
        unroll = max(1, int(params.get("unroll", 1)))
        return math.ceil(params["length"] / unroll) * max(1, unroll * body)
    if name == "while":
        return _while_depth(eqn, known)
    if name == "cond":  # cond and switch: the index first, then the branches' operands
        depths = [_depth(branch, eqn.invars[1:], known) for branch in params["branches"]]
        return None if None in depths else max(depths)
    if name == "pallas_call":
        return _pallas_depth(eqn)
    operands = eqn.invars if name in _CALLS else ()
    depths = [_depth(sub, operands, known) for sub in _subjaxprs(params)]
    return None if None in depths else sum(depths)


def _depth(jaxpr, operands, known: dict) -> int | None:
    """The depth of a sub-jaxpr whose first inputs are `operands` of the outer jaxpr."""
    invars = (jaxpr.jaxpr if isinstance(jaxpr, jax_core.ClosedJaxpr) else jaxpr).invars
    inner = {var: value for var, atom in zip(invars, operands)
             if (value := _value(atom, known)) is not None}
    return jaxpr_depth(jaxpr, inner)


def _while_depth(eqn, known: dict) -> int | None:
    params = eqn.params
    num_cond, num_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts = eqn.invars[:num_cond]
    body_consts = eqn.invars[num_cond:num_cond + num_body]
    per_trip = [_depth(params["cond_jaxpr"], cond_consts, known),
                _depth(params["body_jaxpr"], body_consts, known)]
    trips = _trip_count(eqn, known)
    if trips is None or None in per_trip:
        return None
    return trips * max(1, sum(per_trip))


def _trip_count(eqn, known: dict) -> int | None:
    """Trips of a while loop `counter < bound` whose body adds 1 to the counter and keeps
    the bound, with the counter's start and the bound known; else None."""
    params = eqn.params
    cond, body = params["cond_jaxpr"].jaxpr, params["body_jaxpr"].jaxpr
    num_cond, num_body = params["cond_nconsts"], params["body_nconsts"]
    carry = eqn.invars[num_cond + num_body:]
    if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt" or (
            cond.outvars[0] is not cond.eqns[0].outvars[0]):
        return None
    counter, bound = cond.eqns[0].invars
    cond_carry, body_carry = cond.invars[num_cond:], body.invars[num_body:]
    if counter not in cond_carry:
        return None
    i = cond_carry.index(counter)
    step = next((e for e in body.eqns if body.outvars[i] in e.outvars), None)
    if step is None or step.primitive.name != "add" or not _adds_one(step, body_carry[i]):
        return None
    if bound in cond_carry:  # a carried bound (fori_loop's): the body must pass it through
        j = cond_carry.index(bound)
        if body.outvars[j] is not body_carry[j]:
            return None
        bound_value = _value(carry[j], known)
    elif bound in cond.invars:  # a constant of the cond
        bound_value = _value(eqn.invars[cond.invars.index(bound)], known)
    else:
        bound_value = _value(bound, known)
    start = _value(carry[i], known)
    if start is None or bound_value is None:
        return None
    return max(0, bound_value - start)


def _adds_one(eqn, counter) -> bool:
    """Whether `eqn` (an add) is `counter + 1` or `1 + counter`."""
    a, b = eqn.invars
    return (a is counter and _value(b, {}) == 1) or (b is counter and _value(a, {}) == 1)


def _pallas_depth(eqn) -> int | None:
    kernel = _depth(eqn.params["jaxpr"], (), {})
    if kernel is None:
        return None
    semantics = getattr(eqn.params.get("compiler_params"), "dimension_semantics", None) or ()
    grid = getattr(eqn.params["grid_mapping"], "grid", ())
    sequential = [size for size, kind in zip(grid, semantics)
                  if any(word in str(kind).lower() for word in _SEQUENTIAL_SEMANTICS)]
    if not sequential:
        return kernel
    if not all(isinstance(size, int) for size in sequential):
        return None  # a dynamic grid bound
    return math.prod(sequential) * max(1, kernel)


def _fold(eqn, known: dict) -> None:
    """Records the value of an integer scalar that simple arithmetic on known values gives."""
    if eqn.primitive.name not in _ARITHMETIC or len(eqn.outvars) != 1:
        return
    aval = eqn.outvars[0].aval
    if getattr(aval, "shape", None) != () or not jnp.issubdtype(aval.dtype, jnp.integer):
        return
    values = [_value(atom, known) for atom in eqn.invars]
    if None not in values:
        known[eqn.outvars[0]] = _ARITHMETIC[eqn.primitive.name](*values)


def _value(atom, known: dict) -> int | None:
    if isinstance(atom, jax_core.Literal):
        return _integer(atom.val)
    return known.get(atom)


def _integer(value) -> int | None:
    """A Python int for a concrete integer scalar, else None (arrays are not copied)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        if np.shape(value) == () and jnp.issubdtype(value.dtype, jnp.integer):
            return int(value)
    except (AttributeError, TypeError, jax.errors.ConcretizationTypeError):  # a tracer
        pass
    return None


def _subjaxprs(params: dict):
    """The `Jaxpr`s and `ClosedJaxpr`s among an equation's params (alone or in tuples)."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
                yield item
