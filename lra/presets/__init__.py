"""Released settings and published results, transcribed with their sources, one module
each: `long_range_arena` (LRA's released configs and Table 1, the published rows of the
sequence models), `s5` (S5's run scripts), `spt` (Amos et al.'s self-pretraining).

Configs (`configs/`) apply them under `preset=...`; the report puts the published rows
under runs of the same settings. May import: lra.common only (plain data).
"""
