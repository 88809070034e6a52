"""Test set-up (set before jax loads): 8 fake CPU devices so sharding tests see a mesh,
and one compilation cache per test session.

Many tests compile the same programs again: each experiment binary runs in its own
subprocess, and each tiny run builds fresh jitted closures. A persistent compilation
cache in a new temporary folder (inherited by the subprocesses through the environment,
removed at exit) lets them reuse one compilation: ~25% off the suite's time on 2 cores.
pytest-xdist's workers (`make test`) inherit it from the controller, which loads this
file first, so they share it too. It is never shared between sessions, so a stale entry
cannot outlive the code it came from. Set JAX_COMPILATION_CACHE_DIR yourself to choose
the folder (then it is kept), or to an empty value to compile without a cache.
"""

import atexit
import os
import shutil
import tempfile

# The suite is mostly compilation, and no test reads a timing, so two XLA:CPU settings
# trade running speed for compile speed: LLVM's optimisations off (they cost more to
# compile than they save running tiny programs), and the older elemental emitters in
# place of XLA:CPU's fusion emitters (a tiny GAN's round, D step and G step compiled in
# 15 s instead of 59 s on 2 cores, WORKSPACE.md "Appendix: test-suite and CI timings").
# Only the machine code made from the same HLO differs (the suite passes either way).
# Tests that set XLA_FLAGS for a subprocess keep these flags
# (`tests.binary.cpu_devices_env`).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="dpfed-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
