"""Test setup: 4 fake CPU devices, set before JAX starts, so sharding code runs as on a node."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Runs in tests keep their compilation cache (config.compilation_cache_dir's default, under
# XDG_CACHE_HOME) in a folder of this session, not in the user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lra-test-cache-")

import jax  # noqa: E402  (must come after the flags above)

assert jax.device_count() == 4, "conftest must run before anything imports jax"
# Tests that compare to 1e-5 need float32 matmuls on every platform (GPU/TPU default to
# TF32/bfloat16 passes); on CPU this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")
