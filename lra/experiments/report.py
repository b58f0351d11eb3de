"""Compare runs: `python -m lra.report ROOT... [--out DIR]`.

Reads every run folder below the given roots (a folder holding results.json, metrics.jsonl,
config.json or failed.json; see docs/architecture.md for the workdir layout) and writes to --out
(default ROOT/report for the first root):

- report.md and results.csv: task x mixer test accuracy (%), mean +- sample std over seeds
  with the number of seeds, the average over the tasks present, and under each row its
  published row (lra/presets/long_range_arena.py): LRA Table 1's row of the same attention, or the paper's
  row of a sequence model (S5, S4D-Inv, S4D-LegS, LRU) when the runs used the mixer
  settings that row ran (e.g. s4d with init=inv); and whether the runs used the released
  settings behind it (LRA's config for that task and attention, or S5's run script,
  lra/presets/s5.py: the published number is comparable), else which config keys
  differ; an ours-cell within seed noise of the published value is marked;
- accuracy.png (bars with error bars per task, published values as markers) and
  val_accuracy.png (validation accuracy vs step, mean over seeds +- std);
- recall.md, recall.csv and recall.png for the runs of token tasks (MQAR, MAD, induction
  heads; lra/experiments/recall.py): accuracy against width and against the mixer's
  recurrent state size, one panel per setting, as Zoology's Figure 2; those runs stay out
  of the LRA table;
- runs.csv and a Runs section: one line per run with its mixer and the kind of model that
  ran (results.json `mixer_kind`: an attention core in the attention wrapper, or a sequence
  model), parameters, steps/s and wall time.

A row's label is the mixer's name; a run whose recorded kind or options are not those of
the model that name builds today (e.g. a run of the attention `mamba2`, the SSD core now
named `ssd`, made before `mamba2` named the whole Mamba2 block) says so in its label.

Runs that failed or have not finished (running, or stopped and resumable) are listed with
the reason, never dropped silently. The Markdown table also goes to stdout.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lra.experiments import recall
from lra.models import mixers, pattern
from lra.presets import long_range_arena
from lra.presets import s5 as s5_preset
from lra.presets import spt as spt_preset
from lra.presets.long_range_arena import (  # noqa: F401 (public here too)
    LRA_SOURCE,
    LRA_TABLE1,
    PUBLISHED_ROW,
    SEQUENCE_ROWS,
    SEQUENCE_TABLE,
    Published,
    published_for,
)
from lra.training import workdir

RESULTS_FILE, CONFIG_FILE, METRICS_FILE, FAILED_FILE = (
    "results.json", "config.json", "metrics.jsonl", "failed.json")
RUN_FILES = (RESULTS_FILE, CONFIG_FILE, METRICS_FILE, FAILED_FILE)
SKIPPED_FOLDERS = ("checkpoints", "checkpoints_unreadable")
# A run without results whose files changed this recently counts as running.
RUNNING_SECONDS = 15 * 60
NOISE_MARK = "≈"
METRICS = ("test_accuracy_at_best", "test_accuracy")
# Config keys that never make two runs different variants: seeds are pooled, task and
# attention are the table's axes (and lra.training.train.RESUMABLE_CHANGES cannot change results).
POOLED_KEYS = ("seed", "task", "attention")

# Published.released -> the function that lists the keys in which a run's config differs
# from those released settings (None: none released for the run).
RELEASED_SETTINGS = {"LRA": long_range_arena.differences, "S5": s5_preset.differences}

# Task registry name -> column title, in LRA's order.
TASKS = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval", "image": "Image",
         "pathfinder": "Pathfinder", "pathx": "Path-X"}

# ---------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class Run:
    """One run folder and what it holds."""

    path: Path
    name: str  # relative to its root
    status: str  # finished | running | unfinished | failed
    reason: str  # why it is not finished ("" when it is)
    config: dict
    results: dict | None
    metrics: list
    label: str = ""  # the table row: attention [+ the settings that tell variants apart]

    def get(self, key: str, default=None):
        """A value from results.json, else config.json."""
        if self.results and key in self.results:
            return self.results[key]
        return self.config.get(key, default)

    @property
    def spt(self) -> bool:
        """True for a self-pretraining protocol run (pretrained, then fine-tuned)."""
        return (self.config.get("spt") or {}).get("pretrain_steps", 0) > 0

    @property
    def pretraining(self) -> bool:
        """True for a run of a pretraining objective (no classification accuracy)."""
        return self.get("objective", "classify") in ("causal_lm", "masked_lm")


def find_runs(roots: Sequence[str | Path]) -> list[Run]:
    """Every run folder below the roots (a root may itself be a run), sorted by path.

    Raises:
      FileNotFoundError: a root does not exist.
    """
    runs = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder; give sweep roots or run folders")
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED_FOLDERS)
            if any(name in files for name in RUN_FILES):
                path = Path(folder)
                runs.append(load_run(path, str(path.relative_to(root)) if path != root
                                     else root.name))
                if runs[-1].spt:  # its phases (pretrain/, finetune/) are parts of it
                    subfolders[:] = []
    return runs


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _read_metrics(path: Path) -> tuple[list[dict], str]:
    records, problem = [], ""
    if not path.exists():
        return records, problem
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            problem = f"{path.name} line {number} is not JSON"
    return records, problem


def load_run(path: Path, name: str) -> Run:
    """Reads one run folder and decides its status."""
    try:
        config = _read_json(path / CONFIG_FILE) or {}
        results = _read_json(path / RESULTS_FILE)
        failed = _read_json(path / FAILED_FILE)
    except (json.JSONDecodeError, OSError) as error:
        return Run(path, name, "failed", f"unreadable file: {error}", {}, None, [])
    metrics, problem = _read_metrics(path / METRICS_FILE)
    run = Run(path, name, "finished", "", config, results, metrics)
    steps = config.get("num_train_steps")
    if results is not None and (steps is None or results.get("step") == steps):
        return run
    last_step = max((r.get("step", 0) for r in metrics), default=0)
    not_finite = next((r for r in metrics if any(
        isinstance(v, float) and not math.isfinite(v) for v in r.values())), None)
    if failed is not None:
        tail = [line for line in failed.get("stderr_tail", []) if line.strip()]
        run.status, run.reason = "failed", (f"exit status {failed.get('returncode')}: "
                                            f"{tail[-1] if tail else 'no stderr'}")
    elif not_finite is not None:
        run.status = "failed"
        run.reason = f"non-finite {not_finite.get('split')} metrics at step {not_finite['step']}"
    elif problem:
        run.status, run.reason = "failed", problem
    else:
        age = time.time() - max(p.stat().st_mtime for p in path.iterdir())
        of = f" of {steps}" if steps else ""
        run.status = "running" if age < RUNNING_SECONDS else "unfinished"
        run.reason = (f"at step {last_step}{of}, last written {_duration(age)} ago"
                      + ("" if run.status == "running" else "; relaunch its command to resume"))
    return run


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return str(datetime.timedelta(seconds=round(seconds)))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def mixer_label(run: Run) -> str:
    """The run's mixer name, marked when what ran is not what that name builds today.

    A run records its mixer's kind (results.json `mixer_kind`) and options (config.json
    `model.attention_options`); a recorded kind other than the registry's, or options the
    mixer does not accept, mean the name stood for another model when the run was made.
    """
    name = str(run.get("attention", "?"))
    model = run.config.get("model") or {}
    if name in mixers.NAMES and model.get("mixer_pattern"):
        return pattern.recorded_label(model, name)  # e.g. "gated_deltanet x3 + softmax"
    if name not in mixers.NAMES:
        return name
    recorded = (run.results or {}).get("mixer_kind")
    if recorded is not None and recorded != mixers.kind(name):
        return f"{name} (ran as {recorded}, not today's {mixers.describe(name)})"
    options = (run.config.get("model") or {}).get("attention_options") or {}
    foreign = sorted(set(options) - set(mixers.family_options(name)))
    if foreign:
        return (f"{name} (options {', '.join(foreign)}: another model than today's "
                f"{mixers.describe(name)})")
    return name


def assign_labels(runs: Sequence[Run]) -> None:
    """Labels each run with its mixer (`mixer_label`) plus the config settings that tell
    apart runs of the same task and mixer (e.g. "softmax [model.num_layers=2]"); seeds are
    pooled."""
    flat = [_flatten(workdir.canonical(run.config)) for run in runs]
    names = [mixer_label(run) for run in runs]
    groups: dict[tuple, list[dict]] = {}
    for run, name, config in zip(runs, names, flat):
        groups.setdefault((run.get("task"), name, run.spt), []).append(config)
    varying = set()
    for configs in groups.values():
        keys = set().union(*configs)
        varying |= {k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1}
    from lra.training import train

    varying = sorted(varying - set(POOLED_KEYS) - set(train.RESUMABLE_CHANGES))
    for run, name, config in zip(runs, names, flat):
        settings = [f"{k}={config[k]}" for k in varying if k in config]
        run.label = (name + (" + SPT" if run.spt else "")
                     + (f" [{', '.join(settings)}]" if settings else ""))


# ---------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass
class Cell:
    """Our test accuracies (%) of one label and task, one per seed."""

    values: list

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (ddof=1); NaN for one seed."""
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

    def within_noise(self, published: float | None) -> bool:
        """|ours - published| <= 2 std over seeds (needs at least two seeds)."""
        return published is not None and self.n > 1 and abs(self.mean - published) <= 2 * self.std


