"""The device mesh and how arrays are laid out on it: batches, parameters, optimizer state.

The mesh has three axes, `data`, `fsdp` and `seq` (`config.mesh_fsdp` and
`config.mesh_seq` devices on the last two; `data` gets the rest). Batches are split along
their first axis over `data` and `fsdp`, and arrays of a token per position ([B, L]: the
inputs, masks, per-position targets) along their second axis over `seq` too (sequence
parallelism: one sequence split over `mesh_seq` devices); per-example arrays ([B]:
targets, weights) are not split over `seq` (`batch_spec`). Only the mixers of
`SEQUENCE_PARALLEL_MIXERS` run with `mesh_seq` > 1 (lra/training/validation.py); the
encoder keeps its block activations [B, L, E] split the same way (lra/models/encoder.py).
With `mesh_seq` = 1 every layout is the (data, fsdp) one. Parameter and optimizer-state arrays
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
import functools
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lra.models.attention.sequence_parallel import SEQ_AXIS, splits_sequence
from lra.models.stack import STACKED_LAYERS, gathering_layers

MESH_AXES = ("data", "fsdp", SEQ_AXIS)  # SEQ_AXIS splits sequences; the others a batch's rows
# Mixers that run with the sequence split over the `seq` axis (config.mesh_seq > 1), each
# with the option values it needs (option -> the values allowed):
# - the exact attentions attend across the split (ring attention or all-gather of keys
#   and values, lra/models/attention/sequence_parallel.py); FoX gathers its keys, values
#   and cumulative forget gates (lra/models/attention/fox.py);
# - the linear-time mixers pass states (lra/models/attention/state_passing.py): the
#   kernelized maps (linear.py), the gated cores (gated.py), the delta rule (delta.py)
#   the diagonal SSMs (mixers/ssm.py's `linear_recurrence`; S4D in its recurrent form),
#   the Mamba2 block (mixers/mamba2.py; attention/ssd.py's grouped SSD) and RWKV-7's
#   generalised delta rule (mixers/rwkv7.py; its token shift reads across the shards).
# Every other mixer is refused under mesh_seq > 1 (lra/training/validation.py): its scan,
# whole-length projection (linformer), sorting or blocking would need every position at
# once (XLA would gather the whole sequence on each device).
SEQUENCE_PARALLEL_MIXERS = {
    "softmax": {"implementation": ("xla",)},  # the fused kernels (cudnn, pallas) are not
    "memory_efficient": {},
    "fox": {"form": ("blockwise",)},  # keys, values and gates gathered (fox.py)
    **{name: {} for name in ("linear", "performer", "cosformer", "taylor")},
    **{name: {} for name in ("retnet", "gla", "ssd")},
    **{name: {} for name in ("deltanet", "gated_deltanet", "kda", "gated_deltaproduct")},
    "s5": {},
    "lru": {},
    "s4d": {"form": ("recurrent",)},  # the FFT convolution needs the whole length
    "mamba2": {},  # its convolution's window and its grouped SSD both pass states
    "rwkv7": {},  # its token shift and its state both pass across the shards
}
# Arrays smaller than this stay replicated under fsdp: gathering them costs more than they hold.
FSDP_MIN_ELEMENTS = 1024


def make_mesh(num_devices: int, fsdp: int = 1, seq: int = 1) -> jax.sharding.Mesh:
    """A (`data`, `fsdp`, `seq`) mesh over the first `num_devices` devices (0 = all).

    Args:
      num_devices: how many devices to use; 0 = every device.
      fsdp: size of the `fsdp` axis (parameter sharding).
      seq: size of the `seq` axis (sequence parallelism); `data` gets
        devices / (fsdp * seq). The innermost axis: a sequence's devices are neighbours.
        With several processes it either divides a process's devices (each sequence on
        one host) or is a multiple of them (each sequence spans whole hosts, which then
        read the same rows: `row_group`).

    Raises:
      ValueError: too few devices, `fsdp` * `seq` does not divide their number, or a
        group of `seq` devices spans several processes.
    """
    devices = jax.devices()
    if num_devices > len(devices):
        raise ValueError(f"config.num_devices={num_devices} but only {len(devices)} devices exist")
    devices = devices[: num_devices or len(devices)]
    if not isinstance(fsdp, int) or fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"config.mesh_fsdp={fsdp!r} must be a positive divisor of the "
                         f"{len(devices)} devices")
    if not isinstance(seq, int) or seq < 1 or len(devices) % (fsdp * seq):
        raise ValueError(f"config.mesh_seq={seq!r} must be a positive integer that divides "
                         f"the {len(devices)} devices together with config.mesh_fsdp={fsdp}")
    mesh = jax.make_mesh(
        (len(devices) // (fsdp * seq), fsdp, seq), MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices,
    )
    # Each process reads whole rows (lra/training/data.py): a process's devices hold whole
    # sequence groups, or a group spans whole processes, which then read the same rows.
    local = jax.local_device_count()
    if jax.process_count() > 1 and seq > 1 and local % seq and seq % local:
        raise ValueError(f"config.mesh_seq={seq} must divide the {local} devices of one "
                         f"process or be a multiple of them (a sequence on one host, or "
                         "spanning whole hosts)")
    row_group(mesh)  # every process holds whole rows of one group
    return mesh


@functools.lru_cache(maxsize=8)  # to_global asks for every array of every batch
def row_group(mesh: jax.sharding.Mesh) -> tuple[int, int]:
    """(this process's row group, the number of groups): the processes whose devices hold
    the same rows of a batch (the (data, fsdp) blocks; with a `seq` axis that spans hosts,
    several processes hold the parts of the same sequences) form a group and read the
    same rows; groups are numbered in row order. Without such sharing: (process index,
    process count).

    Raises:
      ValueError: a process whose devices hold rows of several groups' blocks in a way
        that no contiguous share of the batch describes.
    """
    rows = mesh.devices.reshape(-1, mesh.shape.get(SEQ_AXIS, 1))  # one row block per line
    blocks: dict[int, set[int]] = {}
    for block, devices in enumerate(rows):
        for device in devices:
            blocks.setdefault(device.process_index, set()).add(block)
    shares = sorted({tuple(sorted(own)) for own in blocks.values()})
    size = len(shares[0])
    if any(len(share) != size or list(share) != list(range(share[0], share[0] + size))
           for share in shares):
        raise ValueError(f"the mesh {dict(mesh.shape)} gives processes non-contiguous or "
                         "unequal shares of a batch's rows")
    own = tuple(sorted(blocks.get(jax.process_index(), ())))
    return shares.index(own), len(shares)


def batch_spec(mesh: jax.sharding.Mesh, ndim: int = 1) -> PartitionSpec:
    """How a batch array of `ndim` dimensions is split: its rows over the batch axes
    (every mesh axis but `seq`: data and fsdp), and, when the mesh has a `seq` axis > 1,
    its second axis (the sequence of a [B, L] array: inputs, masks, per-position targets)
    over `seq`. [B] arrays (targets, weights) and every array of a mesh without a `seq`
    split get `PartitionSpec(batch axes)`, today's (data, fsdp) layout."""
    rows = tuple(name for name in mesh.axis_names if name != SEQ_AXIS)
    if ndim >= 2 and splits_sequence(mesh):
        return PartitionSpec(rows, SEQ_AXIS)
    return PartitionSpec(rows)


def batch_shardings(batch, mesh: jax.sharding.Mesh):
    """A `NamedSharding` per array of `batch` (a pytree of arrays or shapes), by its rank
    (`batch_spec`)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(mesh, len(x.shape))), batch)


def step_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding | None:
    """What a jitted step's `in_shardings` give its batch argument (a dict of [B] and
    [B, L] arrays, whose keys depend on the task and objective): without a `seq` split,
    one sharding for every array (rows over data and fsdp, as always); with one, None:
    the step takes the arrays as `lra.training.data.to_global` laid them out
    (`batch_shardings`) and constrains them to that layout itself (`constrain_batch`)."""
    return None if splits_sequence(mesh) else NamedSharding(mesh, batch_spec(mesh))


def constrain_batch(batch, mesh: jax.sharding.Mesh):
    """`batch`'s arrays constrained to their `batch_spec` (traced inside a step)."""
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, batch_spec(mesh, x.ndim))), batch)


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
