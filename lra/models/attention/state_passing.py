"""Linear recurrences over a sequence split across the `seq` mesh axis: state passing.

The sequence-parallel form of every linear-time mixer (LASP-2: Sun et al., 2025,
"LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its Hybrid"). A mixer
whose state evolves as an affine map of the previous state,

    S_t = A_t S_{t-1} + W_t       (A_t, W_t from token t's inputs only),

needs, on the device holding positions [s, e), only the state S_{s-1} that enters its
shard. Each device

1. runs its shard's local pass from a zero state (the mixer's own chunked form): local
   outputs, the local final state W = S_{e-1} given S_{s-1} = 0, and the shard's
   transition A = A_{e-1} ... A_s (the map's linear part; a diagonal or a scalar for the
   gated and diagonal-SSM cores, a [D, D] matrix for the delta rule);
2. all-gathers the (A, W) summaries of every device over `seq` (`gather_summaries`: one
   `all_gather` per recurrence and layer, O(state) bytes per device, independent of the
   length);
3. folds the summaries of the devices before it, in order, into its incoming state
   (`incoming_state`: S <- A_j S + W_j for j = 0 .. i - 1, from S = 0; n steps of
   state-sized work);
4. adds the incoming state's contribution to its outputs: the mixer's read of
   (A_t ... A_s) S_{s-1} at each position t, which is linear in S_{s-1}.

The reverse direction of a bidirectional mixer is the same with the devices in the
opposite order (`reverse=True`; `incoming_states` for a batch stacked with its reversal).
A linear attention without decay has no transition: its fold merges states (`fold_all`
when every query reads the whole sequence). Every step is differentiable: the transpose of the
all-gather is a reduce-scatter of the summaries' gradients.

`sequence_parallel.map_over_sequence` runs such a per-shard kernel on global
[B, L, ...] arrays (`jax.shard_map`, the length split over `seq`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lra.models.attention.sequence_parallel import SEQ_AXIS, static_axis_size


def gather_summaries(summary, axis_name: str = SEQ_AXIS):
    """Every device's summary (a tree of arrays), stacked [n, ...] in device order, inside
    `jax.shard_map` over `axis_name`: one `all_gather` of the leaves raveled into one
    vector (one message per layer, whatever the summary's structure)."""
    flat, unravel = ravel_pytree(summary)
    return jax.vmap(unravel)(jax.lax.all_gather(flat, axis_name))


def affine(transition_apply: Callable) -> Callable:
    """The fold S <- A S + W of summaries (A, W), with A applied by `transition_apply(A, S)`."""
    def fold(state, summary):
        transition, write = summary
        return transition_apply(transition, state) + write
    return fold


def incoming_state(
    gathered,
    fold: Callable,
    empty,
    *,
    reverse: bool = False,
    axis_name: str = SEQ_AXIS,
):
    """The state entering this device's shard: `fold` over the earlier devices' summaries.

    Args:
      gathered: every device's summary stacked [n, ...] (`gather_summaries`).
      fold: (state, one device's summary) -> state, e.g. `affine(...)`.
      empty: the state before any token (the fold's start; a tree like the state).
      reverse: fold the later devices' summaries, from the last device down (the reverse
        pass of a bidirectional mixer).
      axis_name: the mesh axis the sequence is split over.

    Returns:
      the incoming state: `empty` folded with devices 0 .. i - 1 (reverse: n - 1 .. i + 1).
    """
    num = static_axis_size(axis_name)
    index = jax.lax.axis_index(axis_name)
    order = jnp.arange(num)

    def step(state, device_and_summary):
        device, summary = device_and_summary
        before = device > index if reverse else device < index
        folded = fold(state, summary)
        return jax.tree.map(lambda new, old: jnp.where(before, new, old), folded, state), None

    xs = (order, gathered)
    if reverse:
        xs = jax.tree.map(lambda x: x[::-1], xs)
    state, _ = jax.lax.scan(step, empty, xs)
    return state


def shard_offset(shard: int, axis_name: str = SEQ_AXIS) -> jax.Array:
    """The token position of this device's first position (contiguous layout)."""
    return jax.lax.axis_index(axis_name) * shard


def incoming_states(
    gathered,
    fold: Callable,
    empty,
    batch: int,
    *,
    bidirectional: bool,
    axis_name: str = SEQ_AXIS,
):
    """`incoming_state` of a batch of `batch` rows or, if `bidirectional`, of the batch
    stacked with its reversal (2 `batch` rows: the first half folds the devices before
    this one, the second, the reverse pass, those after it). Every summary and state
    has the batch first (after the gathered device axis)."""
    if not bidirectional:
        return incoming_state(gathered, fold, empty, axis_name=axis_name)
    rows = lambda tree, part, axis: jax.tree.map(
        lambda x: jax.lax.slice_in_dim(x, part * batch, (part + 1) * batch, axis=axis), tree)
    halves = [incoming_state(rows(gathered, part, 1), fold, rows(empty, part, 0),
                             reverse=part == 1, axis_name=axis_name) for part in (0, 1)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *halves)


def pass_matrix_states(run_with_state: Callable, inputs: tuple, reverse_inputs: tuple | None,
                       *, value_index: int, key_dim: int):
    """One device's outputs of a recurrence whose state S [b, H, D_k, D_v] enters each
    token as a matrix map, S_t = M_t S_{t-1} + (token t's write), read linearly by the
    outputs (the delta rule and its generalisations, whose M_t = alpha_t (I - beta_t
    k_t^T k_t) or diag(w_t) - b_t^T kappa_t), inside `jax.shard_map` over `seq`.

    The shard runs once, from the state [0 | I] with values [v | 0] (state D_k x
    (D_v + D_k)): by linearity its outputs are [o_t from zero | the read of M_t..M_s]
    and its final state [W | M], the shard's affine map S -> M S + W. The (M, W) of every
    device are all-gathered once, each device folds those before it (reverse pass:
    after it) into its incoming state S_in, and adds its read of M_t..M_s S_in. The
    augmented values double the state's width on each shard.

    Args:
      run_with_state: (*inputs, initial_state=[b', H, D_k, D_v']) -> (outputs [b', S, H,
        D_v'], final state [b', H, D_k, D_v']), float32: the mixer's chunked pass.
      inputs: the forward pass's arrays [b, S, ...] (None entries pass through).
      reverse_inputs: the reverse pass's, in forward order, or None (causal); the two
        run as one batch (the reverse rows flipped after the forward rows).
      value_index: which of the inputs holds v [b, S, H, D_v].
      key_dim: D_k, the state's rows.

    Returns:
      (forward outputs [b, S, H, D_v], the reverse pass's in forward order or None).
    """
    batch = inputs[value_index].shape[0]
    if reverse_inputs is not None:  # concatenated: inside shard_map nothing moves
        inputs = tuple(None if x is None else jnp.concatenate([x, y[:, ::-1]], 0)
                       for x, y in zip(inputs, reverse_inputs))
    v = inputs[value_index]
    rows, _, heads, value_dim = v.shape
    v_aug = jnp.concatenate([v, jnp.zeros_like(v, shape=(*v.shape[:-1], key_dim))], -1)
    eye_BxHxDxD = jnp.broadcast_to(jnp.eye(key_dim, dtype=jnp.float32),
                                   (rows, heads, key_dim, key_dim))
    S0 = jnp.concatenate([jnp.zeros_like(v, jnp.float32, shape=(rows, heads, key_dim, value_dim)),
                          eye_BxHxDxD + jnp.zeros_like(v, jnp.float32, shape=())], -1)
    augmented = (*inputs[:value_index], v_aug, *inputs[value_index + 1:])
    out, S_aug = run_with_state(*augmented, initial_state=S0)
    local_BxSxHxD, readM_BxSxHxD = out[..., :value_dim], out[..., value_dim:]
    W_BxHxDxD, M_BxHxDxD = S_aug[..., :value_dim], S_aug[..., value_dim:]
    fold = affine(lambda M, S: jnp.einsum("bhij,bhjd->bhid", M, S))
    S_in = incoming_states(gather_summaries((M_BxHxDxD, W_BxHxDxD)), fold,
                           jnp.zeros_like(W_BxHxDxD), batch,
                           bidirectional=reverse_inputs is not None)
    out = local_BxSxHxD + jnp.einsum("bshd,bhde->bshe", readM_BxSxHxD, S_in)
    if reverse_inputs is None:
        return out, None
    return out[:batch], out[batch:, ::-1]


def fold_all(gathered, fold: Callable, empty):
    """`empty` folded with every device's summary in device order (a bidirectional
    mixer whose state only accumulates: every query reads the whole sequence's)."""
    state, _ = jax.lax.scan(lambda state, summary: (fold(state, summary), None), empty, gathered)
    return state
