"""Softmax attention on JAX's own Pallas flash-attention kernels (`softmax`'s
``implementation="pallas"``).

JAX ships the kernels under `jax.experimental.pallas.ops`; this module only calls them:

- GPU (CUDA or ROCm; Triton): `jax.experimental.pallas.ops.gpu.attention.mha` on q, k, v
  [B, L, H, D] with one ``segment_ids`` [B, L] for queries and keys, ``causal``,
  ``sm_scale`` and ``block_sizes``; its backward pass is Pallas kernels too.
- TPU (Mosaic): splash attention, `jax.experimental.pallas.ops.tpu.splash_attention`:
  ``make_splash_mha`` builds a kernel from a static mask (one `CausalMask` or `FullMask`
  per head), called per example (`jax.vmap`) on q, k, v [H, L, D] with
  ``SegmentIds(q, kv)`` [L]. It has no scale argument, so q is scaled before the call.
- Any other platform (CPU): the GPU kernel in Pallas' interpret mode, where the kernel's
  grid runs as XLA loops on the host. This is a correctness path for tests, slow for long
  sequences, not a fast path.

Platform rule: the kernel is chosen by the platform the program is lowered for, with
`jax.lax.platform_dependent` ('cuda' or 'rocm' -> the GPU kernel, compiled; 'tpu' ->
splash, compiled; anything else -> the GPU kernel interpreted), so a program traced on
this CPU and exported for 'cuda' or 'tpu' (`jax.export`, one platform per export: JAX
lowers a Pallas call for every platform of a multi-platform export) carries that
platform's real kernel. `attention(..., kernel=..., interpret=...)` fixes the choice
instead (the tests run both kernels interpreted on a CPU).

Masking: the mask becomes segment ids (real token = 1, masked token = 0), so a real query
attends to real keys only (and, causal, to earlier ones), a masked query to masked keys
only. Every query sees at least itself, so no row is empty and every output is finite;
the outputs at masked queries are attention over padding, which the encoder never uses. A
disallowed logit gets the kernels' mask value (-0.7 * the float32 maximum), whose
exponential is exactly 0: values at masked positions change no output at a real position,
in values or gradients. Lengths that are not a multiple of the kernel's block are padded
inside with segment id 0 and the outputs sliced back (GPU: blocks of a power of two from 16
to 128 tokens; TPU: 128); on GPU the head width is zero-padded to a power of two >= 16
(Triton's matrix products need every dimension >= 16; zero columns change no logit).

Sharding: XLA cannot split a Pallas kernel over devices (it would run it on the gathered
batch), so inside a mesh context (`jax.set_mesh`, as in training) the call runs under
`jax.shard_map` with the batch split over every mesh axis, when the batch divides.

Under JAX's 64-bit mode the kernels are traced in 32-bit mode, forward and backward
(`_in_32_bit_mode`: their index arithmetic breaks otherwise); the inputs are 32-bit or
narrower.

The kernels have no dropout on the probabilities; `SoftmaxAttention` refuses
``implementation="pallas"`` with attention dropout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from lra.common import Choice

GPU_MIN_DIM = 16  # Triton's matrix products need every dimension >= 16
GPU_MAX_BLOCK = 128  # the GPU kernel's default forward blocks (queries and keys)
GPU_BACKWARD_BLOCK = 32  # the GPU kernel's default backward blocks
TPU_BLOCK = 128  # splash's default blocks (they must be multiples of 128 lanes)


class Kernel(Choice):
    """Which of JAX's Pallas attention kernels runs."""

    GPU = "gpu"  # jax.experimental.pallas.ops.gpu.attention.mha (Triton)
    TPU = "tpu"  # jax.experimental.pallas.ops.tpu.splash_attention (Mosaic)


def _kernel_call(kernel: Kernel, interpret: bool, causal: bool) -> Callable:
    call = _gpu_attention if kernel is Kernel.GPU else _tpu_attention
    return functools.partial(call, causal=causal, interpret=interpret)


def _platform_call(causal: bool) -> Callable:
    """The kernel of the platform the program is lowered for (module docstring)."""
    gpu = _kernel_call(Kernel.GPU, False, causal)
    return functools.partial(
        jax.lax.platform_dependent, cuda=gpu, rocm=gpu,
        tpu=_kernel_call(Kernel.TPU, False, causal),
        default=_kernel_call(Kernel.GPU, True, causal))


