"""Multi-host: two launch.py processes with a real coordinator on localhost (2 CPU devices
each) against one process with 4 devices; preemption of one process; restoring when the
hosts see different checkpoints; data preparation's marker; cluster detection."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jax.sharding import NamedSharding, PartitionSpec

from lra import tasks
from lra.parallel import distributed, sharding
from lra.training import checkpoints, data, train
from lra.tasks import storage
from tests.test_failures import _progress_cut_short
from tests.test_train import TINY, _comparable, _config, _flags, _train_records

ROOT = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
# Longer than TINY, so that a signal lands mid-run; evaluations and checkpoints on the way.
# Mean pooling: the relaunch splits every sequence over both hosts (mesh_seq=4), which
# cls pooling's extra position cannot.
MID = {"num_train_steps": 60, "checkpoint_every": 10, "eval_every": 30, "log_every": 10,
       "model.pooling": "mean"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("listops")
    data.ensure_prepared(tasks.get("listops"), str(path), _config(path).prepare)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _launch_processes(workdir, data_dir, overrides: dict, *,
                      fake_slurm: bool = False) -> list[subprocess.Popen]:
    """NUM_PROCESSES launch.py processes of one run, each with 2 fake CPU devices.

    They meet through explicit flags, or (`fake_slurm`) find each other as the tasks of an
    `srun` step on this one node would, from SLURM's environment variables alone.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           # The relaunch reuses the first launch's compiled steps.
           "JAX_COMPILATION_CACHE_DIR": str(Path(workdir).parent / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    port = _free_port()
    processes = []
    for index in range(NUM_PROCESSES):
        if fake_slurm:
            flags = []
            env = {**env, "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
                   "SLURM_NTASKS": str(NUM_PROCESSES), "SLURM_PROCID": str(index),
                   "SLURM_LOCALID": str(index), "SLURM_NODEID": "0",
                   "SLURM_STEP_TASKS_PER_NODE": str(NUM_PROCESSES),
                   "JAX_COORDINATOR_PORT": str(port)}  # SLURM's would derive from the job id
        else:
            flags = ["--coordinator_address", f"localhost:{port}",
                     "--num_processes", str(NUM_PROCESSES), "--process_id", str(index)]
        processes.append(subprocess.Popen(
            [sys.executable, "launch.py", "--config", "configs/listops.py:runlocal",
             "--workdir", str(workdir), *flags, *_flags(overrides, data_dir)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return processes


# A hang guard, not a speed target: alone the slowest test here takes ~32 s, but on a
# 2-core CI machine beside three other test workers one clean-clone run needed over 240 s.
def _finish(processes, timeout=480.0) -> list[str]:
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return outputs


def _assert_same_records(got: list[dict], want: list[dict]) -> None:
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for record, expected in zip(got, want):
        for key in ("loss", "accuracy", "grad_norm"):
            if key in expected:
                assert record[key] == pytest.approx(expected[key], rel=1e-5), (record, expected)


def test_two_processes_match_one_process_and_resume_together_after_a_sigterm(
        data_dir, tmp_path):
    """Two processes x 2 devices vs one process x 4 devices, same global batch: a SIGTERM
    to one process stops both at one step; the relaunch (as the tasks of a SLURM step this
    time, with every sequence split over the 4 devices of both hosts: mesh_seq=4, ring
    attention across the hosts) finishes like the 1-process run."""
    expected = train.train_and_evaluate(_config(data_dir, **MID), tmp_path / "one")
    workdir = tmp_path / "two"
    processes = _launch_processes(workdir, data_dir, MID)
    deadline = time.monotonic() + 180
    while not (workdir / "checkpoints" / "10").exists():
        assert all(p.poll() is None for p in processes), _finish(processes)
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    processes[1].send_signal(signal.SIGTERM)  # a preemption notice reaches one host only
    outputs = _finish(processes)
    assert [p.returncode for p in processes] == [143, 143], outputs
    assert "jax.distributed: explicit flags: process 1 of 2" in outputs[1]
    stopped = [int(line.split()[3]) for line in outputs[0].splitlines()
               if line.startswith("stopped at step")]
    assert len(stopped) == 1 and 10 <= stopped[0] < MID["num_train_steps"], outputs[0]
    assert (workdir / "checkpoints" / str(stopped[0])).exists()
    assert not (workdir / "results.json").exists()

    relaunched = _launch_processes(workdir, data_dir, {**MID, "mesh_seq": 4}, fake_slurm=True)
    outputs = _finish(relaunched)
    assert [p.returncode for p in relaunched] == [0, 0], outputs
    assert "jax.distributed: SLURM job 4242: process 1 of 2" in outputs[1]
    assert f"resuming from step {stopped[0]}" in outputs[0]
    assert json.loads((workdir / "config.json").read_text())["mesh_seq"] == 4
    _assert_same_records(_train_records(workdir), _train_records(tmp_path / "one"))
    results = json.loads((workdir / "results.json").read_text())
    assert _comparable(results) == _comparable(expected)
    assert results["device"] == "4 x cpu"
    # Only process 0 writes: one TensorBoard file per launch, every record once, its log lines.
    assert len(list(workdir.glob("events.out.tfevents*"))) == 2
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    last = MID["num_train_steps"]
    assert f"step {last}: val" in outputs[0] and f"step {last}: val" not in outputs[1]


def test_each_process_reads_only_its_share_of_every_batch(data_dir, monkeypatch):
    arrays = tasks.get("listops").load("train", str(data_dir))
    batch_size, max_length = TINY["batch_size"], TINY["max_length"]
    whole = data.train_dataset(arrays, batch_size=batch_size, max_length=max_length, seed=3)
    monkeypatch.setattr(jax, "process_count", lambda: NUM_PROCESSES)
    shares = []
    for index in range(NUM_PROCESSES):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        shares.append(data.train_dataset(arrays, batch_size=batch_size, max_length=max_length,
                                         seed=3))
    for step in (0, 1, 25):  # 25: a later epoch, reshuffled
        for key, rows in whole[step].items():
            parts = [share[step][key] for share in shares]
            assert all(len(part) == batch_size // NUM_PROCESSES for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), rows)
    # both processes in one row group (a seq axis over both hosts): both read every row
    shared = data.train_dataset(arrays, batch_size=batch_size, max_length=max_length, seed=3,
                                row_group=(0, 1))
    np.testing.assert_array_equal(shared[1]["inputs"], whole[1]["inputs"])


# ---------------------------------------------------------------------------------------
# Data preparation across processes: a marker file, or per-host copies compared once.

def _run_two_processes(script: str, arguments: list[list[str]], *, devices: int = 1,
                      timeout: float = 60.0) -> list[dict]:
    """Runs `script` as processes 0 and 1 of one run (a real coordinator on localhost), each
    with `devices` CPU devices and its own `arguments` after the port and its index.

    Returns:
      The JSON object each process printed last, with its stderr under "log".

    Raises:
      subprocess.TimeoutExpired: after `timeout` seconds in all (a hang fails the test).
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    port = _free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-c", script, str(port), str(index), *map(str, arguments[index])],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in range(NUM_PROCESSES)]
    deadline = time.monotonic() + timeout
    try:
        outputs = [process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
                   for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    return [{**json.loads(out.strip().splitlines()[-1]), "log": err} for out, err in outputs]


# ---------------------------------------------------------------------------------------
# Restoring on several hosts: the step is chosen together from every host's verdict.

# One process of a 2-process run that restores the newest checkpoint of its folder (a host's
# view of the shared checkpoints) into 4 devices; prints what it restored as JSON.
RESTORE_SCRIPT = """
import json, sys
from pathlib import Path
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from lra.parallel import distributed, sharding
from lra.training import checkpoints
port, index, directory = sys.argv[1:]
distributed.initialize(f"localhost:{port}", 2, int(index))
mesh = sharding.make_mesh(0)
abstract = {"w": jax.ShapeDtypeStruct((8, 2), np.float32,
                                      sharding=NamedSharding(mesh, PartitionSpec("data")))}
with jax.set_mesh(mesh):
    manager = checkpoints.Checkpoints(Path(directory), keep=3)
    state, data_state, progress = manager.restore_latest(abstract)
    total = float(jax.numpy.sum(state["w"]))
    manager.close()
print(json.dumps({"step": progress.step, "data": data_state, "sum": total}))
"""


def _checkpoint_state(step: int) -> np.ndarray:
    return np.arange(16, dtype=np.float32).reshape(8, 2) + step


def _save_checkpoints(directory: Path, steps: tuple[int, ...]) -> None:
    """Checkpoints of a small state sharded over this process's 4 devices."""
    mesh = sharding.make_mesh(0)
    with jax.set_mesh(mesh):
        manager = checkpoints.Checkpoints(directory, keep=len(steps))
        for step in steps:
            w = jax.device_put(_checkpoint_state(step), NamedSharding(mesh, PartitionSpec("data")))
            manager.save(step, {"w": w}, {"next_index": step}, checkpoints.Progress(step=step))
        manager.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's asyncio
def test_hosts_restore_the_same_older_step_when_one_sees_the_newest_corrupt(tmp_path):
    """Host 1 sees checkpoint 2 cut short, host 0 sees it whole (each reads its own copy of
    the folder): both set 2 aside and restore 1, with no process left in a collective."""
    _save_checkpoints(tmp_path / "host0" / "checkpoints", steps=(1, 2))
    shutil.copytree(tmp_path / "host0", tmp_path / "host1")
    _progress_cut_short(tmp_path / "host1" / "checkpoints" / "2")
    results = _run_two_processes(
        RESTORE_SCRIPT, [[tmp_path / f"host{index}" / "checkpoints"] for index in range(2)],
        devices=2)
    assert [(r["step"], r["data"], r["sum"]) for r in results] == [
        (1, {"next_index": 1}, float(_checkpoint_state(1).sum()))] * NUM_PROCESSES
    assert "checkpoint at step 2 is unreadable (on process(es) 1)" in results[0]["log"]
    assert "checkpoint at step 2 is unreadable (" in results[1]["log"]
    aside = tmp_path / "host0" / "checkpoints_unreadable"
    assert [path.name.split("-")[0] for path in aside.iterdir()] == ["2"]


# ---------------------------------------------------------------------------------------
# Data preparation across processes: a marker file, or per-host copies compared once.

# One process of a 2-process run that only prepares tiny ListOps (process 0 prepares slowly,
# so process 1 has to wait for it); prints what happened as JSON, with the start and end
# times of each call of the task's `prepare` in this process. `hide`: a file the preparing
# process removes when done (one that the other hosts do not see yet).
PREPARE_SCRIPT = """
import json, sys, time
from pathlib import Path
from lra import tasks
from lra.parallel import distributed
from lra.training import data
port, index, data_dir, mode, seed, hide = sys.argv[1:]
distributed.initialize(f"localhost:{port}", 2, int(index))
settings = {"num_train": 32, "num_val": 8, "num_test": 8, "seed": int(seed),
            "min_length": 10, "max_length": 30}


class Spy:
    def __init__(self, task):
        self.task, self.calls = task, []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def prepare(self, data_dir, **settings):
        start = time.time()
        if index == "0":
            time.sleep(1.5)
        manifest = self.task.prepare(data_dir, **settings)
        if hide:
            (Path(data_dir) / hide).unlink()
        self.calls.append([start, time.time()])
        return manifest


task = Spy(tasks.get("listops"))
try:
    data.prepare_for_processes(task, data_dir, settings, shared_filesystem=mode == "shared",
                               wait_seconds=60)
    outcome = {"done": time.time()}
except (ValueError, FileNotFoundError) as error:
    outcome = {"error": str(error)}
print(json.dumps({**outcome, "prepared": task.calls}))
"""
SETTINGS = {"num_train": 32, "num_val": 8, "num_test": 8, "seed": 0, "min_length": 10,
            "max_length": 30}


def _prepare_in_two_processes(data_dirs: list, mode: str, seeds=(0, 0), hide="") -> list[dict]:
    return _run_two_processes(PREPARE_SCRIPT, [[data_dirs[index], mode, seeds[index], hide]
                                               for index in range(NUM_PROCESSES)])


def test_on_a_shared_file_system_process_0_prepares_and_the_other_waits_for_its_marker(tmp_path):
    shared = tmp_path / "listops"
    first, second = _prepare_in_two_processes([shared, shared], "shared")
    marker = shared / data.PREPARED_MARKER
    key, _, token = distributed.read_marker_key(marker).partition(".")
    assert key == data.preparation_key("listops", SETTINGS) and len(token) == 32
    written = json.loads(marker.read_text())["time"]
    assert second["done"] >= written and tasks.get("listops").is_prepared(shared)
    assert len(first["prepared"]) == 1 and second["prepared"] == []


def test_a_stale_marker_of_the_same_preparation_does_not_release_the_waiting_host(tmp_path):
    shared = tmp_path / "listops"
    # What an earlier preparation of the same task and settings left (its data since removed).
    distributed.write_marker(shared / data.PREPARED_MARKER, data.preparation_key("listops",
                                                                                 SETTINGS))
    first, second = _prepare_in_two_processes([shared, shared], "shared")
    assert "error" not in second and second["prepared"] == []
    assert second["done"] >= first["prepared"][0][1]  # released once process 0 had prepared


def test_a_waiting_host_missing_a_file_names_it_and_prepares_nothing(tmp_path):
    shared = tmp_path / "listops"
    first, second = _prepare_in_two_processes([shared, shared], "shared", hide="basic_test.tsv")
    assert "done" in first and second["prepared"] == []
    assert str(shared / "basic_test.tsv") in second["error"]
    assert not (shared / "basic_test.tsv").exists()  # nobody prepared it again


def test_the_waiting_hosts_check_names_what_is_missing_and_writes_nothing(data_dir, tmp_path):
    task = tasks.get("listops")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / storage.MANIFEST))):
        data.check_prepared(task, str(tmp_path), {})
    assert not any(tmp_path.iterdir())
    data.check_prepared(task, str(data_dir), {})  # a prepared folder passes


def test_without_a_shared_file_system_each_host_prepares_a_copy_and_they_are_compared(tmp_path):
    results = _prepare_in_two_processes([tmp_path / "a", tmp_path / "b"], "local")
    assert all("done" in result for result in results)
    assert not (tmp_path / "a" / data.PREPARED_MARKER).exists()
    differing = _prepare_in_two_processes([tmp_path / "c", tmp_path / "d"], "local", seeds=(0, 1))
    assert all("differs between process 0 and process(es) 1" in r["error"] for r in differing)


def test_marker_of_another_preparation_does_not_release_the_waiters(tmp_path):
    marker = tmp_path / "data" / data.PREPARED_MARKER
    distributed.write_marker(marker, "another-preparation")
    later = threading.Timer(0.3, distributed.write_marker, (marker, "this-preparation"))
    later.start()
    start = time.monotonic()
    distributed.wait_for_marker(marker, "this-preparation", timeout_seconds=60, what="the data",
                                poll_seconds=0.02)
    assert time.monotonic() - start >= 0.25


@pytest.mark.parametrize("stale, found", [(None, "found no marker"),
                                          ("old", r"found a marker of another preparation \(old\)")])
def test_marker_wait_times_out_with_a_message_saying_what_to_check(tmp_path, stale, found):
    marker = tmp_path / data.PREPARED_MARKER
    if stale:
        distributed.write_marker(marker, stale)
    with pytest.raises(TimeoutError, match=found) as error:
        distributed.wait_for_marker(marker, "new", timeout_seconds=0.1,
                                    what="process 0 to prepare listops", poll_seconds=0.02)
    message = str(error.value)
    assert str(marker) in message and "process 0 to prepare listops" in message
    assert "--config.shared_filesystem=False" in message
    assert "--config.prepare_wait_seconds" in message


def test_preparation_key_names_the_task_and_settings():
    key = data.preparation_key("listops", {"seed": 0, "num_train": 8})
    assert key == data.preparation_key("listops", {"num_train": 8, "seed": 0})
    assert key != data.preparation_key("listops", {"seed": 1, "num_train": 8})
    assert key != data.preparation_key("pathfinder", {"seed": 0, "num_train": 8})


# ---------------------------------------------------------------------------------------
# Cluster detection (environment -> what jax.distributed gets), no cluster needed.

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]",
              "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
              "SLURM_NODEID": "1"}


