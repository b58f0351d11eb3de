"""Tables and plots of `lra.bench` records: Markdown in the layout of the LRA paper's
speed/memory table (Tay et al. 2021, Table 2) and log-log plots of time and memory vs length.
"""

from __future__ import annotations

from pathlib import Path

_MIB = 2**20


def length_label(length: int) -> str:
    """1024 -> '1K', 16384 -> '16K', 1000 -> '1000'."""
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def mib(num_bytes: int) -> str:
    """Bytes as MiB with 3 significant digits or thousands separators."""
    return _num(num_bytes / _MIB)


def _by_scope(records: list[dict]) -> dict[str, list[dict]]:
    scopes: dict[str, list[dict]] = {}
    for r in records:
        scopes.setdefault(r["scope"], []).append(r)
    return scopes


def _grid(records: list[dict]):
    lengths = sorted({r["length"] for r in records})
    names = list(dict.fromkeys(r["attention"] for r in records))
    return lengths, names, {(r["attention"], r["length"]): r for r in records}


def _title(scope: str, records: list[dict]) -> str:
    r = records[0]
    common = f"batch {r['batch']}, {r['dtype']}{', causal' if r['causal'] else ''}, {r['device']}"
    if scope == "step":
        layers = f"{r['num_layers']} layer{'s' if r['num_layers'] != 1 else ''}"
        return (f"### Training step: encoder of {layers}, width {r['emb_dim']}, "
                f"{r['heads']} heads x {r['head_dim']}, MLP {r['mlp_dim']}; {common}")
    return f"### Attention layer, forward + backward: {r['heads']} heads x {r['head_dim']}; {common}"


def _speed_cell(r: dict | None, softmax: dict | None) -> str:
    if r is None:
        return ""
    if r["oom"]:
        return "OOM"
    steps = _num(r["steps_per_s"])
    if r["speedup_vs_softmax"] is not None:
        return f"{steps} ({r['speedup_vs_softmax']:.1f}x)"
    return f"{steps} (softmax {'OOM' if softmax is not None else 'not measured'})"


def _memory_cell(r: dict | None, softmax: dict | None) -> str:
    if r is None:
        return ""
    mib = r["peak_bytes"] / _MIB if r["peak_bytes"] is not None else None
    if r["oom"]:
        return f"OOM (needs {_num(mib)})" if mib is not None else "OOM"
    if softmax is not None and not softmax["oom"] and softmax["peak_bytes"]:
        return f"{_num(mib)} ({r['peak_bytes'] / softmax['peak_bytes']:.2f}x)"
    return _num(mib)


def _efficiency_cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["oom"]:
        return "OOM"
    parts = [f"{r['time_ms']:,.1f} ms"]
    parts.append(f"{r['speedup_vs_exact']:.1f}x" if r["speedup_vs_exact"] is not None else "-")
    fraction = r["matmul_fraction"]
    parts.append(f"{100 * fraction:.0f}%" if fraction is not None else "-")
    return ", ".join(parts)


def _row(name: str, cells: list[str]) -> str:
    return f"| {name} | " + " | ".join(cells) + " |"


def scope_markdown(scope: str, records: list[dict]) -> str:
    """The two tables of one scope: LRA layout (steps/s, memory) and time / efficiency."""
    if all(r["time_ms"] is None and not r["oom"] for r in records):  # --depth_only
        return "\n".join([_title(scope, records), "", depth_markdown(records)])
    lengths, names, cells = _grid(records)
    labels = [length_label(n) for n in lengths]
    softmax = {n: cells.get(("softmax", n)) for n in lengths}
    lines = [_title(scope, records), "",
             "Steps per second (speed-up vs softmax) and peak memory in MiB (ratio to softmax):",
             "",
             _row("attention", [f"steps/s {x}" for x in labels] + [f"MiB {x}" for x in labels]),
             "|---" * (2 * len(lengths) + 1) + "|"]
    for name in names:
        row = [_speed_cell(cells.get((name, n)), softmax[n]) for n in lengths]
        row += [_memory_cell(cells.get((name, n)), softmax[n]) for n in lengths]
        lines.append(_row(name, row))
    fastest = []
    for n, label in zip(lengths, labels):
        baseline = next((cells[(m, n)]["exact_baseline"] for m in names
                         if (m, n) in cells and cells[(m, n)]["exact_baseline"]), None)
        fastest.append(f"{label}: {baseline or 'none measured'}")
    note = ("Time per step, speed-up vs the fastest exact attention measured at that length "
            f"({'; '.join(fastest)}), and matrix-product FLOP/s as a share of the device's "
            "measured matmul FLOP/s:")
    lines += ["", note, "", _row("attention", labels), "|---" * (len(lengths) + 1) + "|"]
    lines += [_row(name, [_efficiency_cell(cells.get((name, n))) for n in lengths])
              for name in names]
    sources = sorted({r["memory_source"] for r in records if not r["oom"]})
    lines += ["", f"Memory source: {', '.join(sources) or 'compiled'} (see `memory_source`)."]
    if any("depth_forward" in r for r in records):  # (records written before depths)
        lines += ["", depth_markdown(records)]
    return "\n".join(lines)


def _depth_cell(r: dict | None) -> str:
    if r is None:
        return ""
    return " / ".join("?" if r.get(key) is None else f"{r[key]:,}"
                      for key in ("depth_forward", "depth_backward"))


def depth_markdown(records: list[dict]) -> str:
    """One scope's sequential depths (lra/bench/depth.py): rows = entries, columns =
    lengths, cells `forward / backward`."""
    lengths, names, cells = _grid(records)
    title = ("Sequential depth (forward / backward): loop iterations run one after another "
             "(? = unknown):")
    lines = [title, "", _row("attention", [length_label(n) for n in lengths]),
             "|---" * (len(lengths) + 1) + "|"]
    lines += [_row(name, [_depth_cell(cells.get((name, n))) for n in lengths])
              for name in names]
    return "\n".join(lines)


