"""Failure modes beyond tests/test_train.py: checkpoints that read back wrong or not at all,
a non-finite loss, bad config values rejected before anything is compiled.

(test_train.py already covers SIGTERM/SIGKILL then relaunch, a latest checkpoint with every
file cut in half, and config errors in-process; test_launch.py the command-line messages.)
"""

import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from lra import tasks
from lra.parallel import sharding
from lra.training import checkpoints, data, train
from lra.models import attention
from tests.test_train import TINY, _comparable, _config, _flags, _train_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("listops")
    data.ensure_prepared(tasks.get("listops"), str(path), _config(path).prepare)
    return path


# ---------------------------------------------------------------------------------------
# Checkpoints that read back wrong or not at all: the run resumes from the newest good one.

# Checkpoints at 3, 6, 9 and 12, all kept.
EVERY_THIRD = {"checkpoint_every": 3, "keep_checkpoints": 4}


def _state_of_the_step_before(checkpoint: Path) -> None:
    """Arrays of the previous checkpoint under this one's name: orbax reads them happily."""
    shutil.rmtree(checkpoint / "state")
    previous = checkpoint.parent / str(int(checkpoint.name) - EVERY_THIRD["checkpoint_every"])
    shutil.copytree(previous / "state", checkpoint / "state")


def _index_missing(checkpoint: Path) -> None:
    """An incomplete copy: the arrays' index file is gone."""
    (checkpoint / "state" / "manifest.ocdbt").unlink()


def _progress_cut_short(checkpoint: Path) -> None:
    path = checkpoint / "progress" / "metadata"
    path.write_bytes(path.read_bytes()[:20])


DAMAGES = {12: (_state_of_the_step_before, "differ from the check sums"),
           9: (_index_missing, "NOT_FOUND|does not exist"),
           6: (_progress_cut_short, "JSON|[Ee]xpecting|[Uu]nterminated")}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's asyncio
def test_damaged_checkpoints_are_set_aside_with_a_warning_each(data_dir, tmp_path, caplog,
                                                               capsys):
    config = _config(data_dir, **EVERY_THIRD)
    expected = train.train_and_evaluate(config, tmp_path)
    expected_records = _train_records(tmp_path)
    (tmp_path / "results.json").unlink()
    for step, (damage, _) in DAMAGES.items():
        damage(tmp_path / "checkpoints" / str(step))
    with caplog.at_level(logging.WARNING):
        results = train.train_and_evaluate(config, tmp_path)  # from 3, replays 4-12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for step, (_, reason) in DAMAGES.items():
        unreadable = [w for w in warnings if w.startswith(f"checkpoint at step {step} is unreadable")]
        assert len(unreadable) == 1 and re.search(reason, unreadable[0]), warnings
        assert len(unreadable[0]) < 400  # one readable line, not a dump of the storage spec
    assert "resuming from step 3" in capsys.readouterr().err
    assert _comparable(results) == _comparable(expected)
    assert _train_records(tmp_path) == expected_records
    aside = sorted(int(p.name.split("-")[0]) for p in (tmp_path / "checkpoints_unreadable").iterdir())
    assert aside == sorted(DAMAGES)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6, 9, 12]


def test_fingerprint_is_exact_and_sees_a_single_changed_bit():
    state = {"w": jax.numpy.arange(12, dtype=jax.numpy.float32).reshape(3, 4),
             "count": jax.numpy.array(7, jax.numpy.int32)}
    with jax.set_mesh(sharding.make_mesh(1)):
        before = np.asarray(checkpoints.fingerprint(state))
    assert before.shape == (2, 2) and before.dtype == np.uint32
    flipped = np.asarray(state["w"]).view(np.uint32).copy()
    flipped[1, 2] ^= 1  # the lowest mantissa bit of one element
    changed = {**state, "w": jax.numpy.asarray(flipped.view(np.float32))}
    with jax.set_mesh(sharding.make_mesh(1)):
        after = np.asarray(checkpoints.fingerprint(changed))
    assert (after[0] == before[0]).all() and (after[1] != before[1]).all()
    # Leaves in tree order ("count" before "w"): independent sums of the raw bits.
    bits = np.asarray(state["w"]).view(np.uint32).ravel().astype(np.uint64)
    weights = np.arange(bits.size, dtype=np.uint64) * 2 + 1
    assert before[1].tolist() == [bits.sum() % 2**32, (bits * weights).sum() % 2**32]
    assert before[0].tolist() == [7, 7]


# ---------------------------------------------------------------------------------------
# A non-finite loss stops the run at its step and keeps the last good checkpoint.

DIVERGING = {"learning_rate": 1e3, "schedule": "constant", "warmup_steps": 1,
             "checkpoint_every": 2}


