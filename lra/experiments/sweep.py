r"""Sweeps: the cartesian product of settings, one run folder each, run one after another.

    python launch.py --config configs/listops.py:runlocal --workdir runs/sweep \
        --sweep attention=softmax,linear,performer --sweep seed=0,1,2 [--config.x=v ...]
        [--dry_run] [--emit slurm]

A `--sweep KEY=V1,V2,...` key is either a config argument (`attention`, `seed`, `preset`,
`runlocal` with values true/false), which goes after the colon of `--config` because it
changes the config's defaults, or any config key (`model.num_layers=1,2`,
`learning_rate=1e-3,3e-4`), which becomes `--config.KEY=V`. Every other flag is handed to
every run unchanged. Each run lives in `WORKDIR/<settings>`, e.g.
`runs/sweep/attention=linear,seed=1`, the settings in the order the --sweep flags give them.

Runs are launched as subprocesses, one at a time, with the command that started the sweep
(`python launch.py ...` from a checkout, `python -m lra.launch ...` otherwise): a run whose
`results.json` belongs to its config is skipped, any other run is launched with the same
command, which resumes it from its last checkpoint. A failed run does not stop the sweep:
its exit status and the tail of its stderr go to `<run>/failed.json` (removed when the run
later succeeds; `python -m lra.report` lists it) and the sweep exits with status 1 at the
end. SIGINT/SIGTERM are forwarded to the running child, which checkpoints and stops; the
sweep then stops too, and the same command continues it.

`--dry_run` prints the commands instead of running them; `--emit slurm` writes
`WORKDIR/sweep.sbatch`, a SLURM job array running the same product (one array task per
run, requeued after preemption or near its time limit so that it resumes).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

FAILED_FILE = "failed.json"
SBATCH_FILE = "sweep.sbatch"
# Config arguments (the text after the colon of --config; see configs/common.py) that take
# no value: swept as true/false.
FLAG_ARGS = ("runlocal",)
TRUE_FALSE = {"true": True, "1": True, "false": False, "0": False}
STDERR_TAIL_LINES = 40
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of the sweep.

    Attributes:
      name: folder name below the sweep root, e.g. "attention=linear,seed=1" ("" = the root).
      config_arg: `configs/<task>.py:<args>` for --config.
      overrides: `--config.KEY=V` flags of this run (pass-through ones first).
    """

    name: str
    config_arg: str
    overrides: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Job:
    """A run ready to execute: its folder, its command and whether it has finished."""

    name: str
    workdir: Path
    command: tuple[str, ...]
    finished: bool = False


# ---------------------------------------------------------------------------------------
# Expansion