def markdown(records: list[dict]) -> str:
    """All scopes' tables, layer first; the matmul reference rate on the first line."""
    if not records:
        return "(no records)"
    rate = records[0].get("matmul_flops_per_s")
    head = (f"Reference: a large matmul runs at {rate / 1e9:,.1f} GFLOP/s on "
            f"{records[0]['device']}." if rate else "")
    parts = [head] if head else []
    for scope, group in _by_scope(records).items():
        if scope == "loop":
            parts.append(loop_markdown(group))
        elif scope == "longest":
            parts.append(longest_markdown(group))
        else:
            parts.append(scope_markdown(scope, group))
    return "\n\n".join(parts)


def _longest_cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["longest_length"] is None:
        return f"error: {_short(r['error'])}" if r["error"] else "none fits"
    length = length_label(r["longest_length"])
    if r["time_ms"] is None:
        return f"{length} / OOM when run / {mib(r['compiled_peak_bytes'])}"
    return f"{length} / {r['time_ms']:,.0f} / {mib(r['compiled_peak_bytes'])}"


def _short(text: str, limit: int = 90) -> str:
    text = text.splitlines()[0].replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def longest_markdown(records: list[dict]) -> str:
    """The longest scope (lra/bench/longest.py): rows = entries, a column per seq, cells
    `longest L / step ms / MiB per device`."""
    r = records[0]
    seqs = sorted({x["seq"] for x in records})
    names = list(dict.fromkeys(x["attention"] for x in records))
    cells = {(x["attention"], x["seq"]): x for x in records}
    layers = f"{r['num_layers']} layer{'s' if r['num_layers'] != 1 else ''}"
    title = (f"### Longest trainable length: encoder of {layers}, width {r['emb_dim']}, "
             f"{r['heads']} heads x {r['head_dim']}, MLP {r['mlp_dim']}; {r['dtype']}"
             f"{', causal' if r['causal'] else ''}; {r['devices']} devices, one sequence per "
             f"data shard (devices / seq), budget {mib(r['memory_budget_bytes'])} MiB per "
             f"device; {r['device']}")
    note = ("Longest length whose training step's compiled peak fits the budget / time per "
            "step in ms / compiled peak in MiB per device:")
    lines = [title, "", note, "",
             _row("attention", [f"seq = {s}" for s in seqs]), "|---" * (len(seqs) + 1) + "|"]
    lines += [_row(name, [_longest_cell(cells.get((name, s))) for s in seqs]) for name in names]
    over = [f"{x['attention']} seq={x['seq']}: {length_label(x['next_length'])} needs "
            f"{mib(x['next_peak_bytes'])}" for x in records
            if x["next_length"] is not None and x["next_peak_bytes"] is not None]
    if over:
        lines += ["", "The next length, over the budget (MiB per device): " + "; ".join(over)
                  + "."]
    return "\n".join(lines)


def loop_markdown(records: list[dict]) -> str:
    """The loop scope: steps/s through the training loop, of the bare step, host share."""
    lines = [f"### Training loop ({records[0]['device']})", "",
             "| config | task / attention | batch x length | loop steps/s | bare step steps/s "
             "| host share |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['task']} / {r['attention']} | {r['batch']} x {r['length']} "
              f"| {_num(r['steps_per_s'])} | {_num(r['step_steps_per_s'])} "
              f"| {100 * r['host_share']:.1f}% |" for r in records]
    return "\n".join(lines)


def plot(records: list[dict], out: str | Path) -> list[Path]:
    """Writes OUT/bench_<scope>.png (layer, step): log-log time and peak memory vs length,
    one line per attention; an out-of-memory point is an x at the memory it would have
    needed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = []
    for scope, group in _by_scope(records).items():
        if scope in ("loop", "longest"):  # one point per config / entry: the table says it all
            continue
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        _draw(group, *axes)
        figure.suptitle(_title(scope, group).removeprefix("### "), fontsize=9)
        figure.tight_layout()
        paths.append(Path(out) / f"bench_{scope}.png")
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)
    return paths


def _draw(records: list[dict], time_axis, memory_axis) -> None:
    from matplotlib.ticker import FuncFormatter

    lengths, names, cells = _grid(records)
    for index, name in enumerate(names):
        color = f"C{index % 10}"
        rows = [cells[(name, n)] for n in lengths if (name, n) in cells]
        ran = [r for r in rows if not r["oom"]]
        needed = [r for r in rows if r["oom"] and r["peak_bytes"]]
        if ran:
            x = [r["length"] for r in ran]
            time_axis.plot(x, [r["time_ms"] for r in ran], "o-", color=color, label=name)
            memory_axis.plot(x, [r["peak_bytes"] / _MIB for r in ran], "o-", color=color,
                             label=name)
        if needed:
            memory_axis.plot([r["length"] for r in needed],
                             [r["peak_bytes"] / _MIB for r in needed], "x", color=color)
    for axis, label in ((time_axis, "time per step (ms)"), (memory_axis, "peak memory (MiB)")):
        axis.set_xscale("log", base=2)
        if axis.lines:
            axis.set_yscale("log")
            axis.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        else:
            axis.text(0.5, 0.5, "nothing ran (out of memory)", ha="center",
                      transform=axis.transAxes)
        axis.set_xticks(lengths, [length_label(n) for n in lengths])
        axis.set_xlabel("sequence length")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    if time_axis.lines:
        time_axis.legend(fontsize=7, ncol=2)
