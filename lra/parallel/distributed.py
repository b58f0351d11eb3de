"""Multi-host runs: start `jax.distributed` when a run spans several processes.

`initialize()` runs once per process, before anything touches a JAX device (launch.py
calls it first thing). It picks one of:

- explicit flags (`--coordinator_address HOST:PORT --num_processes N --process_id I`):
  `jax.distributed.initialize` with exactly these, cluster auto-detection off, every
  local device visible to the process;
- SLURM (an `srun` step of more than one task): JAX's own SLURM detection gives the
  coordinator (first node of the step), the process count and id. JAX then drives one
  GPU per task, the `SLURM_LOCALID`-th; with one task per node, or a task that SLURM
  bound to a subset of the node's GPUs (`--gpus-per-task`), the task drives every GPU it
  sees instead (`slurm_local_device_ids`);
- a Cloud TPU VM (libtpu installed, TPU chips present): `jax.distributed.initialize()`,
  which reads the pod slice's workers from the TPU metadata (one process per host);
- otherwise a single process: nothing to start.

After it, `jax.process_count()` processes each feed their share of every batch
(`lra.data`), process 0 alone writes logs and results, and orbax writes checkpoints
collectively. The helpers below (`is_primary`, `barrier`, `preemption_reached`) are what
the training loop needs to stay in lockstep; on one process they cost nothing.

Waiting without device collectives: `write_marker` / `wait_for_marker` let processes wait
for a file that one of them writes atomically on a shared file system (polling, with a
timeout), so a long wait (process 0 preparing data for hours) never sits in a collective.

Choosing together: `allgather` stacks one small array from every process (one collective
that every process must reach, in the same order); `failing_processes`,
`max_over_processes`, `shared_token` and `check_same_on_all_processes` are built on it, so
decisions that could differ between hosts (which checkpoint reads back, which marker
announces this preparation) are made from every process's view, identically everywhere.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from lra.tasks import storage

_LOG = logging.getLogger(__name__)

# The variables JAX's SLURM detection reads; all are set inside an `srun` step.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str | None:
    """Starts `jax.distributed` for a multi-process run; does nothing for a single process.

    Must run before any JAX computation in this process.

    Args:
      coordinator_address: HOST:PORT of process 0's coordinator service.
      num_processes: how many processes take part; 1 alone forces a single-process run
        (no auto-detection).
      process_id: this process's index in [0, num_processes).

    Returns:
      One line saying what was started, e.g. "SLURM job 42: process 3 of 8 (one GPU per
      task)"; None for a single process.

    Raises:
      ValueError: only some of the three explicit settings are given, or they disagree.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if num_processes == 1 and coordinator_address is None and process_id in (None, 0):
        _LOG.info("single process (--num_processes=1)")
        return None
    if any(value is not None for value in explicit):
        _check_explicit(coordinator_address, num_processes, process_id)
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   cluster_detection_method="deactivate")
        return _log(f"explicit flags: process {process_id} of {num_processes}, coordinator "
                    f"{coordinator_address}")
    if in_slurm_step(os.environ):
        local_device_ids = slurm_local_device_ids(os.environ)
        jax.distributed.initialize(local_device_ids=local_device_ids)
        devices = ("devices: JAX's SLURM default" if local_device_ids is None
                   else f"GPUs {local_device_ids}")
        return _log(f"SLURM job {os.environ['SLURM_JOB_ID']}: process {jax.process_index()} of "
                    f"{jax.process_count()} ({devices})")
    if on_cloud_tpu_vm():
        jax.distributed.initialize()
        return _log(f"Cloud TPU: process {jax.process_index()} of {jax.process_count()}")
    _LOG.info("single process")
    return None


def _check_explicit(coordinator_address, num_processes, process_id) -> None:
    if None in (coordinator_address, num_processes, process_id):
        raise ValueError(
            "give all three of --coordinator_address HOST:PORT, --num_processes N and "
            f"--process_id I (got {coordinator_address!r}, {num_processes!r}, {process_id!r}), "
            "or none of them to auto-detect SLURM or a TPU pod"
        )
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                         f"{num_processes})")


def _log(started: str) -> str:
    _LOG.info("%s", started)
    return started


def in_slurm_step(environ: Mapping[str, str]) -> bool:
    """True inside an `srun` step of more than one task (what JAX's SLURM detection reads)."""
    return all(name in environ for name in SLURM_VARIABLES) and int(environ["SLURM_NTASKS"]) > 1


