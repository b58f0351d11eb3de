"""Precision of the gated, delta-rule and SSD cores in float32 and bfloat16 against float64.

`python -m lra.bench.precision --lengths 4096,16384 --out DIR` writes DIR/precision.json
and DIR/precision.md.

For each core the causal chunked output is computed twice, from float32 inputs and from
the same inputs with q, k, v (C, B and dt x for the SSD) cast to bfloat16 -- the gates
(g, beta, log alpha) stay float32, as the modules pass them (gated.py `GatedAttention`,
delta.py `DeltaNetAttention`, mamba2.py `_ssd_inputs`) -- and compared with a float64
NumPy token-by-token recurrence written here from the equations of each module's
docstring (independent of the JAX code: no chunks, no cumulative sums):

  retnet, gla (gated.py `retain`, per-head / per-channel log-gates g_t <= 0):
      S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = q_t S_t          (inclusive read)
  gated_deltanet, kda (delta.py `delta_rule`, per-head / per-channel log alpha_t <= 0):
      S_t = (I - beta_t k_t^T k_t) diag(alpha_t) S_{t-1} + beta_t k_t^T v_t,   o_t = q_t S_t
  ssd (ssd.py `grouped_ssd`, one group; x already dt-scaled, g = dt A <= 0):
      S_t = exp(g_{t,h}) S_{t-1} + B_t^T x_{t,h},   y_{t,h} = C_t S_t

The cores take their inputs already scaled by the family (`gate` / `_prepare`), so the
inputs are drawn as the families would hand them over (`draw_inputs`): retnet's k scaled
by D^-1/2 and its fixed per-head decays gamma_h = 1 - 2^(-5-h); gla's q scaled by
D^-1/2; the delta rule's q and k L2-normalised (kda's q then scaled by D^-1/2), beta in
(0, 1); log-gates uniform in [-0.1, 0]; the SSD with Mamba2's initial ranges (A in
[1, 16] per head, dt log-uniform in [1e-3, 1e-1] per token and head).

Figures per core, dtype and length (`errors`): the relative L2 error ||out - ref|| /
||ref|| and the max abs error / max |ref|, against the float64 reference of the float32
inputs (the bfloat16 run: input rounding + accumulation); for bfloat16 also against the
float64 reference of the bfloat16-ROUNDED inputs (the core's own error on the inputs it
was given: in the chunked forms mostly the bfloat16 casts of intermediates -- the C x C
matrix, the decayed q and k, the state before its read -- rather than float32
accumulation), and the error of rounding the reference output itself to bfloat16 (the
floor of any bfloat16 output; the cores return float32).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lra.models.attention import delta, gated, ssd
from lra.models.attention.linear import Form
from lra.models.attention.retnet import retnet_gammas

CORES = ("retnet", "gla", "gated_deltanet", "kda", "ssd")
DTYPES = ("float32", "bfloat16")
HEADS, DIM = 4, 64
LOG_GATE_RANGE = (-0.1, 0.0)
SSD_A_RANGE, SSD_DT_RANGE = (1.0, 16.0), (1e-3, 1e-1)
# the inputs cast to bfloat16 in the low-precision run (the gates stay float32)
LOW = {"retnet": ("q", "k", "v"), "gla": ("q", "k", "v"), "gated_deltanet": ("q", "k", "v"),
       "kda": ("q", "k", "v"), "ssd": ("C", "B", "x")}
DESCRIPTION = {
    "retnet": "retain, per-head gates (retnet: k * D^-1/2, g = log(1 - 2^(-5-h)))",
    "gla": "retain, per-channel gates (gla: q * D^-1/2, g ~ U[-0.1, 0])",
    "gated_deltanet": "delta_rule, per-head log-gates (unit q, k; beta ~ U(0, 1); "
                      "log alpha ~ U[-0.1, 0])",
    "kda": "delta_rule, per-channel log-gates (unit k, q * D^-1/2; beta ~ U(0, 1); "
           "log alpha ~ U[-0.1, 0])",
    "ssd": "grouped_ssd, one group (N = P = D; A ~ U[1, 16], dt ~ logU[1e-3, 1e-1]; "
           "g = -dt A, x = dt * N(0, 1))",
}


# --- inputs -------------------------------------------------------------------------------


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def draw_inputs(core: str, length: int, *, heads: int = HEADS, dim: int = DIM,
                seed: int = 0) -> dict[str, np.ndarray]:
    """The core's float32 inputs, [1, L, H, ...], as its family hands them over."""
    rng = np.random.default_rng([seed, CORES.index(core), length])
    normal = lambda *shape: rng.normal(size=(1, length, *shape))
    log_gate = lambda *shape: rng.uniform(*LOG_GATE_RANGE, size=(1, length, *shape))
    scale = dim**-0.5
    if core == "retnet":
        g = np.broadcast_to(np.log(retnet_gammas(heads))[:, None], (1, length, heads, 1))
        x = {"q": normal(heads, dim), "k": normal(heads, dim) * scale,
             "v": normal(heads, dim), "g": g}
    elif core == "gla":
        x = {"q": normal(heads, dim) * scale, "k": normal(heads, dim),
             "v": normal(heads, dim), "g": log_gate(heads, dim)}
    elif core in ("gated_deltanet", "kda"):
        per_channel = core == "kda"
        x = {"q": _unit(normal(heads, dim)) * (scale if per_channel else 1.0),
             "k": _unit(normal(heads, dim)), "v": normal(heads, dim),
             "beta": rng.uniform(0.0, 1.0, size=(1, length, heads)),
             "log_alpha": log_gate(heads, dim) if per_channel else log_gate(heads)}
    elif core == "ssd":
        a_H = rng.uniform(*SSD_A_RANGE, size=heads)
        lo, hi = np.log(SSD_DT_RANGE)
        dt = np.exp(rng.uniform(lo, hi, size=(1, length, heads)))
        x = {"C": normal(1, dim), "B": normal(1, dim),
             "x": normal(heads, dim) * dt[..., None], "g": -dt * a_H}
    else:
        raise ValueError(f"unknown core {core!r}; one of {CORES}")
    return {name: np.ascontiguousarray(a, np.float32) for name, a in x.items()}