@dataclasses.dataclass
class Table:
    tasks: list  # registry names, in column order
    rows: dict  # label -> {"attention": str, "cells": {task: Cell}, "configs": {task: dict}}
    metric: str


def released_differences(row: dict, task: str) -> list[str] | None:
    """Keys in which a row's runs on `task` differ from the released settings behind its
    published row (LRA's or S5's): None if none were released for it (or no run), [] if
    the published number is comparable."""
    config = row.get("configs", {}).get(task)
    reference = reference_for(row)
    if config is None or reference is None or reference.released is None:
        return None
    return RELEASED_SETTINGS[reference.released](config)


def _released_cell(row: dict, task: str) -> str:
    differ = released_differences(row, task)
    if differ is None:
        return "-"
    return "comparable" if not differ else "settings differ: " + ", ".join(differ)


def summarize(runs: Sequence[Run], metric: str = METRICS[0]) -> Table:
    """Groups the finished runs by label and task."""
    rows: dict[str, dict] = {}
    for run in runs:
        if run.status != "finished" or run.pretraining or recall.is_token_run(run):
            continue
        value = run.results.get(metric)
        if value is None or not math.isfinite(value):
            continue
        row = rows.setdefault(run.label, {"attention": run.get("attention"), "cells": {},
                                          "configs": {}, "spt": run.spt})
        row["cells"].setdefault(run.get("task"), Cell([])).values.append(100.0 * value)
        row["configs"].setdefault(run.get("task"), run.config)  # seeds differ in seed only
    present = {task for row in rows.values() for task in row["cells"]}
    tasks = [t for t in TASKS if t in present] + sorted(present - set(TASKS))
    # LRA's row order first, then the sequence models with published rows.
    order = {name: index for index, name in enumerate((*PUBLISHED_ROW, *SEQUENCE_ROWS))}
    labels = sorted(rows, key=lambda label: (order.get(rows[label]["attention"], len(order)),
                                             label))
    return Table(tasks, {label: rows[label] for label in labels}, metric)


