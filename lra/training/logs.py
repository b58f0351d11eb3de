"""Where a run's numbers go: `metrics.jsonl`, TensorBoard event files and the terminal.

`metrics.jsonl` holds one JSON object per logged train interval or evaluation, each with
`step` and `split` (train | val | test). On resume the records after the restored step are
dropped first, so a resumed run's file reads exactly like an uninterrupted one's.
The terminal shows a tqdm bar (step/s, ETA) when stderr is a terminal and plain log lines
otherwise (batch jobs, CI), one per `log_every` steps.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import tqdm
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl (empty if there is none yet)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


class RunLog:
    """Appends records to metrics.jsonl and TensorBoard and drives the progress display.

    Only the process that writes (process 0) should create one with `enabled=True`;
    the others get a silent log, so call sites need no branches.
    """

    def __init__(self, workdir: Path, *, start_step: int, num_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.num_steps = num_steps
        self._start_step = start_step
        self._start_time = time.perf_counter()
        if not enabled:
            return
        _truncate_after(workdir / METRICS_FILE, start_step)
        self._file = open(workdir / METRICS_FILE, "a")
        self._tensorboard = SummaryWriter(logdir=str(workdir))
        self._bar = None
        if sys.stderr.isatty():
            self._bar = tqdm.tqdm(
                total=num_steps, initial=start_step, unit="step", dynamic_ncols=True
            )

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        """Records one train interval or evaluation."""
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        if split != "train":
            self.message(
                f"step {step}: {split} "
                + " ".join(f"{k} {v:.4f}" for k, v in values.items())
            )

    def progress(self, step: int, values: dict[str, float]) -> None:
        """Moves the bar to `step` (or prints a plain line) with the latest train values."""
        if not self.enabled:
            return
        shown = {k: f"{values[k]:.4g}" for k in ("loss", "accuracy") if k in values}
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(shown, refresh=False)
            return
        elapsed = time.perf_counter() - self._start_time
        rate = (step - self._start_step) / elapsed if elapsed > 0 else math.nan
        eta = (self.num_steps - step) / rate if rate > 0 else math.nan
        self.message(
            f"step {step}/{self.num_steps} " + "".join(f"{k} {v} " for k, v in shown.items())
            + f"{rate:.2f} steps/s ETA {_format_seconds(eta)}"
        )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tensorboard.close()
        self._file.close()


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
