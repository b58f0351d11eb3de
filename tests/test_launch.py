"""launch.py from the command line: bad flags and config values give one clear message;
the mixer flag builds the config its config argument builds; --help lists the flags."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import listops
from lra.experiments import launch
from lra.models import mixers

ROOT = Path(__file__).resolve().parents[1]
# launch.py's own flag parsing and run(), with the trainer replaced by its config check and
# printing the config.
PRINT_CONFIG = """
import sys
from lra.experiments import launch
from lra.training import train

def print_config(config, workdir):
    train.validate_config(config, num_devices=1)
    print(config.to_json_best_effort())
    sys.exit(0)

train.train_and_evaluate = print_config
sys.exit(launch.run(["launch.py", *sys.argv[1:]]))
"""


def _launch(*args, tmp_path):
    command = [sys.executable, "launch.py", "--workdir", str(tmp_path / "run"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_unknown_config_key_lists_the_known_keys(tmp_path):
    done = _launch("--config", "configs/listops.py:runlocal", "--config.model.num_layer=2",
                   tmp_path=tmp_path)
    assert done.returncode == 2
    assert "model.num_layer" in done.stderr
    assert "model.num_layers" in done.stderr and "learning_rate" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flags", [
    ("--config", "configs/listops.py:runlocal,attention=nonesuch"),
    ("--config", "configs/listops.py:runlocal,mixer=nonesuch"),
    ("--config", "configs/listops.py:runlocal", "--config.mixer=nonesuch"),
])
def test_unknown_mixer_is_one_line_naming_the_known_ones(tmp_path, flags):
    done = _launch(*flags, tmp_path=tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()  # no traceback, no usage text
    assert line.startswith("error: unknown attention 'nonesuch'; known: ")
    assert all(name in line for name in mixers.NAMES)


def _trainer_config(*flags) -> dict:
    """The config that `python launch.py FLAGS` hands the trainer."""
    done = subprocess.run([sys.executable, "-c", PRINT_CONFIG, "--workdir", "unused", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("arg, before, after, options", [
    # A softmax config switched to linear, with one of linear's options set.
    ("runlocal", (), ("--config.mixer=linear", "--config.model.attention_options.form=recurrent"),
     {"form": "recurrent"}),
    # The alias, before --config, its value the next argument: s5's block has no MLP.
    ("runlocal,attention=softmax", ("--config.attention", "s5"),
     ("--config.model.attention_options.state_size=8",), {"state_size": 8}),
    # preset=lra (ListOps' default) gives the final mixer LRA's released settings for it.
    ("", (), ("--config.mixer=performer",), {}),
])
def test_mixer_flag_builds_the_config_of_the_mixer_argument(arg, before, after, options):
    """`--config.mixer=X` is `:mixer=X`: X's options, block and preset values, and options
    of X set on the command line are kept."""
    got = _trainer_config(*before, "--config", f"configs/listops.py:{arg}", *after)
    name = got["mixer"]
    expected = listops.get_config(f"{arg},mixer={name}".strip(","))
    expected.model.attention_options.update(options)
    assert got == json.loads(expected.to_json_best_effort())
    assert got["attention"] == name and name != "softmax"
    assert set(got["model"]["attention_options"]) == set(mixers.family_options(name))
    assert got["model"]["block_mlp"] == mixers.default_block_mlp(name)
    assert {k: got["model"]["attention_options"][k] for k in options} == options
    if name == "performer":
        assert got["model"]["attention_options"]["num_features"] == 2  # LRA's ListOps file


def test_mixer_flags_move_into_the_config_argument():
    move = launch.move_mixer_flags
    assert move(["--config", "c.py:runlocal,attention=softmax,seed=1", "--config.mixer=s5",
                 "--workdir", "w"]) == ["--config", "c.py:runlocal,seed=1,mixer=s5",
                                        "--workdir", "w"]
    assert move(["--config.attention", "lru", "--config=c.py", "--config.mixer=s4d"]) == [
        "--config=c.py:mixer=s4d"]  # the last one wins, as for any flag
    assert move(["--config.mixers=1", "--config=c.py"]) == ["--config.mixers=1", "--config=c.py"]
    assert move(["--config.mixer=s5", "--workdir", "w"]) == ["--config.mixer=s5", "--workdir", "w"]


def test_help_lists_the_flags():
    done = subprocess.run([sys.executable, "launch.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in ("--config", "--workdir", "--[no]debug", "--sweep", "--dry_run", "--emit",
                 "--coordinator_address", "--num_processes", "--process_id", "--config.KEY"):
        assert flag in done.stdout, flag


def test_bad_config_value_is_one_message_naming_the_key(tmp_path):
    done = _launch("--config", "configs/listops.py:runlocal", "--config.model.num_heads=3",
                   tmp_path=tmp_path)
    assert done.returncode == 2
    assert "config.model.qkv_dim=64 is not divisible by config.model.num_heads=3" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_compiled_programs_are_kept_in_the_compilation_cache(tmp_path):
    """A run writes its compiled programs to config.compilation_cache_dir, so a requeued
    job reads them instead of compiling again (matmul_precision=highest runs too)."""
    import os

    cache = tmp_path / "cache"
    flags = {"compilation_cache_dir": cache, "matmul_precision": "highest",
             "data_dir": tmp_path / "data", "prepare.num_train": 64, "prepare.num_val": 16,
             "prepare.num_test": 16, "batch_size": 16, "eval_batch_size": 16,
             "num_train_steps": 4, "warmup_steps": 1, "eval_every": 4, "checkpoint_every": 4,
             "log_every": 2}
    command = [sys.executable, "launch.py", "--workdir", str(tmp_path / "run"),
               "--config", "configs/listops.py:runlocal",
               *[f"--config.{key}={value}" for key, value in flags.items()]]
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len([p for p in cache.rglob("*") if p.is_file()]) >= 2  # the train and eval steps