def parse_sweep(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Parses `--sweep` values such as "seed=0,1,2" into (key, values) pairs, in order.

    Raises:
      ValueError: a spec without `=`, an invalid key, an empty or repeated value, or a key
        swept twice.
    """
    parsed, seen = [], set()
    for spec in specs:
        key, has_equals, values_text = spec.partition("=")
        key = key.strip()
        if not has_equals or not _KEY.match(key):
            raise ValueError(f"--sweep {spec!r}: expected KEY=V1,V2,... such as seed=0,1,2 "
                             "or model.num_layers=1,2")
        values = [value.strip() for value in values_text.split(",")]
        if not values_text.strip() or not all(values):
            raise ValueError(f"--sweep {spec!r}: empty value; give V1,V2,... after {key}=")
        if len(set(values)) != len(values):
            raise ValueError(f"--sweep {spec!r}: a value is repeated")
        if key in seen:
            raise ValueError(f"--sweep {key}=... is given twice; give all values in one flag")
        seen.add(key)
        parsed.append((key, values))
    return parsed


def _config_arg_names() -> tuple[str, ...]:
    from configs import common  # the configs package (installed, or the checkout's)

    return tuple(common.ARG_TYPES)


def _arg_name(item: str) -> str:
    """The config argument that `name[=value]` sets, under its canonical name."""
    from configs import common

    name = item.partition("=")[0].strip()
    return common.ARG_ALIASES.get(name, name)


def _split_config(config: str) -> tuple[str, list[str]]:
    path, _, args = config.partition(":")
    return path, [item.strip() for item in args.split(",") if item.strip()]


def _arg_item(key: str, value: str) -> str | None:
    """The config-argument item for a swept value (None: a false flag, i.e. left out)."""
    if key not in FLAG_ARGS:
        return f"{key}={value}"
    if value.lower() not in TRUE_FALSE:
        raise ValueError(f"--sweep {key}: values must be true or false, got {value!r}")
    return key if TRUE_FALSE[value.lower()] else None


def _override_key(flag: str) -> str:
    return flag.split("=", 1)[0][len("--config."):]


def expand(config: str, specs: Sequence[str], overrides: Sequence[str] = ()) -> list[Run]:
    """The cartesian product of the sweep, in the order of the flags (the last one fastest).

    Args:
      config: the --config value, `configs/<task>.py[:args]`.
      specs: the --sweep values.
      overrides: pass-through `--config.KEY=V` flags, given to every run.

    Returns:
      One Run per point; a sweep with no specs is one run in the root itself.

    Raises:
      ValueError: bad specs, a key both swept and set by a --config.KEY flag, or two runs
        whose folder names coincide.
    """
    swept = parse_sweep(specs)
    arg_names = _config_arg_names()
    fixed = {_override_key(flag) for flag in overrides}
    for key, _ in swept:
        if key in fixed:
            raise ValueError(f"{key} is both swept and set with --config.{key}; drop one")
    path, base_args = _split_config(config)
    swept_args = {key for key, _ in swept if key in arg_names}
    swept_names = {_arg_name(key) for key in swept_args}  # mixer= and attention= are one
    if len(swept_names) < len(swept_args):
        raise ValueError("--sweep mixer=... and --sweep attention=... sweep one config "
                         "argument; give its values in one flag")
    base_args = [item for item in base_args if _arg_name(item) not in swept_names]
    runs = []
    for point in itertools.product(*(values for _, values in swept)):
        settings = list(zip((key for key, _ in swept), point))
        items = [_arg_item(key, value) for key, value in settings if key in swept_args]
        args = base_args + [item for item in items if item is not None]
        flags = [f"--config.{key}={value}" for key, value in settings if key not in swept_args]
        name = ",".join(f"{key}={_UNSAFE.sub('_', value)}" for key, value in settings)
        config_arg = f"{path}:{','.join(args)}" if args else path
        runs.append(Run(name, config_arg, (*overrides, *flags)))
    names = collections.Counter(run.name for run in runs)
    clashes = [name for name, count in names.items() if count > 1]
    if clashes:
        raise ValueError(f"swept values give the same folder name {clashes[0]!r}; values may "
                         "differ in more than the characters [A-Za-z0-9._+-]")
    return runs


def split_flags(extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits pass-through arguments into `--config.KEY=V` overrides and other flags.

    `--config.KEY V` (value as the next argument) is joined into `--config.KEY=V`.
    """
    overrides, others = [], []
    index = 0
    while index < len(extra):
        arg = extra[index]
        if arg.startswith("--config.") and "=" not in arg and index + 1 < len(extra):
            overrides.append(f"{arg}={extra[index + 1]}")
            index += 2
            continue
        (overrides if arg.startswith("--config.") else others).append(arg)
        index += 1
    return overrides, others


# ---------------------------------------------------------------------------------------
# Which runs have finished


def resolve_config(run: Run):
    """The run's config exactly as launch.py builds it (config file, args, overrides).

    Raises:
      FileNotFoundError: the config file does not exist.
      ValueError: the config file, an argument or an override is invalid.
    """
    path = run.config_arg.partition(":")[0]
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found (paths are relative to the "
                                f"current folder {Path.cwd()}), e.g. configs/listops.py")
    from absl import flags
    from ml_collections import config_flags

    argv = ["sweep", f"--config={run.config_arg}", *run.overrides]
    values = flags.FlagValues()
    # sys_argv: config_flags defines the --config.KEY flags from the arguments it is given.
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    try:
        values(argv)
        return values.config
    except (flags.Error, AttributeError, KeyError, ValueError) as error:
        raise ValueError(f"run {run.name or '.'}: {error_text(error)}") from None


def error_text(error: Exception) -> str:
    """One line for an error of config_flags: the config file's own message, not the
    traceback config_flags wraps it in; "unknown config key ..." for a key not in the config."""
    unknown_key = isinstance(error, (AttributeError, KeyError))
    while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(..))
        error = error.args[0]
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if "Traceback" in text:  # config_flags wraps errors of the config file with their traceback
        text = text.strip().splitlines()[-1].removeprefix("ValueError: ")
    text = " ".join(text.split())
    return f"unknown config key {text}" if unknown_key else text


