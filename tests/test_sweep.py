"""Sweeps: expansion, dry run, the SLURM script, skip/resume/failure, signal forwarding."""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lra import tasks
from lra.experiments import sweep
from lra.training import data, train
from tests import test_train

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch.py"
CONFIG = "configs/listops.py:runlocal"
# The few-second run of test_train.py (checkpoints every 4 steps); the tests sweep num_heads.
TINY = {key: value for key, value in test_train.TINY.items() if key != "model.num_heads"}


@pytest.fixture(autouse=True)
def in_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths are relative to the repository, as for launch.py


def _tiny_flags(data_dir) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**TINY, "data_dir": data_dir}.items()]


# ---------------------------------------------------------------------------------------
# Expansion


def test_expansion_is_the_cartesian_product_in_flag_order():
    runs = sweep.expand("configs/listops.py:runlocal,seed=5",
                        ["attention=softmax,linear", "seed=0,1", "model.num_layers=1,2"],
                        ["--config.learning_rate=0.003"])
    assert len(runs) == 8
    assert [run.name for run in runs[:3]] == [
        "attention=softmax,seed=0,model.num_layers=1",
        "attention=softmax,seed=0,model.num_layers=2",
        "attention=softmax,seed=1,model.num_layers=1"]
    last = runs[-1]
    assert last.name == "attention=linear,seed=1,model.num_layers=2"
    # Config arguments go after the colon (the base seed=5 is replaced), keys become flags.
    assert last.config_arg == "configs/listops.py:runlocal,attention=linear,seed=1"
    assert last.overrides == ("--config.learning_rate=0.003", "--config.model.num_layers=2")
    assert len({(run.config_arg, run.overrides) for run in runs}) == 8


def test_flag_arguments_and_unsafe_values():
    runs = sweep.expand("configs/listops.py:runlocal", ["runlocal=false,true", "data_dir=/a/b"])
    assert [run.config_arg for run in runs] == ["configs/listops.py",
                                                "configs/listops.py:runlocal"]
    assert [run.name for run in runs] == ["runlocal=false,data_dir=_a_b",
                                          "runlocal=true,data_dir=_a_b"]
    assert runs[0].overrides == ("--config.data_dir=/a/b",)
    assert sweep.expand(CONFIG, []) == [sweep.Run("", CONFIG, ())]


@pytest.mark.parametrize("specs, overrides, message", [
    (["seed"], [], "expected KEY=V1,V2"),
    (["seed="], [], "empty value"),
    (["seed=0,,1"], [], "empty value"),
    (["seed=0,0"], [], "repeated"),
    (["seed=0", "seed=1"], [], "given twice"),
    (["1x=2"], [], "expected KEY=V1,V2"),
    (["learning_rate=1,2"], ["--config.learning_rate=3"], "both swept and set"),
    (["runlocal=maybe"], [], "true or false"),
    (["data_dir=a/b,a_b"], [], "same folder name"),
])
def test_bad_sweeps_are_rejected(specs, overrides, message):
    with pytest.raises(ValueError, match=message):
        sweep.expand(CONFIG, specs, overrides)


def test_split_flags_keeps_other_flags_apart():
    overrides, others = sweep.split_flags(
        ["--config.seed", "3", "--config.model.num_layers=2", "--debug", "--num_processes=1"])
    assert overrides == ["--config.seed=3", "--config.model.num_layers=2"]
    assert others == ["--debug", "--num_processes=1"]


def test_resolved_config_is_what_launch_builds():
    config = sweep.resolve_config(sweep.Run(
        "x", "configs/listops.py:runlocal,attention=linear,seed=3",
        ("--config.model.num_layers=1", "--config.learning_rate=0.01")))
    assert (config.attention, config.seed, config.model.num_layers) == ("linear", 3, 1)
    assert config.learning_rate == 0.01 and config.max_length == 128  # runlocal sizes


