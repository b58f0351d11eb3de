"""The training loop: `train_and_evaluate(config, workdir)`.

One jitted train step over a (`data`, `fsdp`) device mesh, the same code on 1 or N devices.
The model and optimizer live as one NNX state pytree split off their graph definition
(`nnx.split`), so the step is a plain `jax.jit` function with buffer donation; dropout is
reseeded every step from `fold_in(key, step)`, so a run is a pure function of the config
and resuming from any checkpoint replays it exactly.

Memory and speed options (each leaves the results unchanged up to float rounding, except
`dtype`, and `grad_accum_steps` with dropout, whose masks are then drawn per micro-batch):
  * `config.mesh_fsdp`: size of the `fsdp` mesh axis; the `data` axis gets the remaining
    devices. Batches are split over both axes. Every parameter and optimizer-state array of
    at least `FSDP_MIN_ELEMENTS` elements is sharded over `fsdp` along its largest dimension
    that the axis size divides (the rest is replicated); XLA gathers a parameter where it is
    used and reduce-scatters its gradient. The rule is computed from the abstract state's
    shapes, so every attention family's parameters are covered without annotations.
  * `config.grad_accum_steps`: the global batch is split inside the jitted step into that
    many micro-batches (`lax.scan`), whose gradients are averaged before one optimizer
    update. This is used instead of `optax.MultiSteps` (which takes one micro-batch per
    step): the step count, the schedule, the checkpoints and the data stream stay those of
    the unaccumulated run, so A micro-batches of B/A rows give the gradient of the batch B
    up to float rounding, and the setting can change when a run resumes on smaller devices.
    Each micro-batch draws its own dropout masks (key `fold_in(step key, micro index)`).
  * `config.dtype`: compute dtype (float32 or bfloat16); parameters, gradients, optimizer
    state, logits and loss stay float32.
  * `config.remat`: recompute each encoder block's activations in the backward pass.

Workdir layout (see docs/architecture.md): config.json, metrics.jsonl, results.json, checkpoints/
(orbax: model + optimizer state, data iterator position, best-val bookkeeping), TensorBoard
event files. The same command on the same workdir resumes; on a finished run it returns the
stored results.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import lra
from lra import data, distributed, logs, models, tasks
from lra.checkpoints import Checkpoints, Progress, fingerprint  # noqa: F401 (public here too)
from lra.models.mixers.ssm import SsmParam
from lra.sharding import batch_spec, fsdp_spec, make_mesh, state_shardings
from lra.tasks import storage
from lra.validation import validate_config  # noqa: F401 (public here too)

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
# Keys that may change between a run and its resumption without changing its results
# (`mixer` is `attention` under a second name, compared as `attention`; runs from before
# the alias existed have no `mixer` key and still resume).
RESUMABLE_CHANGES = ("num_devices", "log_every", "keep_checkpoints", "checkpoint_every",
                     "data_dir", "eval_batch_size", "mesh_fsdp", "grad_accum_steps", "remat",
                     "mixer", "compilation_cache_dir")


# ---------------------------------------------------------------------------------------
# Optimizer and state (config checks: lra/validation.py)


def make_schedule(config: ml_collections.ConfigDict, peak: float | None = None
                  ) -> optax.Schedule:
    """Linear warmup to `peak` (default `learning_rate`), then rsqrt decay, cosine decay to
    0, or constant."""
    peak = config.learning_rate if peak is None else peak
    warmup = config.warmup_steps
    decay_steps, rsqrt_scale = config.num_train_steps - warmup, max(warmup, 1)
    after = {  # each gets the steps since the end of warmup (negative before it)
        "rsqrt": lambda count: peak * jnp.sqrt(rsqrt_scale / (jnp.maximum(count, 0) + rsqrt_scale)),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps),
        "constant": optax.constant_schedule(peak),
    }[config.schedule]
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, param_labels=None
                   ) -> optax.GradientTransformation:
    """AdamW on the schedule (after optional clipping).

    With `param_labels` (a pytree of "regular" / "ssm" like the parameters), the "ssm"
    group (`SsmParam`s: the state-space parameters of S4D, S5, LRU) gets its own AdamW with
    `config.ssm_learning_rate` on the same schedule and `config.ssm_weight_decay` (0: as
    those papers train them), by `optax.multi_transform`.
    """
    adamw = lambda peak, weight_decay: optax.adamw(
        make_schedule(config, peak), b1=config.adam_b1, b2=config.adam_b2,
        eps=config.adam_eps, weight_decay=weight_decay)
    tx = adamw(config.learning_rate, config.weight_decay)
    if param_labels is not None:
        tx = optax.multi_transform(
            {"regular": tx, "ssm": adamw(config.ssm_learning_rate,
                                          config.get("ssm_weight_decay", 0.0))}, param_labels)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx


def ssm_labels(model: nnx.Module):
    """"ssm" for each `SsmParam`, "regular" for every other parameter; None if no SsmParam."""
    is_variable = lambda x: isinstance(x, nnx.Variable)
    params = nnx.state(model, nnx.Param)
    labels = jax.tree.map(lambda v: "ssm" if isinstance(v, SsmParam) else "regular", params,
                          is_leaf=is_variable)
    return labels if "ssm" in jax.tree.leaves(labels) else None


def _build(config: ml_collections.ConfigDict, task) -> tuple[nnx.Module, nnx.Optimizer]:
    rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    model = models.build_model(
        config.model, attention=config.attention, vocab_size=task.vocab_size,
        num_classes=task.num_classes, max_len=config.max_length, rngs=rngs,
        paired=task.paired, dtype=config.dtype, remat=config.remat,
    )
    tx = make_optimizer(config, ssm_labels(model))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def create_state(config, task, mesh):
    """Initialises model + optimizer directly into their device shardings.

    Parameters and optimizer state follow the `fsdp` rule (`state_shardings`; replicated
    when the mesh's `fsdp` axis has size 1); the rng streams are replicated.

    Returns:
      (graphdef, rng_state, state, state_shardings): `state` holds parameters and optimizer
      state (what checkpoints save); `rng_state` the dropout/param streams, reseeded per step.
    """
    abstract = nnx.eval_shape(lambda: _build(config, task))
    graphdef, abstract_rngs, abstract_state = nnx.split(abstract, nnx.RngState, ...)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = (jax.tree.map(lambda _: replicated, abstract_rngs),
                 state_shardings(abstract_state, mesh))

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(_build(config, task), nnx.RngState, ...)

    rng_state, state = init()
    return graphdef, rng_state, state, shardings[1]


# ---------------------------------------------------------------------------------------
# Steps


# What the model is called with, in order; a paired task (retrieval) adds the second document.
MODEL_INPUTS = ("inputs", "mask", "inputs2", "mask2")


def _logits(model, batch, *, deterministic: bool) -> jax.Array:
    return model(*(batch[key] for key in MODEL_INPUTS if key in batch), deterministic=deterministic)


def _micro_batches(batch, accum: int, mesh: jax.sharding.Mesh):
    """[B, ...] -> [accum, B / accum, ...], micro-batch i = rows i, i + accum, ...

    Strided rows keep every micro-batch spread over all devices (each device holds a
    contiguous block of the batch), so the split moves no data.
    """
    sharding = NamedSharding(mesh, PartitionSpec(None, *batch_spec(mesh)))

    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split, batch)


def _mean_grads(model, batch, key, *, accum: int, mesh: jax.sharding.Mesh):
    """Gradients of the mean loss over `batch`, over `accum` micro-batches, + metrics."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fsdp = mesh.shape.get("fsdp", 1)

    def loss_fn(params, micro, index):
        # FSDP: gather each parameter whole where it is used, so activations keep the batch
        # sharding (without this XLA may split them along a parameter's sharded axis).
        params = jax.lax.with_sharding_constraint(params, NamedSharding(mesh, PartitionSpec()))
        micro_model = nnx.merge(graphdef, params, rest, copy=True)
        nnx.reseed(micro_model, dropout=jax.random.fold_in(key, index))  # distinct per micro-batch
        logits = _logits(micro_model, micro, deterministic=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, micro["targets"])
        return losses.mean(), jnp.mean(jnp.argmax(logits, -1) == micro["targets"])

    def micro_step(micro, index):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro, index)
        grads = jax.tree.map(  # reduce-scattered to the parameters' fsdp shards
            lambda g: jax.lax.with_sharding_constraint(
                g, NamedSharding(mesh, fsdp_spec(g.shape, fsdp))), grads)
        return grads, loss, accuracy

    if accum == 1:
        grads, loss, accuracy = micro_step(batch, 0)
    else:
        def body(totals, inputs):
            return jax.tree.map(jnp.add, totals, micro_step(*inputs)), None

        zero = jnp.zeros((), jnp.float32)
        totals = (jax.tree.map(jnp.zeros_like, params), zero, zero)
        inputs = (_micro_batches(batch, accum, mesh), jnp.arange(accum))
        totals, _ = jax.lax.scan(body, totals, inputs)
        grads, loss, accuracy = jax.tree.map(lambda total: total / accum, totals)
    return grads, {"loss": loss, "accuracy": accuracy}


