"""Shared pytest setup, done before jax is imported anywhere: 8 fake CPU devices, and one
persistent compilation cache for the whole session.

The cache: the suite compiles the same programs many times over -- the same tiny configs'
train steps in several files, and the trainer / inference CLIs in subprocesses (reference,
killed and resumed runs; 2-process launches). A cache directory made once per session (by the
xdist controller, inherited by its workers and by every subprocess through the environment)
pays for each program once. It caches every compile (no minimum time or size) and is removed at
the end. A JAX_COMPILATION_CACHE_DIR already set is used as it is and kept.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="t5x_lite_test_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
