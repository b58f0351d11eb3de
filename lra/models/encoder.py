"""The one encoder: embeddings, positions, pre-norm blocks, pooling, heads.

Every mixer (attention family or sequence model) shares every line here except the
token-mixing layer, which comes from the `lra.models.mixers` registry by name. Shapes:
B batch, L length (including the CLS position when pooling is "cls"), E emb_dim, H heads,
D head_dim, K classes.

Causal mode (`causal=True`, pooling "last"): every block attends only to earlier
tokens and the last real token is pooled, so the encoder reads left to right. With a
kernelized attention (one with `step`) it is then a recurrent network:
`init_decode` / `decode_step` run it token by token in constant memory
(`lra.models.decode.classify_stepwise`) and give the same numbers as the parallel pass.

Memory and speed (`dtype`, `remat`): parameters are always float32; `dtype` is the compute
dtype of the embeddings, projections, LayerNorms (statistics in float32) and MLPs, so with
bfloat16 the attention cores get bfloat16 q/k/v. The pooled vector, the head and the logits
are float32. `remat=True` recomputes each block's activations in the backward pass
(`nnx.remat`): only a block's input is kept between forward and backward.
`scan_layers=True` holds the blocks as one block with a leading layer axis run by
`nnx.scan` (lra/models/stack.py): compile time no longer grows with the depth.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.common import Choice
from lra.models import mixers, stack
from lra.models.attention import sequence_parallel
from lra.models.attention.sequence_parallel import SEQ_AXIS, Layout, splits_sequence
from lra.models.norm import make_norm
from lra.models.pattern import LayerMixer, layer_names


class Pooling(Choice):
    """How the encoder output [B, L, E] becomes one vector [B, E]."""

    CLS = "cls"  # a learned CLS vector prepended at position 0; take position 0
    MEAN = "mean"  # mean over real tokens only
    LAST = "last"  # the last real token (required by causal attention)


class Positions(Choice):
    """Position information added to the token embeddings."""

    SINUSOIDAL = "sinusoidal"  # fixed sin/cos table
    LEARNED = "learned"  # trained table, one row per position
    ROPE = "rope"  # nothing added: every block rotates q and k (lra/models/rotary.py)
    NONE = "none"  # no positions (the attention itself may encode order)


class EmbeddingInit(Choice):
    """How the token embedding table [vocab, E] is initialised."""

    FLAX = "flax"  # nnx.Embed's default: variance scaling 1.0, fan_in, truncated normal
    # N(0, 1), as LRA: lra_benchmarks/models/layers/common_layers.py, Embed's
    # emb_init=nn.initializers.normal(stddev=1.0), used by every LRA encoder.
    UNIT_NORMAL = "unit_normal"


_INIT_STDDEV = 0.02  # CLS vector and learned positions


@functools.lru_cache(maxsize=16)
def _sinusoidal_LxE(length: int, dim: int) -> np.ndarray:
    half = dim // 2
    timescales = 10_000.0 ** (-np.arange(half) / max(half - 1, 1))
    angles_LxE2 = np.arange(length)[:, None] * timescales[None, :]
    table = np.zeros((length, dim), np.float32)
    table[:, :half] = np.sin(angles_LxE2)
    table[:, half : 2 * half] = np.cos(angles_LxE2)
    table.setflags(write=False)  # shared by the cache
    return table


def split_sequence(x_BxLxE: jax.Array) -> jax.Array:
    """Block activations kept split by sequence under sequence parallelism.

    When the mesh in context (`jax.set_mesh`) has a `seq` axis of more than one device
    (`config.mesh_seq`, lra/parallel/sharding.py), `x_BxLxE` is constrained to its rows
    over the other axes (data, fsdp) and its positions L over `seq`, the layout of the
    batch's [B, L] arrays: per-token layers then run on each device's positions, and
    pooling reduces across the axis. Without a mesh, or with `seq` of 1, `x_BxLxE`
    itself (nothing is added to the computation).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not splits_sequence(mesh):
        return x_BxLxE
    rows = tuple(name for name in mesh.axis_names if name != SEQ_AXIS)
    return jax.lax.with_sharding_constraint(x_BxLxE, jax.sharding.PartitionSpec(rows, SEQ_AXIS))


