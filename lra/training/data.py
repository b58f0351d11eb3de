"""Data: prepare a task's files, then source -> shuffle -> batch -> global device arrays.

The training stream is a grain `MapDataset` of example *indices*: every epoch is a fresh
permutation drawn from the pair (`config.seed`, epoch) through NumPy's `SeedSequence`
(`epoch_order`), so no two (seed, epoch) pairs share an order: seed s's epoch e+1 is not
seed s+1's epoch e, as it would be with grain's own `shuffle` (which seeds epoch e with
seed + e). The stream repeats forever and is batched without dropping anything (a batch
may straddle two epochs). Rows are gathered from the
task's (memory-mapped) NumPy arrays only after each process has picked its own slice of the
global batch, so on several hosts every process reads just its share. `TrainBatches` reads
ahead (`config.data_threads` threads, `config.data_workers` processes) and puts batches on
the devices `DEVICE_PREFETCH` ahead of the step; its position, the number of batches the
loop took, is saved in every checkpoint, so a resumed run sees exactly the batches an
uninterrupted one would.

Model batches are dicts of `inputs` [B, L] int32, `mask` [B, L] bool (True = real token,
from `lengths`, never from token values), `targets` [B] int32 ([B, L] for a token task,
-1 where a position is not scored, cut and padded with the inputs) and, for evaluation,
`weights` [B] float32 (0 for the padding rows of the last batch). Pair tasks add
`inputs2`/`mask2` the same way.

Command line:
  python -m lra.data prepare <task> --data_dir DIR [--num_train N --num_val N --num_test N
                                                    --seed S --min_length A --max_length B
                                                    --source_dir SRC --tfds_data_dir D
                                                    --validation heldout|test]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import grain
import grain.experimental
import jax
import numpy as np
from absl import flags as absl_flags

from lra import tasks
from lra.parallel import distributed
from lra.tasks import storage

Arrays = dict[str, np.ndarray]

# Written into a shared data folder by process 0 once it is prepared, holding a token unique
# to that preparation (`prepare_for_processes`).
PREPARED_MARKER = ".lra_prepared.json"
# (token array, its lengths, the mask the model gets) for single and paired inputs.
SEQUENCE_FIELDS = (("inputs", "lengths", "mask"), ("inputs2", "lengths2", "mask2"))
# Batches read ahead on the host (grain's buffer), and put on the devices ahead of the step
# that takes them (global arrays made by a background thread while the current step runs).
HOST_PREFETCH = 4
DEVICE_PREFETCH = 2


def ensure_prepared(task, data_dir: str, settings: Mapping) -> None:
    """Makes sure `data_dir` holds the task's data, preparing it when that needs no download.

    A generated task is generated; a downloaded task whose sources are already at hand
    (`task.source_at_hand`: the AAN TSVs of retrieval, a tfds data folder holding the
    dataset) is converted. Otherwise a FileNotFoundError gives the prepare command, with
    the config's `settings` (e.g. the subset sizes of a runlocal config) as its flags.
    """
    if task.generated:
        task.prepare(data_dir, **dict(settings))
    elif task.is_prepared(data_dir):
        if "validation" in settings:
            check_validation_protocol(task.name, data_dir, settings)
    elif _source_at_hand(task, data_dir, settings):
        logging.warning("no prepared %s data in %s: preparing it from its sources", task.name,
                        data_dir)
        task.prepare(data_dir, **dict(settings))
    else:
        raise FileNotFoundError(
            f"no prepared {task.name} data in {data_dir}; prepare it with:\n  "
            f"{storage.prepare_command(task.name, data_dir, settings)}"
        )


def prepare_for_processes(task, data_dir: str, settings: Mapping, *, shared_filesystem: bool,
                          wait_seconds: float) -> None:
    """`ensure_prepared` for every process of a run, without device collectives while waiting.

    One process: `ensure_prepared`. Several processes sharing `data_dir` (a shared file
    system): first they agree on a token unique to this preparation
    (`distributed.shared_token`, drawn by process 0); process 0 then removes any old
    marker, prepares, and writes the marker `PREPARED_MARKER` in `data_dir` holding
    `preparation_key` and the token. The others poll for a marker holding both (at most
    `wait_seconds`), so a marker left by an earlier preparation, even of the same task and
    settings, never releases them; then they check the folder read-only
    (`check_prepared`): they never prepare. Without a shared file system every process
    prepares its own copy (preparation is deterministic) and the copies' manifests are
    compared once.

    Raises:
      TimeoutError: process 0's marker did not appear in time (the message says what to check).
      ValueError: the processes' copies differ, or see `ensure_prepared`.
      FileNotFoundError: files process 0 prepared are missing on a waiting process (named),
        or see `ensure_prepared`.
    """
    if jax.process_count() == 1:
        ensure_prepared(task, data_dir, settings)
    elif not shared_filesystem:
        ensure_prepared(task, data_dir, settings)
        files = (storage.read_manifest(Path(data_dir)) or {}).get("files", {})
        distributed.check_same_on_all_processes(
            json.dumps(files, sort_keys=True),
            f"the prepared {task.name} data (the files of {data_dir}/{storage.MANIFEST})")
    else:
        marker = Path(data_dir) / PREPARED_MARKER
        key = f"{preparation_key(task.name, settings)}.{distributed.shared_token()}"
        if distributed.is_primary():
            marker.unlink(missing_ok=True)
            ensure_prepared(task, data_dir, settings)
            distributed.write_marker(marker, key)
        else:
            distributed.wait_for_marker(marker, key, timeout_seconds=wait_seconds,
                                        what=f"process 0 to prepare {task.name} in {data_dir}")
            check_prepared(task, data_dir, settings)


def preparation_key(task_name: str, settings: Mapping) -> str:
    """Names one preparation (task and settings), so a marker of another one is stale."""
    text = json.dumps({"task": task_name, "settings": dict(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_prepared(task, data_dir: str, settings: Mapping) -> None:
    """Checks, reading only, that `data_dir` holds what another process prepared.

    Every file `manifest.json` lists must be there (a folder without a manifest must pass
    `task.is_prepared`, e.g. the ListOps release as found), and the validation split must
    be the one `settings` asks for.

    Raises:
      FileNotFoundError: naming the missing files (on a network file system, files another
        host wrote may not be visible yet).
      ValueError: see `check_validation_protocol`.
    """
    missing = missing_files(task, data_dir)
    if missing:
        raise FileNotFoundError(
            f"process {jax.process_index()} does not see {', '.join(missing)}, which process 0 "
            f"prepared for {task.name}; if {data_dir} is on a network file system, check that "
            "every host sees the same files (and that they have reached it), then start again")
    if "validation" in settings:
        check_validation_protocol(task.name, data_dir, settings)


def missing_files(task, data_dir: str) -> list[str]:
    """The prepared files of `task` absent from `data_dir` (paths), read from its manifest."""
    folder = Path(data_dir)
    manifest = storage.read_manifest(folder)
    if manifest is None:
        return [] if task.is_prepared(data_dir) else [str(folder / storage.MANIFEST)]
    return [str(folder / name) for name in manifest.get("files", {})
            if not (folder / name).is_file()]


def _source_at_hand(task, data_dir: str, settings: Mapping) -> bool:
    """Whether a downloaded task can prepare `data_dir` now, offline (False for tasks
    without a `source_at_hand` check)."""
    source_at_hand = getattr(task, "source_at_hand", None)
    return source_at_hand is not None and source_at_hand(data_dir, **dict(settings))


def check_validation_protocol(task_name: str, data_dir: str, settings: Mapping) -> None:
    """The prepared folder must hold the validation split the config asks for.

    "test" (LRA's protocol: train on the whole train split, validate on test) and
    "heldout" put different rows in the training split, so a mismatch is an error.
    """
    manifest = storage.read_manifest(Path(data_dir)) or {}
    prepared = (manifest.get("settings") or {}).get("validation")
    wanted = settings["validation"]
    if prepared is not None and prepared != wanted:
        raise ValueError(
            f"config.prepare.validation={wanted!r} but {data_dir} was prepared with "
            f"validation={prepared!r}; prepare a folder for {wanted!r} with:\n  "
            f"{storage.prepare_command(task_name, f'{data_dir}-{wanted}', settings)}\n"
            f"and set --config.data_dir to it, or set --config.prepare.validation={prepared}"
        )


def warn_if_truncated(arrays: Arrays, max_length: int, split: str) -> None:
    """Logs how many sequences of a split are longer than `max_length` (they get truncated)."""
    for _, lengths_key, _ in SEQUENCE_FIELDS:
        if lengths_key in arrays:
            lengths = np.asarray(arrays[lengths_key])
            if (truncated := int(np.sum(lengths > max_length))):
                logging.warning(
                    "%s: %d of %d sequences are longer than max_length=%d and are truncated",
                    split, truncated, len(lengths), max_length,
                )


def fit_rows(rows: np.ndarray, max_length: int, fill: int) -> np.ndarray:
    """[B, *] int32 rows cut or padded with `fill` to [B, max_length]."""
    rows = np.asarray(rows[:, :max_length], np.int32)
    fitted = np.full((len(rows), max_length), fill, np.int32)
    fitted[:, : rows.shape[1]] = rows
    return fitted


def gather(arrays: Arrays, index: np.ndarray, max_length: int) -> Arrays:
    """Rows `index` as a model batch: tokens cut or padded to `max_length`, masks from
    lengths. A token task's split (per-position targets, cut and padded with -1: not
    scored) is padded only to its own width when that is shorter: its test split may be
    longer than training (length extrapolation), and the training batches then stay as
    short as their sequences."""
    targets = arrays["targets"][index]
    if np.ndim(targets) == 2:
        max_length = min(max_length, np.shape(arrays["inputs"])[1])
    batch = {"targets": (np.asarray(targets, np.int32) if np.ndim(targets) == 1
                         else fit_rows(targets, max_length, fill=-1))}
    for inputs_key, lengths_key, mask_key in SEQUENCE_FIELDS:
        if inputs_key not in arrays:
            continue
        batch[inputs_key] = fit_rows(arrays[inputs_key][index], max_length, fill=0)
        lengths = np.minimum(arrays[lengths_key][index], max_length)
        batch[mask_key] = np.arange(max_length)[None, :] < lengths[:, None]
    return batch


def check_targets(arrays: Arrays, spec, split: str) -> None:
    """Per-position targets fit the objective: a token task trains with token_classify,
    and no example scores more positions than `spec.max_targets` (the token head's
    positions per row), which would otherwise be dropped without a word.

    Raises:
      ValueError: naming the split and what to change.
    """
    per_position = np.ndim(arrays["targets"]) == 2
    if per_position != (spec.objective.value == "token_classify"):
        raise ValueError(
            f"the {split} targets are per {'position' if per_position else 'example'}, so "
            f"config.objective={spec.objective.value!r} cannot train on them; use "
            + ("objective='token_classify'" if per_position else "another objective"))
    if per_position and spec.max_targets:
        most = int(np.max(np.sum(np.asarray(arrays["targets"]) >= 0, axis=1), initial=0))
        if most > spec.max_targets:
            raise ValueError(f"a {split} example scores {most} positions, more than the "
                             f"task's max_targets={spec.max_targets}")


RowGroup = tuple[int, int]  # (this process's group, the number of groups)


def _process_slice(global_batch: int, row_group: RowGroup | None = None) -> slice:
    """This process's rows of a global batch: its row group's share (`row_group`, from
    `lra.parallel.sharding.row_group`: processes whose devices share sequences read the
    same rows); None = (process index, process count), every process its own rows."""
    group, groups = (jax.process_index(), jax.process_count()) if row_group is None else row_group
    if global_batch % groups:
        raise ValueError(f"batch size {global_batch} is not divisible by {groups} row groups "
                         "of processes")
    local = global_batch // groups
    return slice(group * local, (group + 1) * local)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the examples in one epoch: a permutation of range(num_examples).

    Drawn from a generator seeded by the pair (seed, epoch), so different pairs give
    independent orders (unlike seeding with seed + epoch).
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0; got seed={seed}, epoch={epoch}")
    generator = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    order = generator.permutation(num_examples)
    order.setflags(write=False)  # shared by the cache
    return order


class _ShuffledEpochs:
    """Example indices of the endless training stream: item i is epoch i // N's order[i % N]."""

    def __init__(self, num_examples: int, seed: int):
        if num_examples <= 0:
            raise ValueError("the training split is empty")
        self.num_examples = num_examples
        self.seed = seed

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> int:
        epoch, position = divmod(index, self.num_examples)
        return int(epoch_order(self.seed, epoch, self.num_examples)[position])


