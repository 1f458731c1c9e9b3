"""Test setup: 8 fake CPU devices (before JAX starts) and a shared persistent compile cache."""

import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The Pallas kernel tests run interpreted (any backend); JAXLLM_PALLAS_INTERPRET=0 compiles them for the
# accelerator instead (scripts/device_check.sh on a GPU).
PALLAS_INTERPRET = os.environ.get("JAXLLM_PALLAS_INTERPRET", "1") != "0"
if PALLAS_INTERPRET:  # the aot extra's libtpu and CUDA plugin would otherwise probe for devices at start-up
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE = Path(tempfile.gettempdir()) / "jaxllm-test-xla-cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def devices():
    found = jax.devices()
    assert len(found) == 8, f"tests expect 8 fake CPU devices, got {len(found)}"
    return found


def subprocess_env(devices: int = 8) -> dict[str, str]:
    """Environment for a child `python -m jaxllm...` process: the repo importable, N fake devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAXLLM_FAULT", None)
    return env


PYTHON = sys.executable

# What the CUDA compiler plugin (the aot-gpu extra, in the test install) writes to stderr whenever JAX
# starts on a machine without a GPU. It comes from the plugin's own libraries, before any of jaxllm runs.
CUDA_PLUGIN_NOISE = ("WARNING: All log messages before absl::InitializeLog() is called", "cudart_stub.cc")


def own_stderr(text: str) -> str:
    """A child process's stderr without the CUDA plugin's start-up lines: what jaxllm itself printed."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not any(noise in line for noise in CUDA_PLUGIN_NOISE))
