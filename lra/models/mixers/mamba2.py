"""The Mamba2 block: in_proj, short convolution, SSD, gated RMSNorm, out_proj.

Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality", ICML 2024 (the Mamba2 block, Fig. 6 and Sec. 7).
Checked against the authors' code (github.com/state-spaces/mamba; read at commit
e9594ce1c732d97440f0332fdc43170a2294dbfa): mamba_ssm/modules/mamba2_simple.py
(`Mamba2Simple`: the layout, the initialisation, `_no_weight_decay`, and the options
ngroups, learnable_init_states, dt_limit), mamba_ssm/modules/mamba2.py (`Mamba2`: the
defaults headdim=64, d_state=128, and `step`) and mamba_ssm/ops/triton/ssd_combined.py
(`_mamba_chunk_scan_combined_fwd`: head h reads the B and C of group h // (H / G);
initial_states; dt clamped to dt_limit after the softplus). The code here is written
from the paper's equations and those conventions, not copied; the SSD is
`lra.models.attention.ssd.grouped_ssd` (the paper's chunked SSD with C B^T formed once
per group), which equals the gated linear-attention core (gated.py) with B and C
broadcast to every head (tested).

Per token t, with E the width, d_inner = expand E, H = d_inner / head_dim heads of
P = head_dim channels, N = d_state and G = ngroups groups of H / G consecutive heads
that share B and C (head h in group G(h) = h // (H / G), as Mamba2):

    [z, xBC, dt_raw] = in_proj(u_t)          z, x [d_inner], B, C [G N], dt_raw [H]
    xBC = silu(conv1d(xBC))                   depthwise, kernel conv_size, with bias
    dt_h = clamp(softplus(dt_raw_h + dt_bias_h), dt_limit),   A_h = -exp(A_log_h)
    h_t = exp(dt_h A_h) h_{t-1} + B_{t,G(h)}^T (dt_h x_{t,h})    [N, P] per head
    y_{t,h} = C_{t,G(h)} h_t + D_h x_{t,h}
    out_t = out_proj(RMSNorm(y_t * silu(z_t)))            (norm_before_gate=False)

with h_{-1} = 0, or the learned per-head [N, P] state with learnable_init_states.
Both nonlinearities are SiLU, x sigmoid(x), exact, as the authors' code (`nn.SiLU()` /
the "swish" activation of the fused kernels); the block has no GELU. The convolution
covers x, B and C (d_inner + 2 G N channels), as Mamba2's. in_proj and out_proj have no
bias (Mamba2's bias=False); the RMSNorm is over all d_inner channels (one group,
Mamba2Simple's `RMSNormGated(d_inner)`, whatever ngroups: Mamba2's fused module
normalises each of the G groups of d_inner / G channels instead) with a learned scale
and eps 1e-5.

Options from Mamba2Simple, all off by default (the defaults give the block as it was
before they existed, to float32 rounding: the SSD's operations are ordered differently):
`ngroups` (1: one B and one C for all heads; must divide H; the C B^T matrix of a chunk
is computed once per group, the per-head decays applied to it afterwards);
`learnable_init_states` (False; a per-head [N, P] `SsmParam`,
`init_states_HxNxP`, zeros at init, that the SSD state starts from in every form and
in `init_state`; Mamba2Simple's `init_states` [H, P, N], here the state's [N, P]
layout); `dt_limit` ((0, inf): no clamp, and none is applied; else dt is clamped to
[lo, hi] after the softplus, as `ssd_combined`'s dt_limit).

Initialisation as Mamba2Simple: A ~ U[1, 16] (A_log = log A), dt ~ log-uniform in
[0.001, 0.1] floored at 1e-4 and dt_bias = softplus^-1(dt) (`ssd.mamba2_init`), D = 1,
norm scale 1; the convolution's weight and bias U(-1/sqrt(taps), 1/sqrt(taps)) (torch's
Conv1d default for a depthwise kernel: fan-in = taps). The projections use flax's
default (LeCun normal, the same 1/fan_in scale family as torch's Linear default); the
reference's per-layer rescaling of out_proj (in its language-model wrapper) is not
applied.

Parameter groups: Mamba2 marks A_log, dt_bias and D `_no_weight_decay` (Mamba2Simple
also init_states); here they are `ssm.SsmParam`s, so lra.training.train gives them no
weight decay and `config.ssm_learning_rate` (Mamba2 itself trains them at the model's
learning rate: set ssm_learning_rate equal to learning_rate to match it exactly). Every
other parameter is an ordinary `nnx.Param`.

Bidirectional (causal=False): two choices, both documented here.
- Convolution: centred, 2 conv_size - 1 taps (a token sees conv_size - 1 tokens on each
  side and itself), so both directions see a symmetric window; as Hydra (Hwang et al.,
  2024), whose bidirectional Mamba2 uses a centred convolution of 7 taps (= 2 * 4 - 1).
  Causal: conv_size taps, a token sees itself and the conv_size - 1 before it.
- SSD: fwd + rev - diag, as the gated core (gated.py): y_t = C_t (sum_{s <= t}
  decay(s, t] B_s^T dt_s x_s) + C_t (sum_{s > t} decay(t, s] B_s^T dt_s x_s), the decay
  over (min, max] the product of exp(dt A) of those tokens; the D skip is added once.
- Learned initial state: it starts the forward pass only (the state before the first
  token, decayed to t: + C_t decay[0, t] h_{-1}); the reverse pass starts from zero.
  Mamba2 is causal and has no reverse pass to follow.

Masking ("skip"): padding is removed from the sequence. The input is zeroed at masked
positions (`ssm.masked`); the convolution runs over the real tokens only (each row's
real tokens are gathered to the front, convolved, and scattered back), so a real token's
window holds the real tokens next to it, never a masked one; after the convolution x, B
and C are zeroed at masked positions and the log-gate set to 0 (the state passes
unchanged, as gated.py's `_gated`). A real output therefore equals that of the sequence
of real tokens alone (holes, left or right padding alike; with a learned initial state,
that sequence starts from it: a masked first token leaves it as it is), and `step` with
mask False leaves the whole state (convolution window and SSD state) unchanged. Outputs
at masked positions are finite and meaningless.

Numerics: the projections take the compute dtype (`dtype`, float32 parameters cast)
and accumulate in float32 (`preferred_element_type`); the convolution, dt, the decays
and the D skip and norm run in float32. The SSD's matmuls (C B^T, the chunk's output,
the state's read and write) take C, B and dt x in the compute dtype, and the state
(float32) cast to it for the read, with float32 accumulation, as gated.py; decays and
the state stay float32 (the recurrent form and `step` read the state in float32, as
gated.py's). Under bfloat16 every matmul of the block has bfloat16 operands and
float32 results (tested); the result has x's dtype. No outer norm and no residual (the
encoder block adds them); no MLP sub-block
(`block_mlp = False`); dropout on the block's output.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lra import common
from lra.models.attention import ssd
from lra.models.attention.linear import Form
from lra.models.attention.sequence_parallel import map_over_sequence, splits_sequence
from lra.models.attention.state_passing import gather_summaries, incoming_state
from lra.models.mixers import ssm

_F32 = jnp.float32
NORM_EPS = 1e-5  # Mamba2's RMSNormGated eps
DT_NO_LIMIT = (0.0, math.inf)  # Mamba2's default dt_limit: no clamp


def _dt_limit(value) -> tuple[float, float]:
    """dt_limit as (lo, hi) floats, or a ValueError naming it unless 0 <= lo <= hi."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"dt_limit must be a pair (lo, hi); got {value!r}")
    lo, hi = (common.real_number("dt_limit", v) for v in value)
    if not 0.0 <= lo <= hi:
        raise ValueError(f"dt_limit must have 0 <= lo <= hi; got {value!r}")
    return lo, hi


