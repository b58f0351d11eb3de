"""Pretraining objectives (lra/training/objectives.py): targets and losses against NumPy written from
the definitions, padding never counted, masked_lm never masking padding, both documents of
a pair, and the encoder's per-token outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import listops as listops_config
from lra import models
from lra.training import objectives

VOCAB = 11
MASK_ID = VOCAB  # the extra embedding row


def _language_model(causal: bool, pooling: str = "mean"):
    config = listops_config.get_config("runlocal")
    config.model.num_layers, config.model.emb_dim, config.model.qkv_dim = 1, 16, 16
    config.model.num_heads, config.model.mlp_dim = 2, 16
    config.model.causal, config.model.pooling = causal, "last" if causal else pooling
    return models.build_model(config.model, attention="softmax", vocab_size=VOCAB,
                              num_classes=3, max_len=12, rngs=nnx.Rngs(0),
                              language_model=True, mask_token=not causal)


def _batch(seed=0, lengths=(12, 7, 3)):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (len(lengths), 12)).astype(np.int32)
    mask = np.arange(12)[None, :] < np.array(lengths)[:, None]
    return {"inputs": jnp.asarray(tokens), "mask": jnp.asarray(mask),
            "targets": jnp.zeros(len(lengths), jnp.int32)}


def _log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _naive_loss(logits, targets, where):
    """Mean cross-entropy and accuracy over the positions `where`, in float64."""
    logp = _log_softmax(np.asarray(logits, np.float64))
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    where = np.asarray(where, bool)
    correct = logits.argmax(-1) == targets
    return -picked[where].mean(), correct[where].mean()


CAUSAL = objectives.Spec(objectives.Objective.CAUSAL_LM, 0.0, MASK_ID)
MASKED = objectives.Spec(objectives.Objective.MASKED_LM, 0.3, MASK_ID)


def _mean_loss(model, batch, key, spec):
    """(mean loss, accuracy) over the batch's targets, masks drawn from `key`."""
    sums = objectives.loss_sums(model, objectives.draw_masks(spec, batch, key), spec,
                                deterministic=True)
    return sums["loss"] / sums["count"], sums["correct"] / sums["count"]


def test_causal_lm_predicts_the_next_real_token():
    model, batch = _language_model(causal=True), _batch()
    loss, accuracy = _mean_loss(model, batch, jax.random.key(0), CAUSAL)
    tokens, mask = np.asarray(batch["inputs"]), np.asarray(batch["mask"])
    logits = np.asarray(model(batch["inputs"], batch["mask"]))
    # Position t predicts token t + 1 where both are real (written out row by row).
    targets = np.zeros_like(tokens)
    where = np.zeros_like(mask)
    for row in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if mask[row, t] and mask[row, t + 1]:
                targets[row, t], where[row, t] = tokens[row, t + 1], True
    expected_loss, expected_accuracy = _naive_loss(logits, targets, where)
    assert where.sum() == 11 + 6 + 2
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(float(accuracy), expected_accuracy, rtol=1e-6)


def test_masked_lm_loss_is_on_the_masked_real_tokens_only():
    model, batch = _language_model(causal=False), _batch(1)
    key = jax.random.key(3)
    loss, _ = _mean_loss(model, batch, key, MASKED)
    tokens, mask = batch["inputs"], batch["mask"]
    rows = objectives.lm_sequences(objectives.draw_masks(MASKED, batch, key))
    inputs, _, picked = objectives.lm_example(MASKED, rows)
    inputs, picked = np.asarray(inputs), np.asarray(picked)
    # The corrupted input says where the masks are: the mask id, at real tokens only.
    np.testing.assert_array_equal(picked, inputs == MASK_ID)
    np.testing.assert_array_equal(inputs[~picked], np.asarray(tokens)[~picked])
    logits = np.asarray(model(jnp.asarray(inputs), mask))
    expected_loss, _ = _naive_loss(logits, np.asarray(tokens), picked)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)


def test_masked_lm_never_masks_padding_and_masks_at_the_rate():
    mask = jnp.asarray(np.random.default_rng(0).random((64, 256)) < 0.6)
    picked = np.asarray(objectives.masked_positions(jax.random.key(1), mask, 0.15))
    assert not picked[~np.asarray(mask)].any()
    rate = picked.sum() / np.asarray(mask).sum()
    assert abs(rate - 0.15) < 0.01, rate


@pytest.mark.parametrize("spec", [CAUSAL, MASKED], ids=["causal_lm", "masked_lm"])
def test_padding_tokens_change_no_loss(spec):
    model = _language_model(causal=spec is CAUSAL)
    batch = _batch(2)
    noise = np.random.default_rng(9).integers(0, VOCAB, batch["inputs"].shape)
    other = dict(batch, inputs=jnp.where(batch["mask"], batch["inputs"], noise))
    assert not np.array_equal(np.asarray(other["inputs"]), np.asarray(batch["inputs"]))
    key = jax.random.key(4)
    first = _mean_loss(model, batch, key, spec)
    second = _mean_loss(model, other, key, spec)
    np.testing.assert_allclose(np.asarray(first), np.asarray(second), rtol=1e-6)
    sums = objectives.eval_sums(model, dict(batch, weights=jnp.asarray([1.0, 1.0, 0.0])),
                                key, spec)
    full = objectives.eval_sums(model, dict(batch, weights=jnp.ones(3)), key, spec)
    assert float(sums["count"]) < float(full["count"])  # the padding row counts nothing