def is_finished(workdir: Path, config) -> bool:
    """True when `workdir/results.json` is the finished result of exactly this config."""
    from lra.training import train

    try:
        results = train.read_finished_results(workdir, config)
    except (json.JSONDecodeError, OSError):
        return False
    return results is not None and results.get("config_hash") == train.config_hash(config)


def launch_command(launch_script: Path | None) -> tuple[str, ...]:
    """How a run is started: `python <launch_script>`, or `python -m lra.launch` for None."""
    if launch_script is None:
        return (sys.executable, "-m", "lra.launch")
    return (sys.executable, str(launch_script))


def plan(runs: Sequence[Run], root: Path, launch_script: Path | None,
         other_flags: Sequence[str] = ()) -> list[Job]:
    """Builds every run's command and checks whether it has finished.

    Every config is resolved first, so a bad one stops the sweep before anything runs.

    Args:
      runs: from `expand`.
      root: the sweep root (--workdir); run `name` lives in `root/name`.
      launch_script: launch.py, as the commands should name it; None = `-m lra.launch`.
      other_flags: flags for launch.py other than `--config.KEY=V` (e.g. --debug).

    Returns:
      One Job per run, in order.

    Raises:
      FileNotFoundError, ValueError: see `resolve_config`.
    """
    jobs = []
    for run in runs:
        config = resolve_config(run)
        workdir = root / run.name if run.name else root
        command = (*launch_command(launch_script), "--config", run.config_arg,
                   "--workdir", str(workdir), *run.overrides, *other_flags)
        jobs.append(Job(run.name, workdir, command, is_finished(workdir, config)))
    return jobs


# ---------------------------------------------------------------------------------------
# Running


