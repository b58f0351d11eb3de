"""float64 NumPy pieces shared by the S4D and LRU tests (tests/test_s4d.py, test_lru.py).

The references read a layer's parameters as NumPy arrays and recompute its output from
the papers' equations: a recurrence per token in each direction (written in the test
files), then D u and the output gate (`output_gate`, from S5's/LRU's block, not from
the module's code), with the GELU each model's released code uses.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def param(variable) -> np.ndarray:
    """A parameter's value as float64."""
    return np.asarray(variable[...], np.float64)


def complex_param(variable) -> np.ndarray:
    """A complex parameter stored as [..., 2] (real, imaginary), as complex128."""
    value = param(variable)
    return value[..., 0] + 1j * value[..., 1]


def edge_mask(batch: int, length: int) -> jax.Array:
    """Row 0 all real; row 1: first token masked, a hole in the middle, right padding;
    row 2 (and later): random with the first token masked, at least one real."""
    mask = np.random.default_rng(11).random((batch, length)) < 0.6
    mask[0] = True
    mask[1] = True
    mask[1, 0] = False
    mask[1, length // 2 - 1: length // 2 + 1] = False
    mask[1, length - 3:] = False
    mask[2:, 0] = False
    mask[2:, 1] = True
    return jnp.asarray(mask)


def gelu(x, *, approximate: bool):
    """GELU: the tanh approximation (flax's `nn.gelu`, S5's and the LRU's code) if
    `approximate`, else exact x Phi(x) (PyTorch's `nn.GELU()`, S4's code)."""
    if approximate:
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def output_gate(y, gate, *, approximate_gelu: bool) -> np.ndarray:
    """S5's output nonlinearities (deterministic): g = gelu(y), then
    full_glu: W1 g * sigmoid(W2 g); half_glu1: g * sigmoid(W2 g);
    half_glu2: y * sigmoid(W2 g); gelu: g."""
    g = gelu(y, approximate=approximate_gelu)
    dense = lambda linear, z: z @ param(linear.kernel) + param(linear.bias)
    activation = gate.activation.value
    if activation == "gelu":
        return g
    if activation == "full_glu":
        return dense(gate.out1, g) * _sigmoid(dense(gate.out2, g))
    if activation == "half_glu1":
        return g * _sigmoid(dense(gate.out2, g))
    return y * _sigmoid(dense(gate.out2, g))


def finite_difference_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of a scalar float64 function, one input element at a time."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad

