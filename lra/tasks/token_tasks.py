"""Generated tasks scored per position: the recall and mechanistic synthetic tasks.

A token task's examples are token sequences with a target at some positions:
``inputs`` [N, L] int32, ``lengths`` [N] int32 and ``targets`` [N, L] int32, the token the
model must output at each position, or `UNSCORED` (-1) where a position is not scored. A
causal encoder with a token head is trained on the scored positions
(`config.objective="token_classify"`, lra/training/objectives.py).

`TokenTask` holds everything such a task shares (settings with defaults, one random stream
per split, atomic files and a manifest, loading); a task module supplies `generate`, a
function of the split's example count, the settings and a NumPy `Generator`, returning
the three arrays. Each split is drawn from its own stream, seeded by (task, seed, split),
so a split depends neither on the other splits' sizes nor on the order they are made, and
a test split may use other settings than training (`split_settings`: induction heads'
longer test sequences).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lra.tasks import storage

UNSCORED = -1  # the target of a position that is not scored
SPLITS = ("train", "val", "test")
ARRAYS = ("inputs", "lengths", "targets")
COUNT_SETTINGS = {"train": "num_train", "val": "num_val", "test": "num_test"}

# (count, settings, rng) -> (inputs [N, L], lengths [N], targets [N, L])
Generate = Callable[[int, Mapping[str, Any], np.random.Generator],
                    tuple[np.ndarray, np.ndarray, np.ndarray]]


def split_rng(task: str, seed: int, split: str) -> np.random.Generator:
    """The random stream of one split, from (task, seed, split) alone."""
    digest = hashlib.sha256(f"lra.{task}/{seed}/{split}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def power_law(size: int, exponent: float) -> np.ndarray:
    """p_i proportional to a * i^(a - 1) for i = 1..`size`, normalised (Zoology's gap law)."""
    p = exponent * np.arange(1, size + 1, dtype=np.float64) ** (exponent - 1)
    return p / p.sum()


@dataclasses.dataclass(frozen=True)
class TokenTask:
    """A generated task with per-position targets (see the module docstring).

    Attributes:
      name: the registry name.
      defaults: every prepare setting with its default; `prepare` accepts exactly these
        (and the split sizes `num_train`, `num_val`, `num_test` and `seed`, which are part
        of every token task's defaults).
      generate: draws one split (see `Generate`).
      vocabulary: settings -> the number of token ids (also the number of classes: a
        target is a token).
      max_targets: settings -> the most scored positions in one example (the objective
        computes the token head at this many positions per row, not at every position).
      check: settings -> None, raising ValueError for an impossible combination.
      split_settings: (split, settings) -> that split's settings (default: the same).
    """

    name: str
    defaults: Mapping[str, Any]
    generate: Generate
    vocabulary: Callable[[Mapping[str, Any]], int]
    max_targets: Callable[[Mapping[str, Any]], int]
    check: Callable[[Mapping[str, Any]], None] = lambda settings: None
    split_settings: Callable[[str, Mapping[str, Any]], Mapping[str, Any]] = (
        lambda split, settings: settings)
    format_version: int = 1
    generated = True
    paired = False
    token_targets = True  # targets [N, L]: train with objective="token_classify"
    splits = SPLITS

    # -- settings ---------------------------------------------------------------------

    def settings(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults updated with `given`, checked.

        Raises:
          ValueError: an unknown setting, a value of the wrong type, or an impossible
            combination (the message names the setting).
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name} has no setting(s) {', '.join(unknown)}; its "
                             f"settings: {', '.join(self.defaults)}")
        settings = dict(self.defaults)
        for key, value in given.items():
            settings[key] = _typed(self.name, key, value, self.defaults[key])
        for split, count in COUNT_SETTINGS.items():
            if settings[count] < 1:
                raise ValueError(f"{self.name}: {count} must be >= 1, got {settings[count]}")
        self.check(settings)
        return settings

    def vocab_size_for(self, settings: Mapping[str, Any] | None = None) -> int:
        return self.vocabulary(self.settings(settings))

    def max_targets_for(self, settings: Mapping[str, Any] | None = None) -> int:
        return self.max_targets(self.settings(settings))

    # -- files ------------------------------------------------------------------------

    def is_prepared(self, data_dir: str | os.PathLike) -> bool:
        manifest = storage.read_manifest(Path(data_dir))
        return bool(manifest) and manifest.get("task") == self.name

    def prepare(self, data_dir: str | os.PathLike, **given) -> dict:
        """Generates the three splits into `data_dir` (nothing to do when they are there).

        Raises:
          ValueError: a bad setting, or `data_dir` holds this task made with other
            settings (or another task).
        """
        settings = self.settings(given)
        data_dir = Path(data_dir)
        manifest = storage.read_manifest(data_dir)
        if manifest is not None:
            storage.check_settings(data_dir, manifest, self.name, settings, self.format_version)
            return manifest
        data_dir.mkdir(parents=True, exist_ok=True)
        files, counts = {}, {}
        for split in SPLITS:
            own = self.split_settings(split, settings)
            rng = split_rng(self.name, settings["seed"], split)
            inputs, lengths, targets = self.generate(settings[COUNT_SETTINGS[split]], own, rng)
            files.update(storage.save_split(data_dir, split, {
                "inputs": inputs.astype(np.int32), "lengths": lengths.astype(np.int32),
                "targets": targets.astype(np.int32)}))
            counts[split] = int(len(inputs))
        return storage.write_manifest(data_dir, {
            "task": self.name, "settings": settings, "counts": counts, "files": files,
            "format_version": self.format_version})

    def load(self, split: str, data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
        """The split's `inputs`, `lengths`, `targets` arrays, memory-mapped."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        return storage.load_split(Path(data_dir), split, ARRAYS,
                                  prepare_command=storage.prepare_command(self.name, data_dir))


def _typed(task: str, key: str, value: Any, default: Any) -> Any:
    """`value` as the type of the setting's default (flags and configs may give strings)."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{task}: setting {key}={value!r} is not a {kind.__name__}") from None
