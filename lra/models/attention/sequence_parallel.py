"""Exact softmax attention over a sequence split across devices: the `seq` mesh axis.

(The linear-time mixers split the sequence by state passing instead, state_passing.py;
both run through `map_over_sequence` here.)

Sequence parallelism: inside a mesh context (`jax.set_mesh`) whose `seq` axis
has more than one device, `SoftmaxAttention` (implementation xla) and
`MemoryEfficientAttention` run `sequence_parallel_attention`: the length is split over
`seq` (and the batch over the other axes) under `jax.shard_map`, and each device attends
its queries to every key by one of two strategies (`KvStrategy`):

- ``ring`` (the default; Liu, Zaharia & Abbeel, 2023, "Ring Attention with Blockwise
  Transformers"): `ring_attention`. The n key/value blocks travel around the ring of
  devices (n - 1 `jax.lax.ppermute`s of keys, values, mask and key positions), and each
  device folds every block into an online softmax of its queries (running max, sum and
  weighted values, float32). No device ever holds more than two key blocks, and the
  logits are [L/n x L/n] per step, or [L/n x key_chunk] when the block's keys are folded
  in chunks (`key_chunk`: memory_efficient's chunk_size). Causal: a block entirely after every query of the
  device is skipped with `lax.cond` (no logits computed); inside a block the causal and
  padding masks are arithmetic (`jnp.where`).
- ``all_gather``: `all_gather_attention`. Keys, values and mask are gathered whole over
  `seq` (one `all_gather` each) and the local queries attend all L keys with the ordinary
  softmax; logits [L/n x L]. Fewer, larger messages; O(L) keys per device.

The strategy is a property of the run, not of the model (both give the same numbers up
to rounding), so it is not a family option: `use_kv_strategy(kv_strategy)` sets it
while tracing (a trainer config key would enter it; not wired yet), default ``ring``.

Layouts (`Layout`): ``contiguous`` = device i holds positions [i L/n, (i + 1) L/n), as a
batch sharded `PartitionSpec(..., "seq")` is; ``striped`` (Brandon et al., 2023, "Striped
Attention") = device i holds positions i, i + n, i + 2n, ... With causal masking the
contiguous layout is unbalanced: device i has i + 1 blocks of work, but the ring moves in
lock step, so every ring step waits for a device that computes a whole block. In the
striped layout every block is about half allowed, and each device computes only the
query tiles' allowed prefix of each block (`query_tiles`: (T + 1) / 2T of it with T
tiles), so every step costs every device the same, about half a block. An encoder runs
its blocks striped under `use_seq_layout("striped")` (`config.seq_layout`): it permutes
its sequence once (`to_striped`), marks it (`tokens_in_layout`, which the attention's
default layout and the rotary positions, `token_positions`, read) and restores token
order after the last block; only `STRIPED_MIXERS` run so. `lra.parallel.ring` offers the
same on global arrays.

Masking as `SoftmaxAttention`'s xla path: disallowed keys are excluded, queries are not
masked; a query row with no allowed key (only ever a masked row) gets the plain average
of all L values, as `jax.nn.dot_product_attention` does, so every output is finite.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lra.common import F32, MASKED_LOGIT, Choice, from_chunks, to_chunks

SEQ_AXIS = "seq"  # the mesh axis that splits the sequence (length) across devices


class KvStrategy(Choice):
    """How keys and values reach every query when the sequence is split over `seq`."""

    RING = "ring"  # blocks travel around the ring (ppermute); online softmax
    ALL_GATHER = "all_gather"  # keys and values gathered whole; ordinary softmax


class Layout(Choice):
    """Which positions of the sequence each device of the `seq` axis holds."""

    CONTIGUOUS = "contiguous"  # device i: [i L/n, (i + 1) L/n)
    STRIPED = "striped"  # device i: i, i + n, i + 2n, ...


# The strategy `sequence_parallel_attention` uses when not given one (`use_kv_strategy`).
_KV_STRATEGY = contextvars.ContextVar("lra_sequence_parallel", default=KvStrategy.RING)
# The layout a run asks its encoders for (`use_seq_layout`), and the order the tokens of
# the sequence being traced are in (`tokens_in_layout`, entered by the encoder only).
_REQUESTED_LAYOUT = contextvars.ContextVar("lra_seq_layout", default=Layout.CONTIGUOUS)
_TOKEN_ORDER = contextvars.ContextVar("lra_token_order", default=Layout.CONTIGUOUS)
# The mixers that run in the striped layout: the exact attentions, whose ring reads each
# key's position; every other mixer needs the tokens in order.
STRIPED_MIXERS = ("softmax", "memory_efficient")


# ---------------------------------------------------------------------------------------
# Sequence parallelism: exact attention over a sequence split across the `seq` mesh axis.
# Extra shape letters: S = L / n, the positions one device holds; C = S, one key block.


@contextlib.contextmanager
def _setting(variable: contextvars.ContextVar, value):
    """`variable` set to `value` inside the block (read while tracing)."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def use_kv_strategy(kv_strategy: KvStrategy | str):
    """While tracing inside it, attention over a split sequence uses `kv_strategy`
    (``"ring"`` or ``"all_gather"``; outside any, ``"ring"``)."""
    return _setting(_KV_STRATEGY, KvStrategy(kv_strategy))


