"""What several layers of lra share: closed choices, option checks, dtype and logit constants.

Everything here is plain Python, NumPy and jax.numpy; it imports nothing of lra, so every
package (models, tasks, training, parallel, presets, experiments, bench) may import it.
"""

from __future__ import annotations

import enum
import re

import jax
import jax.numpy as jnp
import numpy as np

# Accumulation dtype of the linear, gated and delta-rule cores and of every softmax.
F32 = jnp.float32
# The logit of a key a query may not see: the most negative finite float32, so a row with
# no allowed key still gives finite (uniform) probabilities instead of NaN.
MASKED_LOGIT = float(np.finfo(np.float32).min)


class Choice(str, enum.Enum):
    """A closed set of string choices; a wrong value raises a ValueError listing them.

    Subclass it with members ``NAME = "value"`` and convert settings with
    ``MyChoice(value)``. The class name (CamelCase -> snake_case) names the setting
    in the error message, so name the class after the setting.
    """

    @classmethod
    def _missing_(cls, value):
        setting = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
        choices = ", ".join(repr(member.value) for member in cls)
        raise ValueError(f"{setting} must be one of {choices}; got {value!r}")


def positive_int(option: str, value) -> int:
    """`value` as an int, or a ValueError naming `option` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{option} must be a positive integer; got {value!r}")
    return int(value)


def real_number(option: str, value) -> float:
    """`value` as a float, or a ValueError naming `option` unless it is an int or float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{option} must be a number; got {value!r}")
    return float(value)


def boolean(option: str, value) -> bool:
    """`value` as a bool, or a ValueError naming `option` unless it is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{option} must be True or False; got {value!r}")
    return bool(value)


def dot_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b)` accumulated and returned in float32 (any input dtype)."""
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


def to_chunks(x_BxLxZ: jax.Array, size: int, fill: float = 0) -> jax.Array:
    """[B, L, ...] -> [N, B, size, ...]: the sequence axis cut into N = ceil(L / size)
    chunks, the last padded with `fill`, the chunk axis first (the axis `lax.scan` walks)."""
    batch, length = x_BxLxZ.shape[:2]
    num = -(-length // size)
    pad = [(0, 0), (0, num * size - length)] + [(0, 0)] * (x_BxLxZ.ndim - 2)
    x_BxNSxZ = jnp.pad(x_BxLxZ, pad, constant_values=fill)
    return jnp.moveaxis(x_BxNSxZ.reshape(batch, num, size, *x_BxLxZ.shape[2:]), 1, 0)


def from_chunks(x_NxBxSxZ: jax.Array, length: int) -> jax.Array:
    """[N, B, S, ...] -> [B, length, ...]: the inverse of `to_chunks` (padding dropped)."""
    num, batch, size = x_NxBxSxZ.shape[:3]
    x_BxNxSxZ = jnp.moveaxis(x_NxBxSxZ, 0, 1)
    return x_BxNxSxZ.reshape(batch, num * size, *x_NxBxSxZ.shape[3:])[:, :length]


def set_path(config, path: str, value) -> None:
    """config.<path> = value for a dotted path such as "model.attention_options.proj_len"."""
    *parents, name = path.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[name] = value
