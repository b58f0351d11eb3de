r"""Train and evaluate one config from a checkout: `python launch.py --config ... --workdir DIR`.

  python launch.py --config configs/listops.py:runlocal --workdir runs/listops-local

A thin wrapper of `lra.experiments.launch` (flags, sweeps, multi-host: see its docstring); installed,
the same command is `python -m lra.launch ...` or `lra-train ...`. A sweep's runs execute
this script, as the sweep was started.
"""

import sys
from pathlib import Path

from lra.experiments.launch import run

if __name__ == "__main__":
    sys.exit(run(launch_script=Path(__file__)))
