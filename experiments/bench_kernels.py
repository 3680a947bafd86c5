"""Kernel benchmark: softmax vs linear attention over sequence length, and decode-step latency.

  python -m experiments.bench_kernels [--lengths 1024,2048,...,32768] [--out runs/bench_kernels]

Prints a table and writes <out>/kernels.csv, <out>/decode.csv and <out>/kernels.png (with
matplotlib). Every method runs through its public op with impl="auto" except the two baselines:
  dense_reference   softmax_attention(impl="reference"): materialized [t, t] logits;
  jax_nn_causal     jax.nn.dot_product_attention(is_causal=True);
  flash             softmax_attention(impl="auto"): our flash attention (its impl in the table);
  linear / lightning / gla   linear_attention(impl="auto") with no gate, fixed per-head decays, and
                    a per-key-dimension gate;
  delta_rule        delta_rule(impl="auto") (Gated DeltaNet: L2-normalized keys, beta 0.5, a
                    per-head gate); its useful FLOPs b*h*t*(5*C*d + 6*d^2) count the causal
                    halves of its four chunk products and its three state products.
FLOPs (what achieved GFLOP/s divides) count useful work only, by one rule for both families:
  forward      causal softmax 2*b*h*t^2*d (the visible half of QK^T and PV); chunked linear
               b*h*t*(C*(dk+dv) + 4*dk*dv) (the causal half of each chunk's C x C products, plus
               the state's output and update products);
  fwd+bwd      3.5x the forward for both: the backward recomputes the forward's first product
               (logits / intra-chunk scores and chunk states) and runs five products per two of
               the forward (softmax: S, dP, dV, dQ, dK; linear: A, dA, dq, dk, dv on the causal
               halves, and states, dq, dk, dv, dS on the state side).
The machine's dense float32 matmul peak is measured in the same run. Methods whose [t, t] buffers
would not fit in the available memory are skipped and say so. The goals are printed last, each
with PASS or FAIL (or n/a when this run did not measure it).
"""

import argparse
import os

import jax
import jax.numpy as jnp

from experiments import benchmarking as bm
from layers.kernels.dispatch import resolve_impl
from layers import delta_rule as delta_lib
from layers.norms import l2_normalize
from layers.linear_attention import linear_attention
from layers.softmax_attention import softmax_attention

COLUMNS = ["method", "impl", "t", "fwd_ms", "fwd_bwd_ms", "fwd_gflops", "fwd_bwd_gflops",
           "fwd_peak_frac", "fwd_bwd_peak_frac", "note"]
DECODE_COLUMNS = ["model", "context", "step_ms", "cache_mib"]
GATED = ("gla", "delta_rule")  # methods whose gradient includes the gate's


def softmax_flops(b, h, t, d):
  return 2.0 * b * h * t * t * d


def linear_flops(b, h, t, d, chunk):
  return float(b * h * t * (chunk * 2 * d + 4 * d * d))


def delta_flops(b, h, t, d, chunk):
  """Useful FLOPs of the chunked gated delta rule: the causal halves of the chunk's K K^T,
  T [V, K], Q K^T and (Q K^T) u products, and the W S, Q S and K^T u state products."""
  return float(b * h * t * (chunk * 5 * d + 6 * d * d))


def _delta(chunk):
  """The gated delta rule on the benchmark's inputs: L2-normalized keys (a stable recurrence),
  beta 0.5 and the mean of the GLA log-gate over d_k as the per-head gate."""
  def fn(q, k, v, g):
    return delta_lib.delta_rule(q, l2_normalize(k), v, jnp.full(q.shape[:3], 0.5), g.mean(-1),
                                chunk_size=chunk)
  return fn


def _methods(h, d, chunk):
  """name -> (forward fn of (q, k, v, g), flops fn, bwd factor, dense?, impl label).

  g is a GLA log-gate [b, t, h, d]; methods without a data-dependent gate ignore it.
  """
  def gate(kind, g):
    if kind == "none":
      return None
    return -jnp.linspace(0.0, 1.0, h) if kind == "fixed" else g

  soft = lambda impl: (lambda q, k, v, g: softmax_attention(q, k, v, causal=True, impl=impl))
  lin = lambda kind: (lambda q, k, v, g: linear_attention(q, k, v, gate(kind, g),
                                                          chunk_size=chunk))
  flash_impl = resolve_impl("softmax_attention", "auto")
  linear_impl = resolve_impl("linear_attention", "auto")
  sflops = lambda b, t: softmax_flops(b, h, t, d)
  lflops = lambda b, t: linear_flops(b, h, t, d, chunk)
  return {
      "dense_reference": (soft("reference"), sflops, 3.5, True, "reference"),
      "jax_nn_causal": (lambda q, k, v, g: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                        sflops, 3.5, True, "xla"),
      "flash": (soft("auto"), sflops, 3.5, False, flash_impl),
      "linear": (lin("none"), lflops, 3.5, False, linear_impl),
      "lightning": (lin("fixed"), lflops, 3.5, False, linear_impl),
      "gla": (lin("gla"), lflops, 3.5, False, linear_impl),
      "delta_rule": (_delta(chunk), lambda b, t: delta_flops(b, h, t, d, chunk), 3.5, False,
                     resolve_impl(delta_lib.FAMILY, "auto")),
  }