def attention(
    q_BxLxHxD: jax.Array,
    k_BxLxHxD: jax.Array,
    v_BxLxHxD: jax.Array,
    mask_BxL: jax.Array | None = None,
    *,
    causal: bool,
    kernel: Kernel | str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v over real (and, if causal, earlier) keys, on a Pallas kernel.

    Args:
      q_BxLxHxD, k_BxLxHxD, v_BxLxHxD: queries, keys and values, one dtype.
      mask_BxL: True = real token; None = all real.
      causal: if True, position i attends only to positions <= i.
      kernel: "gpu" or "tpu"; None (with interpret None) = the lowering platform's.
      interpret: run the kernel in Pallas' interpret mode; None = unless the kernel's own
        platform (`jax.default_backend()`) runs the computation.

    Returns:
      [B, L, H, D] in q's dtype; rows of masked queries are finite and meaningless.
    """
    if kernel is None and interpret is None:
        call = _platform_call(causal)
    else:
        kernel = Kernel("tpu" if jax.default_backend() == "tpu" else "gpu") if kernel is None \
            else Kernel(kernel)
        if interpret is None:
            interpret = jax.default_backend() != kernel.value
        call = _kernel_call(kernel, interpret, causal)
    batch = q_BxLxHxD.shape[0]
    if jax.config.jax_enable_x64:
        call = _in_32_bit_mode(call)
    segments_BxL = None if mask_BxL is None else mask_BxL.astype(jnp.int32)
    out_BxLxHxD = _over_batch_shards(call, batch)(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD,
                                                  segments_BxL)
    return out_BxLxHxD.astype(q_BxLxHxD.dtype)


def _gpu_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segments_BxL, *, causal, interpret):
    """The GPU kernel (`mha`) on padded lengths and head widths (module docstring)."""
    batch, length, _, head_dim = q_BxLxHxD.shape
    block = min(GPU_MAX_BLOCK, _next_power_of_2(max(length, GPU_MIN_DIM)))
    padded_length = _round_up(length, block)
    padded_dim = max(GPU_MIN_DIM, _next_power_of_2(head_dim))
    pad = ((0, 0), (0, padded_length - length), (0, 0), (0, padded_dim - head_dim))
    q, k, v = (jnp.pad(x, pad) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    backward = min(GPU_BACKWARD_BLOCK, block)
    block_sizes = gpu_attention.BlockSizes(
        block_q=block, block_k=block, block_q_dkv=backward, block_kv_dkv=backward,
        block_q_dq=backward, block_kv_dq=backward)
    out = gpu_attention.mha(
        q, k, v, _padded_segments(segments_BxL, batch, length, padded_length),
        sm_scale=head_dim**-0.5, causal=causal, block_sizes=block_sizes,
        interpret=interpret)
    return out[:, :length, :, :head_dim]


def _tpu_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, segments_BxL, *, causal, interpret):
    """Splash attention per example on [H, L, D] (module docstring)."""
    batch, length, num_heads, head_dim = q_BxLxHxD.shape
    padded_length = _round_up(length, TPU_BLOCK)
    scaled_q = (q_BxLxHxD.astype(jnp.float32) * head_dim**-0.5).astype(q_BxLxHxD.dtype)

    def heads_first(x_BxLxHxD):
        x = jnp.pad(x_BxLxHxD, ((0, 0), (0, padded_length - length), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2)

    shape = (padded_length, padded_length)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * num_heads),
        block_sizes=splash.BlockSizes.get_default(), head_shards=1, q_seq_shards=1,
        interpret=interpret)
    segments = _padded_segments(segments_BxL, batch, length, padded_length)
    q, k, v = (heads_first(x) for x in (scaled_q, k_BxLxHxD, v_BxLxHxD))
    if segments is None:
        out_BxHxLxD = jax.vmap(kernel)(q, k, v)
    else:
        out_BxHxLxD = jax.vmap(
            lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))
        )(q, k, v, segments)
    return jnp.swapaxes(out_BxHxLxD, 1, 2)[:, :length]


def _padded_segments(segments_BxL, batch, length, padded_length):
    """Segment ids [B, padded_length] (real 1, masked and block padding 0), or None when
    every position is real."""
    if segments_BxL is None:
        if padded_length == length:
            return None
        segments_BxL = jnp.ones((batch, length), jnp.int32)
    return jnp.pad(segments_BxL, ((0, 0), (0, padded_length - length)))


def _over_batch_shards(call: Callable, batch: int) -> Callable:
    """`call` under `jax.shard_map` with the batch split over every axis of the mesh in
    context, when there is one of several devices that divides the batch; else `call`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batch % mesh.size:
        return call
    if any(kind == jax.sharding.AxisType.Manual for kind in mesh.axis_types):
        return call  # already inside a shard_map: the arrays are this device's
    spec = jax.sharding.PartitionSpec(mesh.axis_names)
    return jax.shard_map(call, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)


def _in_32_bit_mode(call: Callable) -> Callable:
    """`call` with its forward and backward passes traced in 32-bit mode.

    The kernels' index arithmetic mixes int32 program ids with Python ints, which JAX's
    64-bit mode makes int64 (`lax.div` then refuses the causal GPU kernel, forward and
    backward). Every input here is 32-bit or narrower already, so nothing else changes.
    """
    @jax.custom_vjp
    def in_32_bit(*args):
        with jax.enable_x64(False):
            return call(*args)

    def forward(*args):
        with jax.enable_x64(False):
            return jax.vjp(call, *args)

    def backward(vjp, cotangent):
        with jax.enable_x64(False):
            return vjp(cotangent)

    in_32_bit.defvjp(forward, backward)
    return in_32_bit


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
