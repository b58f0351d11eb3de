"""Multi-head attention as a mixer: q, k, v projections, an attention core, the output."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models import attention as attention_registry
from lra.models.attention.sequence_parallel import token_positions
from lra.models.rotary import apply_rotary


class MultiHeadAttention(nnx.Module):
    """q, k, v projections E -> H*D, the registry's attention core, output H*D -> E.

    A core whose class sets ``uses_keys = False`` (Reformer's shared query/key) gets no
    key projection: its ``k`` argument is the queries, which it ignores.

    With ``rotary=True`` the queries and keys are rotated by their positions (RoPE,
    lra/models/rotary.py) before the core sees them: kernelized families apply their
    feature map to the rotated vectors. A core whose ``rotary_error`` property is a
    message (Synthesizer's synthetic logits) refuses it with that message.
    """

    def __init__(
        self,
        *,
        emb_dim: int,
        qkv_dim: int,
        num_heads: int,
        max_len: int,
        dropout: float,
        attention_dropout: float,
        attention: str,
        attention_options: dict[str, Any],
        causal: bool = False,
        rotary: bool = False,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if qkv_dim % num_heads:
            raise ValueError(
                f"qkv_dim={qkv_dim} must be divisible by num_heads={num_heads}"
            )
        self.num_heads, self.causal = num_heads, causal
        self.core = attention_registry.make(
            attention,
            num_heads=num_heads,
            head_dim=qkv_dim // num_heads,
            max_len=max_len,
            causal=causal,
            dropout_rate=attention_dropout,
            rngs=rngs,
            **attention_options,
        )
        self.rotary = rotary
        if rotary:
            _check_rotary(attention, self.core, qkv_dim // num_heads)
        self.query = nnx.Linear(emb_dim, qkv_dim, dtype=dtype, rngs=rngs)
        uses_keys = getattr(self.core, "uses_keys", True)
        self.key = nnx.Linear(emb_dim, qkv_dim, dtype=dtype, rngs=rngs) if uses_keys else None
        self.value = nnx.Linear(emb_dim, qkv_dim, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(qkv_dim, emb_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def _heads(self, x_BxLxHD: jax.Array) -> jax.Array:
        return x_BxLxHD.reshape(*x_BxLxHD.shape[:-1], self.num_heads, -1)

    def _qkv(self, x: jax.Array, positions) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys, values in heads ([..., H, D]); keys are the queries without `key`.

        `positions` ([L], or a scalar for one token) rotate q and k when `rotary`.
        """
        q = self._heads(self.query(x))
        k = q if self.key is None else self._heads(self.key(x))
        if self.rotary:
            q = apply_rotary(q, positions)
            k = q if self.key is None else apply_rotary(k, positions)
        return q, k, self._heads(self.value(x))

    def __call__(
        self, x_BxLxE: jax.Array, mask_BxL: jax.Array, *, deterministic: bool
    ) -> jax.Array:
        q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = self._qkv(x_BxLxE, token_positions(x_BxLxE.shape[1]))
        y_BxLxHxD = self.core(
            q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, deterministic=deterministic
        )
        y_BxLxE = self.out(y_BxLxHxD.reshape(*y_BxLxHxD.shape[:2], -1))
        return self.dropout(y_BxLxE, deterministic=deterministic)

    @property
    def decodes(self) -> bool:
        """True if the core decodes token by token (`init_state` / `step`): a causal core
        that has them (a bidirectional core's `step` refuses)."""
        return self.causal and hasattr(self.core, "step")

    def init_state(self, batch_size: int):
        """The core's empty decoding state."""
        return self.core.init_state(batch_size)

    def kv_cache(self, batch_size: int):
        """The shapes of what causal decoding of a core without `step` would carry (its
        `kv_cache`: exact attention's keys and values); None if the core defines none."""
        cache = getattr(self.core, "kv_cache", None)
        return None if cache is None else cache(batch_size)

    def step(self, state, x_BxE, mask_B, position):
        """One token through the core's `step` (decoding; no dropout)."""
        q_BxHxD, k_BxHxD, v_BxHxD = self._qkv(x_BxE, position)
        state, y_BxHxD = self.core.step(state, q_BxHxD, k_BxHxD, v_BxHxD, position, mask_B)
        return state, self.out(y_BxHxD.reshape(y_BxHxD.shape[0], -1))


def _check_rotary(name: str, core: nnx.Module, head_dim: int) -> None:
    """Raises a ValueError when rotary positions do not apply to attention `name`."""
    reason = getattr(core, "rotary_error", None)
    if reason:
        raise ValueError(f"positions='rope' does not apply to attention {name!r}: {reason}; "
                         "use positions 'sinusoidal', 'learned' or 'none'")
    if head_dim % 2:
        raise ValueError(f"positions='rope' needs an even head_dim (qkv_dim / num_heads); "
                         f"got {head_dim}")