@pytest.mark.parametrize("extra, expected", [
    # One task per GPU, each seeing all 8: JAX's default (the SLURM_LOCALID-th GPU).
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "8",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),
    # One task per node: it drives every GPU of the node.
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "4"}, [0, 1, 2, 3]),
    ({"SLURM_STEP_TASKS_PER_NODE": "3,1", "CUDA_VISIBLE_DEVICES": "2,3"}, [0, 1]),
    # --gpus-per-task=2: SLURM shows each task its own 2 of the node's 8.
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_GPUS_ON_NODE": "8",
      "CUDA_VISIBLE_DEVICES": "4,5"}, [0, 1]),
    # An explicit choice wins; CPU nodes have nothing to choose.
    ({"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_GPUS_ON_NODE": "4",
      "JAX_LOCAL_DEVICE_IDS": "0"}, None),
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, None),
])
def test_slurm_tasks_get_their_gpus(extra, expected):
    environ = {**SLURM_STEP, **extra}
    assert distributed.in_slurm_step(environ)
    assert distributed.slurm_local_device_ids(environ) == expected


def test_slurm_detection_needs_an_srun_step_of_several_tasks():
    assert not distributed.in_slurm_step({**SLURM_STEP, "SLURM_NTASKS": "1"})
    without_step = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert not distributed.in_slurm_step(without_step)  # sbatch script itself, no srun
    assert not distributed.in_slurm_step({})


@pytest.mark.parametrize("flags, message", [
    ({"coordinator_address": "localhost:1234"}, "give all three"),
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
    ({"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 2},
     r"--process_id=2 must be in \[0, --num_processes=2\)"),
])
def test_bad_explicit_flags_are_rejected_before_any_connection(flags, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**flags)
    assert not jax.distributed.is_initialized()


def test_single_process_starts_nothing(monkeypatch):
    for name in SLURM_STEP:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
    assert distributed.initialize() is None
    monkeypatch.setattr(os, "environ", {**os.environ, **SLURM_STEP})  # inside srun, but
    assert distributed.initialize(num_processes=1) is None  # --num_processes=1 wins
    assert not jax.distributed.is_initialized()
    assert distributed.is_primary() and not distributed.preemption_reached(1)
