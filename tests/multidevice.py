"""Running test code on 8 fake CPU devices.

The device count must be set before jax initializes, so the code runs in a fresh subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N and float32 matmuls at full precision.
"""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = "import jax\njax.config.update('jax_default_matmul_precision', 'highest')\n"


def run_with_devices(code: str, n: int = 8, timeout: int = 600) -> str:
  """Runs `code` (dedented) with n fake CPU devices; returns its stdout, failing on a nonzero exit."""
  from tests import cli
  env = cli.env(devices=n)
  proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout
