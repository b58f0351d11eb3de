r"""Train and evaluate one config: flags -> lra.training.train.train_and_evaluate(config, workdir).

  python -m lra.launch --config configs/listops.py:runlocal --workdir runs/listops-local
  lra-train --config configs/listops.py:attention=softmax,seed=1 --workdir runs/x \
      --config.num_train_steps=2000 --config.model.num_layers=2

`python launch.py ...` in a checkout, `python -m lra.launch ...` and the console script
`lra-train ...` (both installed with the package) are the same command. A `--config` path
that does not exist relative to the current folder but names a shipped config file,
`configs/<task>.py`, is read from the installed `configs` package, so the commands above
work from any folder.

`--config.mixer=NAME` (or its alias `--config.attention=NAME`) is the config argument
`mixer=NAME`: it is moved after the colon of `--config` before the config file runs, so
the file builds that mixer's options, `model.block_mlp` and preset settings exactly as
`--config configs/<task>.py:...,mixer=NAME` does, and options of that mixer given as
`--config.model.attention_options.<option>=...` apply on top (see `move_mixer_flags`;
the rule for presets is in configs/common.py).

The same command on the same workdir resumes the run; on a finished run it prints the
results. Errors in the config, the workdir or the data print one message (exit status 2);
--debug shows the full traceback instead.

With --sweep KEY=V1,V2 (repeatable) it runs the cartesian product, one subfolder of
--workdir per run, skipping finished runs and resuming the others; --dry_run prints the
commands and --emit slurm writes a SLURM job array instead (see lra/experiments/sweep.py).

Several processes (hosts) run one training together: under SLURM (`srun`) or on a Cloud
TPU pod they find each other by themselves; elsewhere give every process
--coordinator_address HOST:PORT --num_processes N --process_id I (see lra/parallel/distributed.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<task>.py[:runlocal,attention=NAME,seed=N,preset=NAME]",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: logs, checkpoints, results")
_DEBUG = flags.DEFINE_bool("debug", False, "show full tracebacks for configuration errors")
# Multi-host: all three, or none to auto-detect SLURM / a Cloud TPU pod (lra.parallel.distributed).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 to N-1")
flags.mark_flags_as_required(["config", "workdir"])

# The errors a user can cause with flags, config values or data folders.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, TimeoutError)
SWEEP_FLAGS = ("--sweep", "--dry_run", "--emit")
SHIPPED_PREFIX = "configs/"  # how a command names a config file shipped with the package
# Config keys that are config arguments in disguise: `--config.<key>=V` is moved into
# `--config` as `<argument>=V` (the mixer under both its names; the per-layer pattern).
MOVED_KEYS = {"mixer": "mixer", "attention": "mixer", "model.mixer_pattern": "pattern"}
MIXER_KEYS = ("mixer", "attention")
_MOVED_FLAG = re.compile(
    rf"--?config\.({'|'.join(re.escape(key) for key in MOVED_KEYS)})(=|$)")
HELP_FLAGS = ("-h", "-help", "--help", "--helpshort", "-?")


# ---------------------------------------------------------------------------------------
# Config files shipped with the package


def shipped_configs_dir() -> Path | None:
    """The folder of the importable `configs` package (installed or the checkout's)."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_config_path(config_arg: str) -> str:
    """`configs/<task>.py[:args]` -> the shipped file's absolute path when the relative one
    does not exist here; any other value (an existing file, another path) is kept as is."""
    path, colon, args = config_arg.partition(":")
    if Path(path).expanduser().is_file() or not path.startswith(SHIPPED_PREFIX):
        return config_arg
    folder = shipped_configs_dir()
    shipped = folder / path[len(SHIPPED_PREFIX):] if folder is not None else None
    if shipped is None or not shipped.is_file():
        return config_arg
    return f"{shipped}{colon}{args}"


def _map_config_flag(argv: list[str], change: Callable[[str], str]) -> list[str]:
    """`argv` with the value of `--config` (either form) replaced by `change(value)`."""
    changed = list(argv)
    for index, arg in enumerate(changed):
        if arg.startswith("--config="):
            changed[index] = "--config=" + change(arg.split("=", 1)[1])
        elif arg == "--config" and index + 1 < len(changed):
            changed[index + 1] = change(changed[index + 1])
    return changed


def resolve_config_flags(argv: list[str]) -> list[str]:
    """`argv` with the value of `--config` (either form) passed through `resolve_config_path`."""
    return _map_config_flag(argv, resolve_config_path)


def move_mixer_flags(argv: list[str]) -> list[str]:
    """`--config.mixer=NAME` and `--config.attention=NAME` moved into `--config` as
    `mixer=NAME`, and `--config.model.mixer_pattern=P` as `pattern=P`.

    The mixer (and a per-layer pattern's mixers) decide which keys
    `model.attention_options` (and `model.pattern_options`) have, `model.block_mlp` and the
    preset's values, and a config is locked once its file has built it; so they are chosen
    where the file reads them, the config argument, replacing an argument of the same name
    given there. The last such flag wins, as for any flag; the value may also be the next
    argument. Without `--config`, `argv` is returned unchanged.

    Args:
      argv: command-line arguments (no program name).

    Returns:
      The arguments with those flags folded into the value of `--config`.
    """
    rest, moved, index = [], {}, 0
    while index < len(argv):
        match = _MOVED_FLAG.match(argv[index])
        if match is None or (not match.group(2) and index + 1 == len(argv)):
            rest.append(argv[index])  # not such a flag, or one without value (absl says so)
        elif match.group(2):
            moved[MOVED_KEYS[match.group(1)]] = argv[index].split("=", 1)[1]
        else:
            index += 1
            moved[MOVED_KEYS[match.group(1)]] = argv[index]
        index += 1
    if not moved or not any(arg.split("=")[0] == "--config" for arg in rest):
        return list(argv)
    if "pattern" in moved:  # the argument's items are comma-separated; a pattern's use "+"
        moved["pattern"] = moved["pattern"].replace(",", "+")
    return _map_config_flag(rest, lambda value: _with_arguments(value, moved))


def _with_arguments(config_arg: str, moved: dict[str, str]) -> str:
    """`path:args` with each of `moved` ({argument: value}) replacing its earlier value."""
    path, _, args = config_arg.partition(":")
    replaced = {"mixer": MIXER_KEYS}
    dropped = {key for name in moved for key in replaced.get(name, (name,))}
    items = [item for item in args.split(",")
             if item.strip() and item.partition("=")[0].strip() not in dropped]
    return f"{path}:{','.join([*items, *(f'{name}={value}' for name, value in moved.items())])}"


# ---------------------------------------------------------------------------------------
# Flags


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with unknown `--config.x` keys reported as the known ones.

    config_flags reads the `--config.x` overrides from `sys.argv`, so that is `argv` (the
    command line as `run` rewrote it) while the flags are parsed.
    """
    saved_argv, sys.argv = sys.argv, list(argv)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        overrides = [a.split("=")[0][2:] for a in argv if a.startswith("--config.")]
        hint = str(error).strip("'\"").replace("\\n", " ")
        print(f"error: unknown config key among {', '.join(overrides)} ({hint})", file=sys.stderr)
        _print_known_keys(argv)
        sys.exit(2)
    except flags.Error as error:
        from lra.experiments import sweep

        from_config_file = "Traceback" in str(error)  # the file's own message says it all
        hint = "" if from_config_file else " (--help lists the flags)"
        print(f"error: {sweep.error_text(error)}{hint}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = saved_argv


def _print_known_keys(argv: list[str]) -> None:
    """Loads the config file alone (no overrides) and lists its keys."""
    config_arg = None
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            config_arg = argv[index + 1]
        elif arg.startswith("--config="):
            config_arg = arg.split("=", 1)[1]
    if config_arg is None:
        return
    try:
        config = config_flags.config_flags.ConfigFileFlagParser(name="config").parse(config_arg)
    except Exception:  # the message above already names the problem
        return
    keys = sorted(_flatten(json.loads(config.to_json_best_effort())))
    print("known keys: config." + ", config.".join(keys), file=sys.stderr)


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    names = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            names += _flatten(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


# ---------------------------------------------------------------------------------------
# Running


def main(argv):
    """absl's main: one training run of the parsed flags; returns the exit status."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not any(arg.startswith(("--verbosity", "-v")) for arg in sys.argv):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from lra.parallel import distributed  # after flag parsing, so --help is fast
    from lra.training import train

    try:
        cluster = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        if cluster is not None:
            print(f"jax.distributed: {cluster}", file=sys.stderr, flush=True)
        results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except USER_ERRORS as error:
        if _DEBUG.value:
            raise
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if results is None:  # stopped by SIGTERM after a checkpoint
        return 143
    _print_results(results, _WORKDIR.value)
    return 0


def _print_results(results: dict, workdir: str) -> None:
    print(
        f"\n{results['task']} / {results['attention']}: step {results['step']}, "
        f"val accuracy {results['val_accuracy']:.4f}, test accuracy {results['test_accuracy']:.4f} "
        f"(best val {results['best_val_accuracy']:.4f} at step {results['best_step']}, "
        f"test there {results['test_accuracy_at_best']:.4f})\n"
        f"results: {workdir}/results.json  metrics: {workdir}/metrics.jsonl  "
        f"TensorBoard: tensorboard --logdir {workdir}"
    )


def run(argv: list[str] | None = None, *, launch_script: Path | None = None) -> int:
    """The command line: a sweep (`--sweep`, `--dry_run`, `--emit`) or one training run.

    Args:
      argv: the full command line, program name first (default `sys.argv`).
      launch_script: the script a sweep's runs execute (the checkout's launch.py); None =
        `python -m lra.launch`.

    Returns:
      The exit status.
    """
    argv = list(sys.argv if argv is None else argv)
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(help_text(launch_script))
        return 0
    argv = [argv[0], *move_mixer_flags(resolve_config_flags(argv[1:]))]
    if any(arg.split("=")[0] in SWEEP_FLAGS for arg in argv[1:]):
        from lra.experiments import sweep

        return sweep.main(argv[1:], launch_script=launch_script)
    app.run(main, argv=argv, flags_parser=_parse_flags)  # exits with main's status
    return 0


def help_text(launch_script: Path | None = None) -> str:
    """What `--help` prints: this module's docstring, the flags of a run and of a sweep."""
    from lra.experiments import sweep

    module = flags.FLAGS.find_module_defining_flag(_WORKDIR.name)
    return (f"{__doc__.strip()}\n\nFlags of a run; every config key is one too "
            f"(--config.KEY=VALUE, e.g. --config.model.num_layers=2):\n"
            f"{flags.FLAGS.module_help(module).strip()}\n\n"
            f"A sweep (--sweep, --dry_run or --emit; lra/experiments/sweep.py) takes the flags of a run "
            f"and these:\n{sweep.usage(launch_script)}")


def console_main() -> None:
    """The `lra-train` console script."""
    sys.exit(run())

