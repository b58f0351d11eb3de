"""Data: prepare a task's files, then source -> shuffle -> batch -> global device arrays.

The training stream is a grain `MapDataset` of example *indices*: every epoch is a fresh
permutation drawn from the pair (`config.seed`, epoch) through NumPy's `SeedSequence`
(`epoch_order`), so no two (seed, epoch) pairs share an order: seed s's epoch e+1 is not
seed s+1's epoch e, as it would be with grain's own `shuffle` (which seeds epoch e with
seed + e). The stream repeats forever and is batched without dropping anything (a batch
may straddle two epochs). Rows are gathered from the
task's (memory-mapped) NumPy arrays only after each process has picked its own slice of the
global batch, so on several hosts every process reads just its share. The position in the
stream is grain's iterator state, saved in every checkpoint, so a resumed run sees exactly
the batches an uninterrupted one would.

Model batches are dicts of `inputs` [B, L] int32, `mask` [B, L] bool (True = real token,
from `lengths`, never from token values), `targets` [B] int32 and, for evaluation,
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
import inspect
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lra import tasks
from lra.tasks import storage

Arrays = dict[str, np.ndarray]

# (token array, its lengths, the mask the model gets) for single and paired inputs.
SEQUENCE_FIELDS = (("inputs", "lengths", "mask"), ("inputs2", "lengths2", "mask2"))


def ensure_prepared(task, data_dir: str, settings: Mapping) -> None:
    """Makes sure `data_dir` holds the task's data, generating it if the task can.

    Tasks that need a download raise a FileNotFoundError giving the command, with the
    config's `settings` (e.g. the subset sizes of a runlocal config) as its flags.
    """
    if task.generated:
        task.prepare(data_dir, **dict(settings))
    elif not task.is_prepared(data_dir):
        raise FileNotFoundError(
            f"no prepared {task.name} data in {data_dir}; prepare it with:\n  "
            f"{storage.prepare_command(task.name, data_dir, settings)}"
        )
    elif "validation" in settings:
        check_validation_protocol(task.name, data_dir, settings)


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


def gather(arrays: Arrays, index: np.ndarray, max_length: int) -> Arrays:
    """Rows `index` as a model batch: tokens cut or padded to `max_length`, masks from lengths."""
    batch = {"targets": np.asarray(arrays["targets"][index], np.int32)}
    for inputs_key, lengths_key, mask_key in SEQUENCE_FIELDS:
        if inputs_key not in arrays:
            continue
        rows = np.asarray(arrays[inputs_key][index][:, :max_length], np.int32)
        tokens_BxL = np.zeros((len(index), max_length), np.int32)
        tokens_BxL[:, : rows.shape[1]] = rows
        lengths = np.minimum(arrays[lengths_key][index], max_length)
        batch[inputs_key] = tokens_BxL
        batch[mask_key] = np.arange(max_length)[None, :] < lengths[:, None]
    return batch


def _process_slice(global_batch: int) -> slice:
    num_processes, process = jax.process_count(), jax.process_index()
    if global_batch % num_processes:
        raise ValueError(f"batch size {global_batch} is not divisible by {num_processes} processes")
    local = global_batch // num_processes
    return slice(process * local, (process + 1) * local)


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
    arrays: Arrays, *, batch_size: int, max_length: int, seed: int
) -> grain.MapDataset:
    """The infinite training stream: batch `i` is `dataset[i]`, the same on every run."""
    num_examples = len(arrays["targets"])
    own = _process_slice(batch_size)
    return (
        grain.MapDataset.source(_ShuffledEpochs(num_examples, seed))
        .batch(batch_size, drop_remainder=True)
        .map(lambda index: gather(arrays, np.asarray(index)[own], max_length))
    )


def train_iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
    """A prefetching iterator whose `get_state()`/`set_state()` go into checkpoints."""
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return iter(dataset.to_iter_dataset(options))


def eval_batches(arrays: Arrays, *, batch_size: int, max_length: int) -> Iterator[Arrays]:
    """The whole split in order; the last batch is padded with rows of weight 0."""
    num_examples = len(arrays["targets"])
    own = _process_slice(batch_size)
    for start in range(0, num_examples, batch_size):
        index = np.arange(start, min(start + batch_size, num_examples))
        weights = np.ones(batch_size, np.float32)
        weights[len(index):] = 0.0
        padded = np.concatenate([index, np.zeros(batch_size - len(index), index.dtype)])
        batch = gather(arrays, padded[own], max_length)
        batch["weights"] = weights[own]
        yield batch


def to_global(batch: Arrays, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Process-local rows -> global arrays sharded along the batch over every mesh axis."""
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in batch.items()
    }


# ---------------------------------------------------------------------------------------
# Command line: python -m lra.data prepare <task> --data_dir DIR [settings]

SETTING_FLAGS = ("num_train", "num_val", "num_test", "seed", "min_length", "max_length",
                 "resolution", "num_workers")
# Folders a task reads from: retrieval the downloaded TSVs; text and image tfds's data folder.
PATH_FLAGS = ("source_dir", "tfds_data_dir")
WORD_FLAGS = ("validation",)  # text, image: heldout | test (validate on test, as LRA)


def _prepare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lra.data", description="Prepare the data of an LRA task."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="generate or convert a task's data")
    prepare.add_argument("task", choices=tasks.NAMES)
    prepare.add_argument("--data_dir", required=True, help="folder to write the prepared data to")
    for name in SETTING_FLAGS:
        prepare.add_argument(f"--{name}", type=int, default=None)
    for name in PATH_FLAGS + WORD_FLAGS:
        prepare.add_argument(f"--{name}", default=None)
    args = parser.parse_args(argv)
    task = tasks.get(args.task)
    settings = {name: getattr(args, name) for name in SETTING_FLAGS + PATH_FLAGS + WORD_FLAGS
                if getattr(args, name) is not None}
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


if __name__ == "__main__":
    sys.exit(_prepare_main(sys.argv[1:]))