def reference_for(row: dict) -> Published | None:
    """The published row a table row compares with: Amos et al.'s SPT row for "+ SPT"
    rows of exact attention, else the mixer's row (lra/presets/long_range_arena.py `published_for`) whose
    settings all the row's runs used: LRA Table 1's for attention, a paper's row for a
    sequence model."""
    if row.get("spt"):
        return spt_preset.published_for(row["attention"])
    return published_for(row["attention"], list(row.get("configs", {}).values()))


def settings_text(published: Published) -> str:
    """The mixer settings a published row ran, as "init=inv, bidirectional=True"."""
    return ", ".join(f"{path.rsplit('.', 1)[-1]}={value}" for path, value in published.settings)


def _published_title(published: Published) -> str:
    settings = settings_text(published)
    return published.model + (f" [{settings}]" if settings else "")


def _published_average(published: Published, tasks: Sequence[str]) -> float | None:
    values = [published.accuracy.get(t) for t in tasks]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def table_rows(table: Table) -> list[dict]:
    """The table as records (what results.csv holds): our cells, averages and published."""
    records = []
    for label, row in table.rows.items():
        cells, published = row["cells"], reference_for(row)
        tasks = [t for t in table.tasks if t in cells]
        for task in tasks:
            reference = published.accuracy.get(task) if published else None
            cell = cells[task]
            records.append({"label": label, "attention": row["attention"], "source": "ours",
                            "task": task, "mean": cell.mean, "std": cell.std, "n_seeds": cell.n,
                            "published": reference, "within_seed_noise": cell.within_noise(
                                reference)})
        records.append({"label": label, "attention": row["attention"], "source": "ours",
                        "task": "average", "mean": float(np.mean([cells[t].mean for t in tasks])),
                        "std": math.nan, "n_seeds": min(cells[t].n for t in tasks),
                        "published": published and _published_average(published, tasks),
                        "within_seed_noise": False})
        if published:
            for task in tasks:
                differ = released_differences(row, task)
                records.append({"label": label, "attention": row["attention"],
                                "source": f"published: {published.model}", "task": task,
                                "mean": published.accuracy.get(task), "std": math.nan,
                                "n_seeds": None, "published": None, "within_seed_noise": False,
                                "comparable": None if differ is None else not differ,
                                "settings_differ": "; ".join(differ or ()),
                                "published_settings": settings_text(published)})
    return records


