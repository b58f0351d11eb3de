"""Memory and speed options of the training loop: fsdp, gradient accumulation, bf16, remat.

Each option is compared with the plain run it must reproduce: an fsdp mesh with a data-only
mesh, A micro-batches of B/A rows with one batch of B rows, remat with no remat; bf16 with
float32 loosely. Runs use 4 fake CPU devices and random ListOps-shaped batches.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from configs_for_tests import listops_runlocal
from flax import nnx
from jax.sharding import PartitionSpec

from configs import listops as listops_config
from lra import tasks
from lra.parallel import sharding
from lra.training import checkpoints, data, train

ROOT = Path(__file__).resolve().parents[1]
TASK = tasks.get("listops")
SIZES = {
    "max_length": 64, "batch_size": 16, "eval_batch_size": 16, "num_train_steps": 12,
    "warmup_steps": 1, "learning_rate": 3e-3, "model.num_layers": 1, "model.emb_dim": 32,
    "model.qkv_dim": 32, "model.num_heads": 2, "model.mlp_dim": 32,
}
NUM_STEPS = 3


def _config(**overrides):
    config = listops_runlocal({**SIZES, **overrides})
    return config


def _arrays(num_rows: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(1, TASK.vocab_size, (num_rows, length)),
        "lengths": rng.integers(length // 4, length + 1, num_rows),
        "targets": rng.integers(0, TASK.num_classes, num_rows),
    }


ARRAYS = _arrays(NUM_STEPS * SIZES["batch_size"], SIZES["max_length"])


def _train(config, arrays=ARRAYS, num_devices=0):
    """Runs NUM_STEPS steps on consecutive batches.

    Returns:
      ({"loss": [...], "grad_norm": [...]} per step, the final state).
    """
    mesh = sharding.make_mesh(num_devices, config.mesh_fsdp)
    train.validate_config(config, mesh.size)
    batch_size = config.batch_size
    with jax.set_mesh(mesh):
        graphdef, rng_state, state, shardings = train.create_state(config, TASK, mesh)
        step = train.make_train_step(graphdef, shardings, config)
        history = {"loss": [], "grad_norm": []}
        for index in range(NUM_STEPS):
            rows = np.arange(index * batch_size, (index + 1) * batch_size) % len(arrays["targets"])
            batch = data.gather(arrays, rows, config.max_length)
            state, metrics = step(state, rng_state, data.to_global(batch, mesh))
            for name, values in history.items():
                values.append(float(metrics[name]))
    return history, state


_RUNS = {}


def _baseline():
    """The plain run (4-way data parallel, float32, no accumulation, no remat), computed once."""
    if "baseline" not in _RUNS:
        _RUNS["baseline"] = _train(_config())
    return _RUNS["baseline"]


def _params(state) -> dict:
    """Model parameters (state[0]; state[1] is the optimizer) by path, as NumPy arrays."""
    return {jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree.leaves_with_path(state[0])}


# The key projection's bias shifts every logit of a query equally, so softmax ignores it: its
# gradient is 0 up to rounding, which Adam scales up to full-size steps. It is compared only
# for equal reduction orders (fsdp); the losses show that it changes nothing.
NOISE_ONLY = "['attention']['key']['bias']"


def _assert_states_close(state, expected, rtol):
    actual, reference = _params(state), _params(expected)
    assert actual.keys() == reference.keys()
    for key in reference:
        if rtol and NOISE_ONLY in key:
            continue
        np.testing.assert_allclose(actual[key], reference[key], rtol=rtol, atol=1e-7, err_msg=key)


# ---------------------------------------------------------------------------------------
# fsdp


def test_fsdp_spec_shards_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((32, 64), 2) == PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((64, 32), 4) == PartitionSpec("fsdp", None)
    assert sharding.fsdp_spec((33, 48), 2) == PartitionSpec(None, "fsdp")  # 33 is odd
    assert sharding.fsdp_spec((33, 35), 2) == PartitionSpec()  # nothing divisible
    assert sharding.fsdp_spec((512,), 2) == PartitionSpec()  # small: replicated
    assert sharding.fsdp_spec((), 2) == PartitionSpec()
    assert sharding.fsdp_spec((64, 64), 1) == PartitionSpec()


def test_fsdp_run_matches_the_data_parallel_run_and_shards_its_state(tmp_path):
    expected, expected_state = _baseline()
    history, state = _train(_config(mesh_fsdp=2))
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-5)
    # It trains (the losses above are of different batches, so they differ anyway): the
    # LayerNorm scales start at exactly 1 and have moved.
    final_scale = np.asarray(state[0]["encoder"]["final_norm"]["scale"][...])
    assert np.abs(final_scale - 1).max() > 1e-3
    _assert_states_close(state, expected_state, rtol=1e-5)

    model, optimizer = state[0], state[1]
    kernel = model["encoder"]["blocks"][0]["attention"]["query"]["kernel"][...]  # [32, 32]
    assert kernel.sharding.spec == PartitionSpec("fsdp", None)
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(16, 32)}
    mu = optimizer["opt_state"][0]["mu"]["encoder"]["blocks"][0]["attention"]["query"]["kernel"]
    assert mu[...].sharding.spec == PartitionSpec("fsdp", None)  # optimizer state too
    bias = model["encoder"]["blocks"][0]["attention"]["query"]["bias"][...]  # 32 values
    assert bias.sharding.spec == PartitionSpec()
    # The baseline's parameters are replicated.
    assert expected_state[0]["encoder"]["blocks"][0]["attention"]["query"]["kernel"][
        ...].sharding.spec == PartitionSpec()

    # A checkpoint of the sharded state restores into the same shardings and values.
    with jax.set_mesh(sharding.make_mesh(0, 2)):
        manager = checkpoints.Checkpoints(tmp_path / "checkpoints", keep=1)
        manager.save(NUM_STEPS, state, {"position": 3}, checkpoints.Progress(step=NUM_STEPS))
        manager.close()
        manager = checkpoints.Checkpoints(tmp_path / "checkpoints", keep=1)
        restored, data_state, restored_progress = manager.restore_latest(state)
        manager.close()
    assert data_state == {"position": 3} and restored_progress.step == NUM_STEPS
    restored_kernel = restored[0]["encoder"]["blocks"][0]["attention"]["query"]["kernel"][...]
    assert restored_kernel.sharding.spec == PartitionSpec("fsdp", None)
    _assert_states_close(restored, state, rtol=0)


# Two blocks of width 64: nearly all bytes are in arrays of >= 1,024 elements that the rule
# shards 4 ways (the 64- and 256-wide biases and LayerNorms stay replicated).
WIDE = {"model.num_layers": 2, "model.emb_dim": 64, "model.qkv_dim": 64, "model.mlp_dim": 256}


def _compiled_run(config):
    """Compiles the train step on `config`'s mesh and runs NUM_STEPS steps with it.

    Returns:
      (compiled step, losses per step, shapes of every parameter of one device's view).
    """
    mesh = sharding.make_mesh(0, config.mesh_fsdp)
    with jax.set_mesh(mesh):
        graphdef, rng_state, state, shardings = train.create_state(config, TASK, mesh)
        step = train.make_train_step(graphdef, shardings, config)
        batches = [data.to_global(data.gather(ARRAYS, np.arange(i * 16, (i + 1) * 16), 64), mesh)
                   for i in range(NUM_STEPS)]
        compiled = step.lower(state, rng_state, batches[0]).compile()
        parameter_shapes = {tuple(x.shape) for x in jax.tree.leaves(state[0])}
        losses = []
        for batch in batches:
            state, metrics = compiled(state, rng_state, batch)
            losses.append(float(metrics["loss"]))
    return compiled, losses, parameter_shapes


def test_fsdp_step_keeps_the_state_sharded_and_gathers_each_layer_where_it_runs():
    plain, plain_losses, parameter_shapes = _compiled_run(_config(**WIDE))
    fsdp, fsdp_losses, _ = _compiled_run(_config(mesh_fsdp=4, **WIDE))
    np.testing.assert_allclose(fsdp_losses, plain_losses, rtol=1e-5)
    # The step's outputs are the new parameters + optimizer state and a few scalar metrics:
    # their bytes per device, from XLA's analysis of the compiled step (measured 0.26x).
    plain_bytes = plain.memory_analysis().output_size_in_bytes
    fsdp_bytes = fsdp.memory_analysis().output_size_in_bytes
    assert fsdp_bytes <= 0.3 * plain_bytes, (fsdp_bytes, plain_bytes)
    # Only parameters are gathered, never an activation (they keep the batch sharding), and
    # each layer's where it runs: every [64, 64] attention kernel (4 per block) is gathered
    # in the forward pass and again in the backward pass, not kept whole in between.
    gathered = re.findall(r"= f32\[([\d,]*)\]\{[\d,]*\} all-gather\(", fsdp.as_text())
    gathered_shapes = {tuple(int(n) for n in shape.split(",")) for shape in gathered}
    assert gathered_shapes <= parameter_shapes, gathered_shapes
    assert gathered.count("64,64") == 2 * 4 * WIDE["model.num_layers"], gathered
    assert "all-gather" not in plain.as_text()


def test_batches_are_split_over_both_batch_axes():
    mesh = sharding.make_mesh(0, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "seq": 1}  # seq: one sequence, whole
    batch = data.to_global(data.gather(ARRAYS, np.arange(16), 64), mesh)
    assert {shard.data.shape for shard in batch["inputs"].addressable_shards} == {(4, 64)}


# ---------------------------------------------------------------------------------------
# Gradient accumulation


OBJECTIVES = {
    "classify": {},
    "causal_lm": {"objective": "causal_lm", "model.causal": True, "model.pooling": "last"},
    "masked_lm": {"objective": "masked_lm", "mask_rate": 0.3},
}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_micro_batches_give_the_whole_batch_gradient_for_every_objective(objective):
    """A = 1, 2, 4 micro-batches of rows of different lengths: the same loss, gradient
    and parameters. Language models' targets are tokens, so micro-batches of short rows
    hold fewer: averaging per micro-batch would weigh them more."""
    runs = [_baseline() if objective == "classify" and accum == 1 else
            _train(_config(grad_accum_steps=accum, **OBJECTIVES[objective]))
            for accum in (1, 2, 4)]
    (expected, expected_state), *accumulated = runs
    for history, state in accumulated:
        # The gradient norm too: Adam's update would hide a gradient scaled by a constant.
        for name in ("loss", "grad_norm"):
            np.testing.assert_allclose(history[name], expected[name], rtol=1e-5, err_msg=name)
        _assert_states_close(state, expected_state, rtol=1e-5)


def test_micro_batches_take_strided_rows_and_keep_the_batch_sharding():
    mesh = sharding.make_mesh(0)
    batch = {"x": jnp.arange(16 * 3).reshape(16, 3)}
    with jax.set_mesh(mesh):
        micro = train._micro_batches(batch, 2, mesh)["x"]
    np.testing.assert_array_equal(micro[0], np.arange(48).reshape(16, 3)[0::2])
    np.testing.assert_array_equal(micro[1], np.arange(48).reshape(16, 3)[1::2])
    assert {shard.data.shape for shard in micro.addressable_shards} == {(2, 2, 3)}


class _DropoutProbe(nnx.Module):
    """A stand-in model for `train._mean_grads`: dropout on the inputs, then a linear map."""

    def __init__(self, rate: float):
        self.dropout = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=0))
        self.linear = nnx.Linear(6, 3, rngs=nnx.Rngs(params=0))

    def __call__(self, inputs, mask, *, deterministic):
        return self.linear(self.dropout(inputs * mask, deterministic=deterministic))


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_each_micro_batch_gets_its_own_dropout(rate):
    """Two identical micro-batches would give exactly the loss of one of them alone (same
    rows, same key as micro-batch 0) if they shared a dropout key; without dropout they do."""
    rng = np.random.default_rng(2)
    half = {"inputs": rng.normal(size=(4, 6)).astype(np.float32), "mask": np.ones((4, 6), bool),
            "targets": rng.integers(0, 3, 4)}
    doubled = {key: np.repeat(value, 2, axis=0) for key, value in half.items()}  # rows 2i = 2i+1
    mesh, key = sharding.make_mesh(1), jax.random.key(7)
    with jax.set_mesh(mesh):
        _, accumulated, _ = train._mean_grads(_DropoutProbe(rate), doubled, key, accum=2,
                                              mesh=mesh)
        _, single, _ = train._mean_grads(_DropoutProbe(rate), half, key, accum=1, mesh=mesh)
    same = np.isclose(float(accumulated["loss"]), float(single["loss"]), rtol=1e-6)
    assert same == (rate == 0.0), (accumulated, single)


# ---------------------------------------------------------------------------------------
# bfloat16


def test_bfloat16_computes_in_bf16_and_keeps_float32_state():
    expected, _ = _baseline()
    config = _config(dtype="bfloat16")
    history, state = _train(config, num_devices=1)
    assert np.isfinite(history["loss"]).all()
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=2e-2)
    assert {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)}  # parameters and optimizer state

    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: train._build(config, TASK)[0]))
    inputs = data.gather(ARRAYS, np.arange(2), config.max_length)

    def logits(params):
        return nnx.merge(graphdef, params)(inputs["inputs"], inputs["mask"])

    jaxpr = jax.make_jaxpr(logits)(abstract_params)
    assert "bf16[2,65,32]" in str(jaxpr)  # the residual stream (CLS + 64 tokens) is bf16
    assert jaxpr.out_avals[0].dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# Rematerialisation: compiled in a fresh process on 1 device, because XLA's default CPU
# scheduler (concurrency-optimized) hoists recomputation and so hides what remat saves.

# Two blocks at 512 tokens, with dropout (the recomputed dropout masks must be the same).
REMAT_PROBE = {"max_length": 512, "batch_size": 2, "eval_batch_size": 2, "model.num_layers": 2,
               "model.dropout": 0.1, "model.attention_dropout": 0.1}


def _remat_probe() -> dict:
    """Per remat setting: compiled temp bytes of the train step and its first losses."""
    arrays = _arrays(REMAT_PROBE["batch_size"], REMAT_PROBE["max_length"], seed=5)
    results = {}
    for remat in (False, True):
        config = _config(remat=remat, num_devices=1, **REMAT_PROBE)
        mesh = sharding.make_mesh(1)
        with jax.set_mesh(mesh):
            graphdef, rng_state, state, shardings = train.create_state(config, TASK, mesh)
            step = train.make_train_step(graphdef, shardings, config)
            batch = data.to_global(
                data.gather(arrays, np.arange(config.batch_size), config.max_length), mesh)
            compiled = step.lower(state, rng_state, batch).compile()
            losses = []
            for _ in range(NUM_STEPS):
                state, metrics = compiled(state, rng_state, batch)
                losses.append(float(metrics["loss"]))
        temp = compiled.memory_analysis().temp_size_in_bytes
        results[str(remat)] = {"temp_bytes": int(temp), "losses": losses}
    return results


def test_remat_keeps_the_losses_and_lowers_compiled_memory():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false")
    done = subprocess.run([sys.executable, __file__, "remat-probe"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    plain, remat = probe["False"], probe["True"]
    np.testing.assert_allclose(remat["losses"], plain["losses"], rtol=1e-6)
    # It trains: the loss of the repeated batch falls (measured 2.20 -> 1.61; the first step
    # has learning rate 0, and dropout alone would also make the losses differ).
    assert remat["losses"][-1] < remat["losses"][0] - 0.2, remat["losses"]
    # Without remat both blocks keep their [B, H, L, L] attention arrays for the backward
    # pass (measured: 40 MiB -> 23 MiB here).
    assert remat["temp_bytes"] < 0.75 * plain["temp_bytes"], probe


# ---------------------------------------------------------------------------------------
# The loop with every option on, and bad values


def test_the_loop_runs_with_every_option(tmp_path):
    config = _config(mesh_fsdp=2, grad_accum_steps=2, dtype="bfloat16", remat=True,
                     num_train_steps=2, eval_every=2, checkpoint_every=2, log_every=1)
    config.prepare.update(num_train=32, num_val=8, num_test=8, min_length=10, max_length=60)
    config.data_dir = str(tmp_path / "data")
    results = train.train_and_evaluate(config, tmp_path / "run")
    assert results["step"] == 2 and 0 <= results["test_accuracy"] <= 1
    assert round(results["test_accuracy"] * 8, 6).is_integer()  # of all 8 test examples
    assert (tmp_path / "run" / "checkpoints" / "2").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"grad_accum_steps": 3}, r"config.grad_accum_steps=3 must divide config.batch_size=16"),
    ({"grad_accum_steps": 8}, r"config.grad_accum_steps=8 must divide .* 4 devices"),
    ({"grad_accum_steps": 0}, r"config.grad_accum_steps must be a positive integer"),
    ({"mesh_fsdp": 3}, r"config.mesh_fsdp=3 must divide the 4 devices"),
    ({"mesh_fsdp": 0}, r"config.mesh_fsdp must be a positive integer"),
    ({"dtype": "float16"}, r"config.dtype='float16'; known: float32, bfloat16"),
    ({"remat": None}, r"config.remat must be True or False"),
    ({"learning_rate": -1e-3}, r"config.learning_rate must be > 0"),
    ({"model.qkv_dim": 31}, r"config.model.qkv_dim=31 is not divisible"),
    ({"attention": "nonesuch"}, r"config.attention='nonesuch' is unknown"),
    ({"model.attention_options": {"bogus": 1}}, r"config.model.attention_options .*bogus"),
    ({"model.pooling": "max"}, r"config.model .*pooling must be one of"),
    ({"model.causal": True}, r"config.model .*causal=True"),
])
def test_bad_values_are_rejected_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        train.validate_config(_config(**overrides), num_devices=4)


def test_bad_attention_option_values_are_rejected_before_compilation():
    config = listops_config.get_config("runlocal,attention=longformer")
    config.model.attention_options.global_positions = (0, config.max_length + 5)
    with pytest.raises(ValueError, match=r"config.model .*longformer.*global_positions"):
        train.validate_config(config, num_devices=4)
    config = listops_config.get_config("runlocal,attention=linformer")
    config.model.attention_options.proj_len = 0
    with pytest.raises(ValueError, match=r"config.model .*proj_len must be a positive int"):
        train.validate_config(config, num_devices=4)


def test_make_mesh_names_the_fsdp_key():
    with pytest.raises(ValueError, match="config.mesh_fsdp=3"):
        sharding.make_mesh(4, 3)


if __name__ == "__main__" and sys.argv[1:] == ["remat-probe"]:
    print(json.dumps(_remat_probe()))
