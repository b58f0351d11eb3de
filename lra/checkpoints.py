"""Checkpoints: orbax, holding the state, the data iterator position and the bookkeeping.

Each checkpoint also holds exact check sums of its arrays (`fingerprint`), verified on
restore: orbax checks its index, not the stored values, so a corrupted data file could
otherwise be read back silently. An unreadable or mismatching newest checkpoint is moved
to `checkpoints_unreadable/` and the one before is used.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec

from lra import distributed


@dataclasses.dataclass
class Progress:
    """What a checkpoint must carry besides the arrays to resume the bookkeeping exactly."""

    step: int = 0
    train_seconds: float = 0.0
    val_accuracy: float = math.nan
    val_step: int = -1
    test_accuracy: float = math.nan
    test_step: int = -1
    best_val_accuracy: float = -math.inf
    best_step: int = -1
    test_accuracy_at_best: float = math.nan
    # Train metrics of the steps since the last logged interval, {"steps": n, "sums":
    # {metric: sum}} (lra.loop.Interval.unlogged; {} when the checkpoint's step was logged),
    # so the resumed run logs the same averages. Older checkpoints hold a list of per-step
    # dicts, which lra.loop.start_totals reads too.
    unlogged: dict | list = dataclasses.field(default_factory=dict)


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@functools.partial(jax.jit, out_shardings=PartitionSpec())
def fingerprint(state) -> jax.Array:
    """[num_arrays, 2] uint32 check sums of the bits of every array in `state`.

    Sums wrap around, so they are exact and the same under any sharding; the second one
    weights each element by its position. Saved with every checkpoint, they reveal arrays
    that read back without an error but changed on disk (orbax checks its index, not the
    values). Call it under `jax.set_mesh`; every process gets the sums.
    """
    def sums(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize])
        bits = bits.astype(jnp.uint32).ravel()
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1
        return jnp.stack([jnp.sum(bits), jnp.sum(bits * weights)])

    return jnp.stack([sums(x) for x in jax.tree.leaves(state)])


class Checkpoints:
    """Orbax checkpoints of (state, data iterator position, Progress), newest N kept.

    Each also holds the `fingerprint` of its state, checked when it is restored.
    """

    def __init__(self, directory: Path, keep: int):
        self.directory = directory.absolute()
        # Processes synchronise each save under keys named after the folder, so managers
        # of several folders (checkpoints/, checkpoints_best/) can save the same step.
        sync = ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=self.directory.name)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               multiprocessing_options=sync)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, data_state: dict, progress: Progress) -> None:
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            progress=ocp.args.JsonSave(dataclasses.asdict(progress)),
            fingerprint=ocp.args.JsonSave(jax.device_get(fingerprint(state)).tolist()),
        ))

    def replace(self, step: int, state, data_state: dict, progress: Progress) -> None:
        """Saves `step` as the only checkpoint kept from now on (keep=1: the best-val state).

        Checkpoints at `step` or later are deleted first: a resumed run that replays steps
        reaches them again (with the same state), and orbax refuses an existing step.
        """
        for old in self._manager.all_steps():
            if old >= step:
                self._manager.delete(old)
        self.save(step, state, data_state, progress)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, abstract_state):
        """The newest checkpoint that reads back.

        An unreadable (truncated, corrupt) newer one is moved to `checkpoints_unreadable/`
        with a warning, so the run continues from the one before and can save that step anew.

        Returns:
          (state, data_state, Progress), or None when there is no readable checkpoint.
        """
        restored, unreadable = None, []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                candidate = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    progress=ocp.args.JsonRestore(),
                    fingerprint=ocp.args.JsonRestore(),
                ))
                sums = jax.device_get(fingerprint(candidate["state"])).tolist()
                if sums != candidate["fingerprint"]:
                    raise ValueError("its arrays differ from the check sums saved with them")
                restored = candidate
                break
            except Exception as error:  # noqa: BLE001 - any failure to read means unusable
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                if len(reason) > 240:  # storage errors append their whole spec
                    reason = reason[:240] + " ..."
                logging.warning("checkpoint at step %d is unreadable (%s); trying an older one",
                                step, reason)
                unreadable.append(step)
        if unreadable:
            if distributed.is_primary():  # one process moves them; all then re-list
                aside = self.directory.parent / "checkpoints_unreadable"
                aside.mkdir(exist_ok=True)
                for step in unreadable:
                    (self.directory / str(step)).rename(aside / f"{step}-{time.time_ns()}")
            distributed.barrier("lra:unreadable-checkpoints-moved")
            self._manager.reload()
        if restored is None:
            return None
        return restored["state"], restored["data"], Progress(**restored["progress"])

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