def _striped_refusal(pattern: Sequence[LayerMixer], attention_dropout: float) -> str | None:
    """Why blocks with these mixers cannot run in the striped layout (None if they can):
    only the exact attentions' ring (`sequence_parallel.STRIPED_MIXERS`, softmax through
    its xla path, without attention dropout, whose explicit path masks by index) reads
    each token's position; every other mixer needs the tokens in order."""
    if attention_dropout > 0:
        return (f"attention_dropout={attention_dropout} runs softmax's explicit path, "
                "which needs the tokens in order; set it to 0")
    for spec in pattern:
        if spec.name not in sequence_parallel.STRIPED_MIXERS:
            return (f"mixer {spec.name!r} needs the tokens in order; the striped layout runs "
                    f"only {', '.join(sequence_parallel.STRIPED_MIXERS)}")
        implementation = spec.options.get(
            "implementation", mixers.default_options(spec.name).get("implementation", "xla"))
        if getattr(implementation, "value", implementation) != "xla":
            return (f"mixer {spec.name!r} with implementation {implementation!r} does not "
                    "run over a split sequence; use implementation 'xla'")
    return None


def _to_striped(x_BxLx_: jax.Array) -> jax.Array:
    """`x_BxLx_` (activations [B, L, E], kept split by sequence, or the mask [B, L]) in
    striped order: device i of the n on `seq` holds tokens i, i + n, i + 2n, ...

    Raises:
      ValueError: if n does not divide the length (`sequence_parallel.to_striped`).
    """
    striped = sequence_parallel.to_striped(x_BxLx_, sequence_parallel.static_seq_size())
    return split_sequence(striped) if striped.ndim == 3 else striped