def _ours_cell(cell: Cell | None, reference: float | None) -> str:
    if cell is None:
        return "-"
    spread = f" ± {cell.std:.2f}" if cell.n > 1 else ""
    mark = f" {NOISE_MARK}" if cell.within_noise(reference) else ""
    return f"{cell.mean:.2f}{spread} (n={cell.n}){mark}"


def markdown_table(table: Table) -> str:
    """Task x mixer: our rows, each followed by its published row, and a footer."""
    if not table.rows:
        return "No finished classification runs yet (token-task runs: see Recall).\n"
    titles = [TASKS.get(t, t) for t in table.tasks]
    lines = ["| Mixer | " + " | ".join(titles) + " | Avg |",
             "|---|" + "---|" * (len(titles) + 1)]
    unpublished, shown_rows = [], {}
    for label, row in table.rows.items():
        cells, published = row["cells"], reference_for(row)
        tasks = [t for t in table.tasks if t in cells]
        ours = [_ours_cell(cells.get(t), published and published.accuracy.get(t))
                for t in table.tasks]
        average = np.mean([cells[t].mean for t in tasks])
        lines.append(f"| {label} | " + " | ".join(ours) + f" | {average:.2f} |")
        if published is None:
            unpublished.append(row["attention"] + (" + SPT" if row.get("spt") else ""))
            continue
        values = [_published_cell(published, t) for t in table.tasks]
        published_average = _published_average(published, tasks)
        shown = "-" if published_average is None else f"{published_average:.2f}"
        lines.append(f"| ↳ published: {_published_title(published)} | " + " | ".join(values)
                     + f" | {shown} |")
        if row.get("spt"):
            continue
        shown_rows[published.model] = published
        if published.released is not None:
            lines.append(f"| ↳ {published.released}'s released settings? | " + " | ".join(
                _released_cell(row, t) if t in cells else "-" for t in table.tasks) + " | |")
    return ("\n".join(lines) + "\n\n"
            + _footer(table, sorted(set(unpublished)), list(shown_rows.values())))