def use_seq_layout(layout: Layout | str):
    """While tracing inside it, an encoder whose sequence is split over `seq` runs its
    blocks in `layout` (``"contiguous"``, the default, or ``"striped"``; `config.seq_layout`)."""
    return _setting(_REQUESTED_LAYOUT, Layout(layout))


def requested_seq_layout() -> Layout:
    """The layout `use_seq_layout` asks for (contiguous outside any)."""
    return _REQUESTED_LAYOUT.get()


def tokens_in_layout(layout: Layout | str):
    """Marks the sequence traced inside it as being in `layout`'s order: the attention
    over a split sequence and the rotary positions (`token_positions`) read it."""
    return _setting(_TOKEN_ORDER, Layout(layout))


def token_positions(length: int) -> jax.Array:
    """The token position [L] of each place of the sequence being traced: 0 .. L-1 in
    token order; under `tokens_in_layout("striped")` the striped order of them."""
    positions_L = jnp.arange(length)
    if _TOKEN_ORDER.get() is Layout.STRIPED:
        positions_L = to_striped(positions_L, static_seq_size(), axis=0)
    return positions_L


def static_seq_size(mesh=None) -> int:
    """The number of devices of `mesh`'s (None: the mesh in context) `seq` axis; 1 if none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else mesh.shape.get(SEQ_AXIS, 1)


def splits_sequence(mesh=None) -> bool:
    """True if `mesh` (None: the mesh in context) has a `seq` axis of more than one device.

    Raises:
      ValueError: inside a `jax.shard_map` that is manual over `seq`: the arrays there are
        a device's shards, for `ring_attention` itself, not for a module.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if static_seq_size(mesh) == 1:
        return False
    if SEQ_AXIS in getattr(mesh, "manual_axes", ()):
        raise ValueError("attention called inside a shard_map over 'seq': call "
                         "ring_attention or all_gather_attention on the shards instead")
    return True


def sequence_parallel_attention(
    q_BxLxHxD: jax.Array,
    k_BxLxHxD: jax.Array,
    v_BxLxHxD: jax.Array,
    mask_BxL: jax.Array | None,
    *,
    causal: bool,
    kv_strategy: KvStrategy | str | None = None,
    layout: Layout | str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    key_chunk: int | None = None,
) -> jax.Array:
    """Exact softmax attention on global arrays, the length split over `mesh`'s `seq` axis.

    The batch is split over the mesh's other axes when their devices divide it (else it
    is whole on each); the length over `seq`. Under ``contiguous`` a length that `seq`
    does not divide is padded inside (keys that no query sees, even in a row with no
    allowed key) and the outputs sliced back.

    Args:
      q_BxLxHxD, k_BxLxHxD, v_BxLxHxD: queries, keys and values, in the layout's order.
      mask_BxL: True = real token (in the layout's order); None = all real.
      causal: if True, position i attends only to positions <= i (token positions).
      kv_strategy: ``"ring"`` or ``"all_gather"``; None = `sequence_parallel`'s.
      layout: ``"contiguous"`` (token order) or ``"striped"`` (`to_striped`); None = the
        order of the sequence being traced (`tokens_in_layout`; token order outside one).
      mesh: a mesh with a `seq` axis; None = the mesh in context.
      key_chunk: under the ring, each block's keys are folded `key_chunk` at a time (the
        logits of one step are then [L/n x key_chunk], not [L/n x L/n]); None = whole
        blocks. The all-gather strategy ignores it.

    Returns:
      [B, L, H, D] in q's dtype, in the layout's order.

    Raises:
      ValueError: a bad strategy or layout, no `seq` axis, or a striped length that `seq`
        does not divide.
    """
    context = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    strategy = KvStrategy(_KV_STRATEGY.get() if kv_strategy is None else kv_strategy)
    layout = Layout(_TOKEN_ORDER.get() if layout is None else layout)
    num = static_seq_size(context)
    batch, length = q_BxLxHxD.shape[:2]
    if layout is Layout.STRIPED and length % num:
        raise ValueError(f"the striped layout needs a length divisible by the {num} devices "
                         f"of {SEQ_AXIS!r}; got {length}")
    keep_BxL = (jnp.ones((batch, length), bool) if mask_BxL is None
                else mask_BxL.astype(bool))
    if strategy is KvStrategy.RING:
        attend = functools.partial(ring_attention, key_chunk=key_chunk)
    else:
        attend = all_gather_attention
    kernel = functools.partial(attend, causal=causal, axis_name=SEQ_AXIS, layout=layout,
                               length=length)
    out_BxLxHxD = map_over_sequence(kernel, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, keep_BxL,
                                    mesh=mesh)
    return out_BxLxHxD.astype(q_BxLxHxD.dtype)


