"""The `loop` scope of `lra.bench`: training steps/s through the real loop, and the host's
share of a step.

  python -m lra.bench --scopes loop [--loop_config configs/listops.py:runlocal]
      [--loop_steps 200 --loop_warmup 20 --repeats 3 --loop_set key=value,...]

The task's data is prepared as a run would; the loop (`lra.training.train._Trainer._train`: batches,
the jitted step, metric reads, logs) runs in a temporary folder, first `--loop_warmup`
steps and two bare steps (compilation), then, `--repeats` times, `--loop_steps` timed
steps followed by as many calls of the bare jitted train step back to back on one batch
already on the devices.
Loop time is the loop's own `train_seconds` (evaluations and checkpoints excluded;
`eval_every` and `checkpoint_every` are set past the end). Per round:

  loop_ms    loop time per step
  step_ms    time per step of the bare jitted step
  host_share 1 - step_ms / loop_ms (clipped at 0): the share of a loop step spent outside
             the jitted step

The record holds the medians over the rounds.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import jax

from lra import tasks
from lra.common import set_path
from lra.parallel import sharding
from lra.training import data, logs, train

DEFAULT_CONFIG = "configs/listops.py:runlocal"


class _StopAt:
    """Stands in for the loop's preemption check: stops it after step `step`."""

    def __init__(self, step: int):
        self.step = step

    def check(self, step: int) -> bool:
        return step >= self.step


def load_config(spec: str, overrides: dict):
    """`path/to/config.py[:arg]` -> its `get_config(arg)` with `overrides` ({"a.b": v}) set."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None:
        raise ValueError(f"--loop_config {spec!r}: no config file {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for key, value in overrides.items():
        set_path(config, key, value)
    return config


def _step_seconds(trainer, batch, count: int) -> float:
    """Seconds per step of the bare jitted train step, `count` calls back to back."""
    state = trainer.state
    start = time.perf_counter()
    for _ in range(count):
        state, _ = trainer.train_step(state, trainer.rng_state, batch)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    trainer.state = state
    return seconds / count


def _loop_seconds(trainer, log, count: int) -> float:
    """Seconds per step of the loop over its next `count` steps."""
    progress = trainer.progress
    step, seconds = progress.step, progress.train_seconds
    trainer._train(log, _StopAt(step + count))
    return (progress.train_seconds - seconds) / count


def measure(config, *, steps: int, warmup: int, repeats: int, label: str = "") -> dict:
    """Runs the loop of `config` as the module docstring says; returns the record."""
    task = tasks.get(config.task)
    total = warmup + repeats * steps
    config.num_train_steps = max(config.num_train_steps, total)
    config.eval_every = config.checkpoint_every = config.num_train_steps + 1
    mesh = sharding.make_mesh(config.num_devices, config.mesh_fsdp, config.get("mesh_seq", 1))
    train.validate_config(config, mesh.size)
    data.ensure_prepared(task, config.data_dir, config.prepare)
    splits = {split: task.load(split, config.data_dir) for split in task.splits}
    with jax.set_mesh(mesh), train.sequence_split_settings(config), \
            tempfile.TemporaryDirectory() as workdir:
        trainer = train._Trainer(config, task, mesh, Path(workdir), splits)
        log = logs.RunLog(Path(workdir), start_step=0, num_steps=config.num_train_steps)
        dataset = data.train_dataset(splits["train"], batch_size=config.batch_size,
                                     row_group=sharding.row_group(mesh),
                                     max_length=config.max_length, seed=config.seed)
        batch = data.to_global(dataset[0], mesh)
        try:
            _loop_seconds(trainer, log, warmup)
            _step_seconds(trainer, batch, 2)  # compiles the bare step (the loop fuses it)
            rounds = [(_loop_seconds(trainer, log, steps), _step_seconds(trainer, batch, steps))
                      for _ in range(repeats)]
        finally:
            log.close()
            getattr(trainer.batches, "close", lambda: None)()
            trainer.checkpoints.close()
    loop_s = statistics.median(r[0] for r in rounds)
    step_s = statistics.median(r[1] for r in rounds)
    return {"scope": "loop", "config": label, "task": config.task,
            "attention": config.attention, "batch": config.batch_size,
            "length": config.max_length, "steps": steps, "repeats": repeats,
            "log_every": config.log_every, "time_ms": 1e3 * loop_s,
            "steps_per_s": 1 / loop_s, "step_ms": 1e3 * step_s, "step_steps_per_s": 1 / step_s,
            "host_share": statistics.median(max(0.0, 1 - s / t) for t, s in rounds),
            "rounds": [{"loop_ms": 1e3 * t, "step_ms": 1e3 * s} for t, s in rounds],
            "oom": False}
