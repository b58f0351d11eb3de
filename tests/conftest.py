"""Test setup: 4 fake CPU devices, set before JAX starts, so sharding code runs as on a node.

Compiling, not running, is most of a test's time on a small CPU: XLA's optimisation
passes are off (`JAX_DISABLE_MOST_OPTIMIZATIONS`, inherited by the processes tests start),
except in tests marked `optimized` (long training loops, whose steps the passes speed up
by more than they cost), and one compilation cache serves all workers of a session.

`LRA_TEST_PLATFORM=cuda` (scripts/gpu_check.sh) runs the tests on the real accelerator
instead: JAX_PLATFORMS is set to it and there are no fake devices (tests that need 4
devices skip).
"""

import os
import tempfile

PLATFORM = os.environ.get("LRA_TEST_PLATFORM", "cpu")
if PLATFORM == "cpu":
    # One thread per XLA operation: the suite's workers already fill the cores (measured on
    # 2 cores, 2 workers: 7% less time on the learning, scan and rotary tests).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        " --xla_cpu_multi_thread_eigen=false"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Measured on the 2-core CPU (suite at 71e8dd9): 27 min 42 s with the passes, 22 min 22 s
    # without; the sequential scans of some learning tests ran up to twice as long.
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
else:
    os.environ["JAX_PLATFORMS"] = PLATFORM
# Every program compiled in this session (by the tests, by their runs, whose
# config.compilation_cache_dir's default lies under XDG_CACHE_HOME, and by the processes
# they start) goes to one cache folder of this session, shared by the xdist workers
# (PYTEST_XDIST_TESTRUNUID names the session), not to the user's cache.
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _SESSION:
    os.environ["XDG_CACHE_HOME"] = os.path.join(tempfile.gettempdir(), f"lra-test-cache-{_SESSION}")
    os.makedirs(os.environ["XDG_CACHE_HOME"], exist_ok=True)
else:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lra-test-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    os.environ["XDG_CACHE_HOME"], "lra", "jax-compilation-cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402  (must come after the flags above)
import pytest  # noqa: E402

if PLATFORM == "cpu":
    assert jax.device_count() == 4, "conftest must run before anything imports jax"
# Tests that compare to 1e-5 need float32 matmuls on every platform (GPU/TPU default to
# TF32/bfloat16 passes); on CPU this changes nothing.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _xla_optimizations_where_marked(request):
    """A test marked `optimized` compiles with XLA's optimisation passes on."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
