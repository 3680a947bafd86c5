"""One command for a GPU or TPU: every kernel against the reference there, then kernel timings.

  python -m experiments.device_check [--out runs/device_check] [--lengths 2048,8192,32768]

Part 1 runs each Pallas kernel variant (flash: causal, window, segments, sinks, GQA, non-causal,
head_dim 64 / 96 / 128; GLA: no gate, per-head and per-key-dim gates, segments with an initial
state, GQA; delta rule: DeltaNet, Gated DeltaNet, segments with an initial state, GQA) with
impl="pallas" on this backend and compares the output and every gradient with impl="reference"
in float32 at highest matmul precision (relative RMS, worst of all tensors), one PASS/FAIL row
per variant. Part 2 times forward and forward+backward in bf16 at each length: flash (pallas)
next to jax.nn.dot_product_attention (cuDNN on GPU where it runs, else XLA) and the xla flash,
and GLA and the gated delta rule (pallas) next to their chunked xla paths. Timing stops when the
time budget (default 7 minutes in all) is spent, and says which rows it skipped.

On CPU the kernels run in interpret mode, so only tiny sizes make sense there (`--tiny`, which
the test suite runs). Writes check.csv and timing.csv under --out; exits 1 if any variant fails.
"""

import argparse
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarking as bm
from layers.delta_rule import delta_rule
from layers.linear_attention import linear_attention
from layers.norms import l2_normalize
from layers.softmax_attention import softmax_attention

log = logging.getLogger("lctx.device_check")

TOL = 2e-3  # float32 at highest precision; kernels accumulate in a different order
CHECK_COLUMNS = ["kernel", "variant", "t", "d", "worst_tensor", "rel_rms", "result"]
TIMING_COLUMNS = ["op", "impl", "t", "fwd_ms", "fwd_bwd_ms", "note"]


def flash_variants(d_list=(64, 96, 128)):
  """name -> keyword arguments of softmax_attention (plus heads and head_dim)."""
  out = {f"causal_d{d}": dict(d=d) for d in d_list}
  out |= {
      "window": dict(window=17),
      "segments": dict(segments=True),
      "sinks": dict(sinks=True),
      "gqa": dict(kv_heads=2),
      "noncausal": dict(causal=False),
  }
  return out


GLA_VARIANTS = {
    "plain": dict(gate=None),
    "scalar_gate": dict(gate="scalar"),
    "vector_gate": dict(gate="vector"),
    "vector_gate_segments_h0": dict(gate="vector", segments=True, h0=True),
    "gqa_scalar_gate": dict(gate="scalar", kv_heads=2),
}

DELTA_VARIANTS = {
    "deltanet": dict(gate=False),
    "gated": dict(gate=True),
    "gated_segments_h0": dict(gate=True, segments=True, h0=True),
    "gqa_gated": dict(gate=True, kv_heads=2),
}


def _rel_rms(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.sqrt(np.mean((x - ref) ** 2)) / (np.sqrt(np.mean(ref ** 2)) + 1e-30))


def _segments(b, t):
  ids = np.zeros((b, t), np.int32)
  for start in (t // 5, t // 2, t // 2 + 3):
    ids[:, start:] += 1
  return jnp.asarray(ids)


def _compare(fn_of_impl, args, names):
  """Worst (name, rel_rms) over the output and the gradients of `args` (a VJP, random cts)."""
  results = {}
  for impl in ("pallas", "reference"):
    f = jax.jit(lambda *a, impl=impl: fn_of_impl(impl, *a))
    out, vjp = jax.vjp(f, *args)
    ct = jax.random.normal(jax.random.key(7), out.shape, out.dtype)
    results[impl] = (out,) + tuple(vjp(ct))
  errs = [(n, _rel_rms(x, r)) for n, x, r in zip(("out",) + names, results["pallas"],
                                                 results["reference"])]
  return max(errs, key=lambda e: e[1])


def check_flash(name, *, t, d=64, heads=4, kv_heads=4, window=None, segments=False, sinks=False,
                causal=True):
  ks = jax.random.split(jax.random.key(0), 4)
  b = 1
  q = jax.random.normal(ks[0], (b, t, heads, d))
  k = jax.random.normal(ks[1], (b, t, kv_heads, d))
  v = jax.random.normal(ks[2], (b, t, kv_heads, d))
  seg = _segments(b, t) if segments else None
  args, names = [q, k, v], ("dq", "dk", "dv")
  if sinks:
    args.append(jax.random.normal(ks[3], (heads,)))
    names += ("dsinks",)

  def fn(impl, q, k, v, *rest):
    return softmax_attention(q, k, v, causal=causal, window=window, segment_ids=seg,
                             sinks=rest[0] if rest else None, impl=impl)

  worst, err = _compare(fn, args, names)
  return dict(kernel="flash", variant=name, t=t, d=d, worst_tensor=worst, rel_rms=err)


def check_gla(name, *, t, d=64, heads=4, kv_heads=4, gate=None, segments=False, h0=False,
              chunk=64):
  ks = jax.random.split(jax.random.key(1), 5)
  b = 1
  q = jax.random.normal(ks[0], (b, t, heads, d))
  k = jax.random.normal(ks[1], (b, t, kv_heads, d)) / np.sqrt(d)
  v = jax.random.normal(ks[2], (b, t, kv_heads, d))
  seg = _segments(b, t) if segments else None
  args, names = [q, k, v], ("dq", "dk", "dv")
  if gate is not None:
    width = (heads,) if gate == "scalar" else (heads, d)
    args.append(jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t) + width) + 2.0))
    names += ("dg",)
  if h0:
    args.append(jax.random.normal(ks[4], (b, heads, d, d)))
    names += ("dh0",)

  def fn(impl, q, k, v, *rest):
    rest = list(rest)
    g = rest.pop(0) if gate is not None else None
    state = rest.pop(0) if h0 else None
    return linear_attention(q, k, v, g, initial_state=state, segment_ids=seg, impl=impl,
                            chunk_size=chunk)

  worst, err = _compare(fn, args, names)
  return dict(kernel="gla", variant=name, t=t, d=d, worst_tensor=worst, rel_rms=err)


