"""Speed, memory and FLOPs of every attention vs sequence length: `python -m lra.bench`.

    python -m lra.bench --attention softmax,linear,performer (or all) \
        --lengths 1024,2048,4096,8192,16384 [--scopes layer,step] [--batch 1 --heads 8 \
        --head_dim 64 --dtype float32|bfloat16 --causal] [--out DIR]

Four scopes, each measured in this one process with compilation excluded (every
program is compiled first, run once untimed, then timed as the median of --repeats
runs that each wait for the result):

  layer  forward + backward of the attention core alone (the gradient of the sum of
         its output with respect to q, k and v), q, k, v [batch, L, heads, head_dim].
  step   one whole encoder training step, `lra.training.train.make_train_step` on the state of
         `lra.training.train.create_state` (forward, backward, AdamW update, state donated and
         fed back), a synthetic batch of random tokens with a full mask. The model
         defaults to the setup of the LRA paper's speed table (Tay et al. 2021, Table 2,
         byte-level text: 4 layers, width 256, 4 heads, qkv 256, MLP 1024, dropout 0.1);
         the paper's batch was 32, here --step_batch (default --batch) so that the
         quadratic baselines fit a workstation. Mean pooling, so the attention sees
         exactly L tokens (causal: last-token pooling).
  loop   a task config's whole training loop (`--loop_config`, default ListOps runlocal):
         steps/s through `lra.training.train`'s loop and the host's share of a step (time
         outside the jitted step / total); see lra/bench/loop.py. No --attention,
         --lengths or sizes: the config's own (`--loop_set key=value,...` changes them).
  longest  for --longest_devices devices and each `seq` of --longest_seqs (sequence
         parallelism, `config.mesh_seq`): the longest of --lengths whose step (the step
         scope's, devices / seq sequences) compiles within --memory_budget_gb per device,
         and its step time; see lra/bench/longest.py. Exact baselines are not added.

An entry of --attention is a registry name, optionally with options after colons:
`linear:form=recurrent:chunk_size=128`. In the step scope an entry may also be a per-layer
pattern (lra/models/pattern.py), names joined by "+": `gated_deltanet+gated_deltanet+
gated_deltanet+softmax` is a hybrid whose layers follow the pattern (--step_layers a
multiple of its length); options after colons go to its first name. The exact baselines softmax and
memory_efficient (--baselines) are measured too unless --no_baseline.

Each record (bench.json is the list of them) holds time_ms, tokens_per_s, the speed-up
vs softmax and vs the fastest exact attention at the same scope and length, peak memory
(`memory_source` "device": the device's own peak statistics, on backends that keep them
and when this program raised the process's peak; "compiled": XLA's compiled memory
analysis, arguments + outputs + temporaries - aliased), `flops` (XLA's cost analysis,
which counts a loop body once), `dot_flops` (every matrix product the program performs,
counted from its jaxpr with scan bodies times their length) and `matmul_fraction`
(dot_flops / time over the FLOP/s of a large matmul measured on the same device), and
`depth_forward` / `depth_backward`: the sequential depth (loop iterations run one after
another, lra/bench/depth.py; None = unknown) of the loss the program differentiates (the
layer scope's summed output; the step's model loss, its dropout off) and of its backward
pass alone.
--depth_only traces each program for its depths and compiles and times nothing (records
with time_ms None; only the depth tables are written).
Out-of-memory is a record with `oom: true`: a program whose compiled analysis exceeds
--memory_budget_gb is not run, and RESOURCE_EXHAUSTED at compile or run time is caught.
With --out: DIR/bench.json, DIR/bench.md (tables in the layout of the LRA paper's
speed/memory table) and DIR/bench_<scope>.png (log-log time and memory vs length).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.bench import depth, flops, output
from lra.bench import longest as longest_scope
from lra.bench import loop as loop_scope
from lra.bench.flops import dot_flops
from lra.models import attention, mixers, pattern
from lra.parallel import sharding
from lra.training import objectives, train

SCOPES = ("layer", "step", "loop", "longest")  # loop, longest: lra/bench/{loop,longest}.py
EXACT = ("softmax", "memory_efficient")  # attentions that compute softmax attention exactly
DEFAULT_BUDGET_GB = 8.0  # where the device keeps no memory statistics (CPU)
# The synthetic step task: byte-level text classification shapes (LRA's speed table task).
STEP_VOCAB_SIZE = 257
STEP_NUM_CLASSES = 2


# ---------------------------------------------------------------------------------------
# Entries and settings


def parse_entry(entry: str) -> tuple[str, dict]:
    """`name:key=value:...` -> (name, options); values parsed as int, float, bool or str.

    `name` may be a pattern `a+b+...` (the step scope only; see `is_pattern`)."""
    name, *pairs = entry.split(":")
    options = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        options[key] = _literal(text)
    return name, options


def is_pattern(name: str) -> bool:
    """Whether an entry's name is a per-layer pattern (`a+b+...`) rather than one mixer."""
    return pattern.SEPARATOR in name


