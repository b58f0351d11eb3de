"""Experiments: what a researcher runs. `launch` (one config -> one run folder; the
`lra-train` / `python -m lra.launch` command), `sweep` (a grid of runs, locally or as a
SLURM array), `report` (tables and plots over run folders; `python -m lra.report`).

May import: lra.training, lra.presets, lra.models, lra.tasks, lra.parallel, lra.common.
"""