def bench_lengths(lengths, b, h, d, chunk, repeats, peak, only=None):
  rows = []
  methods = _methods(h, d, chunk)
  for t in lengths:
    keys = jax.random.split(jax.random.key(t), 5)
    q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in keys[:3])
    cot = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
    g = jax.nn.log_sigmoid(jax.random.normal(keys[4], (b, t, h, d), jnp.float32)) / 16.0
    for name, (fn, flops, bwd_factor, dense, impl) in methods.items():
      if only and name not in only:
        continue
      row = {"method": name, "impl": impl, "t": t}
      need = 4 * b * h * t * t * 4  # logits, probabilities and their two gradients
      if dense and need > 0.7 * bm.available_memory_bytes():
        row["note"] = f"skipped: needs ~{need / 2**30:.0f} GiB for [t, t] buffers"
        rows.append(row)
        print(f"  t={t:6d} {name:16s} {row['note']}", flush=True)
        continue
      fwd = jax.jit(fn)
      loss = lambda q, k, v, g, fn=fn: jnp.vdot(fn(q, k, v, g), cot)
      grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if name in GATED else (0, 1, 2)))
      row["fwd_ms"] = bm.time_ms(fwd, q, k, v, g, repeats=repeats)
      row["fwd_bwd_ms"] = bm.time_ms(grad, q, k, v, g, repeats=repeats)
      f = flops(b, t)
      row["fwd_gflops"] = f / row["fwd_ms"] / 1e6
      row["fwd_bwd_gflops"] = bwd_factor * f / row["fwd_bwd_ms"] / 1e6
      row["fwd_peak_frac"] = row["fwd_gflops"] / peak
      row["fwd_bwd_peak_frac"] = row["fwd_bwd_gflops"] / peak
      rows.append(row)
      print(f"  t={t:6d} {name:16s} fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} "
            f"ms  ({row['fwd_peak_frac']:.0%} of peak fwd)", flush=True)
  return rows


def bench_decode(contexts, repeats):
  """One cached decode step of small models at cache position `context`."""
  if not contexts:
    return []
  from layers.attention import AttentionConfig
  from lctx.config import ModelConfig
  from lctx.generate import init_cache
  from lctx.model import DecoderLM, init_params

  models = {
      "gla": ("gla",),
      "gla+swa512": ("gla", "attention", "gla", "attention"),
      "full_attention": ("attention",),
  }
  rows = []
  for label, mixers in models.items():
    opts = {"attention": AttentionConfig(window=512)} if label == "gla+swa512" else {}
    model = DecoderLM(ModelConfig(vocab_size=256, d_model=256, num_layers=4, d_ff=768,
                                  mixers=mixers, mixer_options=opts))
    tok = jnp.zeros((1, 1), jnp.int32)
    params = init_params(model, jax.random.key(0), tok)

    @jax.jit
    def step(cache, pos):
      logits, new = model.apply({"params": params, "cache": cache}, tok, pos, decode=True,
                                mutable=["cache"])
      return logits, new["cache"]

    for context in contexts:
      cache = init_cache(model, params, 1, context + 1)
      cache = jax.tree_util.tree_map_with_path(
          lambda path, x: jnp.full_like(x, context) if "index" in jax.tree_util.keystr(path)
          else x, cache)
      pos = jnp.full((1, 1), context, jnp.int32)
      ms = bm.time_ms(lambda c, p: step(c, p)[0], cache, pos, repeats=repeats)
      mib = sum(x.nbytes for x in jax.tree.leaves(cache)) / 2**20
      rows.append({"model": label, "context": context, "step_ms": ms, "cache_mib": mib})
      print(f"  decode {label:16s} context {context:6d}: {ms:7.3f} ms/step, cache {mib:8.2f} MiB",
            flush=True)
  return rows


def _goal(ok, text):
  return ("n/a   " if ok is None else ("PASS  " if ok else "FAIL  ")) + text


