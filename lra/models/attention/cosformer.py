"""cosFormer (Qin et al., 2022): ReLU features re-weighted by cos/sin of the position.

Token i gets the angle theta_i = (pi / 2) * i / M and the features

    phi(x_i) = [relu(x_i) cos(theta_i), relu(x_i) sin(theta_i)]     (F = 2 D),

so phi(q_i) . phi(k_j) = relu(q_i) . relu(k_j) cos(theta_i - theta_j): a similarity
that decays with the distance |i - j|, computed in linear time.

Choice of i and M: i is the token's index in the (padded) sequence and M = max_len,
the longest sequence the core is built for, in both the bidirectional and the causal
case. The paper takes M = the sequence length; the official code uses the length of
the (padded) batch tensor. A fixed M keeps 0 <= theta < pi/2 (all features >= 0),
makes a pair's weight independent of padding and of the row's real length, and lets
`step` (decoding) know every weight without seeing future tokens. Sequences longer
than max_len are an error.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lra.models.attention.linear import KernelizedAttention


class CosformerAttention(KernelizedAttention):
    """cosFormer attention on the linear-attention core.

    Options: `form` (parallel | chunked | recurrent), `chunk_size` and `short_conv`
    (linear.py). Positions are
    token indices, M = max_len (see the module docstring). `dropout_rate` is accepted
    and not applied (no attention probabilities).
    """

    positional = True

    @property
    def num_features(self) -> int:
        return 2 * self.head_dim

    def features(self, x_BxLxHxD, positions_BxL, *, query):
        del query
        theta_BxLx1x1 = (positions_BxL * (0.5 * math.pi / self.max_len))[..., None, None]
        relu_BxLxHxD = jax.nn.relu(x_BxLxHxD)
        phi_BxLxHxF = jnp.concatenate(
            [relu_BxLxHxD * jnp.cos(theta_BxLx1x1), relu_BxLxHxD * jnp.sin(theta_BxLx1x1)], -1
        )
        return phi_BxLxHxF, None
