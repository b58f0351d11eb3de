"""The encoder with a token head, for self-pretraining (lra/training/objectives.py).

Amos et al. (2024, "Never Train from Scratch") pretrain the task's own encoder on the
task's own inputs, then fine-tune it with a fresh classifier head: the encoder here is
the classifier's (`Encoder`, same parameter names), so `config.init_from` can carry it
over, and only the head differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.encoder import Encoder


class LanguageModel(nnx.Module):
    """Encoder + linear token head: tokens [B, L], mask [B, L] -> logits [B, L, V].

    Every position gets logits over the task's `vocab_size` tokens (the mask token, an
    extra embedding row, is never a target); which positions enter the loss is the
    objective's business. Logits are float32 whatever the compute dtype.
    """

    def __init__(self, encoder: Encoder, *, vocab_size: int, rngs: nnx.Rngs):
        self.encoder = encoder
        self.lm_head = nnx.Linear(encoder.emb_dim, vocab_size, rngs=rngs)

    def __call__(
        self, tokens_BxL: jax.Array, mask_BxL: jax.Array, *, deterministic: bool = True,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, L, V], or [B, S, V] at `positions` (int [B, S]) only: the head then
        runs at S positions per row, not L (token tasks score a few positions)."""
        x_BxLxE = self.encoder.tokens(tokens_BxL, mask_BxL, deterministic=deterministic)
        if positions is not None:
            x_BxLxE = jnp.take_along_axis(x_BxLxE, positions[..., None], axis=1)
        return self.lm_head(x_BxLxE.astype(jnp.float32))