class Mlp(nnx.Module):
    """E -> mlp_dim -> gelu -> dropout -> E -> dropout."""

    def __init__(
        self, *, emb_dim: int, mlp_dim: int, dropout: float, dtype: Any, rngs: nnx.Rngs
    ):
        self.up = nnx.Linear(emb_dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(mlp_dim, emb_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x_BxLxE: jax.Array, *, deterministic: bool) -> jax.Array:
        h_BxLxM = self.dropout(jax.nn.gelu(self.up(x_BxLxE)), deterministic=deterministic)
        return self.dropout(self.down(h_BxLxM), deterministic=deterministic)


class Block(nnx.Module):
    """Pre-norm block: x + mixer(N(x)), then x + mlp(N(x)) unless `block_mlp` is False;
    N is LayerNorm or masked BatchNorm (`norm`, lra/models/norm.py)."""

    def __init__(
        self,
        *,
        emb_dim: int,
        qkv_dim: int,
        num_heads: int,
        mlp_dim: int,
        max_len: int,
        dropout: float,
        attention_dropout: float,
        attention: str,
        attention_options: dict[str, Any],
        causal: bool = False,
        rotary: bool = False,
        block_mlp: bool = True,
        norm: str = "layer",
        norm_momentum: float = 0.95,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        new_norm = lambda: make_norm(norm, emb_dim, momentum=norm_momentum, dtype=dtype,
                                     rngs=rngs)
        self.attention_norm = new_norm()
        self.attention = mixers.make(
            attention,
            emb_dim=emb_dim,
            qkv_dim=qkv_dim,
            num_heads=num_heads,
            max_len=max_len,
            dropout=dropout,
            attention_dropout=attention_dropout,
            causal=causal,
            rotary=rotary,
            dtype=dtype,
            rngs=rngs,
            **attention_options,
        )
        if block_mlp:
            self.mlp_norm = new_norm()
            self.mlp = Mlp(emb_dim=emb_dim, mlp_dim=mlp_dim, dropout=dropout, dtype=dtype,
                           rngs=rngs)
        else:
            self.mlp_norm = self.mlp = None

    def _mlp(self, x, mask, *, deterministic: bool):
        if self.mlp is None:
            return x
        y = self.mlp_norm(x, mask, deterministic=deterministic)
        return x + self.mlp(y, deterministic=deterministic)

    def __call__(
        self, x_BxLxE: jax.Array, mask_BxL: jax.Array, *, deterministic: bool
    ) -> jax.Array:
        y_BxLxE = self.attention_norm(x_BxLxE, mask_BxL, deterministic=deterministic)
        x_BxLxE = x_BxLxE + self.attention(y_BxLxE, mask_BxL, deterministic=deterministic)
        return split_sequence(self._mlp(x_BxLxE, mask_BxL, deterministic=deterministic))

    def step(self, state, x_BxE, mask_B, position):
        """`__call__` for one token, carrying the mixer's decoding state."""
        y_BxE = self.attention_norm(x_BxE, mask_B, deterministic=True)
        state, y_BxE = self.attention.step(state, y_BxE, mask_B, position)
        return state, self._mlp(x_BxE + y_BxE, mask_B, deterministic=True)


class BlockGroup(nnx.Module):
    """One repeat of a per-layer mixer pattern: its P blocks, run in order (the unit that
    `scan_layers` stacks when the pattern has more than one mixer)."""

    def __init__(self, blocks: Sequence[Block]):
        self.blocks = nnx.List(blocks)

    def __call__(self, x_BxLxE, mask_BxL, *, deterministic: bool):
        for block in self.blocks:
            x_BxLxE = block(x_BxLxE, mask_BxL, deterministic=deterministic)
        return x_BxLxE


class Encoder(nnx.Module):
    """Tokens [B, L] and mask [B, L] -> one pooled vector per sequence [B, E].

    One tower: the classifier uses it once, a dual encoder (retrieval) shares it
    between both documents.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        max_len: int,
        num_layers: int,
        emb_dim: int,
        qkv_dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float,
        attention_dropout: float,
        pooling: str,
        positions: str,
        attention: str,
        attention_options: dict[str, Any],
        causal: bool = False,
        embedding_init: str = "flax",
        block_mlp: bool = True,
        norm: str = "layer",
        norm_momentum: float = 0.95,
        dtype: Any = jnp.float32,
        remat: bool = False,
        scan_layers: bool = False,
        pattern: Sequence[LayerMixer] = (),
        rngs: nnx.Rngs,
    ):
        """Builds the encoder.

        Args:
          vocab_size: number of token ids.
          max_len: longest token sequence (without the CLS position).
          num_layers: number of blocks.
          emb_dim: model width E.
          qkv_dim: total width of q, k and v over all heads (num_heads * D).
          num_heads: H; must divide qkv_dim.
          mlp_dim: hidden width of each block's MLP.
          dropout: dropout after embeddings, attention output and MLP layers.
          attention_dropout: dropout on attention probabilities (families that
            have them).
          pooling: a `Pooling` value, "cls", "mean" or "last"; "last" if causal.
          positions: a `Positions` value, "sinusoidal", "learned", "rope" (rotary, in
            every attention block) or "none".
          attention: a mixer name from `lra.models.mixers.NAMES`.
          attention_options: options of that mixer.
          causal: if True, every block's attention sees only earlier tokens.
          embedding_init: an `EmbeddingInit` value, "flax" or "unit_normal" (LRA's).
          block_mlp: if False, blocks have no MLP sub-block (as S5's and LRU's).
          norm: the blocks' normalisation, "layer" or "batch" (masked BatchNorm, as S5).
          norm_momentum: BatchNorm's running-average momentum.
          dtype: compute dtype (float32 or bfloat16); parameters stay float32.
          remat: if True, each block is rematerialised (recomputed in the backward pass).
          scan_layers: if True, the blocks are one stacked block run by `nnx.scan`
            (attribute `scanned_blocks`, arrays [num_layers, ...]) instead of a list
            (`blocks`); see lra/models/stack.py. With a pattern of P > 1 mixers the
            stacked unit is a `BlockGroup` of P blocks, [num_layers / P, ...].
          pattern: the mixers of one repeat of a per-layer pattern (lra/models/pattern.py),
            repeated to num_layers; empty = every layer is `attention` with
            `attention_options` and `block_mlp`, which a pattern replaces.
          rngs: streams ``params`` and ``dropout``.

        Raises:
          ValueError: for an invalid setting, naming it.
        """
        self.pooling = Pooling(pooling)
        self.positions = Positions(positions)
        if causal and self.pooling is not Pooling.LAST:
            raise ValueError(
                f"pooling={self.pooling.value!r} with causal=True: a causal encoder must "
                "use pooling='last' (only the last real token has seen the whole sequence)"
            )
        self.causal = causal
        self.attention_name = attention
        self.max_len = max_len
        self.emb_dim = emb_dim
        self.dtype = jnp.dtype(dtype)
        if self.dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"dtype must be float32 or bfloat16; got {dtype!r}")
        self.remat = remat
        use_cls = self.pooling is Pooling.CLS
        length = max_len + 1 if use_cls else max_len  # attention sees the CLS position
        init = nnx.initializers.normal(_INIT_STDDEV)
        embed_init = {EmbeddingInit.FLAX: nnx.nn.linear.default_embed_init,
                      EmbeddingInit.UNIT_NORMAL: nnx.initializers.normal(1.0)}
        self.embed = nnx.Embed(vocab_size, emb_dim, dtype=self.dtype, rngs=rngs,
                               embedding_init=embed_init[EmbeddingInit(embedding_init)])
        self.cls_E = nnx.Param(init(rngs.params(), (emb_dim,))) if use_cls else None
        learned = self.positions is Positions.LEARNED
        self.positions_LxE = (
            nnx.Param(init(rngs.params(), (length, emb_dim))) if learned else None
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        pattern = tuple(pattern) or (LayerMixer(attention, attention_options, block_mlp),)
        self.layer_names = layer_names([spec.name for spec in pattern], num_layers)
        new_block = lambda rngs, spec: Block(
                emb_dim=emb_dim,
                qkv_dim=qkv_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                max_len=length,
                dropout=dropout,
                attention_dropout=attention_dropout,
                attention=spec.name,
                attention_options=spec.options,
                causal=causal,
                rotary=self.positions is Positions.ROPE,
                block_mlp=spec.block_mlp,
                norm=norm,
                norm_momentum=norm_momentum,
                dtype=self.dtype,
                rngs=rngs,
            )
        self.scan_layers = scan_layers
        if len(pattern) == 1:  # one mixer: blocks (or one stacked block), as always
            blocks = stack.make_blocks(lambda rngs: new_block(rngs, pattern[0]), num_layers,
                                       scan=scan_layers, rngs=rngs)
        elif scan_layers:  # the pattern's repeats, scanned
            blocks = stack.make_blocks(
                lambda rngs: BlockGroup([new_block(rngs, spec) for spec in pattern]),
                num_layers // len(pattern), scan=True, rngs=rngs)
        else:
            blocks = nnx.List(new_block(rngs, pattern[i % len(pattern)])
                              for i in range(num_layers))
        self.blocks = None if scan_layers else blocks
        self.scanned_blocks = blocks if scan_layers else None
        self.final_norm = nnx.LayerNorm(emb_dim, dtype=self.dtype, rngs=rngs)
        self.striped_refusal = _striped_refusal(pattern, attention_dropout)

    def _embed(
        self, tokens_BxL: jax.Array, mask_BxL: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Token embeddings (+ CLS) + positions, and the mask over that sequence."""
        x_BxLxE = self.embed(tokens_BxL)
        if self.cls_E is not None:
            batch = tokens_BxL.shape[0]
            cls_Bx1xE = jnp.broadcast_to(self.cls_E[...], (batch, 1, self.emb_dim))
            x_BxLxE = jnp.concatenate([cls_Bx1xE.astype(x_BxLxE.dtype), x_BxLxE], 1)
            mask_BxL = jnp.concatenate([jnp.ones((batch, 1), bool), mask_BxL], 1)
        length = x_BxLxE.shape[1]
        if self.positions is Positions.SINUSOIDAL:
            x_BxLxE = x_BxLxE + _sinusoidal_LxE(length, self.emb_dim).astype(self.dtype)
        elif self.positions is Positions.LEARNED:
            x_BxLxE = x_BxLxE + self.positions_LxE[:length].astype(self.dtype)
        return x_BxLxE, mask_BxL

    def _pool(self, x_BxLxE: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        if self.pooling is Pooling.CLS:
            return x_BxLxE[:, 0]
        if self.pooling is Pooling.LAST:
            length = mask_BxL.shape[1]
            last_B = length - 1 - jnp.argmax(mask_BxL[:, ::-1], axis=1)
            return jnp.take_along_axis(x_BxLxE, last_B[:, None, None], axis=1)[:, 0]
        weights_BxLx1 = mask_BxL[..., None].astype(x_BxLxE.dtype)
        count_Bx1 = jnp.maximum(weights_BxLx1.sum(1), 1)
        return (x_BxLxE * weights_BxLx1).sum(1) / count_Bx1

    def __call__(
        self, tokens_BxL: jax.Array, mask_BxL: jax.Array, *, deterministic: bool = True
    ) -> jax.Array:
        """Encodes a batch.

        Args:
          tokens_BxL: int token ids; any id (0 included) at a real position is real.
          mask_BxL: bool, True at real tokens; masked positions never change the
            output.
          deterministic: if False, applies dropout from the ``dropout`` rng stream.

        Returns:
          Pooled vectors [B, emb_dim], float32 whatever the compute dtype.
        """
        x_BxLxE, mask_BxL = self._encode(tokens_BxL, mask_BxL, deterministic=deterministic)
        return self._pool(x_BxLxE, mask_BxL).astype(jnp.float32)

    def tokens(
        self, tokens_BxL: jax.Array, mask_BxL: jax.Array, *, deterministic: bool = True
    ) -> jax.Array:
        """Per-token outputs [B, L, E] (after the final norm, CLS dropped), in the compute
        dtype: what a language-model head reads (lra/models/language_model.py)."""
        x_BxLxE, _ = self._encode(tokens_BxL, mask_BxL, deterministic=deterministic)
        return x_BxLxE[:, 1:] if self.cls_E is not None else x_BxLxE

    def _encode(
        self, tokens_BxL: jax.Array, mask_BxL: jax.Array, *, deterministic: bool
    ) -> tuple[jax.Array, jax.Array]:
        """Embeddings, blocks and final norm: ([B, L(+1), E], the mask over that length)."""
        if tokens_BxL.shape[1] > self.max_len:
            raise ValueError(
                f"sequence length {tokens_BxL.shape[1]} exceeds max_len={self.max_len}"
            )
        x_BxLxE, mask_BxL = self._embed(tokens_BxL, mask_BxL.astype(bool))
        x_BxLxE = split_sequence(self.dropout(x_BxLxE, deterministic=deterministic))
        layout = self._block_layout()
        blocks_mask_BxL = mask_BxL
        if layout is Layout.STRIPED:  # once, before the blocks: tokens i, i + n, ...
            x_BxLxE, blocks_mask_BxL = (_to_striped(x) for x in (x_BxLxE, mask_BxL))
        with sequence_parallel.tokens_in_layout(layout):
            x_BxLxE = stack.run_blocks(
                self.scanned_blocks if self.scan_layers else self.blocks, x_BxLxE,
                blocks_mask_BxL, scan=self.scan_layers, remat=self.remat,
                deterministic=deterministic)
        if layout is Layout.STRIPED:  # back to token order
            x_BxLxE = split_sequence(sequence_parallel.from_striped(
                x_BxLxE, sequence_parallel.static_seq_size()))
        return self.final_norm(x_BxLxE), mask_BxL

    def _block_layout(self) -> Layout:
        """The order the blocks run the sequence in: striped when the run asks for it
        (`sequence_parallel.use_seq_layout`, `config.seq_layout`) and the mesh in context
        splits the sequence; else token order.

        Raises:
          ValueError: striped asked for with a mixer that needs the tokens in order.
        """
        if (sequence_parallel.requested_seq_layout() is Layout.CONTIGUOUS
                or not splits_sequence()):
            return Layout.CONTIGUOUS
        if self.striped_refusal:
            raise ValueError(f"seq_layout='striped' over the {SEQ_AXIS!r} axis: "
                             f"{self.striped_refusal}; use seq_layout='contiguous'")
        return Layout.STRIPED

    def init_decode(self, batch_size: int) -> tuple:
        """The empty decoding state of every block (constant size in the length).

        Raises:
          ValueError: if the encoder is not causal, its attention has no `step`, or its
            layers are scanned.
        """
        if self.scan_layers:
            raise ValueError("decoding token by token needs unrolled layers "
                             "(model.scan_layers=False): each block keeps its own state")
        if not self.causal:
            raise ValueError("decoding token by token needs a causal encoder (causal=True)")
        silent = [name for block, name in zip(self.blocks, self.layer_names)
                  if not getattr(block.attention, "decodes", False)]
        if silent:
            raise ValueError(
                f"mixer {silent[0]!r} has no step, so it cannot decode token by "
                "token; kernelized and gated attentions (linear, performer, cosformer, taylor, "
                "retnet, gla, deltanet, ...) and the causal sequence models can"
            )
        return tuple(block.attention.init_state(batch_size) for block in self.blocks)

    def decode_step(self, state, token_B, mask_B, position):
        """Encodes one token given the state of the tokens before it.

        Args:
          state: from `init_decode` or the previous step.
          token_B: int token ids at `position`.
          mask_B: bool, False where the token is padding (it leaves the state as it is).
          position: int index of the token in the sequence (< max_len).

        Returns:
          (new state, final-norm output of this token [B, E]): at the last real token
          it equals the pooled output of the parallel pass.
        """
        x_BxE = self.embed(token_B)
        if self.positions is Positions.SINUSOIDAL:
            table_LxE = _sinusoidal_LxE(self.max_len, self.emb_dim).astype(self.dtype)
            x_BxE = x_BxE + jnp.asarray(table_LxE)[position]
        elif self.positions is Positions.LEARNED:
            x_BxE = x_BxE + self.positions_LxE[...][position].astype(self.dtype)
        new_state = []
        for block, block_state in zip(self.blocks, state):
            block_state, x_BxE = block.step(block_state, x_BxE, mask_B, position)
            new_state.append(block_state)
        return tuple(new_state), self.final_norm(x_BxE).astype(jnp.float32)


class Head(nnx.Module):
    """Classifier MLP: Dense(hidden) -> relu -> Dense(num_classes), float32 logits."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_dim, hidden_dim, rngs=rngs)
        self.logits = nnx.Linear(hidden_dim, num_classes, rngs=rngs)

    def __call__(self, x_BxI: jax.Array) -> jax.Array:
        return self.logits(jax.nn.relu(self.hidden(x_BxI))).astype(jnp.float32)


class Classifier(nnx.Module):
    """Encoder + classifier head: tokens [B, L], mask [B, L] -> logits [B, K]."""

    def __init__(self, encoder: Encoder, *, num_classes: int, mlp_dim: int, rngs: nnx.Rngs):
        self.encoder = encoder
        self.head = Head(encoder.emb_dim, mlp_dim, num_classes, rngs=rngs)

    def __call__(
        self, tokens_BxL: jax.Array, mask_BxL: jax.Array, *, deterministic: bool = True
    ) -> jax.Array:
        """Returns float32 logits [B, num_classes]; see `Encoder.__call__`."""
        return self.head(self.encoder(tokens_BxL, mask_BxL, deterministic=deterministic))


class DualHead(nnx.Module):
    """LRA's `classifier_head_dual` with NLI interaction, on the pooled pair (u, v):

    [u, v, u*v, u-v] -> Dense(mlp_dim) -> relu -> Dense(mlp_dim // 2) -> relu -> Dense(K),
    float32 logits (lra_benchmarks/models/layers/common_layers.py, classifier_head_dual).
    """

    def __init__(self, emb_dim: int, mlp_dim: int, num_classes: int, *, rngs: nnx.Rngs):
        if mlp_dim < 2:
            raise ValueError(f"the dual head needs mlp_dim >= 2 (mlp_dim // 2 units); got {mlp_dim}")
        self.hidden = nnx.Linear(4 * emb_dim, mlp_dim, rngs=rngs)
        self.hidden2 = nnx.Linear(mlp_dim, mlp_dim // 2, rngs=rngs)
        self.logits = nnx.Linear(mlp_dim // 2, num_classes, rngs=rngs)

    def __call__(self, u_BxE: jax.Array, v_BxE: jax.Array) -> jax.Array:
        pair_Bx4E = jnp.concatenate([u_BxE, v_BxE, u_BxE * v_BxE, u_BxE - v_BxE], -1)
        h_BxM = jax.nn.relu(self.hidden(pair_Bx4E))
        return self.logits(jax.nn.relu(self.hidden2(h_BxM))).astype(jnp.float32)


class DualEncoderClassifier(nnx.Module):
    """Retrieval: one shared encoder tower for both documents, then `DualHead`.

    (tokens [B, L], mask [B, L], tokens2 [B, L], mask2 [B, L]) -> logits [B, K].
    """

    def __init__(self, encoder: Encoder, *, num_classes: int, mlp_dim: int, rngs: nnx.Rngs):
        self.encoder = encoder
        self.head = DualHead(encoder.emb_dim, mlp_dim, num_classes, rngs=rngs)

    def __call__(
        self,
        tokens_BxL: jax.Array,
        mask_BxL: jax.Array,
        tokens2_BxL: jax.Array,
        mask2_BxL: jax.Array,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Returns float32 logits [B, num_classes]; see `Encoder.__call__`.

        Both documents go through the tower in one call of 2B rows, interleaved (row 2i is
        pair i's first document, 2i + 1 its second) so that each device's rows stay on it
        under a batch-sharded mesh. With LayerNorm this equals two calls of B rows up to
        float rounding; dropout masks are drawn once for the 2B rows. With BatchNorm
        (`norm="batch"`) the statistics and the running-average update are over both
        documents together, as in S5's released retrieval model (its BatchNorm's
        `axis_name` spans the 2B rows), not over each document's B rows.
        """
        tokens_2BxL = interleave_pairs(tokens_BxL, tokens2_BxL)
        mask_2BxL = interleave_pairs(mask_BxL.astype(bool), mask2_BxL.astype(bool))
        pooled_2BxE = self.encoder(tokens_2BxL, mask_2BxL, deterministic=deterministic)
        pooled_Bx2xE = pooled_2BxE.reshape(tokens_BxL.shape[0], 2, -1)
        return self.head(pooled_Bx2xE[:, 0], pooled_Bx2xE[:, 1])


def interleave_pairs(first_BxL: jax.Array, second_BxL: jax.Array) -> jax.Array:
    """Two documents per pair -> [2B, L]: row 2i is pair i's first document, 2i + 1 its
    second, the shorter one padded with zeros (False) to the longer length.

    Each device's rows of a batch-sharded [B, ...] stay on it as rows of the [2B, ...]
    (concatenating the two halves would move rows between devices).
    """
    length = max(first_BxL.shape[1], second_BxL.shape[1])
    pad = lambda x_BxL: jnp.pad(x_BxL, ((0, 0), (0, length - x_BxL.shape[1])))
    return jnp.stack([pad(first_BxL), pad(second_BxL)], 1).reshape(-1, length)
