"""Sequence parallelism, the `seq` mesh axis (config.mesh_seq): the mesh, the batches'
layouts, the encoder's activations, a training run equal to mesh_seq=1, the config checks
and resuming with another mesh_seq.

The numbers are those of mesh_seq=1 up to float rounding however the attention crosses
the split: by ring attention where softmax and memory_efficient run it, else by XLA
gathering the sequence for them.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_train
from configs_for_tests import listops_runlocal
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs import listops as listops_config
from lra import models, tasks
from lra.common import set_path
from lra.models.attention import sequence_parallel
from lra.parallel import sharding
from lra.training import data, train, workdir

ROWS = ("data", "fsdp")

# tests/test_train.py's tiny ListOps run, 20 steps logged each, with mean pooling: cls
# adds a position and is refused under mesh_seq > 1 (see test_cls_pooling_is_refused...).
TINY = {**test_train.TINY, "num_train_steps": 20, "log_every": 1, "eval_every": 20,
        "checkpoint_every": 20, "model.pooling": "mean"}


def _config(**overrides):
    return listops_runlocal({**TINY, **overrides})


# ---------------------------------------------------------------------------------------
# The mesh and the batches' layouts


@pytest.mark.parametrize("fsdp, seq, shape", [
    (1, 1, {"data": 4, "fsdp": 1, "seq": 1}),
    (1, 2, {"data": 2, "fsdp": 1, "seq": 2}),
    (2, 2, {"data": 1, "fsdp": 2, "seq": 2}),
    (1, 4, {"data": 1, "fsdp": 1, "seq": 4}),
])
def test_mesh_has_a_seq_axis_and_data_gets_the_rest(fsdp, seq, shape):
    mesh = sharding.make_mesh(4, fsdp, seq)
    assert mesh.axis_names == ("data", "fsdp", "seq")
    assert dict(mesh.shape) == shape
    assert dict(sharding.make_mesh(4, fsdp).shape) == {**shape, "data": 4 // fsdp, "seq": 1}


@pytest.mark.parametrize("fsdp, seq", [(1, 3), (2, 4), (1, 0)])
def test_make_mesh_names_the_seq_key(fsdp, seq):
    with pytest.raises(ValueError, match=f"config.mesh_seq={seq}"):
        sharding.make_mesh(4, fsdp, seq)


def test_batch_spec_splits_sequences_over_seq_and_examples_over_data_and_fsdp():
    for fsdp in (1, 2):
        mesh = sharding.make_mesh(4, fsdp, 2)
        assert sharding.batch_spec(mesh, 1) == PartitionSpec(ROWS)  # [B]: lengths, targets
        assert sharding.batch_spec(mesh, 2) == PartitionSpec(ROWS, "seq")  # [B, L]
        assert sharding.batch_spec(mesh) == PartitionSpec(ROWS)
    mesh = sharding.make_mesh(4)  # seq = 1: every array as before, rows over data and fsdp
    assert sharding.batch_spec(mesh, 1) == sharding.batch_spec(mesh, 2) == PartitionSpec(ROWS)
    assert sharding.step_batch_sharding(mesh).spec == PartitionSpec(ROWS)
    # A mesh without a seq axis (as some tests build) splits rows over its axes.
    plain = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert sharding.batch_spec(plain, 2) == PartitionSpec(("data",))


def _arrays(num_rows=8, length=8):
    rng = np.random.default_rng(0)
    return {"inputs": rng.integers(1, 10, (num_rows, length)),
            "lengths": rng.integers(1, length + 1, num_rows),
            "targets": np.arange(num_rows)}


def test_global_batches_split_each_sequence_over_seq():
    mesh = sharding.make_mesh(4, 1, 2)
    arrays = _arrays()
    batch = data.to_global(data.gather(arrays, np.arange(8), max_length=8), mesh)
    for key in ("inputs", "mask"):
        assert batch[key].sharding.spec == PartitionSpec(ROWS, "seq")
        assert {shard.data.shape for shard in batch[key].addressable_shards} == {(4, 4)}
    assert batch["targets"].sharding.spec == PartitionSpec(ROWS)
    assert {shard.data.shape for shard in batch["targets"].addressable_shards} == {(4,)}
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), arrays["inputs"])
    # The compiled step's abstract batch has the same layouts; evaluation batches too.
    dataset = data.train_dataset(arrays, batch_size=8, max_length=8, seed=0)
    abstract = data.TrainBatches(dataset, mesh, threads=0).abstract_batch()
    assert abstract["inputs"].sharding.spec == PartitionSpec(ROWS, "seq")
    assert abstract["targets"].sharding.spec == PartitionSpec(ROWS)
    [evaluation] = list(data.eval_device_batches(arrays, mesh, batch_size=8, max_length=8,
                                                 threads=0))
    assert evaluation["mask"].sharding.spec == PartitionSpec(ROWS, "seq")
    assert evaluation["weights"].sharding.spec == PartitionSpec(ROWS)


def test_micro_batches_keep_each_array_layout():
    """grad_accum_steps splits [B] and [B, L] arrays into [A, B / A, ...] micro-batches,
    each keeping its layout (rows over data and fsdp, L over seq)."""
    mesh = sharding.make_mesh(4, 1, 2)
    batch = data.to_global(data.gather(_arrays(), np.arange(8), max_length=8), mesh)
    split = jax.jit(lambda batch: train._micro_batches(batch, 2, mesh))(batch)
    assert split["inputs"].shape == (2, 4, 8)
    for key, spec in (("inputs", PartitionSpec(None, ROWS, "seq")),
                      ("targets", PartitionSpec(None, ROWS))):
        layout = split[key].sharding  # jit's output names only the axes of size > 1
        assert layout.is_equivalent_to(NamedSharding(mesh, spec), split[key].ndim), key
    np.testing.assert_array_equal(np.asarray(split["targets"]), [[0, 2, 4, 6], [1, 3, 5, 7]])


# ---------------------------------------------------------------------------------------
# The encoder's activations


def _encoder(pooling: str, causal: bool = False):
    return models.Encoder(
        vocab_size=10, max_len=16, num_layers=2, emb_dim=8, qkv_dim=8, num_heads=2, mlp_dim=8,
        dropout=0.0, attention_dropout=0.0, pooling=pooling, positions="sinusoidal",
        attention="softmax", attention_options={}, causal=causal, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("pooling, causal", [("mean", False), ("last", True), ("cls", False)])
def test_encoder_splits_its_activations_by_sequence_and_pools_the_same(pooling, causal):
    """Mean (a reduction across seq), last (a gather across seq) and cls (position 0, on
    the first seq shard, with the encoder's 17 positions split unevenly) give the
    unsplit numbers; the lowered forward pass constrains the blocks' activations to
    (rows, seq) only under a seq axis > 1."""
    encoder = _encoder(pooling, causal)
    graphdef, state = nnx.split(encoder)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 10, (4, 16)).astype(np.int32)
    mask = np.arange(16)[None] < np.array([16, 9, 5, 12])[:, None]
    forward = jax.jit(lambda state, tokens, mask: nnx.merge(graphdef, state)(tokens, mask))
    expected = forward(state, tokens, mask)
    texts = {}
    for seq in (1, 2):
        mesh = sharding.make_mesh(4, 1, seq)
        with jax.set_mesh(mesh):
            batch = data.to_global({"inputs": tokens, "mask": mask}, mesh)
            texts[seq] = forward.lower(state, batch["inputs"], batch["mask"]).as_text()
            pooled = forward(state, batch["inputs"], batch["mask"])
        np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)
    assert "sharding_constraint" not in texts[1]  # seq = 1: today's computation
    assert texts[2].count("sharding_constraint") == 3  # the blocks' input and 2 outputs
    assert '{"seq"}' in texts[2]


@pytest.mark.parametrize("attention, causal, positions", [
    ("softmax", True, "rope"), ("memory_efficient", False, "learned")])
def test_striped_encoder_gives_the_numbers_of_token_order(attention, causal, positions,
                                                          monkeypatch):
    """seq_layout='striped' on (data 1, seq 4): the blocks hold tokens i, i + 4, ... on
    device i, causal masks and rotary angles follow the token positions, and token order
    comes back: every token's output and every parameter's gradient equal the unsplit
    encoder's (right padding: one row of 16 real tokens, one of 6)."""
    encoder = models.Encoder(
        vocab_size=10, max_len=16, num_layers=2, emb_dim=8, qkv_dim=8, num_heads=2,
        mlp_dim=8, dropout=0.0, attention_dropout=0.0, pooling="last" if causal else "mean",
        positions=positions, attention=attention, attention_options={}, causal=causal,
        rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 10, (2, 16)).astype(np.int32)
    mask = np.arange(16)[None] < np.array([16, 6])[:, None]
    cot = rng.normal(size=(2, 16, 8)).astype(np.float32)

    def loss(params, tokens, mask):
        out = nnx.merge(graphdef, params, rest).tokens(tokens, mask)
        return jnp.sum(out * cot), out

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, expected), expected_grads = grad(params, tokens, mask)
    striped = []
    monkeypatch.setattr(sequence_parallel, "to_striped",
                        _recording(sequence_parallel.to_striped, striped))
    mesh = sharding.make_mesh(4, 1, 4)
    with jax.set_mesh(mesh), sequence_parallel.use_seq_layout("striped"):
        (_, got), got_grads = grad(params, tokens, mask)
    assert striped  # the blocks ran striped
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Relative to the largest gradient: the key projection's bias has none but rounding.
    scale = max(np.abs(e).max() for e in jax.tree.leaves(expected_grads))
    for g, e in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * scale)