def train_dataset(
    arrays: Arrays, *, batch_size: int, max_length: int, seed: int,
    row_group: RowGroup | None = None,
) -> grain.MapDataset:
    """The infinite training stream: batch `i` is `dataset[i]`, the same on every run;
    this process's rows of it (`_process_slice`)."""
    num_examples = len(arrays["targets"])
    own = _process_slice(batch_size, row_group)
    return (
        grain.MapDataset.source(_ShuffledEpochs(num_examples, seed))
        .batch(batch_size, drop_remainder=True)
        .map(lambda index: gather(arrays, np.asarray(index)[own], max_length))
    )


def host_stream(dataset: grain.MapDataset, *, threads: int, workers: int = 0
                ) -> grain.IterDataset:
    """`dataset` in order, read ahead by `threads` threads (0 = in the reading thread) and,
    with `workers` > 0, by that many grain worker processes (each gathers every
    `workers`-th batch; the order stays the same)."""
    stream = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=HOST_PREFETCH))
    if workers:
        if not absl_flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults
            absl_flags.FLAGS.mark_as_parsed()  # here, outside launch.py's absl app)
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return stream


def device_batches(stream: grain.IterDataset, mesh: jax.sharding.Mesh) -> grain.IterDataset:
    """`stream`'s batches as global device arrays (`to_global`), made by a background
    thread `DEVICE_PREFETCH` batches ahead of the one the loop takes."""
    on_devices = stream.map(functools.partial(to_global, mesh=mesh))
    return grain.experimental.ThreadPrefetchIterDataset(
        on_devices, prefetch_buffer_size=DEVICE_PREFETCH)


