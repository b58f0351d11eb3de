"""Training objectives: what the model predicts from a batch, and the loss on it.

`config.objective`:
  classify   the task's label from the pooled encoder output (the LRA tasks).
  causal_lm  next-token prediction on the task's own inputs: the output at token t
             predicts token t + 1, wherever both are real (causal encoders only).
  masked_lm  denoising on the task's own inputs: each real token is picked with
             probability `config.mask_rate`, its id replaced by the mask token (id
             `vocab_size`, an extra embedding row), and the loss is on the picked tokens
             only (bidirectional encoders only).
  token_classify  per-position targets of a token task (MQAR, MAD, induction heads:
             `lra.tasks.token_tasks`): the output at position t predicts the task's
             target there, at scored positions only (targets >= 0; causal encoders
             only). Its metrics add `sequence_accuracy`: the share of examples with
             every scored position right.

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

from lra.common import Choice
from lra.models.encoder import interleave_pairs

# What a classifier is called with, in order; a paired task (retrieval) adds the second document.
MODEL_INPUTS = ("inputs", "mask", "inputs2", "mask2")
_MASKING_STREAM = 7  # fold_in index of the masked-token draws, apart from dropout's


class Objective(Choice):
    """What the model is trained to predict."""

    CLASSIFY = "classify"
    CAUSAL_LM = "causal_lm"
    MASKED_LM = "masked_lm"
    TOKEN_CLASSIFY = "token_classify"


@dataclasses.dataclass(frozen=True)
class Spec:
    """An objective with its settings; `mask_id` is the mask token (masked_lm);
    `max_targets` the most scored positions of a row (token_classify: the token head runs
    at that many positions per row, gathered; 0 = at every position)."""

    objective: Objective = Objective.CLASSIFY
    mask_rate: float = 0.0
    mask_id: int = 0
    max_targets: int = 0

    @property
    def is_lm(self) -> bool:
        """A pretraining objective (causal_lm, masked_lm): targets are the inputs."""
        return self.objective in (Objective.CAUSAL_LM, Objective.MASKED_LM)

    @property
    def per_token(self) -> bool:
        """The model outputs a token at every position (`LanguageModel`)."""
        return self.objective is not Objective.CLASSIFY


def from_config(config, vocab_size: int, max_targets: int = 0) -> Spec:
    """The run's objective; the mask token is id `vocab_size` (the extra embedding row)."""
    return Spec(Objective(config.get("objective", "classify")),
                float(config.get("mask_rate", 0.0)), vocab_size, max_targets)


# ---------------------------------------------------------------------------------------
# Language-model targets


def draw_masks(spec: Spec, batch: dict, key: jax.Array) -> dict:
    """`batch` with masked_lm's picks for its whole rows, drawn once from `key`.

    `picked` [B, L] (and `picked2` for a pair's second document): each real token picked
    with probability `spec.mask_rate`. They are drawn for the whole batch before it is
    split into micro-batches, so which tokens are masked does not depend on
    `grad_accum_steps`. Other objectives get `batch` unchanged.
    """
    if spec.objective is not Objective.MASKED_LM:
        return batch
    key = jax.random.fold_in(key, _MASKING_STREAM)
    picks = {"picked": masked_positions(key, batch["mask"].astype(bool), spec.mask_rate)}
    if "inputs2" in batch:
        picks["picked2"] = masked_positions(jax.random.fold_in(key, 1),
                                            batch["mask2"].astype(bool), spec.mask_rate)
    return {**batch, **picks}


def lm_sequences(batch: dict) -> dict[str, jax.Array]:
    """One row per document: `tokens` [N, L], `mask` [N, L], row `weights` [N], and
    `picked` [N, L] where the batch has masked_lm's draws (`draw_masks`).

    A pair task's documents become rows of their own (N = 2B), interleaved as the dual
    encoder does (`interleave_pairs`: row 2i is pair i's first document), so no row moves
    between devices. Evaluation batches carry `weights` (0 for padding rows); training
    batches weigh every row 1.
    """
    weights = batch.get("weights", jnp.ones(batch["inputs"].shape[0], jnp.float32))
    rows = {"tokens": batch["inputs"], "mask": batch["mask"].astype(bool), "weights": weights}
    if "picked" in batch:
        rows["picked"] = batch["picked"]
    if "inputs2" not in batch:
        return rows
    second = {"tokens": batch["inputs2"], "mask": batch["mask2"].astype(bool),
              "picked": batch.get("picked2")}
    rows = {name: interleave_pairs(first, second[name]) for name, first in rows.items()
            if name != "weights"}
    return {**rows, "weights": jnp.repeat(weights, 2)}


def masked_positions(key: jax.Array, mask_NxL: jax.Array, rate: float) -> jax.Array:
    """bool [N, L]: each real token picked with probability `rate`; padding never."""
    return jax.random.bernoulli(key, rate, mask_NxL.shape) & mask_NxL


