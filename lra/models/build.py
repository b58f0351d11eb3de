"""`build_model`: a model config -> the classifier, dual-encoder classifier or language
model around one `Encoder` (the models package's constructor, used by the trainer)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from lra.models.encoder import Classifier, DualEncoderClassifier, Encoder
from lra.models.language_model import LanguageModel
from lra.models.pattern import layer_mixers


def build_model(
    model_config: Any,
    *,
    attention: str,
    vocab_size: int,
    num_classes: int,
    max_len: int,
    rngs: nnx.Rngs,
    paired: bool = False,
    dtype: Any = jnp.float32,
    remat: bool = False,
    language_model: bool = False,
    mask_token: bool = False,
) -> Classifier | DualEncoderClassifier | LanguageModel:
    """Builds the classifier (or the pretraining language model) that a config describes.

    Args:
      model_config: the config's ``model`` node (attributes num_layers, emb_dim,
        qkv_dim, num_heads, mlp_dim, dropout, attention_dropout, pooling, positions,
        attention_options, causal, embedding_init; block_mlp, norm, norm_momentum,
        scan_layers, mixer_pattern, pattern_options and pattern_block_mlp where present,
        else True, "layer", 0.95, False, "" and each mixer's defaults; see
        lra/models/pattern.py).
      attention: a mixer name from `lra.models.mixers.NAMES` (an attention family or a
        sequence model); with `model_config.mixer_pattern`, the pattern's first name.
      vocab_size: number of token ids.
      num_classes: number of output classes.
      max_len: longest token sequence.
      rngs: streams ``params`` and ``dropout``.
      paired: if True, a `DualEncoderClassifier` over two documents (retrieval).
      dtype: compute dtype of the encoder, float32 or bfloat16 (parameters and logits
        stay float32).
      remat: if True, recompute each block's activations in the backward pass.
      language_model: if True, a `LanguageModel` (token head over `vocab_size` tokens,
        one sequence per document) for the pretraining objectives (lra/training/objectives.py).
      mask_token: if True, the embedding has one more row, id `vocab_size`: the mask
        token of `masked_lm` (kept when fine-tuning from such a run, so shapes match).

    Returns:
      A `Classifier`, a `DualEncoderClassifier` when `paired`, or a `LanguageModel`.

    Raises:
      ValueError: for an invalid setting, naming it.
    """
    encoder = Encoder(
        vocab_size=vocab_size + int(mask_token),
        max_len=max_len,
        num_layers=model_config.num_layers,
        emb_dim=model_config.emb_dim,
        qkv_dim=model_config.qkv_dim,
        num_heads=model_config.num_heads,
        mlp_dim=model_config.mlp_dim,
        dropout=model_config.dropout,
        attention_dropout=model_config.attention_dropout,
        pooling=model_config.pooling,
        positions=model_config.positions,
        attention=attention,
        attention_options=dict(model_config.attention_options),
        causal=model_config.causal,
        embedding_init=model_config.embedding_init,
        block_mlp=model_config.get("block_mlp", True),
        norm=model_config.get("norm", "layer"),
        norm_momentum=model_config.get("norm_momentum", 0.95),
        dtype=dtype,
        remat=remat,
        scan_layers=model_config.get("scan_layers", False),
        pattern=layer_mixers(model_config, attention),
        rngs=rngs,
    )
    if language_model:
        return LanguageModel(encoder, vocab_size=vocab_size, rngs=rngs)
    model_class = DualEncoderClassifier if paired else Classifier
    return model_class(
        encoder, num_classes=num_classes, mlp_dim=model_config.mlp_dim, rngs=rngs
    )