def test_pair_tasks_pretrain_on_both_documents_interleaved():
    """Row 2i is pair i's first document, 2i + 1 its second (the dual encoder's order, so
    no row changes device), with masked_lm's draws following their tokens."""
    first, second = _batch(5, (12, 4)), _batch(6, (9, 2))
    batch = {"inputs": first["inputs"], "mask": first["mask"],
             "inputs2": second["inputs"][:, :10], "mask2": second["mask"][:, :10]}
    rows = objectives.lm_sequences(objectives.draw_masks(MASKED, batch, jax.random.key(2)))
    assert rows["tokens"].shape == (4, 12) and rows["weights"].shape == (4,)
    np.testing.assert_array_equal(np.asarray(rows["mask"]).sum(1), [12, 9, 4, 2])
    tokens, picked = np.asarray(rows["tokens"]), np.asarray(rows["picked"])
    np.testing.assert_array_equal(tokens[1, :9], np.asarray(second["inputs"])[0, :9])
    np.testing.assert_array_equal(tokens[2], np.asarray(first["inputs"])[1])
    assert not picked[~np.asarray(rows["mask"])].any() and picked.any()


def test_encoder_tokens_are_the_pooled_outputs_per_position():
    """`Encoder.tokens` drops the CLS position; mean pooling of it is the pooled vector."""
    for pooling in ("cls", "mean"):
        model = _language_model(causal=False, pooling=pooling)
        batch = _batch(7)
        per_token = np.asarray(model.encoder.tokens(batch["inputs"], batch["mask"]))
        assert per_token.shape == (3, 12, 16)
        pooled = np.asarray(model.encoder(batch["inputs"], batch["mask"]))
        if pooling == "mean":
            mask = np.asarray(batch["mask"])[..., None]
            np.testing.assert_allclose(pooled, (per_token * mask).sum(1) / mask.sum(1),
                                       rtol=1e-5, atol=1e-6)


def test_objective_must_fit_the_encoder():
    from lra.training import validation
    config = listops_config.get_config("runlocal")
    config.objective = "causal_lm"
    with pytest.raises(ValueError, match="needs a causal encoder"):
        validation.validate_config(config, 1)
    config.objective, config.model.causal, config.model.pooling = "masked_lm", True, "last"
    with pytest.raises(ValueError, match="needs a bidirectional encoder"):
        validation.validate_config(config, 1)
    config.model.causal, config.model.pooling, config.mask_rate = False, "cls", 1.5
    with pytest.raises(ValueError, match="mask_rate"):
        validation.validate_config(config, 1)
    config.objective, config.mask_rate = "nonesuch", 0.1
    with pytest.raises(ValueError, match="known: classify, causal_lm, masked_lm"):
        validation.validate_config(config, 1)


class _FixedLogits:
    """A stand-in model: fixed logits [N, L, V] (the token head's outputs), gathered at
    `positions` as `LanguageModel` does."""

    def __init__(self, logits):
        self.logits = jnp.asarray(logits)

    def __call__(self, inputs, mask, *, deterministic, positions=None):
        if positions is None:
            return self.logits
        return jnp.take_along_axis(self.logits, positions[..., None], axis=1)


@pytest.mark.parametrize("max_targets", [0, 3])
def test_token_classify_scores_the_scored_real_positions_only(max_targets):
    """Loss, accuracy and the share of rows with every scored position right, against
    NumPy; changing logits at unscored or padded positions changes nothing."""
    rng = np.random.default_rng(0)
    lengths = np.array([12, 7, 9])
    targets = np.full((3, 12), -1)
    targets[0, [2, 5, 11]] = [1, 4, 7]
    targets[1, [1, 6]] = [3, 3]
    targets[2, [4, 10]] = [2, 9]  # position 10 is padding (length 9): never scored
    logits = rng.normal(size=(3, 12, VOCAB))
    logits[1, 1, 3] = logits[1, 6, 3] = 50.0  # row 1: every scored position right
    batch = {"inputs": jnp.zeros((3, 12), jnp.int32), "targets": jnp.asarray(targets, jnp.int32),
             "mask": jnp.asarray(np.arange(12)[None, :] < lengths[:, None])}
    spec = objectives.Spec(objectives.Objective.TOKEN_CLASSIFY, max_targets=max_targets)
    sums = objectives.loss_sums(_FixedLogits(logits), batch, spec, deterministic=True)

    where = (targets >= 0) & (np.arange(12)[None, :] < lengths[:, None])
    loss, accuracy = _naive_loss(logits, np.maximum(targets, 0), where)
    np.testing.assert_allclose(sums["loss"] / sums["count"], loss, rtol=1e-5)
    np.testing.assert_allclose(sums["correct"] / sums["count"], accuracy, rtol=1e-6)
    assert float(sums["count"]) == 6
    rows_right = [np.all((logits[r].argmax(-1) == targets[r])[where[r]]) for r in range(3)]
    assert float(sums["rows_correct"]) == sum(rows_right) and float(sums["rows"]) == 3

    changed = logits.copy()
    changed[~where] = rng.normal(size=changed[~where].shape) * 100
    again = objectives.loss_sums(_FixedLogits(changed), batch, spec, deterministic=True)
    for key in sums:
        np.testing.assert_allclose(again[key], sums[key], rtol=1e-6)


def test_token_classify_refuses_a_bidirectional_encoder_naming_the_task():
    from configs import mqar as mqar_config
    from lra.training import validation
    config = mqar_config.get_config("runlocal")
    config.model.causal = False
    with pytest.raises(ValueError, match="'mqar'.*causal"):
        validation.validate_config(config, 1)
    config = mqar_config.get_config("runlocal,mixer=linformer")
    with pytest.raises(ValueError, match="'mqar'.*causal form"):
        validation.validate_config(config, 1)
