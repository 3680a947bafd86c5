"""Shared pytest setup: the repository root on sys.path, float32 matmuls at full precision."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def readme_runs(tmp_path_factory):
  """The README's commands, run once at tiny size (tests/readme.py)."""
  from tests.readme import run_readme_commands
  return run_readme_commands(str(tmp_path_factory.mktemp("readme")))
