"""Task registry: the Long Range Arena tasks by name.

A task is an object with

- ``name`` (str), ``num_classes`` (int), ``vocab_size`` (int), ``generated`` (bool: True
  when ``prepare`` needs no download), ``paired`` (bool: True when an example is two
  sequences, as in retrieval; the model is then the dual encoder) and ``splits``
  (``("train", "val", "test")``). Padding is marked by ``lengths``, never by a token value:
  in the pixel tasks 0 is a black pixel;
- ``prepare(data_dir, **settings) -> dict``: writes the task's files into ``data_dir``
  (or accepts files already there) and returns a manifest describing them; preparing
  again with the same settings does nothing, with different settings it raises
  ``ValueError``;
- ``load(split, data_dir) -> dict[str, np.ndarray]``: ``inputs`` [N, L] integer tokens
  padded with 0, ``lengths`` [N], ``targets`` [N] (retrieval adds ``inputs2`` and
  ``lengths2``), memory-mapped where large. Missing files raise ``FileNotFoundError``
  naming the ``python -m lra.data prepare ...`` command that makes them;
- ``is_prepared(data_dir) -> bool``;
- optionally, for a task that needs a download, ``source_at_hand(data_dir, **settings) ->
  bool``: True when ``prepare`` can run now without one (retrieval: the AAN TSVs are in
  ``source_dir``; text, image: tfds's data folder holds the built dataset). A run then
  prepares missing data itself (`lra.training.data.ensure_prepared`).

Token tasks (the recall and mechanistic synthetic tasks: `mqar`, MAD's six,
`induction_heads`) are `lra.tasks.token_tasks.TokenTask`s: ``targets`` is [N, L], the
token to output at each position or -1 where a position is not scored (`token_targets`
is True; they train with ``objective="token_classify"``), and their vocabulary depends on
their settings (`sizes`).

Adding a task is one module in this package plus one line in ``_TASKS``. Modules are
imported only when their task is requested.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:attribute" of the task object, imported lazily by `get`.
_TASKS: dict[str, str] = {
    "listops": "lra.tasks.listops:TASK",
    "text": "lra.tasks.text:TASK",
    "retrieval": "lra.tasks.retrieval:TASK",
    "image": "lra.tasks.image:TASK",
    "pathfinder": "lra.tasks.pathfinder:PATHFINDER",
    "pathx": "lra.tasks.pathfinder:PATHX",
    # token tasks (lra.tasks.token_tasks): per-position targets
    "mqar": "lra.tasks.mqar:TASK",
    "in_context_recall": "lra.tasks.mad:IN_CONTEXT_RECALL",
    "fuzzy_recall": "lra.tasks.mad:FUZZY_RECALL",
    "noisy_recall": "lra.tasks.mad:NOISY_RECALL",
    "selective_copying": "lra.tasks.mad:SELECTIVE_COPYING",
    "compression": "lra.tasks.mad:COMPRESSION",
    "memorization": "lra.tasks.mad:MEMORIZATION",
    "induction_heads": "lra.tasks.induction:TASK",
}

NAMES: tuple[str, ...] = tuple(_TASKS)


def get(name: str) -> Any:
    """Returns the task object registered under `name`.

    Args:
        name: one of `NAMES`.

    Returns:
        The task object (see the module docstring for its contract).

    Raises:
        ValueError: `name` is not a known task.
    """
    try:
        target = _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(NAMES)}") from None
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def sizes(task: Any, settings: Any = None) -> tuple[int, int]:
    """(vocab_size, num_classes) of `task` prepared with `settings` (config.prepare).

    A token task's vocabulary is one of its settings, and its classes are its tokens; the
    other tasks have fixed sizes.
    """
    if getattr(task, "token_targets", False):
        vocab_size = task.vocab_size_for(dict(settings or {}))
        return vocab_size, vocab_size
    return task.vocab_size, task.num_classes
