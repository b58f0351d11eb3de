"""Test setup: 4 fake CPU devices, set before JAX starts, so sharding code runs as on a node.

`LRA_TEST_PLATFORM=cuda` (scripts/gpu_check.sh) runs the tests on the real accelerator
instead: JAX_PLATFORMS is set to it and there are no fake devices (tests that need 4
devices skip).
"""

import os
import tempfile

PLATFORM = os.environ.get("LRA_TEST_PLATFORM", "cpu")
if PLATFORM == "cpu":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
    os.environ["JAX_PLATFORMS"] = PLATFORM
# Runs in tests keep their compilation cache (config.compilation_cache_dir's default, under
# XDG_CACHE_HOME) in a folder of this session, not in the user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lra-test-cache-")

import jax  # noqa: E402  (must come after the flags above)

if PLATFORM == "cpu":
    assert jax.device_count() == 4, "conftest must run before anything imports jax"
# Tests that compare to 1e-5 need float32 matmuls on every platform (GPU/TPU default to
# TF32/bfloat16 passes); on CPU this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")
