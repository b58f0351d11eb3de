"""The recall report: token-task accuracy against model width and against the mixer's
recurrent state, one panel per task setting, as Zoology's Figure 2 (Arora et al., 2024).

`python -m lra.report` calls `write_recall` for the runs of a token task (objective
`token_classify`: MQAR, MAD, induction heads) and writes, beside the LRA report:

- recall.md: per setting (task, sequence length and, for MQAR, key-value pairs), a table
  of mixers x widths with the test accuracy (mean +- std over seeds, n) and the state size;
- recall.csv: one line per (setting, mixer, width);

Runs of one mixer and width at several learning rates count as Zoology counts them: the
point is the learning rate with the best mean accuracy over its seeds (Zoology reports
"the maximum performance for each model over four learning rates"); the table names it.
- recall.png: top row accuracy against width, bottom row accuracy against state size (bytes
  per layer per sequence, log scale), one column per setting.

The state size is what the run recorded (results.json `state_bytes_per_layer`, from the
mixer registry's `mixers.state_size`): the bytes a causal mixer carries from one token to
the next. Exact attention has no fixed state: its KV cache grows with the length, so its
point is the cache at the setting's length, drawn hollow and marked "grows with length".
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from lra.models import pattern
from lra.training import train

# The task settings that make two token-task runs different panels (those a task has).
PANEL_SETTINGS = ("seq_len", "num_kv_pairs", "test_seq_len")
CSV_COLUMNS = ("task", "setting", "mixer", "width", "learning_rate", "mean", "std", "n_seeds",
               "state_bytes_per_layer", "state_grows_with_length")


@dataclasses.dataclass
class Point:
    """The runs of one mixer at one width in one setting (seeds pooled)."""

    task: str
    setting: str  # e.g. "seq_len=256, num_kv_pairs=16"
    mixer: str
    width: int
    state_bytes: float | None
    grows_with_length: bool
    values: list[float]  # accuracy (%) of each seed
    learning_rate: float = math.nan  # the best of those tried

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0


def is_token_run(run) -> bool:
    """A finished run of a token task (objective token_classify)."""
    return run.get("objective", "classify") == "token_classify"


def setting_text(settings: dict) -> str:
    return ", ".join(f"{key}={settings[key]}" for key in PANEL_SETTINGS if key in settings)


def recall_points(runs: Sequence, metric: str) -> list[Point]:
    """The finished token-task runs grouped by (task, setting, mixer, width), at the best
    learning rate of each group."""
    points: dict[tuple, Point] = {}
    for run in runs:
        if run.status != "finished" or not is_token_run(run):
            continue
        value = run.results.get(metric)
        if value is None or not math.isfinite(value):
            continue
        results = run.results
        setting = setting_text(results.get("task_settings") or {})
        width = int((run.config.get("model") or {}).get("emb_dim", 0))
        mixer = pattern.recorded_label(run.config.get("model") or {}, run.get("attention"))
        key = (run.get("task"), setting, mixer, width)
        learning_rate = float(run.config.get("learning_rate", math.nan))
        state = _recorded_state(run)
        point = points.setdefault((*key, learning_rate), Point(
            *key, state.get("state_bytes_per_layer"),
            bool(state.get("state_grows_with_length")), [], learning_rate))
        point.values.append(100.0 * value)
    best: dict[tuple, Point] = {}
    for (*key, _), point in points.items():
        if tuple(key) not in best or point.mean > best[tuple(key)].mean:
            best[tuple(key)] = point
    numbers = lambda setting: tuple(int(x) for x in re.findall(r"\d+", setting))
    return sorted(best.values(), key=lambda p: (p.task, numbers(p.setting), p.mixer, p.width))


def _recorded_state(run) -> dict:
    """The run's state size as results.json records it, or, for a run made before it did,
    from its mixer in the config (`lra.training.train.recurrent_state`); {} if neither."""
    if "state_bytes_per_layer" in run.results:
        return run.results
    try:
        return train.recurrent_state(ml_collections.ConfigDict(run.config))
    except (ValueError, KeyError, AttributeError, TypeError):
        return {}


def panels(points: Sequence[Point]) -> dict[tuple[str, str], list[Point]]:
    grouped: dict[tuple[str, str], list[Point]] = {}
    for point in points:
        grouped.setdefault((point.task, point.setting), []).append(point)
    return grouped


def _bytes(value: float | None, grows: bool) -> str:
    if value is None:
        return "-"
    text = f"{value / 1024:,.1f} KiB"
    return text + " (grows with length)" if grows else text


def recall_markdown(points: Sequence[Point], metric: str) -> str:
    """One table per setting: mixers x widths, accuracy and state size."""
    sections = []
    for (task, setting), group in panels(points).items():
        widths = sorted({p.width for p in group})
        mixers = sorted({p.mixer for p in group}, key=lambda m: -max(
            p.mean for p in group if p.mixer == m))
        cell = {(p.mixer, p.width): p for p in group}
        header = "| Mixer | " + " | ".join(f"width {w}: {metric} % | state" for w in widths) + " |"
        lines = [f"### {task}: {setting}", "", header, "|---|" + "---|---|" * len(widths)]
        for mixer in mixers:
            cells = []
            for width in widths:
                point = cell.get((mixer, width))
                if point is None:
                    cells += ["-", "-"]
                    continue
                spread = f" ± {point.std:.1f}" if len(point.values) > 1 else ""
                cells += [f"{point.mean:.1f}{spread} (n={len(point.values)}, "
                          f"lr {point.learning_rate:.2g})",
                          _bytes(point.state_bytes, point.grows_with_length)]
            lines.append(f"| {mixer} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def plot_recall(points: Sequence[Point], path: Path) -> None:
    """Top row: accuracy vs width; bottom row: accuracy vs state bytes; a column per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    grouped = panels(points)
    mixers = sorted({p.mixer for p in points})
    palette = plt.get_cmap("tab20")  # 11 mixers and more stay apart
    colors = {m: palette(i % 20) for i, m in enumerate(mixers)}
    figure, axes = plt.subplots(2, len(grouped), figsize=(4.2 * len(grouped), 7), squeeze=False)
    for column, ((task, setting), group) in enumerate(grouped.items()):
        top, bottom = axes[0, column], axes[1, column]
        for mixer in mixers:
            own = sorted((p for p in group if p.mixer == mixer), key=lambda p: p.width)
            if not own:
                continue
            grows = own[0].grows_with_length
            style = dict(color=colors[mixer], marker="o", markerfacecolor="none" if grows else None)
            top.errorbar([p.width for p in own], [p.mean for p in own],
                         [p.std for p in own], label=mixer, capsize=2, **style)
            sized = [p for p in own if p.state_bytes]
            bottom.plot([p.state_bytes for p in sized], [p.mean for p in sized],
                        label=mixer + (" (grows with length)" if grows else ""), **style)
        top.set_title(f"{task}: {setting}", fontsize=9)
        top.set_xscale("log", base=2)
        top.set_xlabel("model width")
        bottom.set_xscale("log")
        # Labels at the decades only: within one decade matplotlib labels the minor
        # ticks too, and they overlap.
        bottom.xaxis.set_minor_formatter(NullFormatter())
        bottom.set_xlabel("state per layer per sequence (bytes)")
        for axis in (top, bottom):
            axis.set_ylabel("test accuracy (%)")
            axis.set_ylim(-2, 102)
            axis.grid(alpha=0.3)
    legend = {}  # every mixer once, from whichever panels show it
    for axis in axes[1]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    figure.legend(list(legend.values()), list(legend), fontsize=7, loc="center right")
    figure.tight_layout(rect=(0, 0, 0.82 if len(grouped) > 1 else 0.72, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_recall(runs: Sequence, out: Path, metric: str) -> tuple[str, list[Path]]:
    """recall.md, recall.csv, recall.png in `out` for the token-task runs ("" and no files
    when there are none)."""
    points = recall_points(runs, metric)
    if not points:
        return "", []
    text = recall_markdown(points, metric)
    paths = [out / "recall.md", out / "recall.csv", out / "recall.png"]
    paths[0].write_text("# Recall: accuracy against width and state size\n\n" + text
                        + "\n![recall](recall.png)\n")
    with paths[1].open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for p in points:
            writer.writerow({"task": p.task, "setting": p.setting, "mixer": p.mixer,
                             "width": p.width, "learning_rate": p.learning_rate,
                             "mean": round(p.mean, 3), "std": round(p.std, 3),
                             "n_seeds": len(p.values), "state_bytes_per_layer": p.state_bytes,
                             "state_grows_with_length": p.grows_with_length})
    plot_recall(points, paths[2])
    return text, paths
