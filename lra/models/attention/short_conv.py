"""Short convolutions of q, k and v: the option `short_conv` of the linear, gated and
delta-rule cores (linear.py, gated.py, delta.py).

A depthwise causal 1-D convolution of width w over the sequence, followed by SiLU, on
each of q, k and v separately; every channel c of the H * D (heads times head width) has
its own kernel and no bias:

    y_t[c] = silu( sum_{i=0}^{w-1} W[i, c] x_{t-w+1+i}[c] ),     x_s = 0 for s < 0.

This is flash-linear-attention's `ShortConvolution` (fla/modules/convolution.py: an
`nn.Conv1d` with groups = channels, padding w - 1 and the output cut to the input length,
bias=False, activation='silu') as its DeltaNet, Gated DeltaNet and GLA layers put it on
their q, k and v projections, and as Zoology's 2025 recall baselines use it; w = 4 there
(fla's `conv_size` default). The code here is written from that definition.

Initialisation: torch's `nn.Conv1d` default, which fla's module inherits: for a depthwise
kernel the fan-in is w, so W ~ U(-1/sqrt(w), 1/sqrt(w)). (fla's model classes then
re-initialise every Conv1d with N(0, initializer_range) in `_init_weights`, e.g.
fla/models/delta_net/modeling_delta_net.py; that is not done here.)

Where it sits: the cores apply it to their q, k, v inputs before anything else they do
with them (feature maps, scales, L2 normalisation, gates that read q or k); in the
attention wrapper with rotary positions it so sees the rotated q and k. It is always
causal, also in a bidirectional core (causal=False): a local feature of each token and
the w - 1 before it, not a second direction of mixing (the core's own bidirectional pass
provides that), and the same feature whichever direction the core runs.

Masking: the input is zeroed at masked positions before the convolution and the output
zeroed there after it, so a masked token's values change no output or gradient; a real
token after a masked one reads 0 in that slot of its window (as fla's `mask` argument,
which multiplies the input by the mask). Decoding carries the last w - 1 (masked-to-zero)
inputs of q, k and v (`History`); a padded token pushes a zero, as in the full pass.

Numerics: the convolution runs in float32 (history included) and returns the input's
dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.common import F32

OPTION = "short_conv"


def check_width(value) -> int:
    """`value` as an int, or a ValueError naming `short_conv` unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(
            f"{OPTION} must be an integer >= 0 (0 = off, else the kernel width); got {value!r}")
    return int(value)


class History(NamedTuple):
    """Decoding state of the short convolutions, float32: the last w - 1 inputs of each
    of q, k and v, [B, w - 1, H * D], oldest first."""

    q_BxPxC: jax.Array
    k_BxPxC: jax.Array
    v_BxPxC: jax.Array


class ShortConvolution(nnx.Module):
    """Depthwise causal convolution of width w plus SiLU over [B, L, C] (module docstring)."""

    def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(width)
        self.kernel_WxC = nnx.Param(
            jax.random.uniform(rngs.params(), (width, channels), F32, -bound, bound))

    def __call__(self, x_BxLxC: jax.Array,
                 history_BxPxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(silu(conv(x)) [B, L, C] float32, the last w - 1 inputs [B, w - 1, C]).

        `history_BxPxC` holds the w - 1 inputs before x (zeros at the sequence start).
        """
        kernel_WxC = self.kernel_WxC[...]
        width, length = kernel_WxC.shape[0], x_BxLxC.shape[1]
        u_BxTxC = jnp.concatenate([history_BxPxC, x_BxLxC.astype(F32)], axis=1)
        # A sum of w shifted products, not a grouped conv_general_dilated: elementwise
        # work that XLA fuses on every platform (on this CPU the grouped convolution made
        # the MQAR training step 1.4-1.7x slower; docs/mixers.md).
        y_BxLxC = sum(kernel_WxC[i] * u_BxTxC[:, i:i + length] for i in range(width))
        return jax.nn.silu(y_BxLxC), u_BxTxC[:, length:]


class QkvShortConvolution(nnx.Module):
    """One `ShortConvolution` each for q, k and v of a core with H heads of width D."""

    def __init__(self, *, num_heads: int, head_dim: int, width: int, rngs: nnx.Rngs):
        channels = num_heads * head_dim
        self.width, self.channels = width, channels
        self.q = ShortConvolution(channels, width, rngs=rngs)
        self.k = ShortConvolution(channels, width, rngs=rngs)
        self.v = ShortConvolution(channels, width, rngs=rngs)

    def init_history(self, batch_size: int) -> History:
        """Zeros: the inputs before the sequence start."""
        zeros = lambda: jnp.zeros((batch_size, self.width - 1, self.channels), F32)
        return History(zeros(), zeros(), zeros())

    def __call__(self, q, k, v, keep_BxL, history: History | None = None):
        """((q, k, v) convolved, in their dtypes and zero where masked, the new `History`).

        q, k, v are [B, L, H, D] (L = 1 to decode one token), keep_BxL bool.
        """
        if history is None:
            history = self.init_history(q.shape[0])
        keep_BxLx1 = keep_BxL[..., None]
        outputs, new_history = [], []
        for conv, x_BxLxHxD, before_BxPxC in zip((self.q, self.k, self.v), (q, k, v), history):
            x_BxLxC = x_BxLxHxD.reshape(*x_BxLxHxD.shape[:2], self.channels)
            y_BxLxC, after_BxPxC = conv(jnp.where(keep_BxLx1, x_BxLxC, 0.0), before_BxPxC)
            y_BxLxC = jnp.where(keep_BxLx1, y_BxLxC, 0.0)
            outputs.append(y_BxLxC.reshape(x_BxLxHxD.shape).astype(x_BxLxHxD.dtype))
            new_history.append(after_BxPxC)
        return tuple(outputs), History(*new_history)


def make_qkv_conv(width, *, num_heads: int, head_dim: int,
                  rngs: nnx.Rngs) -> QkvShortConvolution | None:
    """The short convolutions of a core for option value `width`; None for 0 (off).

    Draws from `rngs.params()` only when on, so a core with short_conv=0 is initialised
    exactly as without the option.

    Raises:
      ValueError: naming `short_conv`, unless `width` is an integer >= 0.
    """
    width = check_width(width)
    if not width:
        return None
    return QkvShortConvolution(num_heads=num_heads, head_dim=head_dim, width=width, rngs=rngs)


def convolve_qkv(conv: QkvShortConvolution | None, q, k, v, keep_BxL,
                 history: History | None = None) -> tuple[tuple, History | None]:
    """`conv(q, k, v, keep_BxL, history)`, or the inputs unchanged and no history if off."""
    if conv is None:
        return (q, k, v), None
    return conv(q, k, v, keep_BxL, history)


def empty_history(conv: QkvShortConvolution | None, batch_size: int) -> History | None:
    """The empty `History` of `conv`; None if off (the cores' states then stay as without)."""
    return None if conv is None else conv.init_history(batch_size)
