"""The device mesh and how arrays are laid out on it: batches, parameters, optimizer state.

The mesh has two axes, `data` and `fsdp` (`config.mesh_fsdp` devices on the latter).
Batches are split along their first axis over both. Parameter and optimizer-state arrays
of at least `FSDP_MIN_ELEMENTS` elements are sharded over `fsdp` along their largest
dimension that the axis size divides; the rest is replicated. The rule reads only shapes,
so every attention family's parameters are covered without annotations. Arrays under a
`STACKED_LAYERS` node (the encoder's scanned layer stack, `model.scan_layers`) have a
leading layer axis, which is never split: the rule applies to each layer's slice.

In the train step the parameters stay sharded; inside `gathering(mesh)` the encoder runs each
layer on its parameters gathered whole just before the layer runs (the hook
`lra.models.stack.gathering_layers`, given `gather` over this mesh), an all-gather whose
transpose reduce-scatters that layer's gradient. Activations keep
the batch sharding, and the model is gathered layer by layer, not all at once.
"""

from __future__ import annotations

import contextlib
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lra.models.stack import STACKED_LAYERS, gathering_layers

MESH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated under fsdp: gathering them costs more than they hold.
FSDP_MIN_ELEMENTS = 1024


def make_mesh(num_devices: int, fsdp: int = 1) -> jax.sharding.Mesh:
    """A (`data`, `fsdp`) mesh over the first `num_devices` devices (0 = all).

    Args:
      num_devices: how many devices to use; 0 = every device.
      fsdp: size of the `fsdp` axis (parameter sharding); `data` gets devices / fsdp.

    Raises:
      ValueError: too few devices, or `fsdp` does not divide their number.
    """
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"config.num_devices={num_devices} but only {len(devices)} devices exist")
    devices = devices[: num_devices or len(devices)]
    if not isinstance(fsdp, int) or fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"config.mesh_fsdp={fsdp!r} must be a positive divisor of the "
                         f"{len(devices)} devices")
    return jax.make_mesh(
        (len(devices) // fsdp, fsdp), MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices,
    )


def batch_spec(mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Batches are split along their first axis over every mesh axis (data and fsdp)."""
    return PartitionSpec(mesh.axis_names)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, *, stacked: bool = False) -> PartitionSpec:
    """How an array of `shape` is sharded over an `fsdp` axis of size `fsdp`.

    Its largest dimension divisible by `fsdp` is split (the first such when tied); arrays
    under `FSDP_MIN_ELEMENTS` elements or without a divisible dimension stay replicated.
    With `stacked`, axis 0 indexes layers and stays whole; the rule applies to shape[1:].
    """
    if stacked:
        return PartitionSpec(None, *fsdp_spec(shape[1:], fsdp))
    divisible = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_ELEMENTS or not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda a: shape[a])
    return PartitionSpec(*(("fsdp" if a == axis else None) for a in range(len(shape))))


def is_stacked(path) -> bool:
    """True if a pytree path (of `jax.tree_util`) runs through a `STACKED_LAYERS` node."""
    return any(getattr(key, "key", None) == STACKED_LAYERS for key in path)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
    """NamedShardings for a (possibly abstract) state pytree under the `fsdp` rule."""
    fsdp = mesh.shape.get("fsdp", 1)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp, stacked=is_stacked(path))),
        abstract_state)


def constrain_to_fsdp(tree, mesh: jax.sharding.Mesh):
    """`tree`'s arrays constrained to their `fsdp` shards (a reduce-scatter for gradients)."""
    fsdp = mesh.shape.get("fsdp", 1)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, fsdp_spec(x.shape, fsdp, stacked=is_stacked(path)))), tree)


def gather(tree, mesh: jax.sharding.Mesh):
    """`tree`'s arrays whole on every device, from their `fsdp` shards.

    The array is first constrained to its shards, then replicated, so the transpose (the
    gradient) is reduce-scattered back to the shards right where the array was gathered.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated),
                        constrain_to_fsdp(tree, mesh))


@contextlib.contextmanager
def gathering(mesh: jax.sharding.Mesh):
    """While tracing inside it, the encoder's layers (and `lra.models.stack.gathered`)
    gather their parameters over `mesh`'s `fsdp` axis (if > 1)."""
    fsdp = mesh.shape.get("fsdp", 1) > 1
    with gathering_layers((lambda tree: gather(tree, mesh)) if fsdp else None):
        yield