def slurm_local_device_ids(environ: Mapping[str, str]) -> list[int] | None:
    """Which of the visible GPUs this SLURM task drives; None = JAX's one GPU per task.

    JAX gives task `SLURM_LOCALID` the GPU of that index, which is right for one task per
    GPU where every task sees all of the node's GPUs. A task alone on its node, or one that
    SLURM bound to a subset of the node's GPUs (it sees fewer than the node has), drives
    all the GPUs it sees. `JAX_LOCAL_DEVICE_IDS`, when set, wins (JAX reads it itself).
    """
    if "JAX_LOCAL_DEVICE_IDS" in environ:
        return None
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    node_gpus = int(environ.get("SLURM_GPUS_ON_NODE", 0) or 0) or len(visible)
    num_visible = len(visible) or node_gpus
    if not num_visible:
        return None  # no GPUs (CPU nodes) or nothing to go by: JAX's default
    if _tasks_on_this_node(environ) == 1 or num_visible < node_gpus:
        return list(range(num_visible))
    return None


def _tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """Parses SLURM's per-node task counts, e.g. "2(x3),1", at this node's index."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts = []
    for item in spec.split(","):
        count, _, repeat = item.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = int(environ.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else None


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM: libtpu is installed and the host has TPU chips."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def is_primary() -> bool:
    """True in the process that writes logs, results and the workdir's other files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`; nothing on one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def preemption_reached(step: int) -> bool:
    """True at the step where every process should save and stop after a SIGTERM.

    With several processes, JAX's preemption service receives SIGTERM in any of them and
    agrees on one step for all; every process must call this after every step. With one
    process (no service) it is always False: the training loop's own handler covers it.
    """
    if not jax.distributed.is_initialized():
        return False
    return multihost_utils.reached_preemption_sync_point(step)


def write_marker(path: str | os.PathLike, key: str) -> None:
    """Writes the marker file `path` atomically, holding `key` (see `wait_for_marker`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"key": key, "process": jax.process_index(), "time": time.time()})
    storage.replace_atomically(path, lambda file: file.write(record.encode() + b"\n"))


def read_marker_key(path: str | os.PathLike) -> str | None:
    """The key of the marker file `path`; None when there is none (or it is unreadable)."""
    try:
        return json.loads(Path(path).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def wait_for_marker(path: str | os.PathLike, key: str, *, timeout_seconds: float, what: str,
                    poll_seconds: float = 1.0) -> None:
    """Polls until the marker file `path` holds `key`; a marker holding another key (a
    stale one, left by another preparation) does not count.

    Args:
      path: the marker file, on a file system every process sees.
      key: what the awaited marker must hold.
      timeout_seconds: how long to wait at most.
      what: what the marker announces, for the timeout message.
      poll_seconds: time between two reads.

    Raises:
      TimeoutError: no marker with `key` within `timeout_seconds`; the message names the
        marker, what was found and what to check.
    """
    deadline = time.monotonic() + timeout_seconds
    while (found := read_marker_key(path)) != key:
        if time.monotonic() >= deadline:
            state = "no marker" if found is None else f"a marker of another preparation ({found})"
            raise TimeoutError(
                f"process {jax.process_index()} waited {timeout_seconds:g} s for {what}, i.e. for "
                f"{path} with key {key}, and found {state}. Check process 0's log; if every "
                "host has its own copy of the data folder (no shared file system), set "
                "--config.shared_filesystem=False; for a slow preparation raise "
                "--config.prepare_wait_seconds")
        time.sleep(min(poll_seconds, max(deadline - time.monotonic(), 0.0)))


def allgather(values: np.ndarray) -> np.ndarray:
    """Every process's `values`, stacked: [process_count, *values.shape] (one allgather).

    Every process must call it, in the same order, with the same shape and dtype; on one
    process it is `values[None]` and runs nothing.
    """
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values))


def failing_processes(ok: bool) -> list[int]:
    """The indices of the processes that pass `ok=False`, the same list on every process."""
    gathered = allgather(np.array([ok], np.int32))[:, 0]
    return [index for index, flag in enumerate(gathered) if not flag]


def max_over_processes(value: int) -> int:
    """The largest `value` any process passes (an int32), the same on every process."""
    return int(allgather(np.array([value], np.int32)).max())


def shared_token() -> str:
    """A fresh random 128-bit hex token, process 0's, the same on every process.

    Unique to this call (128 random bits): no marker or record of an earlier call, in this
    run or another, holds it.
    """
    drawn = np.frombuffer(os.urandom(16), np.uint8)
    return allgather(drawn)[0].tobytes().hex()


def check_same_on_all_processes(value: str, what: str) -> None:
    """Raises ValueError unless every process passes the same `value` (one allgather of
    its sha256; no collective on one process)."""
    digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
    gathered = allgather(digest)
    differing = [index for index, row in enumerate(gathered) if not np.array_equal(row, gathered[0])]
    if differing:
        raise ValueError(f"{what} differs between process 0 and process(es) "
                         f"{', '.join(map(str, differing))}")