def _literal(text: str):
    if text in ("True", "true", "False", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every measurement of one benchmark run shares (from the command line)."""

    batch: int = 1
    heads: int = 8  # layer scope
    head_dim: int = 64  # layer scope
    dtype: str = "float32"
    causal: bool = False
    repeats: int = 5
    memory_budget_bytes: float = DEFAULT_BUDGET_GB * 2**30
    step_batch: int = 1
    step_layers: int = 4
    step_emb_dim: int = 256
    step_qkv_dim: int = 256
    step_heads: int = 4
    step_mlp_dim: int = 1024
    step_dropout: float = 0.1
    step_devices: int = 1  # the step's mesh: the first step_devices devices,
    step_seq: int = 1  # its `seq` axis (sequence parallelism); data = devices / seq
    depth_only: bool = False  # trace only: sequential depths, nothing compiled or timed
    analyses: bool = True  # False: no sequential depths nor dot_flops (the longest scope)


@dataclasses.dataclass
class Program:
    """A jitted function, how to make fresh arguments for it, and what it models."""

    fn: Callable
    make_args: Callable[[], tuple]
    feeds_back: bool  # a train step: its first output (the donated state) is the next input
    shape: dict  # batch, heads, head_dim, num_layers, emb_dim, mlp_dim of the record
    # fn's arguments -> (the scalar loss fn differentiates, its inputs): whose sequential
    # depths (lra/bench/depth.py) the record holds; None = not known
    loss: Callable[..., tuple[Callable, tuple]] | None = None
    # the mesh under which it is lowered, compiled and run (`jax.set_mesh`): the modules
    # read it to decide whether to split the sequence; None = no mesh context
    mesh: jax.sharding.Mesh | None = None

    def context(self):
        """`jax.set_mesh(self.mesh)`, or nothing when the program has no mesh."""
        return _within(self.mesh)


def _within(mesh: jax.sharding.Mesh | None):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------
# The two scopes


def _layer_module(name: str, length: int, settings: Settings, options: dict) -> nnx.Module:
    """An attention core (q, k, v [B, L, H, D]), or a sequence model (x [B, L, H*D])."""
    if is_pattern(name):
        raise ValueError(f"--attention {name}: a per-layer pattern is a whole model, measured "
                         "only in the step scope (--scopes step); the layer scope times one "
                         "mixer")
    if name not in mixers.SEQUENCE_NAMES:  # (an unknown name: attention.make says so)
        return attention.make(name, num_heads=settings.heads, head_dim=settings.head_dim,
                              max_len=length, causal=settings.causal, rngs=nnx.Rngs(0),
                              **options)
    width = settings.heads * settings.head_dim
    return mixers.make(name, emb_dim=width, qkv_dim=width, num_heads=settings.heads,
                       max_len=length, dropout=0.0, attention_dropout=0.0,
                       causal=settings.causal, dtype=settings.dtype, rngs=nnx.Rngs(0),
                       **options)


def _layer_program(entry: str, length: int, settings: Settings) -> Program:
    """Forward + backward of one attention core, or of one sequence model (the same width:
    E = heads x head_dim), on random inputs."""
    name, options = parse_entry(entry)
    graphdef, state = nnx.split(_layer_module(name, length, settings, options))
    num_inputs = 1 if name in mixers.SEQUENCE_NAMES else 3

    def loss(*inputs):
        out = nnx.merge(graphdef, state)(*inputs, None, deterministic=True)
        return jnp.sum(out.astype(jnp.float32))

    shape = (settings.batch, length, settings.heads, settings.head_dim)
    if num_inputs == 1:
        shape = (settings.batch, length, settings.heads * settings.head_dim)

    def make_args():
        keys = jax.random.split(jax.random.key(0), num_inputs)
        return tuple(jax.random.normal(key, shape, settings.dtype) for key in keys)

    grad = jax.grad(loss, argnums=tuple(range(num_inputs)))
    return Program(jax.jit(grad), make_args, feeds_back=False,
                   shape={"batch": settings.batch, "heads": settings.heads,
                          "head_dim": settings.head_dim, "num_layers": 1, "emb_dim": None,
                          "mlp_dim": None},
                   loss=lambda *inputs: (loss, inputs))


@dataclasses.dataclass(frozen=True)
class _StepTask:
    """The task interface `lra.training.train.create_state` reads, for synthetic batches."""

    vocab_size: int = STEP_VOCAB_SIZE
    num_classes: int = STEP_NUM_CLASSES
    paired: bool = False


def step_config(entry: str, length: int, settings: Settings):
    """The training config of the step scope: `configs.common.base_config`, sizes overridden.

    Raises:
      ValueError: for sizes `lra.training.train.validate_config` rejects, or bfloat16 with a
        training loop that has no `config.dtype`.
    """
    try:
        from configs import common
    except ImportError as error:
        raise ImportError("the step scope builds its config with the `configs` package, "
                          "which ships with lra: install it (pip install .) or run "
                          "`python -m lra.bench` from the repository root") from error
    name, options = parse_entry(entry)
    arg = f"pattern={name}" if is_pattern(name) else f"attention={name}"
    config = common.base_config("bench", common.parse_arg(arg, ("bench",)))
    config.max_length = length
    config.batch_size = config.eval_batch_size = settings.step_batch
    config.num_devices = settings.step_devices
    if settings.step_seq != 1 or "mesh_seq" in config:
        config.mesh_seq = settings.step_seq
    model = config.model
    model.num_layers, model.emb_dim = settings.step_layers, settings.step_emb_dim
    model.qkv_dim, model.num_heads = settings.step_qkv_dim, settings.step_heads
    model.mlp_dim = settings.step_mlp_dim
    model.dropout = model.attention_dropout = settings.step_dropout
    model.causal = settings.causal
    # The attention sees exactly L tokens (and cls, refused under mesh_seq > 1, is never used).
    model.pooling = "last" if settings.causal else "mean"
    model.attention_options.update(options)
    if "dtype" in config:
        config.dtype = settings.dtype
    elif settings.dtype != "float32":
        raise ValueError(f"--dtype {settings.dtype}: this lra.training.train has no config.dtype, so the "
                         "step scope runs only in float32 (use --scopes layer)")
    train.validate_config(config, settings.step_devices)
    return config


def _step_program(entry: str, length: int, settings: Settings) -> Program:
    """One training step on a (data, fsdp=1, seq) mesh of `settings.step_devices` devices
    (one device by default); with step_seq > 1 every [B, L] batch array is split over
    `seq` (`sharding.batch_shardings`) and the program runs under `jax.set_mesh`."""
    config = step_config(entry, length, settings)
    mesh = sharding.make_mesh(settings.step_devices, 1, settings.step_seq)
    run_mesh = mesh if settings.step_seq > 1 else None  # (seq = 1: no context, as always)
    task = _StepTask()
    with _within(run_mesh):
        first = [train.create_state(config, task, mesh)]  # the first make_args uses it
    graphdef, _, _, shardings = first[0]
    step = train.make_train_step(graphdef, shardings, config)

    def make_args():
        if first:
            _, rng_state, state, _ = first.pop()
        else:
            with _within(run_mesh):
                _, rng_state, state, _ = train.create_state(config, task, mesh)
        rng = np.random.default_rng(0)
        shape = (settings.step_batch, length)
        batch = {"inputs": rng.integers(1, task.vocab_size, shape, dtype=np.int32),
                 "mask": np.ones(shape, bool),
                 "targets": rng.integers(0, task.num_classes, shape[:1], dtype=np.int32)}
        return state, rng_state, jax.device_put(batch, sharding.batch_shardings(batch, mesh))

    def model_loss(state, rng_state, batch):
        """The summed loss of the step's model as a function of its parameters (no dropout)."""
        model, _ = nnx.merge(graphdef, rng_state, state)
        model_def, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            sums = objectives.loss_sums(nnx.merge(model_def, params, rest), batch, spec,
                                        deterministic=True)
            return sums["loss"]

        return loss, (params,)

    spec = train.objective_spec(config)
    return Program(step, make_args, feeds_back=True, shape={
        "batch": settings.step_batch, "heads": settings.step_heads,
        "head_dim": settings.step_qkv_dim // settings.step_heads,
        "num_layers": settings.step_layers, "emb_dim": settings.step_emb_dim,
        "mlp_dim": settings.step_mlp_dim}, loss=model_loss,
        mesh=run_mesh)


PROGRAMS: dict[str, Callable[[str, int, Settings], Program]] = {
    "layer": _layer_program, "step": _step_program}


# ---------------------------------------------------------------------------------------
# Measuring


def device_name(device=None) -> str:
    """The device's kind, with the processor model and core count on a CPU."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {os.cpu_count()} cores)"


def _oom_record(record: dict, error: jax.errors.JaxRuntimeError) -> dict:
    """Marks `record` out of memory for a RESOURCE_EXHAUSTED error; re-raises any other."""
    if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
        raise error
    record.update(oom=True, error=str(error).splitlines()[0])
    return record


@dataclasses.dataclass
class Prepared:
    """A compiled program and its record so far (memory analysis, FLOPs), not yet timed."""

    record: dict
    program: Program | None = None
    compiled: object = None
    args: tuple | None = None  # arguments made for compiling; None = make fresh ones to run


def prepare(entry: str, scope: str, length: int, settings: Settings,
            device_info: dict) -> Prepared:
    """Builds and compiles one measurement; an over-budget or failed compile is an OOM record."""
    program = PROGRAMS[scope](entry, length, settings)
    record = {"attention": entry, "scope": scope, "length": length, **program.shape,
              "dtype": settings.dtype, "causal": settings.causal, "time_ms": None,
              "steps_per_s": None, "tokens_per_s": None, "speedup_vs_softmax": None,
              "speedup_vs_exact": None, "exact_baseline": None, "peak_bytes": None,
              "compiled_peak_bytes": None, "memory_source": "compiled", "flops": None,
              "dot_flops": None, "matmul_fraction": None, "depth_forward": None,
              "depth_backward": None, "oom": False, "error": None, **device_info}
    try:
        with program.context():
            args = program.make_args()
            if program.loss is not None and settings.analyses:
                loss, inputs = program.loss(*args)
                record["depth_forward"], record["depth_backward"] = (
                    depth.forward_backward_depth(loss, *inputs))
            if settings.depth_only:
                return Prepared(record)
            compiled = program.fn.lower(*args).compile()
            counted = dot_flops(program.fn, *args) if settings.analyses else None
    except jax.errors.JaxRuntimeError as error:
        return Prepared(_oom_record(record, error))
    peak = flops.compiled_peak(compiled)  # per device for an SPMD program
    record.update(peak_bytes=peak, compiled_peak_bytes=peak,
                  flops=flops.cost_flops(compiled), dot_flops=counted)
    if peak is not None and peak > settings.memory_budget_bytes:
        record.update(oom=True, error=f"compiled peak {peak:,} bytes exceeds the budget of "
                      f"{settings.memory_budget_bytes:,.0f} bytes")
        return Prepared(record)
    return Prepared(record, program, compiled, args)


def _timed_runs(compiled, args: tuple, feeds_back: bool, repeats: int) -> list[float]:
    def call(args):
        out = jax.block_until_ready(compiled(*args))
        return (out[0], *args[1:]) if feeds_back else args

    args = call(args)  # untimed: first-run allocations and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        args = call(args)
        times.append(time.perf_counter() - start)
    return times


def _memory_stats() -> dict | None:
    """The default device's memory statistics (GPU/TPU); None where it keeps none (CPU)."""
    return jax.devices()[0].memory_stats()


def peak_raised(stats: Callable[[], dict | None], work: Callable[[], object]) -> int | None:
    """Runs `work`; returns the device's peak bytes if `work` raised it, else None.

    Device peak statistics cannot be reset, so the peak measures one program only when
    that program set a new high; otherwise the caller falls back to the compiled analysis.
    """
    before = stats()
    work()
    after = stats()
    if not before or not after or "peak_bytes_in_use" not in after:
        return None
    return after["peak_bytes_in_use"] if after["peak_bytes_in_use"] > before[
        "peak_bytes_in_use"] else None


def execute(prepared: Prepared, settings: Settings, matmul_peak: float) -> dict:
    """Times a prepared measurement (median of repeats) and completes its record."""
    record = prepared.record
    if record["oom"] or prepared.program is None:  # (out of memory, or --depth_only)
        return record
    program, args = prepared.program, prepared.args
    prepared.args = None  # donated or consumed from here on
    times: list[float] = []

    def work():
        with program.context():
            run_args = args if args is not None else program.make_args()
            times.extend(_timed_runs(prepared.compiled, run_args, program.feeds_back,
                                     settings.repeats))

    try:
        device_peak = peak_raised(_memory_stats, work)
    except jax.errors.JaxRuntimeError as error:
        return _oom_record(record, error)
    seconds = statistics.median(times)
    record.update(time_ms=1e3 * seconds, steps_per_s=1 / seconds,
                  tokens_per_s=record["batch"] * record["length"] / seconds)
    if record["dot_flops"] is not None and matmul_peak:
        record["matmul_fraction"] = record["dot_flops"] / seconds / matmul_peak
    if device_peak is not None:
        record.update(peak_bytes=device_peak, memory_source="device")
    return record


def add_speedups(records: list[dict]) -> list[dict]:
    """Fills speedup_vs_softmax and speedup_vs_exact (+ exact_baseline) in place.

    Baselines are the records of the same scope, length, batch, dtype and causality: the
    entry `softmax`, and the fastest exact attention (softmax or memory_efficient, any
    options). A baseline that is out of memory or absent leaves the speed-up None.
    """
    def group(r):
        return r["scope"], r["length"], r["batch"], r["dtype"], r["causal"]

    timed = [r for r in records if r["time_ms"] is not None]
    softmax = {group(r): r for r in timed if r["attention"] == "softmax"}
    fastest: dict = {}
    for r in timed:
        if parse_entry(r["attention"])[0] in EXACT:
            best = fastest.get(group(r))
            if best is None or r["time_ms"] < best["time_ms"]:
                fastest[group(r)] = r
    for r in timed:
        if group(r) in softmax:
            r["speedup_vs_softmax"] = softmax[group(r)]["time_ms"] / r["time_ms"]
        if group(r) in fastest:
            r["speedup_vs_exact"] = fastest[group(r)]["time_ms"] / r["time_ms"]
            r["exact_baseline"] = fastest[group(r)]["attention"]
    return records


def _progress(index: int, total: int, record: dict) -> None:
    head = f"[{index}/{total}] {record['scope']} {record['attention']} L={record['length']}"
    if record["oom"]:
        print(f"{head}: OOM ({record['error']})", file=sys.stderr, flush=True)
        return
    if record["time_ms"] is None:
        print(f"{head}: depth {record['depth_forward']} forward, {record['depth_backward']} "
              "backward", file=sys.stderr, flush=True)
        return
    print(f"{head}: {record['time_ms']:,.1f} ms, {record['tokens_per_s']:,.0f} tokens/s, "
          f"{output.mib(record['peak_bytes'])} MiB ({record['memory_source']})",
          file=sys.stderr, flush=True)


def run(entries: list[str], scopes: list[str], lengths: list[int], settings: Settings,
        matmul_peak: float) -> list[dict]:
    """Measures every (scope, length, entry); records in that order, speed-ups filled.

    Where the device keeps memory statistics, everything is compiled first and run in
    increasing order of compiled peak, so that each program is likely to raise the
    device's (non-resettable) peak and get a device-measured figure.
    """
    device = jax.devices()[0]
    info = {"device": device_name(device), "platform": device.platform,
            "matmul_flops_per_s": matmul_peak}
    plan = [(scope, length, entry) for scope in scopes for length in lengths for entry in entries]
    records: list[dict | None] = [None] * len(plan)
    if _memory_stats():
        prepared = []
        for scope, length, entry in plan:
            prepared.append(prepare(entry, scope, length, settings, info))
            prepared[-1].args = None  # no other program's arguments stay on the device
        order = sorted(range(len(plan)), key=lambda i: prepared[i].record["peak_bytes"] or 0)
        for done, i in enumerate(order, 1):
            records[i] = execute(prepared[i], settings, matmul_peak)
            _progress(done, len(plan), records[i])
    else:
        for i, (scope, length, entry) in enumerate(plan):
            records[i] = execute(prepare(entry, scope, length, settings, info), settings,
                                 matmul_peak)
            _progress(i + 1, len(plan), records[i])
    return add_speedups(records)


# ---------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lra.bench",
                                     description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--attention", default="all", help="comma-separated entries (name[:opt=value...]) or 'all'")
    add("--lengths", default="1024,4096,16384", help="comma-separated sequence lengths")
    add("--scopes", default="layer,step", help="comma-separated: layer, step, loop, longest")
    add("--batch", type=int, default=1, help="batch of the layer scope (and default step batch)")
    add("--heads", type=int, default=8, help="heads of the layer scope")
    add("--head_dim", type=int, default=64, help="per-head width of the layer scope")
    add("--dtype", default="float32", choices=("float32", "bfloat16"))
    add("--causal", action="store_true")
    add("--repeats", type=int, default=5, help="timed runs; the median is reported")
    add("--memory_budget_gb", type=float, default=None,
        help="compiled peak above this is recorded as OOM without running (default: the "
             f"device's memory limit where it reports one, else {DEFAULT_BUDGET_GB:g})")
    add("--baselines", default=",".join(EXACT), help="exact attentions always measured")
    add("--no_baseline", action="store_true", help="measure only the --attention entries")
    add("--depth_only", action="store_true",
        help="trace only: each entry's sequential depth, nothing compiled or timed")
    add("--step_batch", type=int, default=None, help="batch of the step scope (default --batch)")
    add("--step_layers", type=int, default=4)
    add("--step_emb_dim", type=int, default=256)
    add("--step_qkv_dim", type=int, default=256)
    add("--step_heads", type=int, default=4)
    add("--step_mlp_dim", type=int, default=1024)
    add("--step_dropout", type=float, default=0.1, help="dropout and attention dropout")
    add("--matmul_size", type=int, default=2048, help="side of the reference matmul")
    add("--loop_config", default=loop_scope.DEFAULT_CONFIG,
        help="loop scope: config file[:arg] whose training loop is timed")
    add("--loop_set", default="", help="loop scope: config overrides, key=value,...")
    add("--loop_steps", type=int, default=200, help="loop scope: timed steps per round")
    add("--loop_warmup", type=int, default=20, help="loop scope: untimed steps first")
    add("--longest_devices", type=int, default=0,
        help="longest scope: devices of the step's mesh (default 0: all)")
    add("--longest_seqs", default="",
        help="longest scope: comma-separated seq axis sizes (default: 1, 2, 4, ... the "
             "powers of two dividing the devices)")
    add("--out", default=None, help="folder for bench.json, bench.md and the plots")
    return parser


def _entries(args) -> list[str]:
    entries = list(mixers.NAMES) if args.attention == "all" else args.attention.split(",")
    if not args.no_baseline:
        missing = [b for b in args.baselines.split(",") if b and b not in entries]
        entries = missing + entries
    kernel_scopes = [scope for scope in args.scopes.split(",") if scope not in ("loop", "longest")]
    shape = Settings(heads=args.heads, head_dim=args.head_dim)  # options may depend on it
    for entry in entries:  # fail before measuring anything
        name, options = parse_entry(entry)
        if is_pattern(name) and kernel_scopes == ["step"]:
            names = pattern.parse(name)
            if args.step_layers % len(names):
                raise ValueError(f"--attention {entry}: --step_layers {args.step_layers} is "
                                 f"not a multiple of the pattern's {len(names)} names")
            _layer_module(names[0], 1, shape, options)
            continue
        _layer_module(name, 1, shape, options)
    return entries


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise ValueError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def _budget_bytes(gigabytes: float | None) -> float:
    if gigabytes is not None:
        return gigabytes * 2**30
    stats = _memory_stats() or {}
    return stats.get("bytes_limit") or DEFAULT_BUDGET_GB * 2**30


def _settings(args) -> Settings:
    return Settings(
        batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
        causal=args.causal, repeats=args.repeats,
        memory_budget_bytes=_budget_bytes(args.memory_budget_gb),
        step_batch=args.step_batch or args.batch, step_layers=args.step_layers,
        step_emb_dim=args.step_emb_dim, step_qkv_dim=args.step_qkv_dim,
        step_heads=args.step_heads, step_mlp_dim=args.step_mlp_dim,
        step_dropout=args.step_dropout, depth_only=args.depth_only)


def _kernel_records(args, scopes: list[str]) -> list[dict]:
    """The layer and step scopes' records."""
    lengths = _positive_ints(args.lengths, "--lengths")
    entries = _entries(args)
    settings = _settings(args)
    if args.depth_only:
        return run(entries, scopes, lengths, settings, matmul_peak=0.0)
    matmul_peak = flops.matmul_flops_per_s(args.matmul_size, args.dtype, args.repeats)
    print(f"{device_name()}: {args.matmul_size}^2 matmul at {matmul_peak / 1e9:,.1f} GFLOP/s "
          f"({args.dtype})", file=sys.stderr, flush=True)
    return run(entries, scopes, lengths, settings, matmul_peak)


def _loop_record(args) -> dict:
    """The loop scope's record (lra/bench/loop.py)."""
    _positive_ints(f"{args.loop_steps},{args.loop_warmup},{args.repeats}",
                   "--loop_steps, --loop_warmup and --repeats")
    overrides = dict(pair.split("=", 1) for pair in filter(None, args.loop_set.split(",")))
    config = loop_scope.load_config(args.loop_config,
                                    {key: _literal(value) for key, value in overrides.items()})
    record = loop_scope.measure(config, steps=args.loop_steps, warmup=args.loop_warmup,
                                repeats=args.repeats, label=args.loop_config)
    record.update(device=device_name(), matmul_flops_per_s=None)
    print(f"loop {args.loop_config}: {record['steps_per_s']:,.1f} steps/s, bare step "
          f"{record['step_steps_per_s']:,.1f} steps/s, host share "
          f"{100 * record['host_share']:.1f}%", file=sys.stderr, flush=True)
    return record


def _longest_records(args) -> list[dict]:
    """The longest scope's records (lra/bench/longest.py): --attention's entries only."""
    lengths = _positive_ints(args.lengths, "--lengths")
    entries = list(mixers.NAMES) if args.attention == "all" else args.attention.split(",")
    for entry in entries:  # fail before measuring anything
        name, options = parse_entry(entry)
        shape = Settings(heads=args.heads, head_dim=args.head_dim)
        _layer_module(pattern.parse(name)[0] if is_pattern(name) else name, 1, shape, options)
    devices = args.longest_devices or jax.device_count()
    seqs = (_positive_ints(args.longest_seqs, "--longest_seqs") if args.longest_seqs
            else longest_scope.default_seqs(devices))
    return longest_scope.run(entries, seqs, devices, lengths, _settings(args),
                             sys.modules[__name__])


def main(argv=None) -> list[dict]:
    """Runs the benchmark; prints the tables, writes files to --out; returns the records."""
    args = _parser().parse_args(argv)
    scopes = args.scopes.split(",")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    kernel_scopes = [scope for scope in scopes if scope not in ("loop", "longest")]
    records = _kernel_records(args, kernel_scopes) if kernel_scopes else []
    if "longest" in scopes:
        records += _longest_records(args)
    if "loop" in scopes:
        records.append(_loop_record(args))
    text = output.markdown(records)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(records, indent=2) + "\n")
        (out / "bench.md").write_text(text + "\n")
        if not args.depth_only:  # (nothing timed to plot)
            output.plot(records, out)
    return records