def _published_cell(published: Published, task: str) -> str:
    if task not in published.accuracy:
        return "-"
    value = published.accuracy[task]
    return "FAIL" if value is None else f"{value:.2f}"


def _footer(table: Table, unpublished: Sequence[str],
            shown: Sequence[Published] = ()) -> str:
    which = ("test accuracy at the best validation step" if table.metric == METRICS[0]
             else "test accuracy at the last step")
    sources = list(dict.fromkeys(p.source for p in shown)) or [LRA_SOURCE]
    ran = []
    if LRA_SOURCE in sources:
        ran.append("LRA's: one run per model at the LRA sizes (preset=lra)")
    if any(source != LRA_SOURCE for source in sources):
        ran.append("the sequence models': their papers' own sizes and training")
    notes = [
        (f"Test accuracy (%): {which} (results.json `{table.metric}`), mean ± sample std "
         "(ddof=1) over seeds; n = number of seeds."),
        (f"{NOISE_MARK}: within seed noise of the published value, |ours - published| ≤ "
         "2 × std over seeds (needs n ≥ 2)."),
        ("Avg: mean of the task means over the tasks present in that row; the published Avg "
         "is over the same tasks (LRA's paper averages five tasks, Path-X left out; the "
         "sequence models' papers all six)."),
        (f"Published: {'; '.join(sources)}. The runs behind them: {'; '.join(ran)}; runlocal "
         "or shorter runs are not expected to match. FAIL: no model beat chance."),
    ]
    if any(p.released == "LRA" for p in shown):
        notes.append("LRA's released settings?: \"comparable\" when the runs used the settings "
                     "of LRA's released config for that task and attention (lra/presets/long_range_arena.py: "
                     "attention options, model sizes), else the config keys that differ; "
                     "\"(released only)\": a released setting that no option here reproduces.")
    if any(p.settings for p in shown):
        notes.append("[...] after a published row's name: the mixer settings its paper's runs "
                     "used (lra/presets/long_range_arena.py SEQUENCE_TABLE); the row is shown only under runs "
                     "with the same settings.")
    if any(p.released == "S5" for p in shown):
        notes.append("S5's released settings?: \"comparable\" when the runs used the settings "
                     "of S5's run script for that task (preset=s5, lra/presets/s5.py), else "
                     "the config keys that differ.")
    untranscribed = [p.model for p in shown if p.released is None]
    if untranscribed:
        notes.append(f"{', '.join(untranscribed)}: the papers' training settings are not "
                     "transcribed here, so no run is checked for comparability with these rows "
                     "beyond the mixer settings in [...].")
    notes.extend(f"{p.model}: {p.note}." for p in shown if p.note)
    sequence = sorted({row["attention"] for row in table.rows.values()}
                      & set(mixers.SEQUENCE_NAMES))
    if sequence:
        notes.append(f"Sequence models (their own layer, no attention wrapper): "
                     f"{', '.join(sequence)}; every other row is an attention core in the "
                     "attention wrapper (q/k/v and output projections).")
    if "memory_efficient" in {row["attention"] for row in table.rows.values()}:
        notes.append("memory_efficient computes exact softmax attention: its published row "
                     "is the Transformer's.")
    if any(row.get("spt") for row in table.rows.values()):
        notes.append("+ SPT: self-pretrained on the task's own training inputs, then "
                     "fine-tuned (lra/training/pretraining.py); the published row of exact attention "
                     f"is {spt_preset.SPT_SOURCE}, at the LRA sizes (preset=spt runs Amos "
                     "et al.'s settings; runlocal rows are not expected to match).")
    if unpublished:
        notes.append(f"No published row (LRA Table 1, a sequence model's paper; for + SPT, "
                     f"Amos et al.'s): {', '.join(unpublished)}.")
    unmatched = sorted({row["attention"] for row in table.rows.values()
                        if not row.get("spt") and reference_for(row) is None}
                       & set(SEQUENCE_ROWS))
    for name in unmatched:
        rows = "; ".join(f"{p.model} ran {settings_text(p)}"
                         for p in long_range_arena.published_rows(name))
        notes.append(f"{name}: its published rows are for other settings than these runs' "
                     f"({rows}).")
    return "\n".join(f"- {note}" for note in notes) + "\n"


