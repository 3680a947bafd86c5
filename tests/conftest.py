"""Shared pytest setup: the repository root on sys.path, float32 matmuls at full precision, one
persistent compilation cache for the whole session, XLA's backend at optimisation level 0 with its
older fusion emitters, and the README runs kept on one worker.

The suite's programs are tiny and compiled once each: LLVM's optimisation of the generated CPU
code took more time than running it (a sequence-parallel check: 52 s at the default level, 30 s at
0), and XLA's older fusion emitters compile faster still (the 76B-style sequence-parallel check:
19 s of compilation with the new MLIR emitters, 15-17 s without). Both change how the generated
code is built, not what it computes (HLO passes still run; every reference comparison of the
suite passes under them); every process the tests start gets them through XLA_FLAGS
(tests/cli.py: `xla_flags`). Benchmarks and README runs outside the suite use XLA's defaults.

The cache lives in a fresh temporary directory made here (removed at exit), so it is empty when a
session starts and no result depends on an earlier run; the environment variables hand it to
every subprocess the tests start (training runs, fake-device scripts), so the many runs of the
same tiny configuration compile their steps once. A cache hit loads the executable XLA built for
the same program, flags and devices: it changes no number a test checks.
"""

import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# One cache for the session: the pytest-xdist workers (pytest.ini runs two) inherit it from the
# controlling process, which made it and removes it at exit.
_CACHE = os.environ.get("LCTX_TEST_JAX_CACHE")
if not _CACHE:
  _CACHE = tempfile.mkdtemp(prefix="lctx-test-jax-cache-")
  os.environ["LCTX_TEST_JAX_CACHE"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Set in this process's jax config and, as JAX_* variables, for every subprocess.
_CACHE_SETTINGS = {"jax_compilation_cache_dir": _CACHE,
                   "jax_persistent_cache_min_compile_time_secs": 0.2,
                   "jax_persistent_cache_min_entry_size_bytes": 0}
for _name, _value in _CACHE_SETTINGS.items():
  os.environ[_name.upper()] = str(_value)
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["LCTX_TEST_XLA_FLAGS"] = TEST_XLA_FLAGS
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

for _name, _value in _CACHE_SETTINGS.items():
  jax.config.update(_name, _value)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def readme_runs(tmp_path_factory):
  """The README's commands, run once at tiny size (tests/readme.py)."""
  from tests.readme import run_readme_commands
  worker = os.environ.get("PYTEST_XDIST_WORKER")
  if worker:  # every xdist worker's basetemp lies in one directory of this session
    marker = tmp_path_factory.getbasetemp().parent / "readme_runs.started"
    try:
      os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
      raise RuntimeError(f"the README runs already ran on another worker ({worker} is the "
                         "second): the tests that read them were not kept on one worker "
                         "(pytest-xdist --dist loadgroup and the xdist_group marks of "
                         "pytest_collection_modifyitems)") from None
  return run_readme_commands(str(tmp_path_factory.mktemp("readme")))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  # pytest.ini distributes tests over two xdist workers by group (--dist loadgroup): every test
  # that reads the README runs goes to the same worker, so the session fixture runs them once.
  # tryfirst: xdist's worker names the groups in its own hook, which must see these marks.
  for item in items:
    if "readme_runs" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group("readme"))


@pytest.fixture
def tpu_chip(monkeypatch):
  """Mosaic asks for the chip's properties; pretend this CPU is a TPU v5p."""
  from jax._src.pallas.mosaic import tpu_info
  monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, lambda: (
      tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5P, 1)))
