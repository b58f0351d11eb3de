"""The normalisation of a block's sub-layers: LayerNorm (Transformers) or BatchNorm (S5).

`make_norm(kind, ...)` builds a norm called as `norm(x, mask, *, deterministic)` on
[B, L, E] or, when decoding, on one token [B, E]. BatchNorm's statistics are taken over
the real tokens only (the mask), over the whole global batch (under `jit` with a sharded
batch the mean is the global one); evaluation and decoding (`deterministic=True`) use the running averages,
updated with `momentum` during training as S5's code (flax's BatchNorm) does:
running = momentum * running + (1 - momentum) * batch statistic.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from lra.common import Choice


class NormKind(Choice):
    LAYER = "layer"
    BATCH = "batch"


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm with the block's call signature (the mask is not needed)."""

    def __call__(self, x, mask=None, *, deterministic=True):  # noqa: ARG002
        del mask, deterministic
        return super().__call__(x)


class MaskedBatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm over real tokens; running averages when deterministic."""

    def __call__(self, x, mask=None, *, deterministic=True):
        real = None if mask is None else mask.astype(bool)[..., None]
        return super().__call__(x, use_running_average=deterministic, mask=real)


def make_norm(kind: str, emb_dim: int, *, momentum: float = 0.95, dtype: Any,
              rngs: nnx.Rngs) -> nnx.Module:
    """A `LayerNorm` or `MaskedBatchNorm` called as norm(x, mask, *, deterministic)."""
    if NormKind(kind) is NormKind.LAYER:
        return LayerNorm(emb_dim, dtype=dtype, rngs=rngs)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"norm_momentum must be in [0, 1); got {momentum!r}")
    return MaskedBatchNorm(emb_dim, momentum=momentum, dtype=dtype, rngs=rngs)
