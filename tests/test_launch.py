"""launch.py from the command line: bad flags and config values give one clear message."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_unknown_attention_lists_the_known_ones(tmp_path):
    done = _launch("--config", "configs/listops.py:runlocal,attention=nonesuch", tmp_path=tmp_path)
    assert done.returncode != 0
    assert "unknown attention 'nonesuch'" in done.stderr and "softmax" in done.stderr


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
