"""The training loop end to end on tiny ListOps: devices, resume, interruption, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from configs_for_tests import listops_runlocal

from lra import tasks
from lra.parallel import sharding
from lra.training import data, train

ROOT = Path(__file__).resolve().parents[1]
# Everything in a result that may differ between two runs of the same config.
TIMING_KEYS = ("train_seconds", "compile_seconds", "steps_per_second")

TINY = {
    "prepare.num_train": 160, "prepare.num_val": 40, "prepare.num_test": 36,
    "prepare.min_length": 10, "prepare.max_length": 60,
    "max_length": 64, "batch_size": 16, "eval_batch_size": 16,
    "num_train_steps": 12, "warmup_steps": 2, "learning_rate": 3e-3,
    "log_every": 2, "eval_every": 6, "checkpoint_every": 4,
    "model.num_layers": 1, "model.emb_dim": 32, "model.qkv_dim": 32, "model.num_heads": 2,
    "model.mlp_dim": 32,
}


def _config(data_dir, **overrides):
    config = listops_runlocal({**TINY, **overrides})
    config.data_dir = str(data_dir)
    return config


def _flags(config_overrides: dict, data_dir) -> list[str]:
    pairs = {**TINY, **config_overrides, "data_dir": str(data_dir)}
    return [f"--config.{key}={value}" for key, value in pairs.items()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("listops")
    data.ensure_prepared(tasks.get("listops"), str(path), _config(path).prepare)
    return path


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in TIMING_KEYS}


def _train_records(workdir) -> list[dict]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_one_and_four_devices_give_the_same_losses(data_dir):
    config = _config(data_dir)
    task = tasks.get("listops")
    arrays = task.load("train", str(data_dir))
    losses = {}
    for num_devices in (1, 4):
        mesh = sharding.make_mesh(num_devices)
        with jax.set_mesh(mesh):
            graphdef, rng_state, state, shardings = train.create_state(config, task, mesh)
            step = train.make_train_step(graphdef, shardings, config)
            dataset = data.train_dataset(arrays, batch_size=16, max_length=64, seed=0)
            batch = data.to_global(dataset[0], mesh)  # one batch throughout: its loss must fall
            run = []
            for _ in range(4):
                state, metrics = step(state, rng_state, batch)
                run.append(float(metrics["loss"]))
        losses[num_devices] = run
    np.testing.assert_allclose(losses[1], losses[4], rtol=1e-5)
    # The first step has learning rate 0 (warmup); the updates after it lower the loss.
    assert losses[1][3] < losses[1][2] < losses[1][0] - 0.1, losses[1]


def test_run_writes_the_workdir_and_a_rerun_returns_the_stored_results(data_dir, tmp_path):
    config = _config(data_dir)
    results = train.train_and_evaluate(config, tmp_path)
    expected_keys = {"task", "attention", "mixer", "seed", "step", "val_accuracy", "test_accuracy",
                     "best_val_accuracy", "best_step", "test_accuracy_at_best", "num_params",
                     "train_seconds", "steps_per_second", "config_hash", "versions", "device",
                     "objective", "init_from", "mixer_kind", "compile_seconds",
                     "mixer_pattern", "layer_mixers", "mixer_label"}
    assert set(results) == expected_keys
    assert results["mixer_pattern"] == "" and results["mixer_label"] == config.attention
    assert results["layer_mixers"] == [config.attention] * config.model.num_layers
    assert results["compile_seconds"] > 0  # the step's compilation, outside train_seconds
    assert (results["mixer"], results["mixer_kind"]) == (config.attention, "attention")
    assert results["step"] == 12 and results["task"] == "listops"
    assert results["best_step"] in (6, 12)
    # Accuracies count whole examples of the whole splits (36 test, 40 val; none dropped).
    for key, size in (("test_accuracy", 36), ("val_accuracy", 40)):
        assert 0 <= results[key] <= 1 and round(results[key] * size, 6).is_integer(), results
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert json.loads((tmp_path / "config.json").read_text())["num_train_steps"] == 12
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert (tmp_path / "checkpoints" / "12").exists()
    records = _train_records(tmp_path)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records if r["split"] == "val"] == [6, 12]
    before = (tmp_path / "metrics.jsonl").read_text()
    assert train.train_and_evaluate(config, tmp_path) == results
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_a_run_from_before_a_config_key_existed_still_resumes(data_dir, tmp_path):
    """config.json of an earlier lra lacks keys added since (lra.training.workdir.ADDED_DEFAULTS):
    at their defaults they change nothing, neither the check nor the config hash."""
    from lra.training import workdir

    config = _config(data_dir)
    old = workdir.config_dict(config)
    for key in ("objective", "mask_rate", "init_from", "init_from_checkpoint", "spt"):
        del old[key]
    del old["model"]["scan_layers"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    workdir.check_and_write_config(tmp_path, config)  # no error: the same run
    assert workdir.config_hash(ml_collections.ConfigDict(old)) == workdir.config_hash(config)
    config.spt.pretrain_steps = 5  # a new key away from its default is a change
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"different config \(changed: spt\)"):
        workdir.check_and_write_config(tmp_path, config)


@pytest.mark.parametrize("mixer, added", [
    ("gated_deltanet", ("chunk_strategy",)),
    ("mamba2", ("ngroups", "learnable_init_states", "dt_limit")),
])
def test_mixer_options_added_since_keep_the_config_hash(mixer, added):
    """Options a family gained after runs were started (ADDED_DEFAULTS), at their defaults,
    leave the hash of an older config.json unchanged, so sweeps still skip or resume it."""
    from configs import listops

    from lra.training import workdir

    config = listops.get_config(f"mixer={mixer}")
    old = workdir.config_dict(config)
    for option in added:
        del old["model"]["attention_options"][option]
    assert workdir.config_hash(ml_collections.ConfigDict(old)) == workdir.config_hash(config)


def test_logged_train_metrics_are_the_means_of_their_steps(data_dir, tmp_path):
    """Metrics are summed on the devices and read at eval and checkpoint steps too; each
    logged record must still be the mean of its interval's per-step values (log_every=1)."""
    every_step = _config(data_dir, log_every=1)
    train.train_and_evaluate(every_step, tmp_path / "every_step")
    per_step = {r["step"]: r for r in _train_records(tmp_path / "every_step")
                if r["split"] == "train"}
    # Reads mid-interval: eval at 6, checkpoints at 3, 6, 9 (kept in Progress.unlogged).
    train.train_and_evaluate(_config(data_dir, log_every=4, checkpoint_every=3),
                             tmp_path / "every_4")
    logged = [r for r in _train_records(tmp_path / "every_4") if r["split"] == "train"]
    assert [r["step"] for r in logged] == [4, 8, 12]
    for record in logged:
        steps = range(record["step"] - 3, record["step"] + 1)
        for key in ("loss", "accuracy", "grad_norm", "learning_rate"):
            mean = np.mean([per_step[step][key] for step in steps])
            assert record[key] == pytest.approx(mean, rel=1e-5, abs=1e-7), (key, record)