def test_non_finite_loss_stops_at_its_step_keeping_the_last_good_checkpoint(data_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "launch.py", "--config", "configs/listops.py:runlocal",
         "--workdir", str(tmp_path), *_flags(DIVERGING, data_dir)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    found = re.search(r"error: loss is nan \(gradient norm nan\) at step (\d+); the last good "
                      r"checkpoint, step (\d+), is kept", done.stderr)
    assert found, done.stderr
    step, kept = int(found.group(1)), int(found.group(2))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert saved[-1] == kept < step and step <= TINY["num_train_steps"]
    records = _train_records(tmp_path)
    assert records and all(math.isfinite(r["loss"]) for r in records)
    assert not (tmp_path / "results.json").exists()

    # What it kept reads back (check sums included) and holds only finite numbers.
    _assert_latest_checkpoint_is_finite(tmp_path, _config(data_dir, **DIVERGING), kept)


def _assert_latest_checkpoint_is_finite(workdir, config, step: int) -> None:
    """The newest checkpoint in `workdir` is `step`, reads back and holds finite numbers."""
    mesh = sharding.make_mesh(0)
    with jax.set_mesh(mesh):
        _, _, state, _ = train.create_state(config, tasks.get("listops"), mesh)
        manager = checkpoints.Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
        state, _, progress = manager.restore_latest(state)
        manager.close()
    assert progress.step == step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


BAD_FROM = 5  # between the checkpoint at 4 and the next read (log and checkpoint at 6)


def _diverging_from(step: int):
    """make_train_step whose loss, gradient norm and parameters are NaN from `step` on."""
    make = train.make_train_step

    def make_diverging(graphdef, shardings, config):
        train_step = make(graphdef, shardings, config)

        def diverging(state, rng_state, batch):
            state, metrics = train_step(state, rng_state, batch)
            bad = state[1]["step"][...] >= step  # the optimizer's count: steps done
            poison = lambda x: jax.numpy.where(bad, jax.numpy.nan, x)
            state[0] = jax.tree.map(poison, state[0])  # the model's parameters
            return state, {**metrics, "loss": poison(metrics["loss"]),
                           "grad_norm": poison(metrics["grad_norm"])}

        return diverging

    return make_diverging


def test_first_non_finite_step_is_named_though_read_later(data_dir, tmp_path, monkeypatch):
    """Metrics are read only at steps 6 and 12 (log, checkpoint); a loss that turns NaN at
    step 5 is reported as step 5, and checkpoint 6, whose state is NaN, is never saved."""
    monkeypatch.setattr(train, "make_train_step", _diverging_from(BAD_FROM))
    config = _config(data_dir, log_every=6, checkpoint_every=2, eval_every=12)
    with pytest.raises(FloatingPointError, match=r"loss is nan \(gradient norm nan\) at step "
                       rf"{BAD_FROM}; the last good checkpoint, step 4, is kept"):
        train.train_and_evaluate(config, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
    assert not _train_records(tmp_path)  # the first log (step 6) was not written
    _assert_latest_checkpoint_is_finite(tmp_path, config, 4)


# ---------------------------------------------------------------------------------------
# Bad config values: rejected before anything is compiled, with the key in the message.


def _options(name: str, **changes) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**attention.default_options(name), **changes})


BAD_CONFIGS = [
    ({"learning_rate": -0.1}, {}, r"config\.learning_rate must be > 0"),
    ({"model.qkv_dim": 32, "model.num_heads": 3}, {},
     r"config\.model\.qkv_dim=32 is not divisible by config\.model\.num_heads=3"),
    ({"attention": "nonesuch"}, {}, r"config\.attention='nonesuch' is unknown; known: softmax"),
    ({"data_threads": -1}, {}, r"config\.data_threads must be an integer >= 0, got -1"),
    ({"data_workers": -2}, {}, r"config\.data_workers must be an integer >= 0, got -2"),
    ({}, {"implementation": "xla", "nonesuch": 1},
     r"config\.model\.attention_options has unknown option\(s\) nonesuch"),
    # cuDNN attention: no dropout on probabilities, 16-bit only; caught on CPU, before a GPU run.
    ({"model.attention_dropout": 0.1, "dtype": "bfloat16"}, _options("softmax", implementation="cudnn"),
     r"implementation='cudnn' cannot run with config\.model\.attention_dropout=0\.1 .*set it to 0"),
    ({"model.attention_dropout": 0.0}, _options("softmax", implementation="cudnn"),
     r"implementation='cudnn' cannot run with config\.dtype='float32' .*config\.dtype=bfloat16"),
    # Longformer's global tokens must lie inside the sequence (max_len = max_length + CLS).
    ({"attention": "longformer"}, _options("longformer", global_positions=(0, 80)),
     r"config\.model .*max_length 64.*global_positions must be distinct and < max_len=65"),
]


@pytest.mark.parametrize("overrides, options, message", BAD_CONFIGS)
def test_bad_config_is_rejected_before_compilation(data_dir, tmp_path, monkeypatch, overrides,
                                                   options, message):
    config = _config(data_dir, **overrides)
    if options:
        config.model.attention_options = options

    def compile_nothing(*args, **kwargs):
        raise AssertionError("jax.jit was reached before the config was rejected")

    monkeypatch.setattr(jax, "jit", compile_nothing)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()


def test_bad_config_through_launch_is_one_message_naming_the_key(data_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "launch.py", "--config", "configs/listops.py:runlocal,attention=longformer",
         "--workdir", str(tmp_path / "run"), *_flags({"learning_rate": -0.1}, data_dir)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: config.learning_rate must be > 0, got -0.1" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