def static_axis_size(axis_name: str) -> int:
    """The size of mesh axis `axis_name`, as a Python int (shapes and loops need it)."""
    size = jax.lax.axis_size(axis_name)
    try:
        return int(size)
    except jax.errors.ConcretizationTypeError:
        return jax.sharding.get_abstract_mesh().shape[axis_name]


def map_over_sequence(
    kernel: Callable,
    *arrays: jax.Array | None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
):
    """`kernel(*shards)` under `jax.shard_map`, every array split [B, L, ...] -> [b, S, ...].

    The length is split over `mesh`'s `seq` axis (None: the mesh in context) and the
    batch over its other axes when their devices divide it (else whole on each). A
    length that `seq` does not divide is zero-padded at the end (a zero must mean
    "padding" to `kernel`: a masked key, a neutral token) and the outputs sliced back.
    The sequence-parallel form of every mixer runs through it (exact attention here,
    the linear recurrences by state passing, state_passing.py).

    Args:
      kernel: maps the arrays' shards to an output tree of [b, S, ...] arrays; called
        inside the shard_map, so it may use collectives over `seq`.
      arrays: [B, L, ...] arrays (None passes through as None).
      mesh: a mesh with a `seq` axis; None = the mesh in context.

    Returns:
      the kernel's outputs, global [B, L, ...].

    Raises:
      ValueError: the mesh has no `seq` axis.
    """
    context = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if SEQ_AXIS not in context.axis_names:
        raise ValueError(f"sequence parallelism needs a mesh axis {SEQ_AXIS!r}; "
                         f"the mesh has {tuple(context.axis_names)}")
    num = context.shape[SEQ_AXIS]
    batch, length = next(x for x in arrays if x is not None).shape[:2]
    extra = -(-length // num) * num - length

    def pad(x):
        return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)) if extra else x

    spec = jax.sharding.PartitionSpec(_row_axes_dividing(context, batch), SEQ_AXIS)
    mapped = jax.shard_map(kernel, in_specs=tuple(None if x is None else spec for x in arrays),
                           out_specs=spec, **({} if mesh is None else {"mesh": mesh}))
    outputs = mapped(*(None if x is None else pad(x) for x in arrays))
    return jax.tree.map(lambda y: y[:, :length], outputs)


def _row_axes_dividing(mesh, batch: int) -> tuple[str, ...] | None:
    """The mesh's row axes (every axis but `seq`: data and fsdp) if their devices divide
    `batch` (the batch is then split over them), else None (whole on each device)."""
    axes = tuple(name for name in mesh.axis_names if name != SEQ_AXIS)
    if not axes or batch % math.prod(mesh.shape[name] for name in axes):
        return None
    return axes


def map_over_batch(kernel: Callable, *rows: jax.Array, shared: tuple = ()):
    """`kernel(*rows, *shared)` on each device's rows only: under `jax.shard_map` with
    the batch [B, ...] of every array in `rows` split over the mesh in context's row
    axes (every axis but `seq`: data and fsdp), the `shared` arrays whole on every
    device.

    For operations whose batch XLA's partitioner does not split: it all-gathers the
    whole batch before an FFT (measured in s4d's compiled data-parallel step: 4
    all-gathers of [B, E, 2L], every device transforming every row). Without a mesh in
    context, with row axes of one device, or a batch they do not divide, it calls
    `kernel` directly. A `seq` axis is not split here: its devices compute the same
    rows (the mixer's split form is its business).
    """
    context = jax.sharding.get_abstract_mesh()
    axes = _row_axes_dividing(context, rows[0].shape[0])
    if axes is None or math.prod(context.shape[name] for name in axes) == 1:
        return kernel(*rows, *shared)
    spec, whole = jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec()
    mapped = jax.shard_map(kernel, in_specs=(spec,) * len(rows) + (whole,) * len(shared),
                           out_specs=spec)
    return mapped(*rows, *shared)