def test_workdir_of_another_config_is_refused(data_dir, tmp_path):
    train.train_and_evaluate(_config(data_dir, num_train_steps=4, eval_every=2), tmp_path)
    for changed in ({"num_train_steps": 8, "learning_rate": 1e-2},  # finished: not reported
                    {"num_train_steps": 4, "eval_every": 2, "learning_rate": 1e-2}):
        with pytest.raises(ValueError, match="learning_rate"):
            train.train_and_evaluate(_config(data_dir, **changed), tmp_path)


@pytest.mark.parametrize("overrides, message", [
    ({"attention": "nonesuch"}, "known: .*softmax"),
    ({"model.qkv_dim": 30, "model.num_heads": 4}, "qkv_dim=30 is not divisible"),
    ({"learning_rate": -1.0}, "learning_rate must be > 0"),
    ({"warmup_steps": 12}, "warmup_steps=12"),
    ({"batch_size": 6}, "batch_size=6 is not divisible by 4 devices"),
    ({"schedule": "linear"}, "schedule='linear'"),
])
def test_bad_config_values_are_rejected_naming_the_key(data_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(_config(data_dir, **overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_malformed_data_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad_data"
    bad.mkdir()
    for split in ("train", "val", "test"):
        (bad / f"basic_{split}.tsv").write_text("Source\tTarget\n( [MAX 4 3 ] )\t4\n[MIN 2 ]\t\n")
    with pytest.raises(ValueError, match=r"basic_\w+\.tsv.*3"):
        train.train_and_evaluate(_config(bad), tmp_path / "run")


# ---------------------------------------------------------------------------------------
# Interruption: a real process, killed, then relaunched with the same command.

LONG = {"num_train_steps": 240, "checkpoint_every": 20, "eval_every": 60, "log_every": 20}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    results = train.train_and_evaluate(_config(data_dir, **LONG), workdir)
    return results, _train_records(workdir)


def _launch(workdir, data_dir) -> subprocess.Popen:
    command = [sys.executable, "launch.py", "--config", "configs/listops.py:runlocal",
               "--workdir", str(workdir), *_flags(LONG, data_dir)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for_checkpoint(workdir, process, step: int, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not (Path(workdir) / "checkpoints" / str(step)).exists():
        if process.poll() is not None:
            pytest.fail(f"run ended before checkpoint {step}:\n{process.stdout.read()}")
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGKILL, -signal.SIGKILL),
                                               (signal.SIGTERM, 143)])
def test_interrupted_and_relaunched_run_matches_an_uninterrupted_one(
        data_dir, tmp_path, uninterrupted, signum, exit_code):
    process = _launch(tmp_path, data_dir)
    _wait_for_checkpoint(tmp_path, process, 40)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == exit_code, output
    assert not (tmp_path / "results.json").exists(), "the run finished before the signal"
    relaunched = _launch(tmp_path, data_dir)
    output, _ = relaunched.communicate(timeout=300)
    assert relaunched.returncode == 0, output
    results = json.loads((tmp_path / "results.json").read_text())
    expected_results, expected_records = uninterrupted
    assert _comparable(results) == _comparable(expected_results)
    records = _train_records(tmp_path)
    assert [r["step"] for r in records] == [r["step"] for r in expected_records]
    for got, want in zip(records, expected_records):
        for key in ("loss", "accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got, want)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path):
    config = _config(data_dir)
    expected = train.train_and_evaluate(config, tmp_path)
    (tmp_path / "results.json").unlink()
    for path in (tmp_path / "checkpoints" / "12").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    results = train.train_and_evaluate(config, tmp_path)  # resumes at 8, replays 9..12
    assert _comparable(results) == _comparable(expected)
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_unreadable").iterdir()] == ["12"]