def check_delta(name, *, t, d=64, heads=4, kv_heads=4, gate=True, segments=False, h0=False,
                chunk=64):
  ks = jax.random.split(jax.random.key(2), 6)
  b = 1
  q = l2_normalize(jax.random.normal(ks[0], (b, t, heads, d)))
  k = l2_normalize(jax.random.normal(ks[1], (b, t, kv_heads, d)))
  v = jax.random.normal(ks[2], (b, t, kv_heads, d))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, heads)))
  seg = _segments(b, t) if segments else None
  args, names = [q, k, v, beta], ("dq", "dk", "dv", "dbeta")
  if gate:
    args.append(jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, heads)) + 2.0))
    names += ("dg",)
  if h0:
    args.append(jax.random.normal(ks[5], (b, heads, d, d)))
    names += ("dh0",)

  def fn(impl, q, k, v, beta, *rest):
    rest = list(rest)
    g = rest.pop(0) if gate else None
    state = rest.pop(0) if h0 else None
    return delta_rule(q, k, v, beta, g, initial_state=state, segment_ids=seg, impl=impl,
                      chunk_size=chunk)

  worst, err = _compare(fn, args, names)
  return dict(kernel="delta_rule", variant=name, t=t, d=d, worst_tensor=worst, rel_rms=err)


def check_names(d_list=(64, 96, 128)) -> list[str]:
  return ([f"flash_{n}" for n in flash_variants(d_list)] + [f"gla_{n}" for n in GLA_VARIANTS]
          + [f"delta_rule_{n}" for n in DELTA_VARIANTS])


def run_checks(t, only=None, d_list=(64, 96, 128), d_default=64, chunk=64):
  rows = []
  with jax.default_matmul_precision("highest"):
    for name, kw in flash_variants(d_list).items():
      if only and f"flash_{name}" not in only:
        continue
      rows.append(check_flash(name, t=t, **({"d": d_default} | kw)))
    for name, kw in GLA_VARIANTS.items():
      if only and f"gla_{name}" not in only:
        continue
      rows.append(check_gla(name, t=t, d=d_default, chunk=chunk, **kw))
    for name, kw in DELTA_VARIANTS.items():
      if only and f"delta_rule_{name}" not in only:
        continue
      rows.append(check_delta(name, t=t, d=d_default, chunk=chunk, **kw))
  for r in rows:
    r["result"] = "PASS" if r["rel_rms"] < TOL else "FAIL"
  return rows


def _dpa(q, k, v, implementation):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def _fwd_and_fwd_bwd_ms(fn, args, repeats):
  """(forward ms, forward+backward ms) of fn(*args), the backward through every argument."""
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
  fwd_bwd = jax.grad(loss, argnums=tuple(range(len(args))))
  return (bm.time_ms(jax.jit(fn), *args, repeats=repeats),
          bm.time_ms(jax.jit(fwd_bwd), *args, repeats=repeats))