def test_a_swept_mixer_replaces_the_one_of_the_config_argument():
    runs = sweep.expand(CONFIG + ",mixer=s5", ["attention=softmax,linear"])
    assert [run.config_arg for run in runs] == [f"{CONFIG},attention=softmax",
                                                f"{CONFIG},attention=linear"]
    with pytest.raises(ValueError, match="sweep one config argument"):
        sweep.expand(CONFIG, ["mixer=s5", "attention=lru"])


def test_a_mixer_flag_reaches_every_run_of_a_sweep(tmp_path, capsys):
    """`--config.mixer=s5` is the config argument of every run (through launch.py's command
    line), so each run, and the check of whether it finished, builds s5's config."""
    from lra.experiments import launch

    argv = ["launch.py", "--config", CONFIG, "--workdir", str(tmp_path), "--config.mixer=s5",
            "--config.model.attention_options.state_size=8", "--sweep", "seed=0,1", "--dry_run"]
    assert launch.run(argv, launch_script=LAUNCH) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [command[3] for command in commands] == [f"{CONFIG},mixer=s5,seed=0",
                                                    f"{CONFIG},mixer=s5,seed=1"]
    config = sweep.resolve_config(sweep.Run("x", commands[1][3], tuple(commands[1][6:])))
    assert config.attention == "s5" and config.model.attention_options.state_size == 8
    assert not config.model.block_mlp  # s5's block, as with configs/listops.py:mixer=s5


@pytest.mark.parametrize("config_arg, overrides, error, message", [
    (CONFIG, ("--config.model.num_layer=1",), ValueError, "unknown config key 'num_layer'"),
    (CONFIG, ("--config.model.num_layers=a",), ValueError, "num_layers=a"),
    (CONFIG + ",attention=softmx", (), ValueError, "unknown attention 'softmx'"),
    ("configs/nonesuch.py", (), FileNotFoundError, "configs/nonesuch.py not found"),
])
def test_bad_runs_fail_before_anything_runs(config_arg, overrides, error, message):
    with pytest.raises(error, match=message):
        sweep.resolve_config(sweep.Run("x", config_arg, overrides))


# ---------------------------------------------------------------------------------------
# Dry run and SLURM


def _finish(workdir: Path, config, **changes) -> None:
    """A results.json as a finished run of `config` leaves it."""
    workdir.mkdir(parents=True)
    results = {"step": config.num_train_steps, "config_hash": train.config_hash(config),
               **changes}
    (workdir / "results.json").write_text(json.dumps(results))


def test_dry_run_prints_commands_and_marks_finished_runs(tmp_path, capsys):
    root = tmp_path / "sweep"
    args = ["--config", CONFIG, "--workdir", str(root), "--sweep", "attention=softmax,linear",
            "--sweep", "seed=0,1", "--config.num_train_steps=7", "--debug"]
    runs = sweep.expand(CONFIG, ["attention=softmax,linear", "seed=0,1"],
                        ["--config.num_train_steps=7"])
    _finish(root / runs[1].name, sweep.resolve_config(runs[1]))
    _finish(root / runs[2].name, sweep.resolve_config(runs[2]), config_hash="another config")
    assert sweep.main([*args, "--dry_run"], launch_script=LAUNCH) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[1].startswith("# finished: ")
    assert not any(line.startswith("#") for line in (lines[0], *lines[2:]))
    command = shlex.split(lines[3])
    assert command[:2] == [sys.executable, "launch.py"]
    assert command[2:] == ["--config", "configs/listops.py:runlocal,attention=linear,seed=1",
                           "--workdir", str(root / "attention=linear,seed=1"),
                           "--config.num_train_steps=7", "--debug"]
    assert sorted(p.name for p in root.iterdir()) == sorted([runs[1].name, runs[2].name])