def make_train_step(graphdef, state_shardings, config):
    """The jitted step (state, rng_state, batch) -> (new state, metrics); donates `state`.

    Args:
      graphdef: from `create_state`.
      state_shardings: from `create_state`; the step takes and returns the state so sharded.
      config: the run's config (schedule, seed, grad_accum_steps).
    """
    schedule = make_schedule(config)
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    accum = config.grad_accum_steps

    def train_step(state, rng_state, batch):
        model, optimizer = nnx.merge(graphdef, rng_state, state)
        step = optimizer.step[...]
        grads, metrics = _mean_grads(model, batch, jax.random.fold_in(dropout_key, step),
                                     accum=accum, mesh=mesh)
        optimizer.update(model, grads)
        metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=schedule(step))
        return nnx.state((model, optimizer), nnx.Not(nnx.RngState)), metrics

    in_shardings = (state_shardings, NamedSharding(mesh, PartitionSpec()),
                    NamedSharding(mesh, batch_spec(mesh)))
    return jax.jit(train_step, donate_argnums=0, in_shardings=in_shardings,
                   out_shardings=(state_shardings, None))


def make_eval_step(graphdef):
    @jax.jit
    def eval_step(state, rng_state, batch):
        model, _ = nnx.merge(graphdef, rng_state, state)
        logits = _logits(model, batch, deterministic=True)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        weights = batch["weights"]
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * weights
        return {"loss": jnp.sum(losses * weights), "correct": jnp.sum(correct),
                "count": jnp.sum(weights)}

    return eval_step


