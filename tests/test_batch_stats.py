"""State that is not a parameter leaves the train step: BatchNorm's running statistics.

With `model.norm=batch` the first block's first norm sees the token embeddings alone
(positions `none`, mean pooling: no CLS vector), so its running statistics after N real
train steps can be computed in NumPy from the batches, the embedding table before each
step and the momentum (nnx.BatchNorm: running = m * running + (1 - m) * batch statistic,
biased variance over the real tokens). The same holds under gradient accumulation
(micro-batch i = rows i, i + A, ..., each updating the statistics in turn), remat, a
scanned layer stack and FSDP on 4 devices; a run killed and resumed ends with the same
statistics as one that was not.
"""

import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from configs_for_tests import listops_runlocal

from lra import tasks
from lra.parallel import sharding
from lra.training import data, train

TASK = tasks.get("listops")
MOMENTUM = 0.8
SIZES = {
    "max_length": 32, "batch_size": 8, "eval_batch_size": 8, "num_train_steps": 4,
    "warmup_steps": 1, "learning_rate": 1e-2, "model.num_layers": 2, "model.emb_dim": 16,
    "model.qkv_dim": 16, "model.num_heads": 2, "model.mlp_dim": 16, "model.dropout": 0.0,
    "model.attention_dropout": 0.0, "model.norm": "batch", "model.norm_momentum": MOMENTUM,
    "model.positions": "none", "model.pooling": "mean",
}
NUM_STEPS = 3


def _config(**overrides):
    config = listops_runlocal({**SIZES, **overrides})
    return config


def _arrays(num_rows: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"inputs": rng.integers(1, TASK.vocab_size, (num_rows, length)),
            "lengths": rng.integers(3, length + 1, num_rows),  # rows of different lengths
            "targets": rng.integers(0, TASK.num_classes, num_rows)}


ARRAYS = _arrays(NUM_STEPS * SIZES["batch_size"], SIZES["max_length"])


def _leaf(state, *names):
    """The first array of `state` whose path holds `names` in order (layer 0's, when each
    layer has one)."""
    found = [x for path, x in jax.tree.leaves_with_path(state)
             if _contains(jax.tree_util.keystr(path), names)]
    assert found, names
    return np.asarray(found[0])


def _contains(path: str, names) -> bool:
    position = 0
    for name in names:
        position = path.find(f"'{name}'", position)
        if position < 0:
            return False
    return True


def _first_norm(state, scanned: bool):
    blocks = "scanned_blocks" if scanned else "blocks"
    mean, var = (_leaf(state[0], blocks, "attention_norm", name) for name in ("mean", "var"))
    return (mean[0], var[0]) if scanned else (mean, var)


def _train(config, num_devices=0):
    """NUM_STEPS real train steps. Returns (the embedding table before each step, the
    batches, the final state, the step's mesh, graphdef and rng state)."""
    mesh = sharding.make_mesh(num_devices, config.mesh_fsdp)
    train.validate_config(config, mesh.size)
    tables, batches = [], []
    with jax.set_mesh(mesh):
        graphdef, rng_state, state, shardings = train.create_state(config, TASK, mesh)
        step = train.make_train_step(graphdef, shardings, config)
        for index in range(NUM_STEPS):
            rows = np.arange(index * config.batch_size, (index + 1) * config.batch_size)
            batch = data.gather(ARRAYS, rows, config.max_length)
            tables.append(_leaf(state[0], "embed", "embedding").copy())
            batches.append(batch)
            state, _ = step(state, rng_state, data.to_global(batch, mesh))
    return tables, batches, state, (mesh, graphdef, rng_state)


def _reference(tables, batches, accum: int, emb_dim: int):
    """NumPy: the first norm's running (mean, var) after the steps, micro-batch by
    micro-batch."""
    mean, var = np.zeros(emb_dim), np.ones(emb_dim)
    for table, batch in zip(tables, batches):
        for micro in range(accum):
            tokens = np.asarray(batch["inputs"])[micro::accum]
            real = np.asarray(batch["mask"])[micro::accum].astype(bool)
            x = table.astype(np.float64)[tokens][real]  # [real tokens, E]
            mean = MOMENTUM * mean + (1 - MOMENTUM) * x.mean(0)
            var = MOMENTUM * var + (1 - MOMENTUM) * x.var(0)
    return mean, var


