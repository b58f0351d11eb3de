"""`python -m lra.bench`: see `lra.bench.layers`."""

from lra.bench.layers import main

main()