class TrainBatches:
    """The training stream from batch `next_index` on, as global device arrays prefetched
    to the devices (`device_batches`).

    Its state, saved in checkpoints, is {"next_index": batches taken by the loop}, never
    counting the batches read ahead, so a resumed run gets exactly the batches an
    uninterrupted one would. The state does not depend on `threads` or `workers` (the
    stream restarts at `dataset[next_index:]`), so those may change when a run resumes.
    """

    def __init__(self, dataset: grain.MapDataset, mesh: jax.sharding.Mesh, *, threads: int,
                 workers: int = 0):
        self._dataset, self._mesh = dataset, mesh
        self._threads, self._workers = threads, workers
        self._next_index = 0
        self._iterator = None  # started by the first `next`

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._iterator is None:
            stream = host_stream(self._dataset[self._next_index:], threads=self._threads,
                                 workers=self._workers)
            self._iterator = iter(device_batches(stream, self._mesh))
        batch = next(self._iterator)
        self._next_index += 1
        return batch

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The next global batch's shapes, dtypes and shardings (to compile a step before
        the stream starts); reads one host batch, takes nothing from the stream."""
        local = self._dataset[self._next_index]  # this process's rows
        shardings = _batch_shardings(local, self._mesh)
        rows = lambda x: _global_shape(x, self._mesh)
        return {key: jax.ShapeDtypeStruct(rows(x), x.dtype, sharding=shardings[key])
                for key, x in local.items()}

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: dict) -> None:
        self.close()
        self._next_index = int(state["next_index"])

    def close(self) -> None:
        """Stops the read-ahead threads and worker processes."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def eval_dataset(arrays: Arrays, *, batch_size: int, max_length: int,
                 row_group: RowGroup | None = None) -> grain.MapDataset:
    """The whole split in order, batch i = `dataset[i]`; the last batch is padded with rows
    of weight 0 (`weights` [B] float32); this process's rows of it (`_process_slice`)."""
    num_examples = len(arrays["targets"])
    own = _process_slice(batch_size, row_group)

    def batch(start: int) -> Arrays:
        index = np.arange(start, min(start + batch_size, num_examples))
        weights = np.ones(batch_size, np.float32)
        weights[len(index):] = 0.0
        padded = np.concatenate([index, np.zeros(batch_size - len(index), index.dtype)])
        return {**gather(arrays, padded[own], max_length), "weights": weights[own]}

    return grain.MapDataset.source(range(0, num_examples, batch_size)).map(batch)


