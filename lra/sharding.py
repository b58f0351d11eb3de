"""The device mesh and how arrays are laid out on it: batches, parameters, optimizer state.

The mesh has two axes, `data` and `fsdp` (`config.mesh_fsdp` devices on the latter).
Batches are split along their first axis over both. Parameter and optimizer-state arrays
of at least `FSDP_MIN_ELEMENTS` elements are sharded over `fsdp` along their largest
dimension that the axis size divides; the rest is replicated. The rule reads only shapes,
so every attention family's parameters are covered without annotations.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

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


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """How an array of `shape` is sharded over an `fsdp` axis of size `fsdp`.

    Its largest dimension divisible by `fsdp` is split (the first such when tied); arrays
    under `FSDP_MIN_ELEMENTS` elements or without a divisible dimension stay replicated.
    """
    divisible = [axis for axis, size in enumerate(shape) if size % fsdp == 0]
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_ELEMENTS or not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda a: shape[a])
    return PartitionSpec(*(("fsdp" if a == axis else None) for a in range(len(shape))))


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
    """NamedShardings for a (possibly abstract) state pytree under the `fsdp` rule."""
    fsdp = mesh.shape.get("fsdp", 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_state)