def summarize(rows, decode_rows):
  """The goals, computed from this run's rows: one line each, PASS / FAIL / n/a first."""
  get = lambda m, t, col: next((r.get(col) for r in rows if r["method"] == m and r["t"] == t),
                               None)
  lines = []
  gla16, nn16 = get("gla", 16384, "fwd_bwd_ms"), get("jax_nn_causal", 16384, "fwd_bwd_ms")
  if gla16 and nn16:
    lines.append(_goal(nn16 / gla16 >= 10, f"gla fwd+bwd at 16K: {nn16 / gla16:.1f}x faster than "
                                           "jax_nn_causal (goal >= 10x)"))
  else:
    lines.append(_goal(None, "gla fwd+bwd at 16K vs jax_nn_causal (goal >= 10x): 16384 not "
                             "measured for both"))
  frac16 = get("linear", 16384, "fwd_peak_frac")
  if frac16:
    lines.append(_goal(frac16 >= 0.3, f"plain linear forward at 16K: {frac16:.0%} of matmul peak "
                                      "(goal >= 30%, useful FLOPs only)"))
  else:
    lines.append(_goal(None, "plain linear forward at 16K vs matmul peak (goal >= 30%): 16384 "
                             "not measured"))
  delta16 = get("delta_rule", 16384, "fwd_bwd_ms")
  if delta16 and gla16 and nn16:
    lines.append(_goal(delta16 <= 3 * gla16, f"delta_rule fwd+bwd at 16K: {delta16 / gla16:.1f}x "
                                            "gla's (goal <= 3x)"))
    lines.append(_goal(nn16 / delta16 >= 10, f"delta_rule fwd+bwd at 16K: {nn16 / delta16:.1f}x "
                                             "faster than jax_nn_causal (goal >= 10x)"))
  else:
    lines.append(_goal(None, "delta_rule fwd+bwd at 16K vs gla (goal <= 3x) and jax_nn_causal "
                             "(goal >= 10x): 16384 not measured for all three"))
  gla4, gla32 = get("gla", 4096, "fwd_bwd_ms"), get("gla", 32768, "fwd_bwd_ms")
  if gla4 and gla32:
    lines.append(_goal(gla32 / gla4 <= 9, f"gla fwd+bwd 4K -> 32K: {gla32 / gla4:.1f}x longer "
                                          "(goal <= 9x)"))
  for label in sorted({r["model"] for r in decode_rows}):
    ms = {r["context"]: r["step_ms"] for r in decode_rows if r["model"] == label}
    if len(ms) >= 2:
      lo, hi = min(ms), max(ms)
      ratio = ms[hi] / ms[lo]
      line = f"decode {label}: step at {hi} / step at {lo} = {ratio:.2f}x"
      if label == "full_attention":
        lines.append(_goal(None, line + " (no goal: full attention grows with the context)"))
      else:
        lines.append(_goal(ratio <= 1.2, line + " (goal <= 1.2x for linear / sliding-window "
                                                "models)"))
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_kernels",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--chunk_size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--methods", default="", help="comma-separated subset (default: all)")
  parser.add_argument("--decode_contexts", default="1024,65536")
  parser.add_argument("--out", default="runs/bench_kernels")
  args = parser.parse_args(argv)
  ints = lambda s: [int(x) for x in s.split(",") if x]
  os.makedirs(args.out, exist_ok=True)

  peak = bm.matmul_peak_gflops()
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); dense float32 matmul "
        f"peak {peak:.1f} GFLOP/s; b={args.batch} h={args.heads} d={args.head_dim} "
        f"chunk={args.chunk_size}", flush=True)
  only = set(filter(None, args.methods.split(",")))
  rows = bench_lengths(ints(args.lengths), args.batch, args.heads, args.head_dim,
                       args.chunk_size, args.repeats, peak, only)
  decode_rows = bench_decode(ints(args.decode_contexts), args.repeats)

  print()
  bm.print_table(rows, COLUMNS)
  print()
  bm.print_table(decode_rows, DECODE_COLUMNS)
  print()
  for line in summarize(rows, decode_rows):
    print(line)
  bm.write_csv(os.path.join(args.out, "kernels.csv"), rows, COLUMNS)
  bm.write_csv(os.path.join(args.out, "decode.csv"), decode_rows, DECODE_COLUMNS)
  series = {}
  for r in rows:
    if r.get("fwd_bwd_ms"):
      xs, ys = series.setdefault(f"{r['method']} fwd+bwd", ([], []))
      xs.append(r["t"])
      ys.append(r["fwd_bwd_ms"])
  bm.plot_lines(os.path.join(args.out, "kernels.png"), series, "sequence length t",
                "forward+backward ms", f"b={args.batch} h={args.heads} d={args.head_dim}")
  print(f"wrote {args.out}/kernels.csv, decode.csv" + (", kernels.png" if series else ""))


if __name__ == "__main__":
  main()