@pytest.mark.parametrize("overrides, num_devices", [
    ({}, 0),
    ({"grad_accum_steps": 2}, 0),
    ({"grad_accum_steps": 4, "remat": True}, 1),
    ({"model.scan_layers": True, "grad_accum_steps": 2}, 0),
    ({"mesh_fsdp": 4}, 0),
], ids=["plain", "accumulate-2", "accumulate-4-remat", "scan-layers", "fsdp-4"])
def test_running_statistics_follow_the_batches(overrides, num_devices):
    config = _config(**overrides)
    tables, batches, state, (mesh, graphdef, rng_state) = _train(config, num_devices)
    scanned = config.model.scan_layers
    mean, var = _first_norm(state, scanned)
    expected_mean, expected_var = _reference(tables, batches, config.grad_accum_steps,
                                             config.model.emb_dim)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var, expected_var, rtol=1e-4, atol=1e-6)
    # Every norm of every layer moved from its start (mean 0, variance 1).
    statistics = [(path, x) for path, x in jax.tree.leaves_with_path(state[0]) if _stat(path)]
    arrays_per_stat = 1 if scanned else config.model.num_layers  # scanned: [layers, E]
    assert len(statistics) == 2 * 2 * arrays_per_stat  # 2 norms a block, mean and var
    for path, x in statistics:
        start = {"mean": 0.0, "var": 1.0}[_stat(path)]
        assert np.abs(np.asarray(x) - start).max() > 1e-3, jax.tree_util.keystr(path)

    # Evaluation normalises with them: resetting them changes the loss.
    with jax.set_mesh(mesh):
        eval_step = train.make_eval_step(graphdef)
        batch = data.gather(ARRAYS, np.arange(8), config.max_length)
        batch = data.to_global({**batch, "weights": np.ones(8, np.float32)}, mesh)
        trained = float(eval_step(state, rng_state, batch)["loss"])
        start = {"mean": 0.0, "var": 1.0}
        reset = jax.tree_util.tree_map_with_path(
            lambda path, x: x * 0 + start[_stat(path)] if _stat(path) else x, state)
        assert abs(float(eval_step(reset, rng_state, batch)["loss"]) - trained) > 1e-4


def _stat(path) -> str | None:
    """"mean" or "var" for a BatchNorm running statistic's path, else None."""
    # nnx State: ['mean'].value; orbax's raw read of a checkpoint: ['mean']['value'].
    match = re.search(r"\['(mean|var)'\](\.value|\['value'\])$", jax.tree_util.keystr(path))
    return match.group(1) if match else None


def _checkpoint_statistics(workdir, step: int) -> dict[str, np.ndarray]:
    """The running statistics saved in checkpoint `step`, read by orbax alone."""
    saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree.leaves_with_path(saved) if _stat(path)}


def test_a_resumed_run_continues_the_same_statistics(tmp_path):
    config = _config(num_train_steps=4, checkpoint_every=2, eval_every=4, log_every=2)
    config.prepare.update(num_train=40, num_val=8, num_test=8, min_length=5, max_length=30)
    config.data_dir = str(tmp_path / "data")
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, workdir)
    uninterrupted = _checkpoint_statistics(workdir, 4)
    assert len(uninterrupted) == 2 * 2 * config.model.num_layers
    for path, x in uninterrupted.items():
        assert np.abs(x - (0.0 if "mean" in path else 1.0)).max() > 1e-3, path
    # As if killed after checkpoint 2: the relaunch restores it and replays steps 3 and 4.
    (workdir / "results.json").unlink()
    shutil.rmtree(workdir / "checkpoints" / "4")
    train.train_and_evaluate(config, workdir)
    resumed = _checkpoint_statistics(workdir, 4)
    for path, x in uninterrupted.items():
        np.testing.assert_allclose(resumed[path], x, rtol=1e-6, err_msg=path)
