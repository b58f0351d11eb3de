"""The `longest` scope of `lra.bench`: the longest sequence whose training step fits a
per-device memory budget, with and without sequence parallelism.

    python -m lra.bench --scopes longest --attention softmax,gated_deltanet \
        --lengths 1024,2048,4096,8192 --memory_budget_gb 1 \
        [--longest_devices 4] [--longest_seqs 1,2,4] [--step_... sizes]

For each --attention entry and each `seq` of --longest_seqs, the step scope's training step
(lra/bench/layers.py: the same model, sizes from the --step_ flags) runs on a mesh of
--longest_devices devices (default: all) with a `seq` axis of that size (`config.mesh_seq`)
and `rows` = devices / seq sequences per batch: one sequence per data shard, so every
device holds the same share of one sequence's work whatever `seq` is, and per-device
memory is comparable across `seq` (--step_batch is ignored here).

The --lengths are walked in increasing order: at each the step is built and compiled, and
its compiled peak per device (XLA's memory analysis of the SPMD program, arguments +
outputs + temporaries - aliased, which is per device) is compared with --memory_budget_gb;
the walk stops at the first length over the budget (or out of memory at compile time).
The longest length that fitted is then timed as the step scope times (median of
--repeats runs after an untimed one, on the arguments it was compiled with). Only the step
of the longest length that fitted so far is kept (compiled, with its arguments: the model
state and one batch); an over-budget step keeps neither.

One record per (entry, seq): `longest_length` (None: not even the shortest fits),
`time_ms`, `steps_per_s`, `tokens_per_s` (rows x length per second), `compiled_peak_bytes`
(per device, at the longest length), `next_length` / `next_peak_bytes` (the first length
that did not fit and its peak; None when every length fitted or it failed otherwise),
`tried` (each compiled length and its peak), and `error`: why a (entry, seq) has no
result, e.g. a mixer outside `lra.parallel.sharding.SEQUENCE_PARALLEL_MIXERS` with
seq > 1 (`lra.training.train.validate_config` refuses it), or running out of memory
when timed. The exact baselines are not added to this scope: it compares the `seq`
values of each entry, not entries with each other (list softmax in --attention to
include it).
"""

from __future__ import annotations

import dataclasses
import sys

import jax

from lra.bench import output

SCOPE = "longest"


def default_seqs(devices: int) -> list[int]:
    """1, 2, 4, ... up to `devices`: the powers of two that divide the device count."""
    seqs, seq = [], 1
    while seq <= devices and devices % seq == 0:
        seqs.append(seq)
        seq *= 2
    return seqs


def _base_record(entry: str, seq: int, devices: int, settings, info: dict) -> dict:
    return {"attention": entry, "scope": SCOPE, "seq": seq, "devices": devices,
            "rows": devices // seq, "batch": devices // seq,
            "num_layers": settings.step_layers, "emb_dim": settings.step_emb_dim,
            "heads": settings.step_heads, "head_dim": settings.step_qkv_dim // settings.step_heads,
            "mlp_dim": settings.step_mlp_dim, "dtype": settings.dtype,
            "causal": settings.causal, "memory_budget_bytes": settings.memory_budget_bytes,
            "longest_length": None, "length": None, "time_ms": None, "steps_per_s": None,
            "tokens_per_s": None, "compiled_peak_bytes": None, "peak_bytes": None,
            "memory_source": "compiled", "next_length": None, "next_peak_bytes": None,
            "tried": [], "oom": False, "error": None, **info}


def measure(entry: str, seq: int, devices: int, lengths: list[int], settings,
            info: dict, scopes) -> dict:
    """The record of one (entry, seq): the walk over `lengths` and the timed longest step,
    by `scopes`' (lra/bench/layers.py's, which imports this module) `prepare` and
    `execute` of the step scope."""
    record = _base_record(entry, seq, devices, settings, info)
    if devices % seq:
        record["error"] = f"seq {seq} does not divide the {devices} devices"
        return record
    step_settings = dataclasses.replace(settings, step_devices=devices, step_seq=seq,
                                        step_batch=devices // seq, analyses=False,
                                        depth_only=False)
    best = None  # the prepared step of the longest length that fitted so far
    for length in sorted(lengths):
        try:
            prepared = scopes.prepare(entry, "step", length, step_settings, info)
        except ValueError as error:  # a configuration validate_config refuses
            record["error"] = str(error)
            break
        peak = prepared.record["compiled_peak_bytes"]
        record["tried"].append({"length": length, "compiled_peak_bytes": peak})
        if prepared.record["oom"]:
            record.update(next_length=length, next_peak_bytes=peak)
            break
        best = prepared  # (the shorter length's step and its arguments are dropped)
        print(f"longest {entry} seq={seq} L={length}: {output.mib(peak)} MiB per device "
              "(fits)", file=sys.stderr, flush=True)
    if best is None:
        return record
    timed = scopes.execute(best, step_settings, matmul_peak=0.0)
    record.update(longest_length=timed["length"], length=timed["length"],
                  compiled_peak_bytes=timed["compiled_peak_bytes"],
                  peak_bytes=timed["peak_bytes"], memory_source=timed["memory_source"])
    if timed["oom"]:  # out of memory when run although the compiled analysis fitted
        record.update(oom=True, error=timed["error"])
        return record
    record.update(time_ms=timed["time_ms"], steps_per_s=timed["steps_per_s"],
                  tokens_per_s=timed["tokens_per_s"])
    return record


def run(entries: list[str], seqs: list[int], devices: int, lengths: list[int],
        settings, scopes) -> list[dict]:
    """One record per (entry, seq), in that order; `scopes` is lra/bench/layers.py (its
    `prepare`, `execute` and `device_name`)."""
    if devices > jax.device_count():
        raise ValueError(f"--longest_devices {devices}: only {jax.device_count()} devices")
    device = jax.devices()[0]
    info = {"device": scopes.device_name(device), "platform": device.platform,
            "matmul_flops_per_s": None}
    records = []
    for entry in entries:
        for seq in seqs:
            records.append(measure(entry, seq, devices, lengths, settings, info, scopes))
            _progress(records[-1])
    return records


def _progress(r: dict) -> None:
    head = f"longest {r['attention']} seq={r['seq']} ({r['devices']} devices, {r['rows']} rows)"
    if r["time_ms"] is None:
        print(f"{head}: {r['error'] or 'nothing fits'}", file=sys.stderr, flush=True)
        return
    print(f"{head}: L={r['longest_length']}, {r['time_ms']:,.1f} ms, "
          f"{output.mib(r['compiled_peak_bytes'])} MiB per device", file=sys.stderr, flush=True)