def lm_example(spec: Spec, rows: dict[str, jax.Array]
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(model inputs [N, L], targets [N, L], target positions [N, L] bool) of
    `lm_sequences` rows."""
    tokens_NxL, mask_NxL = rows["tokens"], rows["mask"]
    if spec.objective is Objective.CAUSAL_LM:
        targets = jnp.pad(tokens_NxL[:, 1:], ((0, 0), (0, 1)))
        has_next = jnp.pad(mask_NxL[:, 1:], ((0, 0), (0, 1)))
        return tokens_NxL, targets, mask_NxL & has_next
    picked = rows["picked"]
    return jnp.where(picked, spec.mask_id, tokens_NxL), tokens_NxL, picked


def _lm_terms(model, spec: Spec, batch, deterministic: bool):
    """Per-token losses, correct flags and weights [N, L] (0 off target)."""
    rows = lm_sequences(batch)
    inputs, targets, where = lm_example(spec, rows)
    logits_NxLxV = model(inputs, rows["mask"], deterministic=deterministic)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_NxLxV, targets)
    correct = jnp.argmax(logits_NxLxV, -1) == targets
    return losses, correct, where * rows["weights"][:, None]


# ---------------------------------------------------------------------------------------
# Token tasks: per-position targets


def scored_positions(scored_NxL: jax.Array, count: int) -> jax.Array:
    """int32 [N, count]: the indices of each row's scored positions, in order, then of
    unscored ones to fill the row (a row must have at most `count` scored positions)."""
    order = jnp.argsort(jnp.logical_not(scored_NxL), axis=1, stable=True)
    return order[:, :count].astype(jnp.int32)


def _token_terms(model, spec: Spec, batch, deterministic: bool):
    """Per-position losses, correct flags and weights [N, S] (0 where not scored); S = L,
    or `spec.max_targets` positions gathered per row."""
    targets_NxL, mask_NxL = batch["targets"], batch["mask"].astype(bool)
    scored_NxL = (targets_NxL >= 0) & mask_NxL
    positions = None
    if spec.max_targets:
        positions = scored_positions(scored_NxL, spec.max_targets)
        targets_NxL = jnp.take_along_axis(targets_NxL, positions, axis=1)
        scored_NxL = jnp.take_along_axis(scored_NxL, positions, axis=1)
    logits = model(batch["inputs"], mask_NxL, deterministic=deterministic, positions=positions)
    targets_NxL = jnp.where(scored_NxL, targets_NxL, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets_NxL)
    correct = jnp.argmax(logits, -1) == targets_NxL
    weights = batch.get("weights", jnp.ones(targets_NxL.shape[0], jnp.float32))
    return losses, correct, scored_NxL * weights[:, None]


def example_sums(correct, where) -> dict[str, jax.Array]:
    """Examples with every scored position right (`rows_correct`), of those with any
    scored position (`rows`); `where` holds the row weights."""
    has_targets = jnp.max(where, axis=1)
    all_right = jnp.all(correct | (where == 0), axis=1)
    return {"rows_correct": jnp.sum(all_right * has_targets), "rows": jnp.sum(has_targets)}


# ---------------------------------------------------------------------------------------
# Losses and evaluation sums


def _class_terms(model, batch, deterministic: bool):
    """Per-row losses, correct flags and weights [B]."""
    logits = model(*(batch[k] for k in MODEL_INPUTS if k in batch), deterministic=deterministic)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch.get("weights", jnp.ones(losses.shape, jnp.float32))
    return losses, jnp.argmax(logits, -1) == batch["targets"], weights


def loss_sums(model, batch: dict, spec: Spec, *, deterministic: bool) -> dict[str, jax.Array]:
    """Sums of the loss and of correct predictions over a batch's targets, and their count.

    Targets are rows (classify), target tokens (language models; masked_lm needs the
    batch's `draw_masks`) or scored positions (token_classify, which adds `example_sums`).
    Rows of weight 0 (an evaluation's padding rows) count nothing. Sums, not means: a batch
    split into micro-batches adds their sums and divides once, which gives the whole
    batch's mean however the targets fall into the micro-batches.
    """
    if spec.objective is Objective.TOKEN_CLASSIFY:
        losses, correct, weights = _token_terms(model, spec, batch, deterministic)
    elif spec.is_lm:
        losses, correct, weights = _lm_terms(model, spec, batch, deterministic)
    else:
        losses, correct, weights = _class_terms(model, batch, deterministic)
    sums = {"loss": jnp.sum(losses * weights), "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}
    if spec.objective is Objective.TOKEN_CLASSIFY:
        sums.update(example_sums(correct, weights))
    return sums


def eval_sums(model, batch: dict, key: jax.Array, spec: Spec) -> dict[str, jax.Array]:
    """`loss_sums` of an evaluation batch; masked_lm draws its masks from `key`."""
    return loss_sums(model, draw_masks(spec, batch, key), spec, deterministic=True)