def to_bfloat16(core: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs of the bfloat16 run: `LOW[core]` rounded to bfloat16, the rest as is."""
    return {name: a.astype(jnp.bfloat16) if name in LOW[core] else a
            for name, a in inputs.items()}


# --- the float64 references (token by token, vectorised over heads) ----------------------


def gated_reference(q, k, v, g):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t; [L, H, D] (g [L, H, 1 | D])."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    length, heads, dim = q.shape
    decay = np.exp(g)[..., None]  # [L, H, G, 1]
    S = np.zeros((heads, dim, v.shape[-1]))
    out = np.empty((length, heads, v.shape[-1]))
    for t in range(length):
        S *= decay[t]
        S += k[t][:, :, None] * v[t][:, None, :]
        out[t] = np.matmul(q[t][:, None, :], S)[:, 0]
    return out


def delta_reference(q, k, v, beta, log_alpha):
    """S_t = (I - beta_t k_t^T k_t) diag(alpha_t) S_{t-1} + beta_t k_t^T v_t, o_t = q_t S_t;
    q, k, v [L, H, D], beta [L, H], log_alpha [L, H] or [L, H, D]."""
    q, k, v, beta, log_alpha = (np.asarray(a, np.float64) for a in (q, k, v, beta, log_alpha))
    length, heads, dim = q.shape
    alpha = np.exp(log_alpha)
    alpha = alpha[..., None, None] if alpha.ndim == 2 else alpha[..., None]  # rows of S
    S = np.zeros((heads, dim, v.shape[-1]))
    out = np.empty((length, heads, v.shape[-1]))
    for t in range(length):
        S *= alpha[t]
        kS = np.matmul(k[t][:, None, :], S)[:, 0]  # [H, Dv]
        S += k[t][:, :, None] * (beta[t][:, None] * (v[t] - kS))[:, None, :]
        out[t] = np.matmul(q[t][:, None, :], S)[:, 0]
    return out


def ssd_reference(C, B, x, g):
    """S_t = exp(g_{t,h}) S_{t-1} + B_{t,G(h)}^T x_{t,h}, y_{t,h} = C_{t,G(h)} S_t;
    C, B [L, G, N], x [L, H, P], g [L, H]; head h in group h // (H / G)."""
    C, B, x, g = (np.asarray(a, np.float64) for a in (C, B, x, g))
    length, heads, dim = x.shape
    of_head = np.arange(heads) // (heads // C.shape[1])
    decay = np.exp(g)[..., None, None]
    S = np.zeros((heads, C.shape[-1], dim))
    out = np.empty((length, heads, dim))
    for t in range(length):
        S *= decay[t]
        S += B[t][of_head][:, :, None] * x[t][:, None, :]
        out[t] = np.matmul(C[t][of_head][:, None, :], S)[:, 0]
    return out


def reference(core: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The float64 causal output of `core` on `inputs` (batch row 0), [L, H, D]."""
    row = {name: np.asarray(a[0], np.float64) for name, a in inputs.items()}
    if core in ("retnet", "gla"):
        return gated_reference(row["q"], row["k"], row["v"], row["g"])
    if core in ("gated_deltanet", "kda"):
        return delta_reference(row["q"], row["k"], row["v"], row["beta"], row["log_alpha"])
    if core == "ssd":
        return ssd_reference(row["C"], row["B"], row["x"], row["g"])
    raise ValueError(f"unknown core {core!r}; one of {CORES}")


# --- the cores ----------------------------------------------------------------------------


def run_core(core: str, inputs: dict[str, np.ndarray], chunk_size: int) -> np.ndarray:
    """The core's causal chunked output (float32, batch row 0), [L, H, D]."""
    x = {name: jnp.asarray(a) for name, a in inputs.items()}
    if core in ("retnet", "gla"):
        out = gated.retain(x["q"], x["k"], x["v"], x["g"], form=Form.CHUNKED, causal=True,
                           chunk_size=chunk_size)
    elif core in ("gated_deltanet", "kda"):
        out = delta.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_alpha"],
                               form=delta.Form.CHUNKED, causal=True, chunk_size=chunk_size)
    elif core == "ssd":
        out = ssd.grouped_ssd(x["C"], x["B"], x["x"], x["g"], form=Form.CHUNKED, causal=True,
                              chunk_size=chunk_size)
    else:
        raise ValueError(f"unknown core {core!r}; one of {CORES}")
    out = np.asarray(jax.block_until_ready(out))
    assert out.dtype == np.float32, out.dtype
    return out[0].astype(np.float64)


def chunk_strategy(core: str) -> str:
    """The chunk strategy that `auto` resolves to on this backend (ssd has one)."""
    if core == "ssd":
        return "scan"
    per_channel = core == "gla"
    return gated.resolve_chunk_strategy("auto", batched_on_cpu=per_channel).value


# --- measurement --------------------------------------------------------------------------


def errors(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """rel_l2 = ||out - ref|| / ||ref||, max_rel = max |out - ref| / max |ref|."""
    diff = np.asarray(out, np.float64) - ref
    return {"rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
            "max_rel": float(np.max(np.abs(diff)) / np.max(np.abs(ref)))}


def measure(core: str, length: int, *, chunk_size: int = 64, seed: int = 0,
            heads: int = HEADS, dim: int = DIM, dtypes=DTYPES) -> list[dict]:
    """One record per dtype (module docstring)."""
    inputs = draw_inputs(core, length, heads=heads, dim=dim, seed=seed)
    start = time.perf_counter()
    ref = reference(core, inputs)
    ref_seconds = time.perf_counter() - start
    records = []
    for dtype in dtypes:
        given = inputs if dtype == "float32" else to_bfloat16(core, inputs)
        start = time.perf_counter()
        out = run_core(core, given, chunk_size)
        record = {"core": core, "dtype": dtype, "length": length, "chunk_size": chunk_size,
                  "chunk_strategy": chunk_strategy(core),
                  "core_seconds": time.perf_counter() - start,  # compile included
                  "ref_max_abs": float(np.max(np.abs(ref))), **errors(out, ref)}
        if dtype == "float32":
            record.update(rel_l2_rounded=None, max_rel_rounded=None, rel_l2_output_floor=None,
                          max_rel_output_floor=None, ref_seconds=ref_seconds)
        else:
            start = time.perf_counter()
            ref_rounded = reference(core, given)
            rounded = errors(out, ref_rounded)
            floor = errors(ref.astype(jnp.bfloat16), ref)
            record.update(rel_l2_rounded=rounded["rel_l2"], max_rel_rounded=rounded["max_rel"],
                          rel_l2_output_floor=floor["rel_l2"],
                          max_rel_output_floor=floor["max_rel"],
                          ref_seconds=time.perf_counter() - start)
        records.append(record)
    return records


def _e(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def markdown(result: dict) -> str:
    """The table of `result` (as written to precision.json)."""
    setup = result["setup"]
    lines = [
        "# Precision of the gated, delta-rule and SSD cores vs a float64 recurrence",
        "",
        (f"Causal chunked form, chunk {setup['chunk_size']}, B = 1, H = {setup['heads']}, "
         f"D = {setup['dim']}, seed {setup['seed']}, backend {setup['backend']} "
         f"(JAX {setup['jax']}). bfloat16: q, k, v (SSD: C, B, dt x) cast to bfloat16, "
         "gates float32, float32 accumulation and state; the cores return float32."),
        "",
        ("- err = ||out - ref|| / ||ref|| (relative L2); max = max |out - ref| / max |ref|; "
         "ref = float64 token-by-token recurrence of the float32 inputs."),
        ("- vs rounded: against the float64 reference of the bfloat16-rounded inputs "
         "(the core's own error without the input rounding: its bfloat16 casts of "
         "intermediates and float32 accumulation)."),
        "- output floor: the error of rounding the float64 reference itself to bfloat16.",
        "",
        ("| core | L | dtype | err | max | err vs rounded | max vs rounded "
         "| output floor (err / max) | core s | ref s |"),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["records"]:
        floor = ("—" if r["rel_l2_output_floor"] is None
                 else f"{_e(r['rel_l2_output_floor'])} / {_e(r['max_rel_output_floor'])}")
        lines.append(
            f"| {r['core']} | {r['length']} | {r['dtype']} | {_e(r['rel_l2'])} "
            f"| {_e(r['max_rel'])} | {_e(r['rel_l2_rounded'])} | {_e(r['max_rel_rounded'])} "
            f"| {floor} | {r['core_seconds']:.2f} | {r['ref_seconds']:.2f} |")
    lines += ["", "Cores:", ""]
    lines += [f"- {core}: {DESCRIPTION[core]}; chunk strategy {strategy}"
              for core, strategy in setup["chunk_strategies"].items()]
    lines += ["", f"Total time {result['seconds']:.1f} s (core times include compilation).", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lra.bench.precision",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,16384",
                        help="comma-separated sequence lengths")
    parser.add_argument("--out", required=True, help="folder for precision.json / .md")
    parser.add_argument("--cores", default=",".join(CORES), help=f"subset of {CORES}")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    cores = [c for c in args.cores.split(",") if c]
    for core in cores:
        if core not in CORES:
            parser.error(f"unknown core {core!r}; one of {CORES}")
    start = time.perf_counter()
    records = []
    for core in cores:
        for length in lengths:
            for r in measure(core, length, chunk_size=args.chunk_size, seed=args.seed,
                             heads=args.heads, dim=args.dim):
                records.append(r)
                print(f"{core:15s} L={length:6d} {r['dtype']:9s} err {_e(r['rel_l2'])} "
                      f"max {_e(r['max_rel'])} vs-rounded {_e(r['rel_l2_rounded'])} "
                      f"({r['core_seconds']:.1f} s core, {r['ref_seconds']:.1f} s ref)",
                      flush=True)
    result = {
        "setup": {"lengths": lengths, "cores": cores, "chunk_size": args.chunk_size,
                  "heads": args.heads, "dim": args.dim, "seed": args.seed, "batch": 1,
                  "backend": jax.default_backend(), "jax": jax.__version__,
                  "chunk_strategies": {c: chunk_strategy(c) for c in cores},
                  "descriptions": {c: DESCRIPTION[c] for c in cores},
                  "log_gate_range": LOG_GATE_RANGE, "ssd_a_range": SSD_A_RANGE,
                  "ssd_dt_range": SSD_DT_RANGE},
        "records": records,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "precision.md").write_text(markdown(result))
    print(f"wrote {out / 'precision.json'} and {out / 'precision.md'} "
          f"({result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