def evaluate(eval_step, state, rng_state, arrays, *, config, mesh) -> dict[str, float]:
    """Loss and accuracy over a whole split (no example dropped, padding weighted out)."""
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in data.eval_batches(arrays, batch_size=config.eval_batch_size,
                                   max_length=config.max_length):
        sums = jax.device_get(eval_step(state, rng_state, data.to_global(batch, mesh)))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    return {"loss": totals["loss"] / totals["count"], "accuracy": totals["correct"] / totals["count"]}


# ---------------------------------------------------------------------------------------
# Workdir files


def _config_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A short hash of everything that can change a run's results."""
    relevant = {k: v for k, v in _config_dict(config).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _check_and_write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    path = workdir / CONFIG_FILE
    new = _config_dict(config)
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(
            k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
        )
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config (changed: {', '.join(changed)}); "
                "use another --workdir to start a new run"
            )
    if distributed.is_primary():
        _write_atomically(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    storage.replace_atomically(path, lambda file: file.write(text.encode()))


def _versions() -> dict[str, str]:
    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
    versions = {"python": sys.version.split()[0], "lra": lra.__version__}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_finished_results(workdir: str | Path, config) -> dict | None:
    path = Path(workdir) / RESULTS_FILE
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    return results if results.get("step") == config.num_train_steps else None


# ---------------------------------------------------------------------------------------
# The loop


class _Preemption:
    """Turns SIGTERM (and a first Ctrl-C) into a stop the loop checks after every step.

    The loop then saves a checkpoint and returns; a second Ctrl-C interrupts at once. With
    several processes, JAX's preemption service takes SIGTERM in any of them and picks one
    step at which all stop together (their checkpoint is collective); this class then
    installs no handlers, and Ctrl-C ends a process at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def check(self, step: int) -> bool:
        """True when the loop should save and stop after `step`; call it after every step."""
        self.requested = self.requested or distributed.preemption_reached(step)
        return self.requested

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """Trains and evaluates `config.task` with `config.attention`, resuming from `workdir`.

    Returns:
      The results dict (also in workdir/results.json), or None when the run was stopped by
      SIGTERM or Ctrl-C after saving a checkpoint (relaunching resumes it).

    Raises:
      ValueError: a bad config value, unknown task/attention, or a workdir of another config.
      FileNotFoundError: data that must be downloaded is missing (the message says how).
      FloatingPointError: the loss became non-finite (the step is named).
    """
    workdir = Path(workdir).expanduser()
    task = tasks.get(config.task)
    use_compilation_cache(config.get("compilation_cache_dir", ""))
    mesh = make_mesh(config.num_devices, config.mesh_fsdp)
    validate_config(config, mesh.size)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_and_write_config(workdir, config)
    finished = read_finished_results(workdir, config)
    if finished is not None:
        logging.info("%s holds a finished run; nothing to do", workdir)
        return finished
    _prepare_data(task, config)
    splits = {split: task.load(split, config.data_dir) for split in task.splits}
    for split, arrays in splits.items():
        data.warn_if_truncated(arrays, config.max_length, split)
    precision = config.get("matmul_precision", "default")
    with jax.set_mesh(mesh), jax.default_matmul_precision(
            None if precision == "default" else precision):
        return _Trainer(config, task, mesh, workdir, splits).run()


def use_compilation_cache(directory: str) -> None:
    """Keeps compiled programs in `directory` across processes ("" = off).

    JAX reads the setting when it first compiles with the persistent cache, so it applies
    to a process's first run (launch.py, a sweep's subprocesses), not to one that already
    compiled with another setting.
    """
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))


def _prepare_data(task, config: ml_collections.ConfigDict) -> None:
    """Process 0 prepares (generates) the data first; the others then find it ready."""
    if distributed.is_primary():
        data.ensure_prepared(task, config.data_dir, config.prepare)
    distributed.barrier("lra:data-prepared")
    if not distributed.is_primary():  # a no-op check on a shared file system
        data.ensure_prepared(task, config.data_dir, config.prepare)


class _Trainer:
    def __init__(self, config, task, mesh, workdir: Path, splits):
        self.config, self.task, self.mesh, self.workdir, self.splits = (
            config, task, mesh, workdir, splits)
        self.graphdef, self.rng_state, self.state, shardings = create_state(config, task, mesh)
        self.train_step = make_train_step(self.graphdef, shardings, config)
        self.eval_step = make_eval_step(self.graphdef)
        self.checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
        self.progress = Progress()
        dataset = data.train_dataset(splits["train"], batch_size=config.batch_size,
                                     max_length=config.max_length, seed=config.seed)
        self.batches = data.train_iterator(dataset)
        restored = self.checkpoints.restore_latest(self.state)
        if restored is not None:
            self.state, data_state, self.progress = restored
            self.batches.set_state(data_state)

    def run(self) -> dict | None:
        config, progress = self.config, self.progress
        log = logs.RunLog(self.workdir, start_step=progress.step,
                          num_steps=config.num_train_steps, enabled=jax.process_index() == 0)
        preemption = _Preemption()
        sizes = ", ".join(f"{split} {len(a['targets']):,}" for split, a in self.splits.items())
        platform = self.mesh.devices.flat[0].platform
        log.message(f"{config.task} / {config.attention}: {self._num_params():,} parameters; "
                    f"examples: {sizes}; {self.mesh.size} {platform} device(s); {self.workdir}")
        if progress.step:
            log.message(f"resuming from step {progress.step}")
        try:
            stopped = self._train(log, preemption)
            if stopped:
                log.message(f"stopped at step {progress.step} by a signal; checkpoint saved, "
                            "relaunch the same command to resume")
                return None
            if progress.val_step != progress.step:
                self._evaluate(log)
            if progress.test_step != progress.step:
                self._record(log, "test", self._eval_split("test"))
            results = self._results()
        finally:
            preemption.restore()
            log.close()
            self.checkpoints.close()
        if distributed.is_primary():
            _write_atomically(self.workdir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        return results

    def _train(self, log: logs.RunLog, preemption: _Preemption) -> bool:
        """Runs the remaining steps; True if a signal stopped it (after saving)."""
        config, progress = self.config, self.progress
        interval = list(progress.unlogged)  # host copies of this log interval's metrics
        pending = None  # the last step's device metrics, read one step late
        started = time.perf_counter()
        while progress.step < config.num_train_steps:
            batch = data.to_global(next(self.batches), self.mesh)
            self.state, metrics = self.train_step(self.state, self.rng_state, batch)
            if pending is not None:
                interval.append(self._read(*pending))
            progress.step += 1
            pending = (progress.step, metrics)
            step = progress.step
            stop = preemption.check(step)
            due = {name: step % every == 0 for name, every in (
                ("log", config.log_every), ("eval", config.eval_every),
                ("checkpoint", config.checkpoint_every))}
            last = step == config.num_train_steps
            if not (any(due.values()) or last or stop):
                continue
            interval.append(self._read(*pending))
            pending = None
            summary = _mean(interval)
            log.progress(step, summary)
            if due["log"] or last:
                log.write(step, "train", summary)
                interval = []
            progress.train_seconds += time.perf_counter() - started
            if due["eval"]:
                self._evaluate(log)
            if due["checkpoint"] or last or stop:
                progress.unlogged = interval
                self.checkpoints.save(step, self.state, self.batches.get_state(), progress)
            if stop:
                return True
            started = time.perf_counter()
        return False

    def _read(self, step: int, metrics) -> dict[str, float]:
        """Host copies of a step's metrics; a non-finite loss or gradient stops the run.

        Checked before the step's checkpoint is saved, so no checkpoint holds such a state.
        """
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            last = self.checkpoints.latest_step()
            kept = ("no checkpoint was saved yet" if last is None else
                    f"the last good checkpoint, step {last}, is kept in {self.checkpoints.directory}")
            raise FloatingPointError(
                f"loss is {values['loss']} (gradient norm {values['grad_norm']}) at step {step}; "
                f"{kept} (lower config.learning_rate or set config.grad_clip)"
            )
        return values

    def _eval_split(self, split: str) -> dict[str, float]:
        return evaluate(self.eval_step, self.state, self.rng_state, self.splits[split],
                        config=self.config, mesh=self.mesh)

    def _record(self, log: logs.RunLog, split: str, values: dict[str, float]) -> None:
        log.write(self.progress.step, split, values)
        setattr(self.progress, f"{split}_accuracy", values["accuracy"])
        setattr(self.progress, f"{split}_step", self.progress.step)

    def _evaluate(self, log: logs.RunLog) -> None:
        """Validation; and test whenever validation improves on its best."""
        progress = self.progress
        self._record(log, "val", self._eval_split("val"))
        if progress.val_accuracy > progress.best_val_accuracy:
            progress.best_val_accuracy, progress.best_step = progress.val_accuracy, progress.step
            self._record(log, "test", self._eval_split("test"))
            progress.test_accuracy_at_best = progress.test_accuracy

    def _num_params(self) -> int:
        model, _ = nnx.merge(self.graphdef, self.rng_state, self.state)
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    def _results(self) -> dict:
        config, progress = self.config, self.progress
        return {
            "task": config.task,
            "attention": config.attention,
            "mixer": config.attention,  # the same name under the mixer registry's key
            "seed": config.seed,
            "step": progress.step,
            "val_accuracy": progress.val_accuracy,
            "test_accuracy": progress.test_accuracy,
            "best_val_accuracy": progress.best_val_accuracy,
            "best_step": progress.best_step,
            "test_accuracy_at_best": progress.test_accuracy_at_best,
            "num_params": self._num_params(),
            "train_seconds": progress.train_seconds,
            "steps_per_second": progress.step / max(progress.train_seconds, 1e-9),
            "config_hash": config_hash(config),
            "device": f"{self.mesh.size} x {self.mesh.devices.flat[0].device_kind}",
            "versions": _versions(),
        }


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}