class _Forwarder:
    """Passes SIGINT/SIGTERM on to the running child and remembers that the sweep must stop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signum = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)


def run_child(command: Sequence[str], name: str, forwarder: _Forwarder) -> tuple[int, list[str]]:
    """Runs one command, echoing its stderr with a `[name]` prefix.

    The child gets its own session, so a Ctrl-C on the terminal reaches it once, through the
    sweep (a second Ctrl-C interrupts it at once).

    Returns:
      (exit status, the last lines of its stderr).
    """
    tail = collections.deque(maxlen=STDERR_TAIL_LINES)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1,
                               start_new_session=True, errors="replace")
    forwarder.child = process
    try:
        for line in process.stderr:
            tail.append(line.rstrip("\n"))
            print(f"[{name or '.'}] {line}", end="", file=sys.stderr, flush=True)
        return process.wait(), list(tail)
    finally:
        forwarder.child = None


def record_failure(workdir: Path, returncode: int, command: str,
                   stderr_tail: Sequence[str]) -> Path:
    """Writes `workdir/failed.json` (what `python -m lra.report` lists as failed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / FAILED_FILE
    record = {"returncode": returncode, "command": command,
              "stderr_tail": list(stderr_tail), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def record_failure_from_log(workdir: str, returncode: str, log: str) -> None:
    """`record_failure` for the SLURM script: the stderr tail is read from the job's log."""
    path = Path(log)
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    record_failure(Path(workdir), int(returncode), f"SLURM array task, log {log}",
                   lines[-STDERR_TAIL_LINES:])


def execute(jobs: Sequence[Job], runner: Callable = run_child) -> int:
    """Runs the unfinished jobs one after another and prints a summary.

    Args:
      jobs: from `plan`.
      runner: `runner(command, name, forwarder) -> (exit status, stderr tail)`.

    Returns:
      0 when every run finished, 1 when any failed or was stopped from outside, and
      128 + the signal number when a signal to the sweep stopped it.
    """
    outcome = {"finished": [], "skipped": [], "failed": [], "stopped": []}
    with _Forwarder() as forwarder:
        for index, job in enumerate(jobs):
            if forwarder.signum is not None:
                break
            label = f"[{index + 1}/{len(jobs)}] {job.name or job.workdir}"
            if job.finished:
                print(f"{label}: finished before, skipped", flush=True)
                outcome["skipped"].append(job)
                continue
            state = "resuming" if (job.workdir / "checkpoints").exists() else "starting"
            print(f"{label}: {state}: {shlex.join(job.command)}", flush=True)
            returncode, tail = runner(job.command, job.name, forwarder)
            failed_file = job.workdir / FAILED_FILE
            if returncode == 0:
                failed_file.unlink(missing_ok=True)
                outcome["finished"].append(job)
            elif forwarder.signum is not None or returncode == 128 + signal.SIGTERM:
                outcome["stopped"].append(job)
            else:
                path = record_failure(job.workdir, returncode, shlex.join(job.command), tail)
                print(f"{label}: failed with exit status {returncode}; see {path}", flush=True)
                outcome["failed"].append((job, returncode, tail))
    _print_summary(jobs, outcome, forwarder.signum)
    if forwarder.signum is not None:
        return 128 + forwarder.signum
    return 1 if outcome["failed"] or outcome["stopped"] else 0


def _print_summary(jobs, outcome, signum) -> None:
    counts = ", ".join(f"{len(items)} {name}" for name, items in outcome.items())
    print(f"\nsweep: {len(jobs)} runs: {counts}", flush=True)
    for job, returncode, tail in outcome["failed"]:
        last = next((line for line in reversed(tail) if line.strip()), "")
        print(f"  failed: {job.name or job.workdir} (exit status {returncode}): {last}")
    for job in outcome["stopped"]:
        print(f"  stopped: {job.name or job.workdir} (checkpointed; rerun to resume)")
    if signum is not None:
        print(f"  stopped by {signal.Signals(signum).name}: rerun the same command to continue")


# ---------------------------------------------------------------------------------------
# SLURM


def slurm_script(jobs: Sequence[Job], root: Path) -> str:
    """A job array with one task per run: `sbatch` it to run the sweep on a cluster.

    Near its time limit (`--signal=B:TERM@120`) or on preemption the script passes SIGTERM
    to the run, which checkpoints, and requeues the array task, which then resumes.
    """
    root = root.absolute()
    if re.search(r"\s", str(root)):
        raise ValueError(f"--workdir {root} has whitespace, which #SBATCH --output cannot hold")
    python = shlex.quote(sys.executable)
    commands = "\n".join(f"  {shlex.quote(shlex.join(job.command[1:]))}" for job in jobs)
    workdirs = "\n".join(f"  {shlex.quote(str(job.workdir.absolute()))}" for job in jobs)
    return f"""#!/bin/bash
# The sweep below {root}: {len(jobs)} runs, one job-array task each.
# Submit: sbatch [--partition=P --gres=gpu:1 --time=HH:MM:SS] {root / SBATCH_FILE}
# A finished run exits at once, an unfinished one resumes from its last checkpoint.
#SBATCH --job-name=lra-sweep
#SBATCH --array=0-{len(jobs) - 1}
#SBATCH --ntasks=1
#SBATCH --output={root}/slurm-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@120

set -u
cd {shlex.quote(str(Path.cwd()))}
PYTHON=${{PYTHON:-{python}}}
RUNS=(
{commands}
)
WORKDIRS=(
{workdirs}
)
index=${{SLURM_ARRAY_TASK_ID:?run this script with sbatch (a job array)}}
workdir=${{WORKDIRS[$index]}}
log={shlex.quote(str(root))}/slurm-${{SLURM_ARRAY_JOB_ID:-0}}_${{index}}.out
eval "args=(${{RUNS[$index]}})"

requeue=0
on_term() {{
  echo "SIGTERM: the run checkpoints, then this task is requeued" >&2
  requeue=1
  kill -TERM "$child" 2>/dev/null
}}
trap on_term TERM
"$PYTHON" "${{args[@]}}" &
child=$!
wait "$child"
status=$?
if [[ $requeue == 1 ]]; then  # the trap ended the first wait; wait for the run itself
  wait "$child"
  second=$?
  [[ $second != 127 ]] && status=$second
fi

if [[ $status == 0 ]]; then
  rm -f "$workdir/{FAILED_FILE}"
elif [[ $requeue == 1 || $status == 143 ]]; then
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{index}}"
else
  "$PYTHON" -c 'import sys; from lra.experiments import sweep; sweep.record_failure_from_log(*sys.argv[1:])' \\
    "$workdir" "$status" "$log"
fi
exit "$status"
"""


# ---------------------------------------------------------------------------------------
# Command line (reached through lra.launch)


def _parser(launch_script: Path | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=launch_script.name if launch_script else "python -m lra.launch", allow_abbrev=False,
        description="Run the cartesian product of --sweep settings, one folder per run.")
    parser.add_argument("--config", required=True, help="configs/<task>.py[:args]")
    parser.add_argument("--workdir", required=True, help="sweep root: one subfolder per run")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="config argument or config key and its values (repeatable)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("--emit", choices=("slurm",),
                        help=f"write WORKDIR/{SBATCH_FILE} (a job array) instead of running")
    return parser


def usage(launch_script: Path | None = None) -> str:
    """The sweep's flags, as `--help` of launch.py lists them."""
    return _parser(launch_script).format_help()


def main(argv: Sequence[str], launch_script: Path | None = None) -> int:
    """The sweep command: `launch.py ... --sweep K=V,... [--dry_run] [--emit slurm]`.

    Args:
      argv: the arguments after the program name.
      launch_script: path of launch.py, which every run executes; None = every run is
        `python -m lra.launch` (the installed package).

    Returns:
      The exit status (2 for a bad sweep or config, see `execute` otherwise).
    """
    args, extra = _parser(launch_script).parse_known_args(argv)
    overrides, other_flags = split_flags(extra)
    root = Path(args.workdir).expanduser()
    launch = launch_script
    if launch_script is not None and launch_script.is_absolute():
        launch = Path(os.path.relpath(launch_script))
    try:
        jobs = plan(expand(args.config, args.sweep, overrides), root, launch, other_flags)
        script = slurm_script(jobs, root) if args.emit == "slurm" else None
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if script is not None:
        if args.dry_run:
            print(script, end="")
            return 0
        root.mkdir(parents=True, exist_ok=True)
        path = root / SBATCH_FILE
        path.write_text(script)
        print(f"wrote {path} ({len(jobs)} runs)\nsubmit: sbatch [--partition=P --gres=gpu:1 "
              f"--time=HH:MM:SS] {path}\nthen: python -m lra.report {root}")
        return 0
    if args.dry_run:
        for job in jobs:
            prefix = "# finished: " if job.finished else ""
            print(prefix + shlex.join(job.command))
        return 0
    status = execute(jobs)
    print(f"report: python -m lra.report {root}")
    return status
