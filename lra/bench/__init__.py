"""Benchmarks, `python -m lra.bench`: speed, memory and FLOPs of every mixer vs length.

`layers` (the command: layer and step scopes, records, the main entry), `flops` (FLOPs
counted from the jaxpr, XLA's cost and memory analyses), `depth` (sequential depth:
loop iterations on the program's critical path, forward and backward, read from the
jaxpr), `loop` (the loop scope: a
config's training loop, steps/s and the host's share), `output` (JSON, Markdown, plots).

May import: lra.training, lra.models, lra.tasks, lra.parallel, lra.common.
"""
