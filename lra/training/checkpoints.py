"""Checkpoints: orbax, holding the state, the data iterator position and the bookkeeping.

Each checkpoint also holds exact check sums of its arrays (`fingerprint`), verified on
restore: orbax checks its index, not the stored values, so a corrupted data file could
otherwise be read back silently.

Restoring is decided together: the processes try the same steps, newest first, and after
each read every process's verdict (read back or not, then check sums equal or not) is
gathered, so all of them restore the same step, the newest one that reads back on every
host. A checkpoint unreadable on any host (corrupt, cut short, not visible there) is moved
to `checkpoints_unreadable/` for all; every collective (the verdicts, the check sums, the
barrier after the move) is reached by every process. Reads go through a reader of this
process alone, so a read that fails on one host leaves no other waiting in orbax.
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

from lra.parallel import distributed


@dataclasses.dataclass
class Progress:
    """What a checkpoint must carry besides the arrays to resume the bookkeeping exactly."""

    step: int = 0
    train_seconds: float = 0.0  # the steps' time, compilation excluded
    compile_seconds: float = 0.0  # lowering + compiling the train step, each (re)start
    val_accuracy: float = math.nan
    val_step: int = -1
    test_accuracy: float = math.nan
    test_step: int = -1
    best_val_accuracy: float = -math.inf
    best_step: int = -1
    test_accuracy_at_best: float = math.nan
    # token_classify: the share of examples with every scored position right
    val_sequence_accuracy: float = math.nan
    test_sequence_accuracy: float = math.nan
    test_sequence_accuracy_at_best: float = math.nan
    # Train metrics of the steps since the last logged interval, {"steps": n, "sums":
    # {metric: sum}} (lra.training.loop.Interval.unlogged; {} when the checkpoint's step was logged),
    # so the resumed run logs the same averages. Older checkpoints hold a list of per-step
    # dicts, which lra.training.loop.start_totals reads too.
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
        # Reads wait for no other process (orbax's own restore ends with a barrier that a
        # process whose read failed would never reach); `restore_latest` agrees instead.
        alone = ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()})
        self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                                        multiprocessing_options=alone)

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
        """The newest checkpoint that reads back on every process.

        All processes must call it. Unreadable newer ones (on any process) are moved to
        `checkpoints_unreadable/` with a warning, so the run continues from the one before
        and can save those steps anew.

        Returns:
          (state, data_state, Progress), or None when no checkpoint reads back everywhere.
        """
        steps = set(self._manager.all_steps())
        restored, unreadable = None, []
        while restored is None and (step := _newest_everywhere(steps - set(unreadable))) >= 0:
            restored = self._restore_everywhere(step, abstract_state, here=step in steps)
            if restored is None:
                unreadable.append(step)
        if unreadable:
            self._set_aside(unreadable)
        if restored is None:
            return None
        return restored["state"], restored["data"], Progress(**restored["progress"])

    def _restore_everywhere(self, step: int, abstract_state, *, here: bool) -> dict | None:
        """Checkpoint `step` if it reads back, with its check sums, on every process."""
        candidate, reason = (self._read(step, abstract_state) if here
                             else (None, "not found by this process"))
        if not _readable_everywhere(step, reason):
            return None
        sums = jax.device_get(fingerprint(candidate["state"])).tolist()  # every process
        mismatch = (None if sums == candidate["fingerprint"]
                    else "its arrays differ from the check sums saved with them")
        return candidate if _readable_everywhere(step, mismatch) else None

    def _read(self, step: int, abstract_state) -> tuple[dict | None, str | None]:
        """(the checkpoint, None), or (None, why it does not read back on this process)."""
        try:
            return self._reader.restore(self.directory / str(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                progress=ocp.args.JsonRestore(),
                fingerprint=ocp.args.JsonRestore(),
            )), None
        except Exception as error:  # noqa: BLE001 - any failure to read means unusable
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if len(reason) > 240:  # storage errors append their whole spec
                reason = reason[:240] + " ..."
            return None, reason

    def _set_aside(self, steps: list[int]) -> None:
        """Moves `steps` to `checkpoints_unreadable/` (process 0); all processes re-list."""
        if distributed.is_primary():
            aside = self.directory.parent / "checkpoints_unreadable"
            aside.mkdir(exist_ok=True)
            for step in steps:
                if (self.directory / str(step)).exists():  # it may be missing only here
                    (self.directory / str(step)).rename(aside / f"{step}-{time.time_ns()}")
        distributed.barrier("lra:unreadable-checkpoints-moved")
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        self._reader.close()


def _newest_everywhere(steps: set[int]) -> int:
    """The newest of the steps any process still has to try; -1 when none has any."""
    return distributed.max_over_processes(max(steps, default=-1))


def _readable_everywhere(step: int, reason: str | None) -> bool:
    """Gathers each process's verdict on `step` (`reason` None: it reads back here);
    warns when any process failed. The same answer on every process."""
    failing = distributed.failing_processes(reason is None)
    if failing:
        where = reason or f"on process(es) {', '.join(map(str, failing))}"
        logging.warning("checkpoint at step %d is unreadable (%s); trying an older one",
                        step, where)
    return not failing
