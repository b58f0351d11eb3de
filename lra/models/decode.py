"""Transformers as RNNs: classify a sequence token by token with a causal encoder.

A causal encoder (`config.model.causal=True`, pooling "last") whose attention is
kernelized (linear, performer, cosformer, taylor) is a recurrent network: each block
keeps the linear-attention state (S, z), of a size independent of the length, and
`classify_stepwise` runs the whole model one token at a time under `lax.scan`. Its
logits equal those of the parallel pass `model(tokens, mask)` (up to float rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lra.models.encoder import Classifier


def classify_stepwise(model: Classifier, tokens_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """Logits for the last real token of each row, computed token by token.

    Memory does not grow with the length: the scan carries one decoding state per
    block and the output of the last real token seen so far. Padding tokens (mask
    False) leave the state as it is; real tokens need not form a prefix. Runs
    deterministically (no dropout).

    Args:
      model: a `Classifier` whose encoder is causal, with a kernelized attention.
      tokens_BxL: int token ids.
      mask_BxL: bool, True at real tokens.

    Returns:
      float32 logits [B, num_classes] (a row with no real token gets those of a zero
      vector).

    Raises:
      ValueError: if the encoder is not causal, its attention has no `step`, or the
        sequence is longer than its max_len.
    """
    encoder = model.encoder
    batch, length = tokens_BxL.shape
    if length > encoder.max_len:
        raise ValueError(f"sequence length {length} exceeds max_len={encoder.max_len}")
    state = encoder.init_decode(batch)

    def body(carry, xs):
        state, last_BxE = carry
        token_B, real_B, position = xs
        state, y_BxE = encoder.decode_step(state, token_B, real_B, position)
        return (state, jnp.where(real_B[:, None], y_BxE, last_BxE)), None

    xs = (tokens_BxL.T, mask_BxL.astype(bool).T, jnp.arange(length))
    last_BxE = jnp.zeros((batch, encoder.emb_dim), jnp.float32)
    (_, last_BxE), _ = jax.lax.scan(body, (state, last_BxE), xs)
    return model.head(last_BxE)
