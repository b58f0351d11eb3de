"""The data pipeline: order, resumable position, evaluation batches, masks, sharding."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lra.parallel import sharding
from lra.training import data


def _arrays(num_examples=10, width=6):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, width + 1, num_examples).astype(np.int32)
    inputs = np.zeros((num_examples, width), np.uint8)
    for row, length in enumerate(lengths):
        inputs[row, :length] = rng.integers(0, 5, length)  # token 0 inside a real span too
    return {"inputs": inputs, "lengths": lengths, "targets": np.arange(num_examples, dtype=np.int32)}


def test_train_stream_sees_every_example_once_per_epoch_in_a_new_order():
    arrays = _arrays(num_examples=12)
    dataset = data.train_dataset(arrays, batch_size=4, max_length=6, seed=3)
    epochs = [np.concatenate([dataset[e * 3 + i]["targets"] for i in range(3)]) for e in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert not np.array_equal(epochs[0], epochs[1])
    again = data.train_dataset(arrays, batch_size=4, max_length=6, seed=3)
    assert np.array_equal(again[4]["targets"], dataset[4]["targets"])
    other_seed = data.train_dataset(arrays, batch_size=4, max_length=6, seed=4)
    assert not np.array_equal(other_seed[0]["targets"], dataset[0]["targets"])


def _targets(batches, count: int) -> list[np.ndarray]:
    return [np.asarray(next(batches)["targets"]) for _ in range(count)]


@pytest.mark.parametrize("threads, workers", [(2, 0), (0, 1)])
def test_prefetched_stream_resumes_exactly_from_the_batches_taken(threads, workers):
    """The state counts the batches the loop took, not those read ahead: after 3 taken
    (and up to 2 + 4 read ahead), a new iterator at that state yields batch 3 on."""
    arrays = _arrays(num_examples=10)
    dataset = data.train_dataset(arrays, batch_size=4, max_length=6, seed=0)
    mesh = sharding.make_mesh(0)
    expected = [np.asarray(dataset[i]["targets"]) for i in range(8)]
    first = data.TrainBatches(dataset, mesh, threads=threads, workers=workers)
    np.testing.assert_array_equal(_targets(first, 3), expected[:3])
    time.sleep(0.2)  # let the read-ahead run
    state = first.get_state()
    first.close()
    assert state == {"next_index": 3}
    resumed = data.TrainBatches(dataset, mesh, threads=1, workers=0)  # other settings
    resumed.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    batches = [next(resumed) for _ in range(5)]
    resumed.close()
    np.testing.assert_array_equal([np.asarray(b["targets"]) for b in batches], expected[3:])
    assert all(b["inputs"].sharding.spec == sharding.batch_spec(mesh) for b in batches)


def test_mask_comes_from_lengths_not_token_values():
    arrays = _arrays()
    arrays["inputs"][0, :] = 0
    arrays["lengths"][0] = 4
    batch = data.gather(arrays, np.array([0]), max_length=8)
    np.testing.assert_array_equal(batch["mask"][0], [True] * 4 + [False] * 4)
    assert batch["inputs"].shape == (1, 8) and batch["inputs"].dtype == np.int32


def test_truncation_cuts_tokens_and_lengths():
    arrays = _arrays(width=6)
    arrays["lengths"][:] = 6
    batch = data.gather(arrays, np.arange(3), max_length=4)
    assert batch["inputs"].shape == (3, 4)
    assert batch["mask"].all()
    np.testing.assert_array_equal(batch["inputs"], arrays["inputs"][:3, :4])


def test_eval_batches_cover_the_split_once_with_padding_weighted_out():
    arrays = _arrays(num_examples=10)
    batches = list(data.eval_batches(arrays, batch_size=4, max_length=6))
    assert len(batches) == 3
    weights = np.concatenate([b["weights"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert weights.sum() == 10
    np.testing.assert_array_equal(targets[weights > 0], np.arange(10))
    mesh = sharding.make_mesh(0)
    prefetched = list(data.eval_device_batches(arrays, mesh, batch_size=4, max_length=6,
                                               threads=2))
    assert len(prefetched) == 3
    for host, device in zip(batches, prefetched):
        assert set(host) == set(device)
        for key, value in host.items():
            np.testing.assert_array_equal(np.asarray(device[key]), value)
            assert device[key].sharding.spec == sharding.batch_spec(mesh)


def test_pair_inputs_get_their_own_mask():
    arrays = _arrays()
    arrays["inputs2"] = arrays["inputs"][::-1].copy()
    arrays["lengths2"] = arrays["lengths"][::-1].copy()
    batch = data.gather(arrays, np.arange(2), max_length=6)
    np.testing.assert_array_equal(batch["mask2"].sum(1), arrays["lengths2"][:2])


def test_global_batch_is_sharded_over_the_data_axis():
    import jax

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = data.gather(_arrays(num_examples=8), np.arange(8), max_length=6)
    global_batch = data.to_global(batch, mesh)
    assert global_batch["inputs"].shape == (8, 6)
    assert len(global_batch["inputs"].addressable_shards) == 4
    np.testing.assert_array_equal(np.asarray(global_batch["targets"]), np.arange(8))


def test_missing_download_data_names_the_prepare_command(tmp_path):
    class DownloadTask:
        name, generated = "text", False

        def is_prepared(self, data_dir):
            return False

    with pytest.raises(FileNotFoundError, match="python -m lra.data prepare text --data_dir"):
        data.ensure_prepared(DownloadTask(), str(tmp_path / "nothing"), {})


def _prepare_cli(*args):
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "lra.data", "prepare", *args]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)


def test_prepare_command_writes_the_data_and_refuses_other_settings(tmp_path):
    sizes = ["--num_train", "30", "--num_val", "5", "--num_test", "5",
             "--min_length", "5", "--max_length", "40"]
    done = _prepare_cli("listops", "--data_dir", str(tmp_path), *sizes)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 30, "val": 5, "test": 5}
    assert (tmp_path / "basic_train.tsv").exists()
    again = _prepare_cli("listops", "--data_dir", str(tmp_path), *sizes[:-1], "50")
    assert again.returncode == 2
    assert "max_length=40 there, 50 requested" in again.stderr
    unknown = _prepare_cli("nonesuch", "--data_dir", str(tmp_path))
    assert unknown.returncode == 2 and "listops" in unknown.stderr


def test_seeds_and_epochs_give_independent_orders():
    """No two (seed, epoch) pairs over seeds 0..4 and epochs 0..4 share an epoch's order.

    With per-epoch seeds of seed + epoch, seed s's epoch e+1 would be seed s+1's epoch e.
    """
    num_examples = 64
    arrays = {"inputs": np.zeros((num_examples, 2), np.int32),
              "lengths": np.ones(num_examples, np.int32),
              "targets": np.arange(num_examples, dtype=np.int32)}
    orders = {}
    for seed in range(5):
        dataset = data.train_dataset(arrays, batch_size=16, max_length=2, seed=seed)
        for epoch in range(5):
            order = np.concatenate([dataset[epoch * 4 + i]["targets"] for i in range(4)])
            assert sorted(order) == list(range(num_examples))
            orders[seed, epoch] = tuple(order)
    assert len(set(orders.values())) == len(orders) == 25