class State(NamedTuple):
    """Decoding state, float32: the last conv_size - 1 inputs of the convolution
    [B, conv_size - 1, d_inner + 2 G N] and the SSD state [B, H, N, P]."""

    conv_BxKxC: jax.Array
    ssd_BxHxNxP: jax.Array


def _rms_norm(y, scale):
    return y * jax.lax.rsqrt(jnp.mean(jnp.square(y), -1, keepdims=True) + NORM_EPS) * scale


class Mamba2Block(nnx.Module):
    """The Mamba2 block (module docstring): x [B, L, E], mask [B, L] -> [B, L, E]."""

    block_mlp = False  # the Mamba2 block has no MLP sub-block (config default)

    def __init__(
        self,
        *,
        emb_dim: int,
        max_len: int,
        causal: bool,
        dropout: float,
        dtype: Any,
        rngs: nnx.Rngs,
        expand: int = 2,
        head_dim: int = 64,
        d_state: int = 64,
        conv_size: int = 4,
        form: str = "chunked",
        chunk_size: int = 64,
        ngroups: int = 1,
        learnable_init_states: bool = False,
        dt_limit: tuple[float, float] = (0.0, math.inf),
    ):
        """Builds the block.

        Args:
          emb_dim: E, the input and output width (Mamba2's d_model).
          max_len: unused (no length limit); part of the contract.
          causal: if True, output t sees tokens <= t only (and `step` decodes).
          dropout: rate of the dropout on the block's output.
          dtype: compute dtype of the projections; the rest runs in float32.
          rngs: streams ``params`` and ``dropout``.
          expand: d_inner = expand * E (Mamba2's default 2).
          head_dim: P, channels per head (Mamba2's headdim, default 64); clipped to
            d_inner when larger, and must divide d_inner.
          d_state: N, the state size per head (Mamba2Simple's default 64; Mamba2's 128).
          conv_size: the causal convolution's kernel (Mamba2's d_conv, default 4); the
            bidirectional one has 2 conv_size - 1 centred taps.
          form: how the SSD is computed: "chunked", "parallel" or "recurrent".
          chunk_size: the chunked form's chunk (Mamba2's 256; 64 here as the gated cores).
          ngroups: G, the groups of heads that share B and C (Mamba2's ngroups, default 1:
            one B and one C for all heads); must divide the number of heads.
          learnable_init_states: if True, the SSD state starts from a learned per-head
            [N, P] parameter (zeros at init), in the forward direction (Mamba2Simple's
            learnable_init_states, default False: a zero state).
          dt_limit: (lo, hi): dt is clamped to [lo, hi] after the softplus (Mamba2's
            dt_limit; the default (0, inf) clamps nothing and is skipped).

        Raises:
          ValueError: naming the option, for a bad option value.
        """
        del max_len
        for name, value in (("expand", expand), ("head_dim", head_dim), ("d_state", d_state),
                            ("conv_size", conv_size), ("chunk_size", chunk_size)):
            common.positive_int(name, value)
        self.form = Form(form)
        ngroups = common.positive_int("ngroups", ngroups)
        self.learnable_init_states = common.boolean("learnable_init_states",
                                                    learnable_init_states)
        self.dt_limit = _dt_limit(dt_limit)
        d_inner = expand * emb_dim
        head_dim = min(head_dim, d_inner)
        if d_inner % head_dim:
            raise ValueError(f"head_dim ({head_dim}) must divide d_inner = expand * emb_dim "
                             f"= {d_inner}")
        self.emb_dim, self.causal, self.dtype = emb_dim, bool(causal), dtype
        self.d_inner, self.head_dim, self.d_state = d_inner, head_dim, d_state
        self.num_heads = d_inner // head_dim
        if self.num_heads % ngroups:
            raise ValueError(f"ngroups ({ngroups}) must divide the number of heads "
                             f"d_inner / head_dim = {self.num_heads}")
        self.ngroups = ngroups
        self.conv_size, self.chunk_size = conv_size, chunk_size
        self.conv_dim = d_inner + 2 * ngroups * d_state
        taps = conv_size if self.causal else 2 * conv_size - 1

        self.in_proj = nnx.Linear(emb_dim, d_inner + self.conv_dim + self.num_heads,
                                  use_bias=False, dtype=dtype, preferred_element_type=_F32,
                                  rngs=rngs)
        bound = 1.0 / math.sqrt(taps)
        uniform = lambda shape: jax.random.uniform(rngs.params(), shape, _F32, -bound, bound)
        self.conv_weight_KxC = nnx.Param(uniform((taps, self.conv_dim)))
        self.conv_bias_C = nnx.Param(uniform((self.conv_dim,)))
        a_log_H, dt_bias_H = ssd.mamba2_init(rngs.params(), self.num_heads)
        self.A_log_H = ssm.SsmParam(a_log_H)
        self.dt_bias_H = ssm.SsmParam(dt_bias_H)
        self.D_H = ssm.SsmParam(jnp.ones((self.num_heads,), _F32))
        self.init_states_HxNxP = (
            ssm.SsmParam(jnp.zeros((self.num_heads, d_state, head_dim), _F32))
            if self.learnable_init_states else None)
        self.norm_scale_I = nnx.Param(jnp.ones((d_inner,), _F32))
        self.out_proj = nnx.Linear(d_inner, emb_dim, use_bias=False, dtype=dtype,
                                   preferred_element_type=_F32, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    @property
    def decodes(self) -> bool:
        """True if the block decodes token by token (`init_state` / `step`): causal."""
        return self.causal

    # --- pieces shared by __call__ and step ------------------------------------------

    def _split_proj(self, zxbcdt):
        i, c = self.d_inner, self.conv_dim
        return zxbcdt[..., :i], zxbcdt[..., i:i + c], zxbcdt[..., i + c:]

    def _ssd_inputs(self, xBC, dt_raw, keep):
        """x [.., H, P], C and B [.., G, N] in the compute dtype, dt x [.., H, P] in the
        compute dtype, log-gate dt A [.., H] float32; zero (neutral gate) where `keep`
        [..] is False."""
        keep = keep[..., None]
        xBC = jnp.where(keep, xBC, 0.0)
        i, gn = self.d_inner, self.ngroups * self.d_state
        x = xBC[..., :i].reshape(*xBC.shape[:-1], self.num_heads, self.head_dim)
        groups = lambda m: m.reshape(*m.shape[:-1], self.ngroups, self.d_state)
        B, C = groups(xBC[..., i:i + gn]), groups(xBC[..., i + gn:])
        dt = jax.nn.softplus(dt_raw + self.dt_bias_H[...])
        if self.dt_limit != DT_NO_LIMIT:
            dt = jnp.clip(dt, *self.dt_limit)
        g = jnp.where(keep, -dt * jnp.exp(self.A_log_H[...]), 0.0)
        low = lambda m: m.astype(self.dtype)  # the SSD's matmul inputs
        return x, low(C), low(B), low(x * dt[..., None]), g

    def _initial_state(self):
        """The SSD's starting state, [H, N, P] float32, or None (zero)."""
        return None if self.init_states_HxNxP is None else self.init_states_HxNxP[...]

    def _finish(self, y_xHxP, x_xHxP, z, deterministic):
        y = y_xHxP + self.D_H[...][:, None] * x_xHxP
        y = y.reshape(*y.shape[:-2], self.d_inner) * jax.nn.silu(z)
        y = _rms_norm(y, self.norm_scale_I[...])
        return self.dropout(self.out_proj(y.astype(self.dtype)), deterministic=deterministic)

    def _conv(self, xBC_BxLxC, keep_BxL):
        """The depthwise convolution over each row's real tokens (module docstring)."""
        u, order_BxL = ssm.real_tokens_first(xBC_BxLxC, keep_BxL)
        before = self.conv_size - 1
        after = self.conv_weight_KxC.shape[0] - 1 - before
        return self._window_sum(jnp.pad(u, [(0, 0), (before, after), (0, 0)]), order_BxL)

    def _window_sum(self, ext_BxWxC, order_BxL):
        """The convolution at each of the L places of `ext_BxWxC` (a row's real tokens
        first, `before` tokens of context ahead of them and `after` behind), back in the
        row's token order (`order_BxL` from `ssm.real_tokens_first`)."""
        w_KxC, length = self.conv_weight_KxC[...], order_BxL.shape[1]
        out = sum(w_KxC[j] * ext_BxWxC[:, j:j + length] for j in range(w_KxC.shape[0]))
        return ssm.take_rows(out + self.conv_bias_C[...], jnp.argsort(order_BxL, axis=1))

    def _conv_shard(self, xBC_BxSxC, keep_BxS):
        """`_conv` on one device's shard [b, S, C] of a sequence split over `seq`.

        A real token's window holds the conv_size - 1 real tokens before it (and, centred,
        as many after it), which may lie on earlier (later) devices, however many
        padded positions lie between: each device's last conv_size - 1 real tokens (and
        first) are all-gathered, and the window entering its shard is folded from the
        devices before it (the one after it, from those after it), as state passing
        (lra/models/attention/state_passing.py); then the shard's real tokens are
        gathered to the front, between the two windows, and convolved as `_conv`."""
        before = self.conv_size - 1
        after = self.conv_weight_KxC.shape[0] - 1 - before
        u, order_BxS = ssm.real_tokens_first(xBC_BxSxC, keep_BxS)
        count_B = jnp.sum(keep_BxS, axis=1)
        # this shard's last `before` real tokens, right-aligned (zeros before them)
        last_idx = count_B[:, None] - before + jnp.arange(before)
        last = jnp.where((last_idx >= 0)[..., None],
                         ssm.take_rows(u, jnp.maximum(last_idx, 0)), 0.0)
        first = u[:, :after]  # its first `after` real tokens (zeros past the count)
        gathered = gather_summaries((last, first, count_B))

        def fold_before(window_BxKxC, summary):  # the last `before` real tokens so far
            last_j, _, count_j = summary
            shift = jnp.arange(before)[None] + count_j[:, None]
            older = ssm.take_rows(window_BxKxC, jnp.minimum(shift, before - 1))
            return jnp.where((shift < before)[..., None], older, last_j)

        def fold_after(window_BxKxC, summary):  # the first `after` real tokens after
            _, first_j, count_j = summary
            shift = jnp.arange(after)[None] - count_j[:, None]
            later = ssm.take_rows(window_BxKxC, jnp.maximum(shift, 0))
            return jnp.where((shift < 0)[..., None], first_j, later)

        ext = jnp.concatenate([incoming_state(gathered, fold_before, jnp.zeros_like(last)), u,
                               jnp.zeros_like(first)], axis=1)
        if after:  # the next real tokens, right after this shard's own real tokens
            window = incoming_state(gathered, fold_after, jnp.zeros_like(first), reverse=True)
            place = lambda e, w, c: jax.lax.dynamic_update_slice(e, w, (before + c, 0))
            ext = jax.vmap(place)(ext, window, count_B)
        return self._window_sum(ext, order_BxS)

    # --- the contract -------------------------------------------------------------------

    def __call__(self, x_BxLxE: jax.Array, mask_BxL: jax.Array | None = None, *,
                 deterministic: bool = True) -> jax.Array:
        """x [B, L, E], mask [B, L] bool (True = real) -> [B, L, E] in x's dtype."""
        keep_BxL = (jnp.ones(x_BxLxE.shape[:2], bool) if mask_BxL is None
                    else mask_BxL.astype(bool))
        zxbcdt = self.in_proj(ssm.masked(x_BxLxE, keep_BxL)).astype(_F32)
        z, xBC, dt_raw = self._split_proj(zxbcdt)
        split = splits_sequence()  # the sequence split over the `seq` mesh axis
        conv = map_over_sequence(self._conv_shard, xBC, keep_BxL) if split else self._conv(
            xBC, keep_BxL)
        x, C, B, v, g = self._ssd_inputs(jax.nn.silu(conv), dt_raw, keep_BxL)
        if split:
            y = ssd.grouped_ssd_over_sequence(C, B, v, g, self._initial_state(),
                                              causal=self.causal, chunk_size=self.chunk_size)
        else:
            y = ssd.grouped_ssd(C, B, v, g, self._initial_state(), form=self.form,
                                causal=self.causal, chunk_size=self.chunk_size)
        return self._finish(y, x, z, deterministic).astype(x_BxLxE.dtype)

    def init_state(self, batch_size: int) -> State:
        """The decoding state before the first token: a zero convolution window and the
        SSD's starting state (zero, or the learned one)."""
        shape = (batch_size, self.num_heads, self.d_state, self.head_dim)
        initial = self._initial_state()
        S = jnp.zeros(shape, _F32) if initial is None else jnp.broadcast_to(initial, shape)
        return State(jnp.zeros((batch_size, self.conv_size - 1, self.conv_dim), _F32), S)

    def step(self, state: State, x_BxE: jax.Array, mask_B: jax.Array | None,
             position: int) -> tuple[State, jax.Array]:
        """Decodes one token; applied to tokens 0, 1, ... it gives the causal `__call__`
        outputs (at real tokens).

        Args:
          state: from `init_state` or the previous step.
          x_BxE: the token's input.
          mask_B: bool, False where the token is padding (the state passes unchanged;
            the output there is finite and meaningless).
          position: unused (the block is time-invariant).

        Returns:
          (new state, output [B, E] in x's dtype).

        Raises:
          ValueError: if the block is not causal.
        """
        del position
        if not self.causal:
            raise ValueError("step decodes a causal Mamba2 block; build it with causal=True")
        keep_B, u = ssm.step_input(x_BxE, mask_B)
        z, xBC, dt_raw = self._split_proj(self.in_proj(u).astype(_F32))
        window_BxKxC = jnp.concatenate([state.conv_BxKxC, xBC[:, None]], axis=1)
        xBC = jax.nn.silu(jnp.sum(window_BxKxC * self.conv_weight_KxC[...], axis=1)
                          + self.conv_bias_C[...])
        x, C, B, v, g = self._ssd_inputs(xBC, dt_raw, keep_B)
        S, y = ssd.grouped_ssd_step(state.ssd_BxHxNxP, C, B, v, g)
        keep = keep_B[:, None, None]
        new_state = State(jnp.where(keep, window_BxKxC[:, 1:], state.conv_BxKxC),
                          jnp.where(keep[..., None], S, state.ssd_BxHxNxP))
        return new_state, self._finish(y, x, z, True).astype(x_BxE.dtype)
