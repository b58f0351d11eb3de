"""The training loop: `train_and_evaluate(config, workdir)`.

One jitted train step over a (`data`, `fsdp`, `seq`) device mesh, the same code on 1 or N
devices. The model and optimizer live as one NNX state pytree split off their graph
definition (`nnx.split`), so the step is a plain `jax.jit` function with buffer donation;
dropout is reseeded every step from `fold_in(key, step)`, so a run is a pure function of
the config and resuming from any checkpoint replays it exactly.

Memory and speed options (each leaves the results unchanged up to float rounding, except
`dtype`, and `grad_accum_steps` with dropout, whose masks are then drawn per micro-batch,
or with BatchNorm, whose statistics are then per micro-batch):
  * `config.mesh_fsdp`: size of the `fsdp` mesh axis; the `data` axis gets the remaining
    devices (those left by `mesh_seq` too). Batches' rows are split over both axes. Every
    parameter and optimizer-state array of at least `FSDP_MIN_ELEMENTS` elements is
    sharded over `fsdp` along its largest dimension that the axis size divides (the rest
    is replicated). The state stays sharded in the
    step: each encoder block gathers its parameters just before it runs (lra/models/
    stack.py), the rest is gathered before the forward pass, and gradients are
    reduce-scattered to the shards. The rule is computed from the abstract state's
    shapes, so every attention family's parameters are covered without annotations.
  * `config.mesh_seq`: size of the `seq` mesh axis (sequence parallelism): the batch's
    [B, L] arrays are split along L over it as well, [B] arrays are not
    (`sharding.batch_spec`), and the encoder keeps its block activations so split; only
    the mixers of `sharding.SEQUENCE_PARALLEL_MIXERS` may run with it > 1.
  * `config.kv_strategy`: how the exact attentions reach every key under `mesh_seq` > 1
    (`ring` or `all_gather`, lra/models/attention/sequence_parallel.py), and
    `config.seq_layout`, the order the encoder's blocks hold a split sequence in
    (`contiguous`, or `striped` for causal load balance: exact attentions only), both
    entered around the loop (`sequence_split_settings`; the steps are traced inside it).
  * `config.grad_accum_steps`: the global batch is split inside the jitted step into that
    many micro-batches (`lax.scan`); their summed losses' gradients and their target counts
    are added, and divided once, before one optimizer update. This is used instead of
    `optax.MultiSteps` (which takes one micro-batch per step): the step count, the
    schedule, the checkpoints and the data stream stay those of the unaccumulated run, so
    A micro-batches give the gradient of the whole batch up to float rounding, for every
    objective (masked_lm's masks are drawn for the whole batch), and the setting can
    change when a run resumes on smaller devices. Each micro-batch draws its own dropout
    masks (key `fold_in(step key, micro index)`). BatchNorm's running statistics take the
    micro-batches' statistics one after another, in order (see `_mean_grads`).
  * `config.dtype`: compute dtype (float32 or bfloat16); parameters, gradients, optimizer
    state, logits and loss stay float32.
  * `config.remat`: recompute each encoder block's activations in the backward pass.
  * `config.model.scan_layers`: the blocks as one stacked block under `nnx.scan` (compiled
    once whatever the depth; another parameter layout).

Workdir layout (see docs/architecture.md): config.json, metrics.jsonl, results.json, checkpoints/
(orbax: model + optimizer state, data iterator position, best-val bookkeeping), TensorBoard
event files. The same command on the same workdir resumes; on a finished run it returns the
stored results.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
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

from lra import models, tasks
from lra.models import mixers, pattern, stack
from lra.models.attention.sequence_parallel import (
    KvStrategy,
    Layout,
    use_kv_strategy,
    use_seq_layout,
)
from lra.models.mixers.ssm import SsmParam
from lra.parallel import distributed, sharding
from lra.parallel.sharding import batch_spec, make_mesh, state_shardings
from lra.training import data, logs, loop, objectives, pretraining
from lra.training.checkpoints import Checkpoints, Progress, fingerprint  # noqa: F401 (public here too)
from lra.training.validation import validate_config  # noqa: F401 (public here too)
from lra.training.workdir import (  # noqa: F401 (public here too)
    CONFIG_FILE,
    RESULTS_FILE,
    RESUMABLE_CHANGES,
    check_and_write_config,
    config_hash,
    read_finished_results,
    versions,
    write_results,
)

# ---------------------------------------------------------------------------------------
# Optimizer and state (config checks: lra/training/validation.py)


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
    vocab_size, num_classes = tasks.sizes(task, config.prepare)
    model = models.build_model(
        config.model, attention=config.attention, vocab_size=vocab_size,
        num_classes=num_classes, max_len=config.max_length, rngs=rngs,
        paired=task.paired, dtype=config.dtype, remat=config.remat,
        language_model=objective_spec(config).per_token,
        mask_token=pretraining.uses_mask_token(config),
    )
    tx = make_optimizer(config, ssm_labels(model))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _abstract_state(config: ml_collections.ConfigDict, mesh):
    """(abstract parameters + optimizer state, their shardings) of the run `config`."""
    abstract = nnx.eval_shape(lambda: _build(config, tasks.get(config.task)))
    _, _, abstract_state = nnx.split(abstract, nnx.RngState, ...)
    return abstract_state, state_shardings(abstract_state, mesh)


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


def objective_spec(config: ml_collections.ConfigDict) -> objectives.Spec:
    """The run's objective (lra/training/objectives.py); masked_lm's mask token is the id after the
    task's vocabulary; token_classify's head runs at the task's most scored positions per
    example."""
    objective = config.get("objective", "classify")
    if objective == "masked_lm":
        return objectives.from_config(config, tasks.sizes(tasks.get(config.task), config.prepare)[0])
    if objective == "token_classify":
        task = tasks.get(config.task)
        return objectives.from_config(config, 0, task.max_targets_for(config.prepare))
    return objectives.from_config(config, 0)  # no mask token


def _micro_batches(batch, accum: int, mesh: jax.sharding.Mesh):
    """[B, ...] -> [accum, B / accum, ...], micro-batch i = rows i, i + accum, ...

    Strided rows keep every micro-batch spread over all devices (each device holds a
    contiguous block of the batch), so the split moves no data.
    """
    def split(x):  # [B] and [B, L] arrays each keep their layout (`batch_spec`)
        layout = NamedSharding(mesh, PartitionSpec(None, *batch_spec(mesh, x.ndim)))
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, layout)

    return jax.tree.map(split, batch)


def _gather_all_but_layers(params):
    """Inside `sharding.gathering`: every parameter outside the encoder's layers gathered
    whole (`stack.LAYER_NODES` gather their own, one layer at a time)."""
    def gather(path, x):
        in_layers = any(getattr(key, "key", None) in stack.LAYER_NODES for key in path)
        return x if in_layers else stack.gathered(x)

    return jax.tree_util.tree_map_with_path(gather, params)


# What a forward pass may change besides the parameters: BatchNorm's running statistics
# (and any future cache or counter). The rng streams are reseeded every step and not kept.
MUTABLE = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))


def _mean_grads(model, batch, key, *, accum: int, mesh: jax.sharding.Mesh,
                spec: objectives.Spec = objectives.Spec()):
    """Gradients of the mean loss over `batch`, over `accum` micro-batches.

    Each micro-batch gives the gradient of its summed loss and its target count; the sums
    are added and divided once by the batch's count, so the result is the whole batch's
    mean gradient for every objective however its targets fall into the micro-batches.
    masked_lm's masks are drawn for the whole batch first (`objectives.draw_masks`, from
    the key micro-batch 0 uses, so an unaccumulated run draws what it always drew).

    The forward passes' other changes (`MUTABLE`: BatchNorm statistics) are carried from
    micro-batch to micro-batch, in order (rows i, i + accum, ... are micro-batch i): the
    running averages take every micro-batch's statistics, as `accum` successive batches
    would. Without accumulation they are those of the whole batch.

    Returns:
      (gradients, {"loss", "accuracy"}, the new `MUTABLE` state of `model`).
    """
    graphdef, params, mutable, rng_state = nnx.split(model, nnx.Param, MUTABLE, ...)
    batch = objectives.draw_masks(spec, batch, jax.random.fold_in(key, 0))

    def sums_fn(params, mutable, micro, index):
        # FSDP: parameters stay sharded; those outside the layers (embeddings, final norm,
        # head) are gathered whole here, each layer's where it runs (lra/models/stack.py),
        # so activations keep the batch sharding and the model is gathered layer by layer.
        with sharding.gathering(mesh):
            micro_model = nnx.merge(graphdef, _gather_all_but_layers(params), mutable,
                                    rng_state, copy=True)
            nnx.reseed(micro_model, dropout=jax.random.fold_in(key, index),  # per micro-batch
                       policy="match_shape")  # a scanned layer stack: one key per layer
            sums = objectives.loss_sums(micro_model, micro, spec, deterministic=False)
        sums = {key: sums[key] for key in ("loss", "correct", "count")}  # what training logs
        return sums["loss"], (sums, nnx.state(micro_model, MUTABLE))

    def micro_step(mutable, micro, index):
        (_, (sums, mutable)), grads = jax.value_and_grad(sums_fn, has_aux=True)(
            params, mutable, micro, index)
        grads = sharding.constrain_to_fsdp(grads, mesh)  # reduce-scattered to the fsdp shards
        return mutable, (grads, sums)

    if accum == 1:
        mutable, (grads, sums) = micro_step(mutable, batch, 0)
    else:
        def body(carry, inputs):
            mutable, totals = carry
            mutable, terms = micro_step(mutable, *inputs)
            return (mutable, jax.tree.map(jnp.add, totals, terms)), None

        zero = jnp.zeros((), jnp.float32)
        totals = (jax.tree.map(jnp.zeros_like, params),
                  {"loss": zero, "correct": zero, "count": zero})
        inputs = (_micro_batches(batch, accum, mesh), jnp.arange(accum))
        (mutable, (grads, sums)), _ = jax.lax.scan(body, (mutable, totals), inputs)
    count = jnp.maximum(sums["count"], 1.0)  # a language-model batch may have no target
    grads = jax.tree.map(lambda total: total / count, grads)
    return grads, {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count}, mutable


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
    spec = objective_spec(config)

    def train_step(state, rng_state, batch):
        if sharding.splits_sequence(mesh):  # [B] and [B, L] arrays: each its own layout
            batch = sharding.constrain_batch(batch, mesh)
        model, optimizer = nnx.merge(graphdef, rng_state, state)
        step = optimizer.step[...]
        grads, metrics, mutable = _mean_grads(
            model, batch, jax.random.fold_in(dropout_key, step), accum=accum, mesh=mesh,
            spec=spec)
        nnx.update(model, mutable)  # BatchNorm statistics: the forward passes' new values
        optimizer.update(model, grads)
        metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=schedule(step))
        return nnx.state((model, optimizer), nnx.Not(nnx.RngState)), metrics

    in_shardings = (state_shardings, NamedSharding(mesh, PartitionSpec()),
                    sharding.step_batch_sharding(mesh))
    return jax.jit(train_step, donate_argnums=0, in_shardings=in_shardings,
                   out_shardings=(state_shardings, None))


def make_eval_step(graphdef, spec: objectives.Spec = objectives.Spec(), seed: int = 0):
    """The jitted (state, rng_state, batch, index) -> sums of loss, correct, count.

    `masked_lm` draws batch `index`'s masked tokens from (`seed`, index): an evaluation
    sees the same masks every time.
    """
    key = jax.random.fold_in(jax.random.key(seed), 2)

    @jax.jit
    def eval_step(state, rng_state, batch, index=0):
        model, _ = nnx.merge(graphdef, rng_state, state)
        return objectives.eval_sums(model, batch, jax.random.fold_in(key, index), spec)

    return eval_step


def evaluate(eval_step, state, rng_state, arrays, *, config, mesh) -> dict[str, float]:
    """Loss and accuracy over a whole split (no example dropped, padding weighted out),
    and token_classify's `sequence_accuracy`; batches prefetched to the devices, the sums
    read once, after the last batch."""
    batches = data.eval_device_batches(arrays, mesh, batch_size=config.eval_batch_size,
                                       max_length=config.max_length, threads=config.data_threads)
    sums = jax.device_get([eval_step(state, rng_state, batch, np.uint32(index))
                           for index, batch in enumerate(batches)])
    totals = {k: sum(float(batch_sums[k]) for batch_sums in sums) for k in sums[0]}
    values = {"loss": totals["loss"] / totals["count"],
              "accuracy": totals["correct"] / totals["count"]}
    if "rows" in totals:  # token_classify: examples with every scored position right
        values["sequence_accuracy"] = totals["rows_correct"] / max(totals["rows"], 1.0)
    return values


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
    mesh = make_mesh(config.num_devices, config.mesh_fsdp, config.get("mesh_seq", 1))
    validate_config(config, mesh.size)
    workdir.mkdir(parents=True, exist_ok=True)
    check_and_write_config(workdir, config)
    if pretraining.spt_enabled(config):  # pretrain, then fine-tune (lra/training/pretraining.py)
        return pretraining.run_protocol(config, workdir, train_and_evaluate,
                                        check=lambda c: validate_config(c, mesh.size),
                                        write_results=write_results,
                                        config_hash=config_hash(config))
    finished = read_finished_results(workdir, config)
    if finished is not None:
        logging.info("%s holds a finished run; nothing to do", workdir)
        return finished
    _prepare_data(task, config)
    splits = {split: task.load(split, config.data_dir) for split in task.splits}
    for split, arrays in splits.items():
        data.warn_if_truncated(arrays, config.max_length, split)
        data.check_targets(arrays, objective_spec(config), split)
    precision = config.get("matmul_precision", "default")
    with jax.set_mesh(mesh), jax.default_matmul_precision(
            None if precision == "default" else precision), sequence_split_settings(config):
        return _Trainer(config, task, mesh, workdir, splits).run()


@contextlib.contextmanager
def sequence_split_settings(config: ml_collections.ConfigDict):
    """The run's choices for a sequence split over `seq` (`config.kv_strategy`,
    `config.seq_layout`), in force while the steps are traced inside it."""
    with use_kv_strategy(config.get("kv_strategy", KvStrategy.RING)), use_seq_layout(
            config.get("seq_layout", Layout.CONTIGUOUS)):
        yield


def recurrent_state(config: ml_collections.ConfigDict) -> dict:
    """The run's decoding state per layer and sequence (`mixers.state_size`), as
    results.json records it: `state_bytes_per_layer` and `state_grows_with_length`; {}
    when a mixer names no decoding state. With a per-layer pattern the bytes are the mean
    over the layers, the state grows if any layer's does, and `state_bytes_by_mixer` gives
    each mixer's own."""
    model = config.model
    specs = pattern.layer_mixers(model, config.attention)
    sizes = {}
    for spec in specs:
        try:
            sizes[spec.name] = mixers.state_size(
                spec.name, emb_dim=model.emb_dim, qkv_dim=model.qkv_dim,
                num_heads=model.num_heads, max_len=config.max_length, options=spec.options)
        except ValueError as error:
            logging.warning("no state size recorded: %s", error)
            return {}
    record = {"state_bytes_per_layer": sum(sizes[spec.name].bytes for spec in specs) / len(specs),
              "state_grows_with_length": any(size.grows_with_length for size in sizes.values())}
    if len(specs) > 1:
        record["state_bytes_by_mixer"] = {name: size.bytes for name, size in sizes.items()}
    else:
        record["state_bytes_per_layer"] = sizes[config.attention].bytes
    return record


