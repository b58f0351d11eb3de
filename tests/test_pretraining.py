"""Fine-tuning from another run (`init_from`) and the SPT protocol (lra/training/pretraining.py) on tiny
ListOps: the encoder restored exactly, a fresh head, shape mismatches named, the protocol
end to end, and resuming in the middle of either phase."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lra.parallel import sharding
from lra.training import pretraining, train
from test_train import TIMING_KEYS, _config, data_dir  # noqa: F401 (a fixture)

SMALL = {"num_train_steps": 6, "eval_every": 3, "checkpoint_every": 3, "log_every": 3,
         "warmup_steps": 1, "model.pooling": "mean"}


def _pretrain(data_dir, workdir, **overrides):
    config = _config(data_dir, **{**SMALL, "objective": "masked_lm", "mask_rate": 0.3,
                                  **overrides})
    results = train.train_and_evaluate(config, workdir)
    assert results["objective"] == "masked_lm"
    return config, results


def _saved_arrays(checkpoint_step_dir):
    """The state arrays of one orbax checkpoint, read without any target: {path: array}."""
    restored = ocp.StandardCheckpointer().restore(checkpoint_step_dir / "state")
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
            for path, v in flat}


def _initial_state(config, mesh):
    task = __import__("lra.tasks", fromlist=["get"]).get(config.task)
    _, _, state, _ = train.create_state(config, task, mesh)
    return state


def _protocol_config(data_dir):
    return _config(data_dir, **SMALL, **{"spt.pretrain_steps": 6, "spt.warmup_steps": 1,
                                         "mask_rate": 0.3})


def _comparable(results: dict) -> dict:
    """Results without timings and the pretraining run's folder (tmp_path here)."""
    drop = {*TIMING_KEYS, "init_from"}
    comparable = {k: v for k, v in results.items() if k not in drop}
    comparable["spt"] = {k: v for k, v in results["spt"].items() if k not in TIMING_KEYS}
    return comparable


@pytest.fixture(scope="module")
def protocol(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("spt")
    return workdir, train.train_and_evaluate(_protocol_config(data_dir), workdir)


def test_init_from_restores_exactly_the_saved_encoder_with_a_fresh_head(data_dir, protocol):
    source = protocol[0] / "pretrain"  # the protocol's masked_lm run
    results = json.loads((source / "results.json").read_text())
    config = _config(data_dir, **SMALL, init_from=str(source), init_from_checkpoint="last")
    mesh = sharding.make_mesh(config.num_devices, config.mesh_fsdp)
    with jax.set_mesh(mesh):
        fresh = _initial_state(config, mesh)
        state, record = pretraining.load_encoder(
            _initial_state(config, mesh), config,
            lambda c: train._abstract_state(c, mesh))
    assert record["step"] == 6 and record["config_hash"] == results["config_hash"]
    saved = _saved_arrays(source / "checkpoints" / "6")
    encoder = dict(nnx.to_flat_state(state[0]["encoder"]))
    assert len(encoder) > 5
    for path, variable in encoder.items():
        key = ("0", "encoder", *map(str, path), "value")
        np.testing.assert_array_equal(np.asarray(variable.get_value()), saved[key],
                                      err_msg=str(path))
    # The head and the optimizer start fresh (as a run from scratch with the same seed).
    for part, fresh_part in ((state[0]["head"], fresh[0]["head"]), (state[1], fresh[1])):
        for (path, new), (old_path, old) in zip(nnx.to_flat_state(part),
                                                nnx.to_flat_state(fresh_part)):
            assert path == old_path
            np.testing.assert_array_equal(np.asarray(new.get_value()),
                                          np.asarray(old.get_value()), err_msg=str(path))


def test_mismatched_shapes_fail_before_training_naming_the_parameter(data_dir, tmp_path):
    source = tmp_path / "pretrain"
    _pretrain(data_dir, source, **{"model.mlp_dim": 16})
    config = _config(data_dir, **SMALL, init_from=str(source))
    with pytest.raises(ValueError, match=r"encoder parameter blocks\.0\.mlp\.down\.kernel has "
                                         r"shape \(16, 32\) there but \(32, 32\) here"):
        train.train_and_evaluate(config, tmp_path / "finetune")
    assert not (tmp_path / "finetune" / "metrics.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="holds no run"):
        train.train_and_evaluate(_config(data_dir, **SMALL, init_from=str(tmp_path / "none")),
                                 tmp_path / "other")


def test_protocol_pretrains_then_fine_tunes_in_one_workdir_tree(protocol):
    workdir, results = protocol
    assert results["objective"] == "classify" and results["step"] == 6
    assert results["spt"]["objective"] == "masked_lm" and results["spt"]["step"] == 6
    assert results["init_from"]["workdir"] == str(workdir / "pretrain")
    assert json.loads((workdir / "results.json").read_text()) == results
    pretrain = json.loads((workdir / "pretrain" / "results.json").read_text())
    assert pretrain["objective"] == "masked_lm"
    assert (workdir / "finetune" / "init_from.json").exists()
    assert results["spt"]["best_val_accuracy"] == pretrain["best_val_accuracy"]


@pytest.mark.parametrize("phase, stop_at", [("pretrain", 3), ("finetune", 3)])
def test_protocol_resumes_in_the_middle_of_either_phase(data_dir, tmp_path, protocol, monkeypatch,
                                                        phase, stop_at):
    stopped = []
    original = train._Preemption.check

    def stop_once(self, step):
        in_phase = self_phase[0] == phase
        if in_phase and step == stop_at and not stopped:
            stopped.append(step)
            return True
        return original(self, step)

    self_phase = [None]
    original_trainer = train._Trainer.__init__

    def remember_phase(self, config, task, mesh, workdir, splits):
        self_phase[0] = workdir.name
        original_trainer(self, config, task, mesh, workdir, splits)

    monkeypatch.setattr(train._Preemption, "check", stop_once)
    monkeypatch.setattr(train._Trainer, "__init__", remember_phase)
    assert train.train_and_evaluate(_protocol_config(data_dir), tmp_path) is None
    assert stopped == [stop_at]
    assert not (tmp_path / phase / "results.json").exists()
    results = train.train_and_evaluate(_protocol_config(data_dir), tmp_path)
    _, expected = protocol
    assert _comparable(results) == _comparable(expected)
    assert results["init_from"]["step"] == expected["init_from"]["step"]
    # Equal results also show that the resumed fine-tune continued from its own checkpoint:
    # starting its encoder from the pretraining run again would change them.
    assert results["spt"]["best_val_accuracy"] == expected["spt"]["best_val_accuracy"]