def run_timings(lengths, *, heads, head_dim, repeats, budget_s, backend, chunk=64):
  """Forward and forward+backward ms per op; rows past the budget are listed as skipped."""
  rows, skipped, start = [], [], time.monotonic()
  gate_key = jax.random.key(3)

  def ops(t):
    shape = (1, t, heads, head_dim)
    mk = lambda i: jax.random.normal(jax.random.key(i), shape, jnp.bfloat16)
    q, k, v = mk(0), mk(1), mk(2)
    g = jax.nn.log_sigmoid(jax.random.normal(gate_key, shape, jnp.float32) + 2.0)
    dpa_impl = "cudnn" if backend == "gpu" else "xla"
    yield ("flash", "pallas", lambda q, k, v: softmax_attention(q, k, v, impl="pallas"),
           (q, k, v))
    yield ("flash", "xla", lambda q, k, v: softmax_attention(q, k, v, impl="xla"), (q, k, v))
    yield ("jax.nn.dot_product_attention", dpa_impl, lambda q, k, v: _dpa(q, k, v, dpa_impl),
           (q, k, v))
    gla = lambda impl: (lambda q, k, v, g: linear_attention(q, k, v, g, impl=impl,
                                                            chunk_size=chunk))
    yield ("gla", "pallas", gla("pallas"), (q, k, v, g))
    yield ("gla", "xla", gla("xla"), (q, k, v, g))
    beta = jax.nn.sigmoid(mk(3)[..., 0].astype(jnp.float32))
    gdn = lambda impl: (lambda q, k, v, beta, g: delta_rule(
        l2_normalize(q), l2_normalize(k), v, beta, g[..., 0], impl=impl, chunk_size=chunk))
    yield ("gated_delta_rule", "pallas", gdn("pallas"), (q, k, v, beta, g))
    yield ("gated_delta_rule", "xla", gdn("xla"), (q, k, v, beta, g))

  for t in lengths:
    for op, impl, fn, args in ops(t):
      if time.monotonic() - start > budget_s:
        skipped.append(f"{op}/{impl}@{t}")
        continue
      row = dict(op=op, impl=impl, t=t, note="")
      try:
        row["fwd_ms"], row["fwd_bwd_ms"] = _fwd_and_fwd_bwd_ms(fn, args, repeats)
      except Exception as e:  # a reference implementation that does not run here (e.g. cuDNN)
        if op != "jax.nn.dot_product_attention":
          raise
        row["note"] = f"{impl} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        if impl == "cudnn":
          row["impl"] = "xla"
          row["fwd_ms"], row["fwd_bwd_ms"] = _fwd_and_fwd_bwd_ms(
              lambda q, k, v: _dpa(q, k, v, "xla"), args, repeats)
      rows.append(row)
  return rows, skipped


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/device_check")
  p.add_argument("--lengths", default="2048,8192,32768", help="timing lengths (comma-separated)")
  p.add_argument("--check_t", type=int, default=1000, help="sequence length of the checks")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--budget_s", type=float, default=420.0, help="time budget of the whole run")
  p.add_argument("--only", default="", help="comma-separated check names (e.g. flash_window)")
  p.add_argument("--no_timing", action="store_true", help="run the checks only")
  p.add_argument("--tiny", action="store_true",
                 help="CPU-sized: checks at t=40 (d=16, GLA chunks of 16), timings at t=64 "
                      "(interpret mode)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  backend = jax.default_backend()
  start = time.monotonic()
  only = {s for s in args.only.split(",") if s}
  if args.tiny:
    check_t, d_list, d_default, chunk, lengths = 40, (16,), 16, 16, [64]
    heads, head_dim = 2, 16
  else:
    check_t, d_list, d_default, chunk = args.check_t, (64, 96, 128), 64, 64
    lengths = [int(s) for s in args.lengths.split(",") if s]
    heads, head_dim = args.heads, args.head_dim
  if backend == "cpu" and not args.tiny:
    print("device_check: no GPU or TPU here; the kernels would run in interpret mode "
          "(use --tiny on CPU)")
  print(f"device_check on {backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}")

  checks = run_checks(check_t, only, d_list, d_default, chunk)
  if not checks:
    raise SystemExit(f"device_check: --only={args.only!r} names no check; names are "
                     + ", ".join(check_names(d_list)))
  bm.print_table(checks, CHECK_COLUMNS)
  bm.write_csv(os.path.join(args.out, "check.csv"), checks, CHECK_COLUMNS)

  timings, skipped = [], []
  if not args.no_timing:
    left = args.budget_s - (time.monotonic() - start)
    timings, skipped = run_timings(lengths, heads=heads, head_dim=head_dim,
                                   repeats=args.repeats, budget_s=left, backend=backend,
                                   chunk=chunk)
    print(f"\nbf16, b=1, h={heads}, d={head_dim}, causal; best of {args.repeats} after warm-up")
    bm.print_table(timings, TIMING_COLUMNS)
    bm.write_csv(os.path.join(args.out, "timing.csv"), timings, TIMING_COLUMNS)
  if skipped:
    print(f"time budget of {args.budget_s:.0f} s spent: skipped {', '.join(skipped)}")
  failed = [f"{r['kernel']}_{r['variant']}" for r in checks if r["result"] != "PASS"]
  print(f"device_check: {len(checks) - len(failed)}/{len(checks)} kernel variants match the "
        f"reference on {backend}" + (f"; FAILED: {', '.join(failed)}" if failed else "")
        + f" ({time.monotonic() - start:.0f} s; tables in {args.out})")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