def _fake_python(folder: Path) -> dict:
    """A `python` that records launch.py's arguments (and obeys FAKE_RC / FAKE_WAIT), and a
    `scontrol` that records its arguments: enough to run the SLURM script here."""
    folder.mkdir()
    (folder / "python").write_text(f"""#!/bin/bash
if [[ $1 == launch.py ]]; then
  printf '%s\\n' "$@" > "$FAKE_DIR/args"
  trap 'echo TERM >> "$FAKE_DIR/events"; exit 143' TERM
  if [[ ${{FAKE_WAIT:-0}} == 1 ]]; then touch "$FAKE_DIR/ready"; while true; do sleep 0.02; done; fi
  echo "error: something went wrong" >&2
  exit ${{FAKE_RC:-0}}
fi
exec {shlex.quote(sys.executable)} "$@"
""")
    (folder / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$FAKE_DIR/events"\n')
    for name in ("python", "scontrol"):
        (folder / name).chmod(stat.S_IRWXU)
    return {**os.environ, "FAKE_DIR": str(folder), "PYTHON": str(folder / "python"),
            "PATH": f"{folder}:{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "77"}


def test_emitted_slurm_script_runs_each_point_and_requeues(tmp_path, capsys):
    root = tmp_path / "sweep"
    assert sweep.main(["--config", CONFIG, "--workdir", str(root), "--sweep", "seed=0,1,2",
                       "--config.data_dir=/data/with space", "--emit", "slurm"],
                      launch_script=LAUNCH) == 0
    script = root / sweep.SBATCH_FILE
    assert f"sbatch [--partition=P --gres=gpu:1 --time=HH:MM:SS] {script}" in capsys.readouterr().out
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    for directive in ("--array=0-2", "--requeue", "--signal=B:TERM@120",
                      f"--output={root}/slurm-%A_%a.out"):
        assert f"#SBATCH {directive}\n" in text
    env = _fake_python(tmp_path / "fake")
    fake = tmp_path / "fake"

    def run_task(index, **extra):
        return subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True,
                              env={**env, **extra, "SLURM_ARRAY_TASK_ID": str(index)},
                              cwd=tmp_path, timeout=60)

    assert run_task(1).returncode == 0
    assert (fake / "args").read_text().splitlines() == [
        "launch.py", "--config", "configs/listops.py:runlocal,seed=1", "--workdir",
        str(root / "seed=1"), "--config.data_dir=/data/with space"]
    # A failure is recorded for the report, with the tail of the task's log.
    (root / "slurm-77_2.out").write_text("step 1\nerror: something went wrong\n")
    assert run_task(2, FAKE_RC="3").returncode == 3
    failed = json.loads((root / "seed=2" / sweep.FAILED_FILE).read_text())
    assert failed["returncode"] == 3 and failed["stderr_tail"][-1] == "error: something went wrong"
    # SIGTERM (time limit or preemption): the run gets it, then the task is requeued.
    task = subprocess.Popen(["bash", str(script)], env={**env, "FAKE_WAIT": "1",
                                                        "SLURM_ARRAY_TASK_ID": "0"},
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (fake / "ready").exists():
        assert time.monotonic() < deadline and task.poll() is None
        time.sleep(0.02)
    task.send_signal(signal.SIGTERM)
    assert task.wait(timeout=30) == 143
    assert (fake / "events").read_text().splitlines() == ["TERM", "scontrol requeue 77_0"]


# ---------------------------------------------------------------------------------------
# Running: failures, skips, signals (fake runner / fake children)


def _job(tmp_path, name, command=("true",), finished=False):
    return sweep.Job(name, tmp_path / name, tuple(command), finished)


def test_a_failure_is_recorded_does_not_stop_the_sweep_and_is_cleared_later(tmp_path, capsys):
    jobs = [_job(tmp_path, "a"), _job(tmp_path, "b", finished=True), _job(tmp_path, "c")]
    calls = []

    def runner(command, name, forwarder):
        calls.append(name)
        return (2, ["Traceback", "error: bad value", ""]) if name == "a" else (0, [])

    assert sweep.execute(jobs, runner) == 1
    assert calls == ["a", "c"]  # b had finished: skipped
    failed = json.loads((tmp_path / "a" / sweep.FAILED_FILE).read_text())
    assert failed["returncode"] == 2 and failed["stderr_tail"][1] == "error: bad value"
    out = capsys.readouterr().out
    assert "sweep: 3 runs: 1 finished, 1 skipped, 1 failed, 0 stopped" in out
    assert "failed: a (exit status 2): error: bad value" in out
    assert sweep.execute(jobs, lambda command, name, forwarder: (0, [])) == 0
    assert not (tmp_path / "a" / sweep.FAILED_FILE).exists()


def test_sigterm_is_forwarded_to_the_child_and_stops_the_sweep(tmp_path, capsys):
    child = (f"import pathlib, signal, sys, time\n"
             f"def stop(*_):\n"
             f"    pathlib.Path({str(tmp_path / 'got_term')!r}).touch()\n"
             f"    sys.exit(143)\n"
             f"signal.signal(signal.SIGTERM, stop)\n"
             f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
             f"time.sleep(60)\n")
    second = f"import pathlib; pathlib.Path({str(tmp_path / 'second_ran')!r}).touch()"
    jobs = [_job(tmp_path, "first", (sys.executable, "-c", child)),
            _job(tmp_path, "second", (sys.executable, "-c", second))]

    def signal_when_ready():
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=signal_when_ready)
    previous = signal.getsignal(signal.SIGTERM)
    thread.start()
    started = time.monotonic()
    status = sweep.execute(jobs)
    thread.join()
    assert status == 128 + signal.SIGTERM and time.monotonic() - started < 30
    assert (tmp_path / "got_term").exists() and not (tmp_path / "second_ran").exists()
    assert not (tmp_path / "first" / sweep.FAILED_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert "stopped by SIGTERM" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# End to end: real tiny ListOps runs through launch.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("listops")
    config = sweep.resolve_config(sweep.Run("x", CONFIG, tuple(_tiny_flags(path))))
    data.ensure_prepared(tasks.get("listops"), str(path), config.prepare)
    return str(path)


def _sweep(root, data_dir, *values):
    command = [sys.executable, "launch.py", "--config", CONFIG, "--workdir", str(root),
               "--sweep", "model.num_heads=" + ",".join(values), *_tiny_flags(data_dir)]
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_sweep_runs_records_failures_resumes_and_skips(tmp_path, data_dir):
    root = tmp_path / "sweep"
    done = _sweep(root, data_dir, "3", "2")  # qkv_dim 32 is not divisible by 3 heads
    assert done.returncode == 1, done.stdout + done.stderr
    assert "sweep: 2 runs: 1 finished, 0 skipped, 1 failed, 0 stopped" in done.stdout
    failed = json.loads((root / "model.num_heads=3" / sweep.FAILED_FILE).read_text())
    assert failed["returncode"] == 2
    assert any("not divisible by config.model.num_heads=3" in line
               for line in failed["stderr_tail"])
    good = root / "model.num_heads=2"
    first = json.loads((good / "results.json").read_text())
    assert first["step"] == 12 and not (good / sweep.FAILED_FILE).exists()

    # Interrupted after step 8: no results, the newest checkpoint lost. The sweep resumes it.
    (good / "results.json").unlink()
    for path in sorted((good / "checkpoints" / "12").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (good / "checkpoints" / "12").rmdir()
    done = _sweep(root, data_dir, "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming from step 8" in done.stderr
    resumed = json.loads((good / "results.json").read_text())
    timing = ("train_seconds", "compile_seconds", "steps_per_second")
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in first.items() if k not in timing}

    # Finished now: the next sweep skips it (execute() skipping a finished job is tested above).
    runs = sweep.expand(CONFIG, ["model.num_heads=3,2"], _tiny_flags(data_dir))
    jobs = sweep.plan(runs, root, LAUNCH)
    assert [(job.name, job.finished) for job in jobs] == [("model.num_heads=3", False),
                                                          ("model.num_heads=2", True)]
