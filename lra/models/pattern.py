"""Per-layer mixer patterns: hybrid stacks such as three Gated DeltaNet layers per softmax one.

`model.mixer_pattern` names the mixers of consecutive layers, separated by "+" (or ","),
e.g. "gated_deltanet+gated_deltanet+gated_deltanet+softmax"; the pattern repeats to fill
`model.num_layers`, which it must divide. "" (the default) means every layer is
`config.attention`, today's model. The pattern's first name is `config.attention` (the
configs set it so: `configs/<task>.py:pattern=...`), so a pattern of one name is exactly
the single-mixer model.

Options and blocks per name: the first name (`config.attention`) keeps
`model.attention_options` and `model.block_mlp`, as without a pattern; every other name N
has its own `model.pattern_options.N` (its family's defaults, settable from the command
line as `--config.model.pattern_options.N.<option>=...`) and `model.pattern_block_mlp.N`
(its paper's block). A name's layers all share its settings.

Shapes: a pattern of P names and num_layers = R * P layers is R repeats of the same P
blocks; with `model.scan_layers` the R repeats are scanned (lra/models/stack.py: one group
of P blocks with a leading axis of size R), without it the blocks are a list in layer
order. Either way layer i runs mixer pattern[i % P].
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from lra.models import mixers

SEPARATOR = "+"  # the sweep's value lists are comma-separated, so "+" is the canonical one


class LayerMixer(NamedTuple):
    """The mixer of one layer: its name, its options and whether its block has an MLP."""

    name: str
    options: Mapping[str, Any]
    block_mlp: bool


def parse(text: str) -> tuple[str, ...]:
    """"a+b+b" (or "a,b,b") -> ("a", "b", "b"); "" -> ().

    Raises:
      ValueError: for an unknown mixer name or an empty entry, naming `model.mixer_pattern`.
    """
    text = (text or "").strip()
    if not text:
        return ()
    names = tuple(name.strip() for name in re.split(r"[+,]", text))
    for name in names:
        if name not in mixers.NAMES:
            raise ValueError(
                f"model.mixer_pattern={text!r}: unknown mixer {name!r} (names are separated "
                f"by '+'); known mixers: {', '.join(mixers.NAMES)}")
    return names


def canonical(text: str) -> str:
    """The pattern written with "+" between names ("" stays "")."""
    return SEPARATOR.join(parse(text))


def layer_mixers(model_config: Any, attention: str) -> tuple[LayerMixer, ...]:
    """The P mixers of one repeat of the pattern of `model_config` (module docstring).

    A config without `mixer_pattern` (or with "") gives the one mixer `attention`.
    `pattern_options` / `pattern_block_mlp` entries that a config built in Python lacks
    default to the mixer's own defaults.

    Raises:
      ValueError: for an unknown name, or a pattern whose first name is not `attention`.
    """
    names = parse(model_config.get("mixer_pattern", "")) or (attention,)
    if names[0] != attention:
        raise ValueError(
            f"model.mixer_pattern={canonical(model_config.mixer_pattern)!r} starts with "
            f"{names[0]!r} but config.attention is {attention!r}: the pattern's first name is "
            "the config's mixer (build the config with configs/<task>.py:pattern=...)")
    options = model_config.get("pattern_options") or {}
    block_mlp = model_config.get("pattern_block_mlp") or {}

    def spec(name: str) -> LayerMixer:
        if name == attention:
            return LayerMixer(name, dict(model_config.attention_options),
                              bool(model_config.get("block_mlp", True)))
        return LayerMixer(name, dict(options.get(name, mixers.default_options(name))),
                          bool(block_mlp.get(name, mixers.default_block_mlp(name))))

    return tuple(spec(name) for name in names)


def layer_names(pattern: Sequence[str], num_layers: int) -> tuple[str, ...]:
    """The mixer of every layer: `pattern` repeated to `num_layers`.

    Raises:
      ValueError: if the pattern's length does not divide `num_layers`.
    """
    if num_layers % len(pattern):
        raise ValueError(
            f"model.mixer_pattern of {len(pattern)} layers ({SEPARATOR.join(pattern)}) does "
            f"not divide model.num_layers={num_layers}: the pattern repeats whole")
    return tuple(pattern) * (num_layers // len(pattern))


def label(pattern: Sequence[str], num_layers: int) -> str:
    """A readable name: "gated_deltanet x3 + softmax", "(gla + softmax) x2", "softmax"."""
    runs: list[list] = []
    for name in pattern:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    text = " + ".join(name if count == 1 else f"{name} x{count}" for name, count in runs)
    repeats = num_layers // len(pattern)
    if len(runs) == 1 and repeats > 1:
        return text  # one name: the layer count is the model's depth, not a pattern
    return text if repeats == 1 else f"({text}) x{repeats}"


def recorded_label(model_config: Mapping[str, Any], attention: str) -> str:
    """The mixer a run's recorded `model` config describes: its pattern's `label`, or
    `attention` for a run without a pattern (as reports name runs)."""
    names = parse(model_config.get("mixer_pattern", ""))
    if not names:
        return attention
    return label(names, int(model_config.get("num_layers", len(names))))