def layer_record(config: ml_collections.ConfigDict) -> dict:
    """results.json's per-layer mixers: the pattern ("" = none), every layer's mixer and a
    readable label (lra/models/pattern.py)."""
    names = [spec.name for spec in pattern.layer_mixers(config.model, config.attention)]
    return {"mixer_pattern": pattern.canonical(config.model.get("mixer_pattern", "")),
            "layer_mixers": list(pattern.layer_names(names, config.model.num_layers)),
            "mixer_label": pattern.label(names, config.model.num_layers)}


def use_compilation_cache(directory: str) -> None:
    """Keeps compiled programs in `directory` across processes ("" = off).

    JAX reads the setting when it first compiles with the persistent cache, so it applies
    to a process's first run (launch.py, a sweep's subprocesses), not to one that already
    compiled with another setting.
    """
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))


def _prepare_data(task, config: ml_collections.ConfigDict) -> None:
    """The data ready on every process (see `data.prepare_for_processes`)."""
    data.prepare_for_processes(task, config.data_dir, config.prepare,
                               shared_filesystem=config.shared_filesystem,
                               wait_seconds=config.prepare_wait_seconds)


class _Trainer:
    def __init__(self, config, task, mesh, workdir: Path, splits):
        self.config, self.task, self.mesh, self.workdir, self.splits = (
            config, task, mesh, workdir, splits)
        self.graphdef, self.rng_state, self.state, shardings = create_state(config, task, mesh)
        self.train_step = make_train_step(self.graphdef, shardings, config)
        self.loop_step = loop.make_loop_step(self.train_step, self.state, self.rng_state,
                                             shardings, mesh)
        self.eval_step = make_eval_step(self.graphdef, objective_spec(config), config.seed)
        self.checkpoints = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
        # Pretraining runs keep their best-validation state: what `init_from` fine-tunes
        # from by default (classifiers skip the extra saves; `init_from_checkpoint=last`).
        self.best_checkpoint = (Checkpoints(workdir / pretraining.CHECKPOINT_FOLDERS["best"],
                                            keep=1)
                                if objective_spec(config).is_lm else None)
        self.progress = Progress()
        dataset = data.train_dataset(splits["train"], batch_size=config.batch_size,
                                     max_length=config.max_length, seed=config.seed,
                                     row_group=sharding.row_group(mesh))
        self.batches = data.TrainBatches(dataset, mesh, threads=config.data_threads,
                                         workers=config.data_workers)
        restored = self.checkpoints.restore_latest(self.state)
        if restored is not None:
            self.state, data_state, self.progress = restored
            self.batches.set_state(data_state)
        elif config.get("init_from"):
            self.state = pretraining.start_from(
                self.state, config, workdir,
                lambda source: _abstract_state(source, mesh))

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
            self.batches.close()
            log.close()
            self.checkpoints.close()
            if self.best_checkpoint is not None:
                self.best_checkpoint.close()
        write_results(self.workdir, results)
        return results

    def _train(self, log: logs.RunLog, preemption: _Preemption) -> bool:
        """Runs the remaining steps; True if a signal stopped it (after saving).

        Metrics stay on the devices (`lra.training.loop`) and are read only at a log, eval or
        checkpoint step, the last step or a stop, always before a checkpoint is saved, so
        no checkpoint holds a state that followed a non-finite loss.
        """
        config, progress = self.config, self.progress
        totals = loop.start_totals(progress.step, progress.unlogged, self.mesh)
        leaves, state_def = jax.tree.flatten(self.state)  # self.state again where read
        rng_leaves = jax.tree.leaves(self.rng_state)
        if progress.step < config.num_train_steps:
            self._compile(leaves, rng_leaves, totals)
        started = time.perf_counter()
        while progress.step < config.num_train_steps:
            leaves, totals = self.loop_step(leaves, rng_leaves, next(self.batches), totals)
            progress.step += 1
            step = progress.step
            stop = preemption.check(step)
            due = {name: step % every == 0 for name, every in (
                ("log", config.log_every), ("eval", config.eval_every),
                ("checkpoint", config.checkpoint_every))}
            last = step == config.num_train_steps
            if not (any(due.values()) or last or stop):
                continue
            self.state = state_def.unflatten(leaves)
            interval = loop.read(totals, self.checkpoints)  # raises for a non-finite loss
            log.progress(step, interval.means())
            if due["log"] or last:
                log.write(step, "train", interval.means())
                interval = loop.Interval(steps=0, sums={})
                totals = loop.start_totals(step, {}, self.mesh)
            progress.train_seconds += time.perf_counter() - started
            if due["eval"]:
                self._evaluate(log)
            if due["checkpoint"] or last or stop:
                progress.unlogged = interval.unlogged()
                self.checkpoints.save(step, self.state, self.batches.get_state(), progress)
            if stop:
                return True
            started = time.perf_counter()
        return False

    def _compile(self, leaves, rng_leaves, totals) -> None:
        """Compiles the loop step ahead of the first step, timed apart from training
        (`Progress.compile_seconds`); the step's calls then find the compiled program in
        JAX's cache."""
        started = time.perf_counter()
        self.loop_step.lower(leaves, rng_leaves, self.batches.abstract_batch(), totals).compile()
        self.progress.compile_seconds += time.perf_counter() - started

    def _eval_split(self, split: str) -> dict[str, float]:
        return evaluate(self.eval_step, self.state, self.rng_state, self.splits[split],
                        config=self.config, mesh=self.mesh)

    def _record(self, log: logs.RunLog, split: str, values: dict[str, float]) -> None:
        log.write(self.progress.step, split, values)
        setattr(self.progress, f"{split}_accuracy", values["accuracy"])
        if "sequence_accuracy" in values:
            setattr(self.progress, f"{split}_sequence_accuracy", values["sequence_accuracy"])
        setattr(self.progress, f"{split}_step", self.progress.step)

    def _evaluate(self, log: logs.RunLog) -> None:
        """Validation; and test whenever validation improves on its best."""
        progress = self.progress
        self._record(log, "val", self._eval_split("val"))
        if progress.val_accuracy > progress.best_val_accuracy:
            progress.best_val_accuracy, progress.best_step = progress.val_accuracy, progress.step
            self._record(log, "test", self._eval_split("test"))
            progress.test_accuracy_at_best = progress.test_accuracy
            progress.test_sequence_accuracy_at_best = progress.test_sequence_accuracy
            if self.best_checkpoint is not None:
                self.best_checkpoint.replace(progress.step, self.state,
                                             self.batches.get_state(), progress)

    def _num_params(self) -> int:
        model, _ = nnx.merge(self.graphdef, self.rng_state, self.state)
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    def _results(self) -> dict:
        config, progress = self.config, self.progress
        return {
            "task": config.task,
            "attention": config.attention,
            "mixer": config.attention,  # the same name under the mixer registry's key
            "mixer_kind": mixers.kind(config.attention),  # attention core | sequence model
            **layer_record(config),
            "seed": config.seed,
            "step": progress.step,
            "val_accuracy": progress.val_accuracy,
            "test_accuracy": progress.test_accuracy,
            "best_val_accuracy": progress.best_val_accuracy,
            "best_step": progress.best_step,
            "test_accuracy_at_best": progress.test_accuracy_at_best,
            "num_params": self._num_params(),
            "train_seconds": progress.train_seconds,
            "compile_seconds": progress.compile_seconds,
            "steps_per_second": progress.step / max(progress.train_seconds, 1e-9),
            "config_hash": config_hash(config),
            "device": f"{self.mesh.size} x {self.mesh.devices.flat[0].device_kind}",
            "objective": config.get("objective", "classify"),
            "init_from": pretraining.start_record(self.workdir),
            "versions": versions(),
            **self._token_results(),
        }

    def _token_results(self) -> dict:
        """token_classify's extra figures: the share of examples with every scored position
        right, and the task's settings (a report groups recall runs by them)."""
        if self.config.get("objective", "classify") != "token_classify":
            return {}
        progress = self.progress
        return {"val_sequence_accuracy": progress.val_sequence_accuracy,
                "test_sequence_accuracy": progress.test_sequence_accuracy,
                "test_sequence_accuracy_at_best": progress.test_sequence_accuracy_at_best,
                "task_settings": self.task.settings(self.config.prepare),
                **recurrent_state(self.config)}