def test_striped_encoder_refuses_a_mixer_that_needs_token_order():
    encoder = models.Encoder(
        vocab_size=10, max_len=16, num_layers=1, emb_dim=8, qkv_dim=8, num_heads=2,
        mlp_dim=8, dropout=0.0, attention_dropout=0.0, pooling="mean", positions="none",
        attention="linear", attention_options={}, rngs=nnx.Rngs(0))
    tokens, mask = np.ones((2, 16), np.int32), np.ones((2, 16), bool)
    with jax.set_mesh(sharding.make_mesh(4, 1, 2)), sequence_parallel.use_seq_layout("striped"):
        with pytest.raises(ValueError, match=(r"seq_layout='striped' over the 'seq' axis: "
                                              r"mixer 'linear' needs the tokens in order")):
            encoder(tokens, mask)


def test_encoder_outside_a_mesh_is_unchanged():
    x = jnp.ones((2, 4, 3))
    assert models.encoder.split_sequence(x) is x


# ---------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("listops")
    data.ensure_prepared(tasks.get("listops"), str(path), _config().prepare)
    return path


def _run(data_dir, run_dir, **overrides):
    config = _config(**overrides)
    config.data_dir = str(data_dir)
    results = train.train_and_evaluate(config, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return results, [r["loss"] for r in records if r["split"] == "train"]


def _recording(function, calls: list):
    def recorded(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return recorded


def test_mesh_seq_2_trains_as_mesh_seq_1(data_dir, tmp_path, monkeypatch):
    """20 steps of the real loop (prefetched global batches, the compiled loop step,
    evaluation, checkpoints) on 4 devices: (data 2, seq 2) gives the losses and accuracies
    of (data 4), with a hybrid of two layers: softmax attention (implementation xla;
    all-gather of keys and values, config.kv_strategy) then Gated DeltaNet (state
    passing); the split run also shards the parameters (fsdp 2, so data 1), accumulates
    2 micro-batches and rematerialises the blocks (no dropout, whose masks would be
    drawn per micro-batch)."""
    hybrid = {"model.num_layers": 2, "model.mixer_pattern": "softmax+gated_deltanet",
              "model.dropout": 0.0, "model.attention_dropout": 0.0}
    expected, expected_losses = _run(data_dir, tmp_path / "seq1", mesh_seq=1, **hybrid)
    gathered = []  # config.kv_strategy reaches the attention: all-gather, not the ring
    monkeypatch.setattr(sequence_parallel, "all_gather_attention",
                        _recording(sequence_parallel.all_gather_attention, gathered))
    results, losses = _run(data_dir, tmp_path / "seq2", mesh_seq=2, kv_strategy="all_gather",
                           mesh_fsdp=2, grad_accum_steps=2, remat=True, **hybrid)
    assert gathered
    assert len(losses) == 20
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert np.mean(expected_losses[-5:]) < np.mean(expected_losses[:5]) - 0.05  # it trains
    for key in ("val_accuracy", "test_accuracy", "best_val_accuracy", "best_step"):
        assert results[key] == expected[key], key
    assert results["config_hash"] == expected["config_hash"]  # mesh_seq changes no result


# ---------------------------------------------------------------------------------------
# Config checks


def _validate(config):
    train.validate_config(config, num_devices=4)


@pytest.mark.parametrize("arg, overrides, message", [
    ("attention=linformer", {},
     (r"mixer 'linformer' is not yet supported under sequence parallelism \(config.mesh_seq=2\)"
      r"; supported mixers: softmax \(implementation 'xla'\), memory_efficient, fox \(form "
      r"'blockwise'\), linear, ")),
    ("attention=reformer", {}, r"mixer 'reformer' is not yet supported .*\(config.mesh_seq=2\)"),
    ("attention=s4d", {}, (r"config.model.attention_options.form='conv' of mixer 's4d' is not "
                           r"yet supported .*config.mesh_seq=2.*s4d \(form 'recurrent'\)")),
    ("attention=softmax", {"model.attention_options.implementation": "pallas",
                           "model.attention_dropout": 0.0},
     (r"config.model.attention_options.implementation='pallas' of mixer 'softmax' is not yet "
      r"supported under sequence parallelism \(config.mesh_seq=2\)")),
    ("pattern=softmax+longformer", {},
     r"per-layer pattern's mixer 'longformer' is not yet supported .*config.mesh_seq=2"),
    ("attention=fox", {"model.attention_options.form": "quadratic"},
     (r"config.model.attention_options.form='quadratic' of mixer 'fox' is not yet supported "
      r".*config.mesh_seq=2")),
    ("attention=softmax", {"max_length": 63},
     r"config.max_length=63 must be divisible by config.mesh_seq=2"),
    ("attention=softmax", {"model.pooling": "cls"},
     r"config.model.pooling='cls' .*max_length \+ 1 = 129.*config.mesh_seq=2.*'mean' or 'last'"),
    ("attention=softmax", {"mesh_seq": 3}, r"config.mesh_seq=3 must divide the 4 devices"),
    ("attention=softmax", {"mesh_seq": 4, "mesh_fsdp": 2},
     r"config.mesh_seq=4 must divide the 4 devices together with config.mesh_fsdp=2"),
    ("attention=softmax", {"mesh_seq": 0}, r"config.mesh_seq must be a positive integer"),
    ("attention=softmax", {"kv_strategy": "bogus"},
     r"config.kv_strategy must be one of 'ring', 'all_gather'; got 'bogus'"),
    ("attention=softmax", {"seq_layout": "bogus"},
     r"config.seq_layout must be one of 'contiguous', 'striped'; got 'bogus'"),
    ("pattern=softmax+linear", {"seq_layout": "striped"},
     (r"config.seq_layout='striped' runs only softmax, memory_efficient: mixer 'linear' "
      r"needs the tokens of its sequence in order")),
    ("attention=softmax", {"seq_layout": "striped", "model.attention_dropout": 0.1},
     r"config.seq_layout='striped' needs config.model.attention_dropout=0 \(got 0.1\)"),
    ("attention=softmax", {"batch_size": 3},
     r"config.batch_size=3 is not divisible by 2 batch shards \(4 devices / config.mesh_seq=2\)"),
])
def test_what_cannot_split_the_sequence_is_refused_naming_the_key(arg, overrides, message):
    config = listops_config.get_config(f"runlocal,{arg}")
    config.mesh_seq, config.model.pooling = 2, "mean"
    for key, value in overrides.items():
        set_path(config, key, value)
    with pytest.raises(ValueError, match=message):
        _validate(config)


@pytest.mark.parametrize("arg", ["attention=softmax", "attention=memory_efficient",
                                 "attention=gated_deltanet", "pattern=s5+fox"])
def test_supported_mixers_are_accepted_and_batches_split_over_fewer_shards(arg):
    config = listops_config.get_config(f"runlocal,{arg}")
    config.mesh_seq, config.model.pooling = 2, "mean"
    config.batch_size = config.eval_batch_size = 2  # 2 rows: one per (data) shard
    _validate(config)
    config.model.pooling, config.model.causal = "last", True
    _validate(config)


def test_a_run_resumes_with_another_mesh_seq_and_old_runs_without_the_key(tmp_path):
    config = _config(mesh_seq=1)
    workdir.check_and_write_config(tmp_path, config)
    config.mesh_seq = 2
    workdir.check_and_write_config(tmp_path, config)  # no error: the same run
    assert json.loads((tmp_path / "config.json").read_text())["mesh_seq"] == 2
    old = workdir.config_dict(config)
    del old["mesh_seq"]  # config.json of an lra from before the key
    (tmp_path / "config.json").write_text(json.dumps(old))
    workdir.check_and_write_config(tmp_path, config)
    assert workdir.config_hash(config) == workdir.config_hash(_config())  # as mesh_fsdp
    assert "mesh_seq" in workdir.RESUMABLE_CHANGES and workdir.ADDED_DEFAULTS["mesh_seq"] == 1
    assert "kv_strategy" in workdir.RESUMABLE_CHANGES
