"""Configs for tests: a shipped config with dotted-key overrides, as the command line sets."""

from configs import listops as listops_config
from lra.common import set_path


def listops_runlocal(overrides: dict):
    """`configs/listops.py:runlocal` with `{"model.num_layers": 1, ...}` applied in order."""
    config = listops_config.get_config("runlocal")
    for key, value in overrides.items():
        set_path(config, key, value)
    return config
