"""The encoder's L identical blocks: unrolled (a Python loop) or scanned (one traced block).

Unrolled (`scan_layers=False`): an `nnx.List` of L blocks under the attribute `blocks`;
the step's program holds L copies of the block, so tracing and compiling grow with L.
Scanned (`scan_layers=True`): one block whose arrays have a leading layer axis [L, ...],
under the attribute `STACKED_LAYERS` (`scanned_blocks`), built by `nnx.vmap`
(each layer its own initial values and dropout stream) and run by `nnx.scan`: the block is
traced and compiled once. Given the same parameters both give the same outputs and
gradients; initial values and dropout masks are drawn differently. Decoding token by token
(`Encoder.init_decode`) needs the unrolled blocks.

FSDP: inside `gathering_layers(gather)` (which `lra.parallel.sharding.gathering` enters with
the mesh's all-gather), each block runs on `gather(its parameters)`, so it gathers them
whole just before it runs and its gradient is reduce-scattered there in the backward pass.
The models know only this hook, not the mesh. The gathered copies are not kept for the backward pass (a `nnx.remat` whose policy
saves every value but the sharding constraints' outputs): the backward pass gathers each
layer again, so whole copies live one layer at a time (as XLA's scheduler orders them).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
from flax import nnx

# The state node of a scanned layer stack: its arrays are [num_layers, ...].
STACKED_LAYERS = "scanned_blocks"
# The state nodes holding the layers: their parameters are gathered one layer at a time.
LAYER_NODES = ("blocks", STACKED_LAYERS)
# How parameters are gathered where they are used (`gathering_layers`); None = not at all.
_GATHER = contextvars.ContextVar("lra_gather_parameters", default=None)


@contextlib.contextmanager
def gathering_layers(gather: Callable | None):
    """While tracing inside it, each block runs on `gather(its parameters)` and `gathered`
    applies `gather`; None turns both off."""
    token = _GATHER.set(gather)
    try:
        yield
    finally:
        _GATHER.reset(token)


def is_gathering() -> bool:
    """True inside `gathering_layers` with a gather function."""
    return _GATHER.get() is not None


def gathered(params):
    """`params` (a pytree of one layer's or of unstacked arrays) gathered inside
    `gathering_layers`; unchanged outside it."""
    gather = _GATHER.get()
    return params if gather is None else gather(params)


def make_blocks(new_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
                scan: bool, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` blocks from `new_block(rngs)`: an `nnx.List`, or with `scan` one block
    whose every array has a leading axis of size `num_layers`."""
    if not scan:
        return nnx.List(new_block(rngs) for _ in range(num_layers))

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs: nnx.Rngs) -> nnx.Module:
        return new_block(rngs)

    return stacked(rngs)


def run_blocks(blocks: nnx.Module, x_BxLxE: jax.Array, mask_BxL: jax.Array, *, scan: bool,
               remat: bool, deterministic: bool) -> jax.Array:
    """x [B, L, E] through every block in order (`make_blocks`' output, the same `scan`).

    Args:
      remat: if True, each block's activations are recomputed in the backward pass.
      deterministic: if False, blocks apply dropout.
    """
    run_block = _block_runner(remat=remat, deterministic=deterministic)
    if not scan:
        for block in blocks:
            x_BxLxE = run_block(block, x_BxLxE, mask_BxL)
        return x_BxLxE

    @nnx.scan(in_axes=(nnx.Carry, None, 0), out_axes=nnx.Carry)
    def through_layers(x_BxLxE, mask_BxL, block):
        return run_block(block, x_BxLxE, mask_BxL)

    return through_layers(x_BxLxE, mask_BxL, blocks)


def _block_runner(*, remat: bool, deterministic: bool):
    """(block, x_BxLxE, mask_BxL) -> x_BxLxE, rematerialised as `remat` and FSDP need."""

    def run_block(block, x_BxLxE, mask_BxL):
        return _call_gathered(block, x_BxLxE, mask_BxL, deterministic=deterministic)

    if remat:
        return nnx.remat(run_block)
    if is_gathering():
        return nnx.remat(run_block, policy=_save_all_but_gathered)
    return run_block


def _save_all_but_gathered(primitive, *_, **__) -> bool:
    """Remat policy: the backward pass keeps every value but gathered parameters (the only
    sharding constraints in a block), which it gathers again."""
    return primitive.name != "sharding_constraint"


def _call_gathered(block, x_BxLxE, mask_BxL, *, deterministic: bool) -> jax.Array:
    """`block(x, mask)` on its parameters gathered whole (`gathered`)."""
    if not is_gathering():
        return block(x_BxLxE, mask_BxL, deterministic=deterministic)
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    whole = nnx.merge(graphdef, gathered(params), rest)
    y_BxLxE = whole(x_BxLxE, mask_BxL, deterministic=deterministic)
    nnx.update(block, nnx.state(whole, nnx.Not(nnx.Param)))  # BatchNorm statistics, rng counts
    return y_BxLxE