# ---------------------------------------------------------------------------------------
# Runs listing, CSV, plots


RUN_COLUMNS = ("run", "status", "task", "attention", "mixer_kind", "seed", "step",
               "num_params", "steps_per_second", "train_seconds", "best_val_accuracy",
               "test_accuracy", "test_accuracy_at_best", "reason")


def run_record(run: Run) -> dict:
    """One line per run (what runs.csv holds)."""
    results = run.results or {}
    step = results.get("step", max((r.get("step", 0) for r in run.metrics), default=None))
    record = {"run": run.name, "status": run.status, "task": run.get("task"),
              "attention": run.get("attention"), "mixer_kind": results.get("mixer_kind"),
              "seed": run.get("seed"), "step": step, "reason": run.reason}
    for key in RUN_COLUMNS[7:-1]:
        record[key] = results.get(key) if run.status == "finished" else None
    return record


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(fraction) -> str:
    return "-" if fraction is None else f"{100 * fraction:.2f}"


def runs_markdown(runs: Sequence[Run]) -> str:
    lines = [("| Run | Status | Task | Mixer | Kind | Seed | Step | Params | Steps/s "
              "| Wall time | Best val % | Test % |"), "|" + "---|" * 12]
    for run in runs:
        r = run_record(run)
        lines.append(
            f"| {r['run']} | {r['status']} | {r['task']} | {r['attention']} | "
            f"{r['mixer_kind'] or 'not recorded'} | {r['seed']} | "
            f"{_number(r['step'], 'd')} | {_number(r['num_params'], ',d')} | "
            f"{_number(r['steps_per_second'], '.2f')} | {_duration(r['train_seconds'])} | "
            f"{_percent(r['best_val_accuracy'])} | {_percent(r['test_accuracy_at_best'])} |")
    return "\n".join(lines) + "\n"


def not_finished_markdown(runs: Sequence[Run]) -> str:
    others = [run for run in runs if run.status != "finished"]
    if not others:
        return "All runs finished.\n"
    return "\n".join(f"- {run.status}: {run.name} ({run.reason})" for run in others) + "\n"


def write_csv(path: Path, records: Sequence[dict], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns))
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if _missing(record.get(k)) else record.get(k) for k in columns})


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_colors(runs: Sequence[Run]) -> dict[str, str]:
    """One color per label, the same in every plot."""
    labels = sorted({run.label for run in runs})
    return {label: f"C{index % 10}" for index, label in enumerate(labels)}


