"""Speed and memory of attention layers vs sequence length: `python -m lra.bench`.

  python -m lra.bench --attention softmax,linear,local --lengths 1024,4096,16384 \
      [--batch 1 --heads 8 --head_dim 64 --dtype float32 --causal] [--out DIR]

An entry of --attention is a registry name, optionally with options after colons:
`linear:form=recurrent:chunk_size=128`. Each entry is measured in this one process:
forward + backward of the attention core alone (a sum of its output differentiated with
respect to q, k and v), compiled first (compilation is not timed), then the median of
--repeats runs. Peak memory is XLA's compiled memory analysis (arguments + outputs +
temporaries), which is also how an out-of-memory case is recognised before it runs: an
entry whose analysis exceeds --memory_budget_gb is recorded with `oom: true` instead of
being executed. Results go to stdout as a Markdown table and, with --out, to
DIR/bench.json (a list of records).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models import attention


def parse_entry(entry: str) -> tuple[str, dict]:
    """`name:key=value:...` -> (name, options); values parsed as int, float, bool or str."""
    name, *pairs = entry.split(":")
    options = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        options[key] = _literal(text)
    return name, options


def _literal(text: str):
    if text in ("True", "true", "False", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _grad_fn(core):
    graphdef, state = nnx.split(core)

    def loss(q, k, v):
        out = nnx.merge(graphdef, state)(q, k, v, None, deterministic=True)
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(entry: str, *, length: int, batch: int, heads: int, head_dim: int, dtype: str,
            causal: bool, repeats: int, memory_budget_bytes: float) -> dict:
    """One record: fwd+bwd median time and compiled peak memory of one attention at one length."""
    name, options = parse_entry(entry)
    core = attention.make(name, num_heads=heads, head_dim=head_dim, max_len=length,
                          causal=causal, rngs=nnx.Rngs(0), **options)
    shape = (batch, length, heads, head_dim)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
    grad = _grad_fn(core)
    compiled = grad.lower(q, k, v).compile()
    analysis = compiled.memory_analysis()
    peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes) if analysis is not None else None
    record = {"attention": entry, "scope": "layer", "length": length, "batch": batch,
              "heads": heads, "head_dim": head_dim, "dtype": dtype, "causal": causal,
              "peak_bytes": peak, "oom": False, "time_ms": None, "tokens_per_s": None,
              "device": jax.devices()[0].device_kind}
    if peak is not None and peak > memory_budget_bytes:
        record["oom"] = True
        return record
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    record["time_ms"] = 1e3 * statistics.median(times)
    record["tokens_per_s"] = batch * length / statistics.median(times)
    return record


def markdown(records: list[dict]) -> str:
    """Rows: attention; columns: time (ms) and peak memory (MiB) per length."""
    lengths = sorted({r["length"] for r in records})
    names = list(dict.fromkeys(r["attention"] for r in records))
    cells = {(r["attention"], r["length"]): r for r in records}
    header = "| attention | " + " | ".join(f"{n} ms / MiB" for n in lengths) + " |"
    lines = [header, "|---" * (len(lengths) + 1) + "|"]
    for name in names:
        row = []
        for length in lengths:
            r = cells.get((name, length))
            if r is None:
                row.append("")
            elif r["oom"]:
                row.append(f"OOM (needs {r['peak_bytes'] / 2**20:,.0f} MiB)")
            else:
                row.append(f"{r['time_ms']:,.1f} / {r['peak_bytes'] / 2**20:,.0f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lra.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--attention", default="all",
                        help="comma-separated entries (name[:opt=value...]) or 'all'")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory_budget_gb", type=float, default=8.0)
    parser.add_argument("--out", default=None, help="folder for bench.json")
    args = parser.parse_args(argv)
    entries = attention.NAMES if args.attention == "all" else args.attention.split(",")
    for entry in entries:  # fail before measuring anything
        name, options = parse_entry(entry)
        attention.make(name, num_heads=1, head_dim=1, max_len=1, rngs=nnx.Rngs(0), **options)
    records = []
    for length in (int(n) for n in args.lengths.split(",")):
        for entry in entries:
            record = measure(entry, length=length, batch=args.batch, heads=args.heads,
                             head_dim=args.head_dim, dtype=args.dtype, causal=args.causal,
                             repeats=args.repeats,
                             memory_budget_bytes=args.memory_budget_gb * 2**30)
            records.append(record)
            print(json.dumps(record), flush=True)
    print(markdown(records))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench.json").write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