def to_striped(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """Token order -> striped order along `axis`: the result's contiguous shard i of
    `num_shards` holds tokens i, i + n, i + 2n, ... (token t at shard t mod n, place t // n).

    Raises:
      ValueError: if `num_shards` does not divide the length.
    """
    length = _striped_length(x, num_shards, axis)
    shape = x.shape[:axis] + (length // num_shards, num_shards) + x.shape[axis + 1:]
    return jnp.swapaxes(x.reshape(shape), axis, axis + 1).reshape(x.shape)


def from_striped(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """Striped order -> token order along `axis` (the inverse of `to_striped`).

    Raises:
      ValueError: if `num_shards` does not divide the length.
    """
    length = _striped_length(x, num_shards, axis)
    shape = x.shape[:axis] + (num_shards, length // num_shards) + x.shape[axis + 1:]
    return jnp.swapaxes(x.reshape(shape), axis, axis + 1).reshape(x.shape)


def _striped_length(x: jax.Array, num_shards: int, axis: int) -> int:
    length = x.shape[axis]
    if num_shards < 1 or length % num_shards:
        raise ValueError(f"the striped layout needs a length divisible by {num_shards} "
                         f"shards; got {length}")
    return length


def shard_positions(index: jax.Array, shard: int, num: int, layout: Layout | str) -> jax.Array:
    """The token positions [S] that device `index` of `num` holds, `shard` = S of them."""
    local_S = jnp.arange(shard)
    if Layout(layout) is Layout.STRIPED:
        return local_S * num + index
    return index * shard + local_S


def _shard_view(q_BxSxHxD, mask_BxS, axis_name, layout, length):
    """(devices n on `axis_name`, real length (default n S), this device's token
    positions [S], keep mask [B, S]): what both kv strategies start from."""
    num = static_axis_size(axis_name)
    batch, shard = q_BxSxHxD.shape[:2]
    length = num * shard if length is None else length
    qpos_S = shard_positions(jax.lax.axis_index(axis_name), shard, num, layout)
    keep_BxS = jnp.ones((batch, shard), bool) if mask_BxS is None else mask_BxS.astype(bool)
    return num, length, qpos_S, keep_BxS


def ring_attention(
    q_BxSxHxD: jax.Array,
    k_BxSxHxD: jax.Array,
    v_BxSxHxD: jax.Array,
    mask_BxS: jax.Array | None,
    *,
    causal: bool,
    axis_name: str = SEQ_AXIS,
    layout: Layout | str = Layout.CONTIGUOUS,
    length: int | None = None,
    key_chunk: int | None = None,
) -> jax.Array:
    """Ring attention on one device's shards, inside `jax.shard_map` over `axis_name`.

    Forward: each of the n steps folds one key block into the online softmax of the local
    queries (`_fold_block`); between steps every device sends its current block (keys,
    values, mask, key positions) to the next device (`jax.lax.ppermute`, n - 1 times), so
    device i sees its own block, then those of devices i - 1, i - 2, ...
    Backward (a `jax.custom_vjp`, so that no step's block is stored): the blocks go
    around the ring again, each with its key and value gradients, which every device
    adds to from its queries (`_block_grads`, the probabilities recomputed from the saved
    log-sum-exp of each query row); n - 1 sends of the blocks and one more of the
    gradients, which brings them home. Saved for the backward pass: the local q, k, v,
    outputs and one log-sum-exp per query row and head, O(L/n) per device.

    Args:
      q_BxSxHxD, k_BxSxHxD, v_BxSxHxD: this device's queries, keys and values.
      mask_BxS: True = real key; None = all real.
      causal: if True, a query attends only to keys at positions <= its own.
      axis_name: the mesh axis the sequence is split over.
      layout: which positions each device holds (`Layout`).
      length: the number of real positions (default n S); positions >= length are
        padding that no query sees.
      key_chunk: keys folded at a time within a block, forward and backward (a
        `lax.scan` over the block's chunks, the last zero-padded); None = the whole block.

    Returns:
      [B, S, H, D] float32.
    """
    num, length, qpos_S, keep_BxS = _shard_view(q_BxSxHxD, mask_BxS, axis_name, layout, length)
    tiles = query_tiles(q_BxSxHxD.shape[1], causal, layout)
    attend = _ring(num, axis_name, causal, length, tiles, key_chunk)
    return attend(q_BxSxHxD, k_BxSxHxD, v_BxSxHxD, keep_BxS, qpos_S)


STRIPED_TILES = 4  # query tiles per block under the striped causal layout (`query_tiles`)


def query_tiles(shard: int, causal: bool, layout: Layout | str) -> tuple[tuple[slice, int], ...]:
    """(query rows, number of leading keys) pairs that cover one block's allowed logits.

    Under the striped layout with a causal mask, a query at place p of its device (token
    p n + i) may see a key of any device only at a place <= p (token p' n + j <= p n + i
    needs p' <= p), so the query tile of places [a t, (a + 1) t) needs only the first
    (a + 1) t keys of every block: T tiles compute (T + 1) / 2T of the block's logits, and
    every device does the same work at every ring step (Brandon et al., 2023). Otherwise
    one tile: all rows, all keys (a contiguous causal block is whole or skipped).
    """
    if not causal or Layout(layout) is Layout.CONTIGUOUS:
        return ((slice(None), shard),)
    tiles = next(n for n in (STRIPED_TILES, 2, 1) if shard % n == 0)
    size = shard // tiles
    return tuple((slice(a * size, (a + 1) * size), (a + 1) * size) for a in range(tiles))


def _ring(num: int, axis_name: str, causal: bool, length: int,
          tiles: tuple[tuple[slice, int], ...], key_chunk: int | None) -> Callable:
    """`ring_attention`'s computation as a function of (q, k, v, keep, qpos) with its
    ring backward pass (`jax.custom_vjp`)."""
    to_next = [(i, (i + 1) % num) for i in range(num)]

    def send(tree):
        return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, to_next), tree)

    def around(fold, carry, block):
        """(carry, block) = fold(carry, block) for each of the n blocks as they pass
        (n - 1 sends); returns the carry and the last block, folded."""
        def step(state, _):
            carry, block = fold(*state)
            return (carry, send(block)), None

        state, _ = jax.lax.scan(step, (carry, block), length=num - 1)
        return fold(*state)

    def forward(q, k, v, keep, qpos):
        def fold(stats, block):
            return _fold_block(q, qpos, stats, block, causal=causal, length=length,
                               tiles=tiles, key_chunk=key_chunk), block

        stats, _ = around(fold, _empty_stats(q), (k, v, keep, qpos))
        return stats

    @jax.custom_vjp
    def attend(q, k, v, keep, qpos):
        return _finish(forward(q, k, v, keep, qpos), length)

    def attend_forward(q, k, v, keep, qpos):
        stats = forward(q, k, v, keep, qpos)
        max_BxSxH, sum_BxSxH = stats[:2]
        seen_BxSxH = sum_BxSxH > 0
        lse_BxSxH = jnp.where(seen_BxSxH, max_BxSxH + jnp.log(jnp.where(seen_BxSxH,
                                                                        sum_BxSxH, 1.0)), 0.0)
        out = _finish(stats, length)
        return out, (q, k, v, keep, qpos, out, lse_BxSxH, seen_BxSxH)

    def attend_backward(saved, dout_BxSxHxD):
        q, k, v, keep, qpos, out, lse_BxSxH, seen_BxSxH = saved
        dout_BxSxHxD = dout_BxSxHxD.astype(F32)
        delta_BxSxH = jnp.where(seen_BxSxH, jnp.sum(dout_BxSxHxD * out, -1), 0.0)
        # A row with no allowed key is the mean of all `length` values: 1/length each.
        unseen_BxHxD = jnp.where(seen_BxSxH[..., None], 0.0, dout_BxSxHxD).sum(1) / length
        row = (q, qpos, dout_BxSxHxD, lse_BxSxH, seen_BxSxH, delta_BxSxH, unseen_BxHxD)
        grads = functools.partial(_block_grads, *row, causal=causal, length=length,
                                  tiles=tiles, key_chunk=key_chunk)

        def fold(dq, block):
            dq_blk, dk, dv = grads(block[:4])
            return dq + dq_blk, (*block[:4], block[4] + dk, block[5] + dv)

        zeros = (jnp.zeros_like(k, F32), jnp.zeros_like(v, F32))
        dq, block = around(fold, jnp.zeros_like(q, F32), (k, v, keep, qpos, *zeros))
        dk, dv = send(block[4:])  # the block's gradients go home: n sends in all
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    attend.defvjp(attend_forward, attend_backward)
    return attend


def _block_grads(
    q_BxSxHxD, qpos_S, dout_BxSxHxD, lse_BxSxH, seen_BxSxH, delta_BxSxH, unseen_BxHxD,
    block, *, causal: bool, length: int, tiles: tuple[tuple[slice, int], ...],
    key_chunk: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients (dq [B,S,H,D], dk, dv [B,C,H,D], float32) from the local queries'
    rows through one key block (`ring_attention`'s backward pass), tile by tile
    (`query_tiles`).

    p = exp(logit - lse) over allowed keys (rows with an allowed key), dv = p^T dout,
    ds = p (dout v^T - delta), dq = ds k / sqrt(D), dk = ds^T q / sqrt(D); rows with no
    allowed key add dout / length to every real key's dv and nothing else. A block
    entirely after the queries (causal) skips the logits (`lax.cond`).
    """
    k_BxCxHxD, v_BxCxHxD, _, kpos_C = block
    real_C = kpos_C < length
    dv_unseen_BxCxHxD = real_C[None, :, None, None] * unseen_BxHxD[:, None]
    rows = (q_BxSxHxD, qpos_S, dout_BxSxHxD, lse_BxSxH, seen_BxSxH, delta_BxSxH)

    def attend(_):
        dq_parts, dk_BxCxHxD, dv_BxCxHxD = [], 0.0, 0.0
        for tile, keys in tiles:
            dq, dk, dv = _chunked_tile_grads(
                *(x[:, tile] if x.ndim > 1 else x[tile] for x in rows),
                _leading_keys(block, real_C, keys), causal=causal, key_chunk=key_chunk)
            after = ((0, 0), (0, k_BxCxHxD.shape[1] - keys), (0, 0), (0, 0))
            dq_parts.append(dq)
            dk_BxCxHxD = dk_BxCxHxD + jnp.pad(dk, after)
            dv_BxCxHxD = dv_BxCxHxD + jnp.pad(dv, after)
        return jnp.concatenate(dq_parts, axis=1), dk_BxCxHxD, dv_BxCxHxD

    def skip(_):
        return (jnp.zeros_like(q_BxSxHxD, F32), jnp.zeros_like(k_BxCxHxD, F32),
                jnp.zeros_like(v_BxCxHxD, F32))

    if causal:
        dq, dk, dv = jax.lax.cond(jnp.min(kpos_C) > jnp.max(qpos_S), skip, attend, None)
    else:
        dq, dk, dv = attend(None)
    return dq, dk, dv + dv_unseen_BxCxHxD


def _leading_keys(block: tuple[jax.Array, ...], real_C: jax.Array, keys: int
                  ) -> tuple[jax.Array, ...]:
    """The first `keys` keys of a ring block: (keys, values, allowed [B, K] = real and not
    masked, positions [K])."""
    k_BxCxHxD, v_BxCxHxD, keep_BxC, kpos_C = block
    return (k_BxCxHxD[:, :keys], v_BxCxHxD[:, :keys], (keep_BxC & real_C)[:, :keys],
            kpos_C[:keys])


def _allowed(allowed_BxK, qpos_T, kpos_K, causal: bool) -> jax.Array:
    """[B, T, 1, K]: which keys each query row may see (and, if causal, not after it)."""
    allowed = allowed_BxK[:, None, None, :]
    if causal:
        allowed = allowed & (kpos_K[None, :] <= qpos_T[:, None])[None, :, None, :]
    return allowed


def _tile_grads(q_BxTxHxD, qpos_T, dout_BxTxHxD, lse_BxTxH, seen_BxTxH, delta_BxTxH, block,
                *, causal: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`_block_grads` for T query rows and the K keys of `block` (keys, values, allowed
    [B, K], positions [K]): (dq [B,T,H,D], dk, dv [B,K,H,D]), float32."""
    k_BxKxHxD, v_BxKxHxD, allowed_BxK, kpos_K = block
    scale = q_BxTxHxD.shape[-1] ** -0.5
    logits_BxTxHxK = jnp.einsum(
        "bqhd,bkhd->bqhk", q_BxTxHxD, k_BxKxHxD, preferred_element_type=F32) * scale
    allowed = _allowed(allowed_BxK, qpos_T, kpos_K, causal) & seen_BxTxH[..., None]
    probs_BxTxHxK = jnp.where(allowed, jnp.exp(logits_BxTxHxK - lse_BxTxH[..., None]), 0.0)
    dv_BxKxHxD = jnp.einsum("bqhk,bqhd->bkhd", probs_BxTxHxK, dout_BxTxHxD,
                            preferred_element_type=F32)
    dprobs_BxTxHxK = jnp.einsum("bqhd,bkhd->bqhk", dout_BxTxHxD, v_BxKxHxD,
                                preferred_element_type=F32)
    dlogits_BxTxHxK = probs_BxTxHxK * (dprobs_BxTxHxK - delta_BxTxH[..., None]) * scale
    dq_BxTxHxD = jnp.einsum("bqhk,bkhd->bqhd", dlogits_BxTxHxK, k_BxKxHxD,
                            preferred_element_type=F32)
    dk_BxKxHxD = jnp.einsum("bqhk,bqhd->bkhd", dlogits_BxTxHxK, q_BxTxHxD,
                            preferred_element_type=F32)
    return dq_BxTxHxD, dk_BxKxHxD, dv_BxKxHxD


def _empty_stats(q_BxSxHxD: jax.Array) -> tuple[jax.Array, ...]:
    """The online softmax before any key: max, sum, weighted values, sum of values (made
    `like` q, so that inside `shard_map` they vary over the same axes as q)."""
    batch, shard, heads, dim = q_BxSxHxD.shape
    return (jnp.full_like(q_BxSxHxD, MASKED_LOGIT, F32, shape=(batch, shard, heads)),
            jnp.zeros_like(q_BxSxHxD, F32, shape=(batch, shard, heads)),
            jnp.zeros_like(q_BxSxHxD, F32),
            jnp.zeros_like(q_BxSxHxD, F32, shape=(batch, heads, dim)))


def _fold_block(
    q_BxSxHxD: jax.Array,
    qpos_S: jax.Array,
    stats: tuple[jax.Array, ...],
    block: tuple[jax.Array, ...],
    *,
    causal: bool,
    length: int,
    tiles: tuple[tuple[slice, int], ...],
    key_chunk: int | None,
) -> tuple[jax.Array, ...]:
    """`stats` with one key block folded in (the online softmax of `ring_attention`),
    tile by tile (`query_tiles`).

    Only allowed keys (real, and if causal not after the query) get weight; the running
    max is taken over them. The sum of the values of every real key is kept besides, for
    rows that end with no allowed key. A block entirely after the queries (causal) is
    skipped with `lax.cond`.
    """
    *softmax_stats, vsum_BxHxD = stats
    _, v_BxCxHxD, _, kpos_C = block
    real_C = kpos_C < length
    vsum_BxHxD = vsum_BxHxD + jnp.einsum(
        "bkhd,k->bhd", v_BxCxHxD, real_C.astype(v_BxCxHxD.dtype), preferred_element_type=F32)

    def attend(softmax_stats):
        parts = [_fold_chunked_tile(q_BxSxHxD[:, tile], qpos_S[tile],
                                    tuple(x[:, tile] for x in softmax_stats),
                                    _leading_keys(block, real_C, keys), causal=causal,
                                    key_chunk=key_chunk)
                 for tile, keys in tiles]
        return tuple(jnp.concatenate(columns, axis=1) for columns in zip(*parts))

    softmax_stats = tuple(softmax_stats)
    if causal:
        after_queries = jnp.min(kpos_C) > jnp.max(qpos_S)
        softmax_stats = jax.lax.cond(after_queries, lambda s: s, attend, softmax_stats)
    else:
        softmax_stats = attend(softmax_stats)
    return (*softmax_stats, vsum_BxHxD)


def _key_chunks(block: tuple[jax.Array, ...], size: int) -> tuple[jax.Array, ...]:
    """A tile's keys (keys, values [B, K, H, D], allowed [B, K], positions [K]) cut into
    [N, ...] chunks of `size` keys; the last chunk is padded with keys not allowed."""
    k_BxKxHxD, v_BxKxHxD, allowed_BxK, kpos_K = block
    return (*(to_chunks(x, size) for x in (k_BxKxHxD, v_BxKxHxD, allowed_BxK)),
            to_chunks(kpos_K[None], size)[:, 0])


def _fold_chunked_tile(q_BxTxHxD, qpos_T, softmax_stats, block, *, causal: bool,
                       key_chunk: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`_fold_tile` over the block's keys `key_chunk` at a time (None: all at once)."""
    if key_chunk is None or block[0].shape[1] <= key_chunk:
        return _fold_tile(q_BxTxHxD, qpos_T, softmax_stats, block, causal=causal)

    def step(stats, chunk):
        return _fold_tile(q_BxTxHxD, qpos_T, stats, chunk, causal=causal), None

    softmax_stats, _ = jax.lax.scan(step, softmax_stats, _key_chunks(block, key_chunk))
    return softmax_stats


def _chunked_tile_grads(q_BxTxHxD, qpos_T, dout_BxTxHxD, lse_BxTxH, seen_BxTxH, delta_BxTxH,
                        block, *, causal: bool, key_chunk: int | None
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`_tile_grads` over the block's keys `key_chunk` at a time (None: all at once): each
    key's gradients depend only on its own logits, given the rows' lse and delta."""
    rows = (q_BxTxHxD, qpos_T, dout_BxTxHxD, lse_BxTxH, seen_BxTxH, delta_BxTxH)
    num_keys = block[0].shape[1]
    if key_chunk is None or num_keys <= key_chunk:
        return _tile_grads(*rows, block, causal=causal)

    def step(dq_BxTxHxD, chunk):
        dq, dk, dv = _tile_grads(*rows, chunk, causal=causal)
        return dq_BxTxHxD + dq, (dk, dv)

    dq_BxTxHxD, (dk_NxBxCxHxD, dv_NxBxCxHxD) = jax.lax.scan(
        step, jnp.zeros_like(q_BxTxHxD, F32), _key_chunks(block, key_chunk))
    return (dq_BxTxHxD, from_chunks(dk_NxBxCxHxD, num_keys),
            from_chunks(dv_NxBxCxHxD, num_keys))


def _fold_tile(q_BxTxHxD, qpos_T, softmax_stats, block, *, causal: bool
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The running (max, sum, weighted values) of T query rows with the K keys of `block`
    (keys, values, allowed [B, K], positions [K]) folded in."""
    max_BxTxH, sum_BxTxH, acc_BxTxHxD = softmax_stats
    k_BxKxHxD, v_BxKxHxD, allowed_BxK, kpos_K = block
    logits_BxTxHxK = jnp.einsum(
        "bqhd,bkhd->bqhk", q_BxTxHxD, k_BxKxHxD, preferred_element_type=F32
    ) * (q_BxTxHxD.shape[-1] ** -0.5)
    allowed = _allowed(allowed_BxK, qpos_T, kpos_K, causal)
    logits_BxTxHxK = jnp.where(allowed, logits_BxTxHxK, MASKED_LOGIT)
    new_max_BxTxH = jnp.maximum(max_BxTxH, logits_BxTxHxK.max(-1))
    weights_BxTxHxK = jnp.where(allowed, jnp.exp(logits_BxTxHxK - new_max_BxTxH[..., None]), 0.0)
    rescale_BxTxH = jnp.exp(max_BxTxH - new_max_BxTxH)
    sum_BxTxH = sum_BxTxH * rescale_BxTxH + weights_BxTxHxK.sum(-1)
    acc_BxTxHxD = acc_BxTxHxD * rescale_BxTxH[..., None] + jnp.einsum(
        "bqhk,bkhd->bqhd", weights_BxTxHxK.astype(v_BxKxHxD.dtype), v_BxKxHxD,
        preferred_element_type=F32)
    return new_max_BxTxH, sum_BxTxH, acc_BxTxHxD


def _finish(stats: tuple[jax.Array, ...], length: int) -> jax.Array:
    """The outputs [B, S, H, D] float32 of the online softmax: weighted values / sum, and
    for a row with no allowed key the plain average of all `length` values (as
    `jax.nn.dot_product_attention`, whose such rows have L equal logits)."""
    _, sum_BxSxH, acc_BxSxHxD, vsum_BxHxD = stats
    seen_BxSxH = sum_BxSxH > 0  # an allowed key's weight is exp(0) = 1 at the max
    out_BxSxHxD = acc_BxSxHxD / jnp.where(seen_BxSxH, sum_BxSxH, 1.0)[..., None]
    return jnp.where(seen_BxSxH[..., None], out_BxSxHxD, (vsum_BxHxD / length)[:, None])


def all_gather_attention(
    q_BxSxHxD: jax.Array,
    k_BxSxHxD: jax.Array,
    v_BxSxHxD: jax.Array,
    mask_BxS: jax.Array | None,
    *,
    causal: bool,
    axis_name: str = SEQ_AXIS,
    layout: Layout | str = Layout.CONTIGUOUS,
    length: int | None = None,
) -> jax.Array:
    """The local queries against all keys, gathered over `axis_name`, inside `jax.shard_map`.

    Keys, values, mask and key positions are gathered whole (`jax.lax.all_gather`, whose
    transpose reduce-scatters the key and value gradients); then the ordinary softmax:
    disallowed logits = `MASKED_LOGIT`, keys at positions >= `length` weight 0.
    Arguments and result as `ring_attention`.
    """
    _, length, qpos_S, keep_BxS = _shard_view(q_BxSxHxD, mask_BxS, axis_name, layout, length)
    k_BxLxHxD, v_BxLxHxD, keep_BxL = (
        jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
        for x in (k_BxSxHxD, v_BxSxHxD, keep_BxS))
    kpos_L = jax.lax.all_gather(qpos_S, axis_name, axis=0, tiled=True)
    logits_BxSxHxL = jnp.einsum(
        "bqhd,bkhd->bqhk", q_BxSxHxD, k_BxLxHxD, preferred_element_type=F32
    ) * (q_BxSxHxD.shape[-1] ** -0.5)
    real_L = kpos_L < length
    allowed = (keep_BxL & real_L)[:, None, None, :]
    if causal:
        allowed = allowed & (kpos_L[None, :] <= qpos_S[:, None])[None, :, None, :]
    logits_BxSxHxL = jnp.where(allowed, logits_BxSxHxL, MASKED_LOGIT)
    max_BxSxH = jax.lax.stop_gradient(
        jnp.where(real_L, logits_BxSxHxL, MASKED_LOGIT).max(-1))
    weights_BxSxHxL = jnp.where(real_L, jnp.exp(logits_BxSxHxL - max_BxSxH[..., None]), 0.0)
    probs_BxSxHxL = weights_BxSxHxL / weights_BxSxHxL.sum(-1, keepdims=True)
    return jnp.einsum("bqhk,bkhd->bqhd", probs_BxSxHxL.astype(v_BxLxHxD.dtype), v_BxLxHxD,
                      preferred_element_type=F32)
