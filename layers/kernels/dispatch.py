"""Which implementation runs: "reference", "xla", "pallas" or "auto", logged whenever it is chosen.

`auto` picks the fastest implementation that is correct on the current backend: the Pallas kernels
on GPU and TPU, the chunked pure-JAX path on CPU (Pallas only runs interpreted there, which is
orders of magnitude slower). Every choice is logged with the family name, so a run's log and a
test's `caplog` both say which implementation ran.

`CANNOT_LOWER` lists the (family, backend) pairs whose Pallas kernel does not lower with the
pinned JAX: there `auto` runs xla and logs why, and impl="pallas" is an error naming it. It is
empty today: tests/test_softmax_attention.py, tests/test_linear_chunked.py and
tests/test_delta_rule.py export every kernel variant for cuda and tpu, so an entry is needed
exactly when one of those exports fails.
"""

import logging

import jax

IMPLS = ("reference", "xla", "pallas", "auto")

log = logging.getLogger("lctx.kernels")

CANNOT_LOWER: dict[tuple[str, str], str] = {}


def resolve_impl(family: str, impl: str, backend: str | None = None,
                 no_kernel: str | None = None) -> str:
  """Returns the concrete implementation for `impl` and logs the choice.

  Args:
    family: the operation's name, used in the log line and in errors (e.g. "linear_attention").
    impl: one of IMPLS.
    backend: jax backend name; default `jax.default_backend()`.
    no_kernel: why the family's Pallas kernel cannot take this call (a variant it does not
      implement), or None: like a CANNOT_LOWER entry, `auto` then runs xla and says why and
      impl="pallas" is an error.
  """
  if impl not in IMPLS:
    raise ValueError(f"{family}: impl={impl!r} is not one of {IMPLS}")
  backend = backend or jax.default_backend()
  chosen = impl
  why = no_kernel or CANNOT_LOWER.get((family, backend))
  if impl == "pallas" and why:
    raise ValueError(f"{family}: impl='pallas' cannot run on {backend}: {why}; use impl='xla' "
                     "or 'auto'")
  if impl == "auto":
    chosen = "xla" if backend == "cpu" or why else "pallas"
    if why and backend != "cpu":  # on CPU auto runs xla anyway
      log.warning("%s: impl=auto -> xla on %s because %s", family, backend, why)
  mode = " (interpret mode)" if chosen == "pallas" and backend == "cpu" else ""
  log.info("%s: impl=%s -> %s on %s%s", family, impl, chosen, backend, mode)
  return chosen


def pallas_interpret(backend: str | None = None) -> bool:
  """True where Pallas kernels must run in interpret mode (no Mosaic/GPU lowering: CPU)."""
  return (backend or jax.default_backend()) == "cpu"