def eval_batches(arrays: Arrays, *, batch_size: int, max_length: int) -> Iterator[Arrays]:
    """The batches of `eval_dataset`, host arrays, one after another."""
    dataset = eval_dataset(arrays, batch_size=batch_size, max_length=max_length)
    return (dataset[i] for i in range(len(dataset)))


def eval_device_batches(arrays: Arrays, mesh: jax.sharding.Mesh, *, batch_size: int,
                        max_length: int, threads: int) -> Iterator[dict[str, jax.Array]]:
    """The batches of `eval_dataset` as global device arrays, prefetched as training's."""
    from lra.parallel import sharding  # (see `_batch_shardings`)

    dataset = eval_dataset(arrays, batch_size=batch_size, max_length=max_length,
                           row_group=sharding.row_group(mesh))
    return iter(device_batches(host_stream(dataset, threads=threads), mesh))


def to_global(batch: Arrays, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Process-local rows -> global arrays: rows split over the mesh's batch axes (data,
    fsdp), and the sequence of a [B, L] array over `seq` when the mesh splits sequences
    (`lra.parallel.sharding.batch_spec`). A process holds whole rows, its row group's
    (`sharding.row_group`: the processes of a `seq` axis that spans hosts hold the same
    rows); each of its devices takes its part of them (rows, and positions under `seq`)."""
    shardings = _batch_shardings(batch, mesh)
    return {
        key: jax.make_array_from_process_local_data(shardings[key], value,
                                                    _global_shape(value, mesh))
        for key, value in batch.items()
    }


def _global_shape(local, mesh: jax.sharding.Mesh) -> tuple[int, ...]:
    """The global shape of a process's rows `local`: rows x the mesh's row groups; the
    other dimensions whole (each device looks up its part of them in `local`)."""
    from lra.parallel import sharding  # (see `_batch_shardings`)

    return (local.shape[0] * sharding.row_group(mesh)[1], *local.shape[1:])


def _batch_shardings(batch, mesh: jax.sharding.Mesh) -> dict:
    # Imported here: lra.parallel.sharding imports the models (FSDP's gathering hook),
    # which preparing data (`python -m lra.data`) and grain's workers do without.
    from lra.parallel import sharding

    return sharding.batch_shardings(batch, mesh)


# ---------------------------------------------------------------------------------------
# Command line: python -m lra.data prepare <task> --data_dir DIR [settings]

SETTING_FLAGS = ("num_train", "num_val", "num_test", "seed", "min_length", "max_length",
                 "resolution", "num_workers")
# Folders a task reads from: retrieval the downloaded TSVs; text and image tfds's data folder.
PATH_FLAGS = ("source_dir", "tfds_data_dir")
WORD_FLAGS = ("validation",)  # text, image: heldout | test (validate on test, as LRA)


def command_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lra.data", description="Prepare the data of a task."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="generate or convert a task's data")
    prepare.add_argument("task", choices=tasks.NAMES)
    prepare.add_argument("--data_dir", required=True, help="folder to write the prepared data to")
    known, _ = parser.parse_known_args(argv)
    task = tasks.get(known.task)
    token_settings = getattr(task, "defaults", None) if getattr(task, "token_targets", False) else None
    if token_settings is not None:  # a token task's own settings, typed by their defaults
        names = tuple(token_settings)
        for name, default in token_settings.items():
            prepare.add_argument(f"--{name}", default=None, help=f"default {default}")
    else:
        names = SETTING_FLAGS + PATH_FLAGS + WORD_FLAGS
        for name in SETTING_FLAGS:
            prepare.add_argument(f"--{name}", type=int, default=None)
        for name in PATH_FLAGS + WORD_FLAGS:
            prepare.add_argument(f"--{name}", default=None)
    args = parser.parse_args(argv)
    settings = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if token_settings is None:
        accepted = set(inspect.signature(task.prepare).parameters) - {"data_dir"}
        unknown = sorted(set(settings) - accepted)
        if unknown:
            parser.error(f"{args.task} does not take {', '.join('--' + u for u in unknown)}")
    try:
        manifest = task.prepare(args.data_dir, **settings)
    except (ValueError, FileNotFoundError, ImportError) as error:  # ImportError: a missing extra
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = manifest.get("counts", {}) if isinstance(manifest, Mapping) else {}
    print(f"{args.task} data ready in {args.data_dir} {counts}")
    return 0

