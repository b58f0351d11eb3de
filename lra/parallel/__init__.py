"""Parallelism: the device mesh and the shardings of state and batches (`sharding`), and
multi-host start-up and the few host collectives the run needs (`distributed`).

May import: lra.tasks (file manifests, for checking prepared data across hosts) and
lra.common. Never lra.training or above; lra.models reads only the FSDP gathering context
(`lra.common`), not this package.
"""
