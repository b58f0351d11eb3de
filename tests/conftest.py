"""Test setup: 4 fake CPU devices, set before JAX starts, so sharding code runs as on a node."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after the flags above)

assert jax.device_count() == 4, "conftest must run before anything imports jax"