def plot_accuracy(table: Table, path: Path, colors: dict[str, str]) -> None:
    """Bars of our mean test accuracy per task and label, std as error bars, published
    values as black markers."""
    plt = _pyplot()
    labels = list(table.rows)
    width = 0.8 / max(len(labels), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 2.0 + 0.6 * len(table.tasks) * len(labels)),
                                         4.5))
    marked = False
    for index, label in enumerate(labels):
        row = table.rows[label]
        published = reference_for(row)
        xs = [i + (index - (len(labels) - 1) / 2) * width for i in range(len(table.tasks))]
        cells = [row["cells"].get(t) for t in table.tasks]
        means = [c.mean if c else math.nan for c in cells]
        errors = [c.std if c and c.n > 1 else 0.0 for c in cells]
        axes.bar(xs, means, width, yerr=errors, capsize=3, label=label, color=colors[label])
        if published:
            values = [published.accuracy.get(t) if c else None for t, c in zip(table.tasks, cells)]
            points = [(x, v) for x, v in zip(xs, values) if v is not None]
            if points:
                axes.scatter(*zip(*points), marker="_", s=300, color="black", zorder=3,
                             label=None if marked else "published")
                marked = True
    axes.set_xticks(range(len(table.tasks)), [TASKS.get(t, t) for t in table.tasks])
    axes.set_ylabel(f"test accuracy (%), {table.metric}")
    axes.set_title("Test accuracy: mean ± std over seeds")
    if table.rows:
        axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_validation(runs: Sequence[Run], path: Path, colors: dict[str, str]) -> None:
    """Validation accuracy vs step per task: mean over seeds of each label, ± std shaded."""
    plt = _pyplot()
    curves: dict[str, dict[str, list[dict]]] = {}
    for run in runs:
        points = {r["step"]: 100.0 * r["accuracy"] for r in run.metrics
                  if r.get("split") == "val" and "accuracy" in r}
        if points:
            task = str(run.get("task") or "?")
            curves.setdefault(task, {}).setdefault(run.label, []).append(points)
    tasks = [t for t in TASKS if t in curves] + sorted(set(curves) - set(TASKS))
    columns = min(3, max(len(tasks), 1))
    rows = max(1, math.ceil(len(tasks) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for axis, task in zip(axes.flat, tasks):
        for label, seeds in sorted(curves[task].items()):
            steps = sorted(set().union(*seeds))
            values = [[s[step] for s in seeds if step in s] for step in steps]
            mean = np.array([np.mean(v) for v in values])
            std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
            axis.plot(steps, mean, marker="o", markersize=3, label=label, color=colors[label])
            axis.fill_between(steps, mean - std, mean + std, alpha=0.2, color=colors[label])
        axis.set_title(TASKS.get(task, task))
        axis.set_xlabel("step")
        axis.set_ylabel("validation accuracy (%)")
        axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(tasks):]:
        axis.axis("off")
    if not tasks:
        axes.flat[0].text(0.5, 0.5, "no validation records yet", ha="center")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------
# Command line


def write_report(roots: Sequence[str | Path], out: str | Path,
                 metric: str = METRICS[0]) -> tuple[str, list[Path]]:
    """Writes report.md, results.csv, runs.csv, accuracy.png and val_accuracy.png to `out`.

    Returns:
      (the Markdown text printed to stdout, the paths written).

    Raises:
      FileNotFoundError: a root is missing.
      ValueError: no run folder below the roots, or an unknown metric.
    """
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r}; known: {', '.join(METRICS)}")
    runs = find_runs(roots)
    if not runs:
        raise ValueError(f"no run folders (with {', '.join(RUN_FILES)}) below "
                         f"{', '.join(map(str, roots))}")
    assign_labels(runs)
    table = summarize(runs, metric)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in ("report.md", "results.csv", "runs.csv", "accuracy.png",
                                     "val_accuracy.png")]
    summary = (f"## Test accuracy by task and mixer\n\n{markdown_table(table)}\n"
               f"## Not finished\n\n{not_finished_markdown(runs)}")
    paths[0].write_text(f"# LRA report: {', '.join(map(str, roots))}\n\n{summary}\n"
                        f"![test accuracy](accuracy.png)\n\n![validation accuracy]"
                        f"(val_accuracy.png)\n\n## Runs\n\n{runs_markdown(runs)}")
    write_csv(paths[1], table_rows(table), ("label", "attention", "source", "task", "mean",
                                            "std", "n_seeds", "published", "within_seed_noise",
                                            "comparable", "settings_differ",
                                            "published_settings"))
    write_csv(paths[2], [run_record(run) for run in runs], RUN_COLUMNS)
    colors = label_colors(runs)
    plot_accuracy(table, paths[3], colors)
    plot_validation(runs, paths[4], colors)
    recall_text, recall_paths = recall.write_recall(runs, out, metric)
    if recall_text:
        summary += f"\n## Recall (token tasks)\n\n{recall_text}"
    return summary, paths + recall_paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lra.report", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", help="sweep roots or run folders")
    parser.add_argument("--out", help="output folder (default: ROOT/report of the first root)")
    parser.add_argument("--metric", default=METRICS[0], choices=METRICS,
                        help="which test accuracy of results.json to tabulate")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.roots[0]) / "report")
    try:
        summary, paths = write_report(args.roots, out, args.metric)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    print("wrote " + ", ".join(map(str, paths)))
    return 0

