"""Training objectives: what the model predicts from a batch, and the loss on it.

`config.objective`:
  classify   the task's label from the pooled encoder output (the LRA tasks).
  causal_lm  next-token prediction on the task's own inputs: the output at token t
             predicts token t + 1, wherever both are real (causal encoders only).
  masked_lm  denoising on the task's own inputs: each real token is picked with
             probability `config.mask_rate`, its id replaced by the mask token (id
             `vocab_size`, an extra embedding row), and the loss is on the picked tokens
             only (bidirectional encoders only).

These are Amos, Berant and Gupta's self-pretraining objectives ("Never Train from
Scratch", ICLR 2024, section 2: causal for unidirectional models, masked for
bidirectional ones, on the downstream task's training inputs only). Their code replaces a
masked token by the mask token alone (no 80/10/10 mix as in BERT), and so does this.
Pair tasks (retrieval) pretrain on both documents, each as its own sequence, as their
`AANLM` does.

Padding never enters a loss or a metric: targets exist only at real tokens (and, for
evaluation, in real rows: `weights`). The language-model metrics are the mean loss and
the accuracy over target tokens; they go by the same names (`loss`, `accuracy`) as the
classifier's, so logs, checkpoints' best-val bookkeeping and the report work unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lra.models.attention import Choice

# What a classifier is called with, in order; a paired task (retrieval) adds the second document.
MODEL_INPUTS = ("inputs", "mask", "inputs2", "mask2")
_MASKING_STREAM = 7  # fold_in index of the masked-token draws, apart from dropout's


class Objective(Choice):
    """What the model is trained to predict."""

    CLASSIFY = "classify"
    CAUSAL_LM = "causal_lm"
    MASKED_LM = "masked_lm"


@dataclasses.dataclass(frozen=True)
class Spec:
    """An objective with its settings; `mask_id` is the mask token (masked_lm)."""

    objective: Objective = Objective.CLASSIFY
    mask_rate: float = 0.0
    mask_id: int = 0

    @property
    def is_lm(self) -> bool:
        return self.objective is not Objective.CLASSIFY


def from_config(config, vocab_size: int) -> Spec:
    """The run's objective; the mask token is id `vocab_size` (the extra embedding row)."""
    return Spec(Objective(config.get("objective", "classify")),
                float(config.get("mask_rate", 0.0)), vocab_size)


# ---------------------------------------------------------------------------------------
# Language-model targets


def lm_sequences(batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens [N, L], mask [N, L], row weights [N]): one row per document.

    A pair task's two documents become rows of their own (N = 2B); evaluation batches
    carry `weights` (0 for padding rows), training batches weigh every row 1.
    """
    tokens, mask = batch["inputs"], batch["mask"].astype(bool)
    weights = batch.get("weights", jnp.ones(tokens.shape[0], jnp.float32))
    if "inputs2" in batch:
        length = max(tokens.shape[1], batch["inputs2"].shape[1])
        pad = lambda x: jnp.pad(x, ((0, 0), (0, length - x.shape[1])))
        tokens = jnp.concatenate([pad(tokens), pad(batch["inputs2"])])
        mask = jnp.concatenate([pad(mask), pad(batch["mask2"].astype(bool))])
        weights = jnp.concatenate([weights, weights])
    return tokens, mask, weights


def masked_positions(key: jax.Array, mask_NxL: jax.Array, rate: float) -> jax.Array:
    """bool [N, L]: each real token picked with probability `rate`; padding never."""
    return jax.random.bernoulli(key, rate, mask_NxL.shape) & mask_NxL


def lm_example(spec: Spec, tokens_NxL, mask_NxL, key) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(model inputs [N, L], targets [N, L], target positions [N, L] bool)."""
    if spec.objective is Objective.CAUSAL_LM:
        targets = jnp.pad(tokens_NxL[:, 1:], ((0, 0), (0, 1)))
        has_next = jnp.pad(mask_NxL[:, 1:], ((0, 0), (0, 1)))
        return tokens_NxL, targets, mask_NxL & has_next
    picked = masked_positions(jax.random.fold_in(key, _MASKING_STREAM), mask_NxL,
                              spec.mask_rate)
    return jnp.where(picked, spec.mask_id, tokens_NxL), tokens_NxL, picked


def _lm_terms(model, spec: Spec, batch, key, deterministic: bool):
    """Per-token losses, correct flags and weights [N, L] (0 off target)."""
    tokens, mask, row_weights = lm_sequences(batch)
    inputs, targets, where = lm_example(spec, tokens, mask, key)
    logits_NxLxV = model(inputs, mask, deterministic=deterministic)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_NxLxV, targets)
    correct = jnp.argmax(logits_NxLxV, -1) == targets
    return losses, correct, where * row_weights[:, None]


# ---------------------------------------------------------------------------------------
# Losses and evaluation sums


def _class_logits(model, batch, deterministic: bool) -> jax.Array:
    return model(*(batch[k] for k in MODEL_INPUTS if k in batch), deterministic=deterministic)


def train_loss(model, batch, key, spec: Spec, *, deterministic: bool = False):
    """(mean loss, accuracy) over the batch's targets: its rows (classify) or its target
    tokens (language models; a batch without any counts 0)."""
    if not spec.is_lm:
        logits = _class_logits(model, batch, deterministic)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return losses.mean(), jnp.mean(jnp.argmax(logits, -1) == batch["targets"])
    losses, correct, weights = _lm_terms(model, spec, batch, key, deterministic)
    count = jnp.maximum(weights.sum(), 1.0)
    return (losses * weights).sum() / count, (correct * weights).sum() / count


def eval_sums(model, batch, key, spec: Spec) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over a batch's targets, and their count
    (padding rows, weight 0, count nothing)."""
    if not spec.is_lm:
        logits = _class_logits(model, batch, True)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        weights = batch["weights"]
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * weights
        return {"loss": jnp.sum(losses * weights), "correct": jnp.sum(correct),
                "count": jnp.sum(weights)}
    losses, correct, weights = _lm_terms(model, spec, batch, key, True)
    return {"loss": jnp.sum(losses * weights), "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}
