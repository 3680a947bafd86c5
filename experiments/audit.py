"""Audit of the sequence-parallel methods: collective bytes, per-device memory and step time.

  python -m experiments.audit [--batch 1 --heads 4 --kv_heads 4 --head_dim 64 --seq_len 16384
                            --shards 8 --methods ring,lasp2h,lasp2,zeco,lasp2_delta,zeco_delta
                            --out runs/audit]

For one layer's attention op of each method (ring and LASP-2H for softmax layers, LASP-2 and ZeCO
for GLA-gated linear layers and for the Gated DeltaNet delta rule), at global length T over P fake
CPU devices, it compiles
  forward       o = op(q, k, v[, beta][, g])
  forward+bwd   the gradients of <o, cotangent> with respect to every input
and reads from the optimized HLO the bytes every rank sends (experiments/hlo_collectives.py); the
backward's bytes are (forward+bwd) - (forward). Next to them, the formulas (x element size):
  ring     forward 2(P-1)/P B Hk T d            (K and V pass every other rank once)
           backward 2(2P-3)/P B Hk T d          (dK, dV accumulators: P-1 sends ending at
                                                 their owner; K, V again: P-2 sends, as XLA
                                                 reuses the forward's first received shard)
  lasp2h   forward 2(P-1)/P B Hk T d            (all-gather of K and V)
           backward the same                    (reduce-scatter of dK and dV)
  lasp2    forward (P-1) B H d_k (d_v + 1)      (all-gather of the memory states and of the
                                                 GLA gate's per-chunk decays, d_k per head)
           backward the same                    (their gradients, reduce-scattered)
  zeco     forward B H d_k d_v, one state per rank (the All-Scan); backward the same
  lasp2_delta  forward (P-1) B H d_k (d_v + d_k)  (all-gather of every piece's memory state and
                                                 its full [d_k, d_k] transition)
               backward the same
  zeco_delta   forward B H d_k d_v, one state per rank (the transition stays local); backward
               the same
(The decays add a 1/d_v share to LASP-2's (P-1) B H d_k d_v.) The goal is measured within 5% of
the formula.

It also reports each program's per-device peak memory from the compiled memory analysis against
the same op on one device at the same T (goal at P = 8: at most 1/6, for every method but LASP-2H,
which holds the whole K, V by design), and the step time of the
forward+backward. The P devices are simulated on this machine's CPU cores and share them, so the
times only rank the methods; they are not a speed-up measurement. Writes audit_comm.csv and
audit_memory.csv under --out.
"""

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from experiments.benchmarking import print_table, time_ms, write_csv  # noqa: E402
from layers.delta_parallel import lasp2_delta_rule, zeco_delta_rule  # noqa: E402
from layers.delta_rule import delta_rule  # noqa: E402
from layers.linear_attention import linear_attention  # noqa: E402
from layers.softmax_attention import softmax_attention  # noqa: E402
from experiments import hlo_collectives
from sharding import specs  # noqa: E402
from layers.linear_parallel import (lasp2_linear_attention, token_spec,  # noqa: E402
                                    zeco_linear_attention)
from layers.softmax_parallel import allgather_attention, ring_attention  # noqa: E402
from sharding.layout import SeqLayout  # noqa: E402

METHODS = ("ring", "lasp2h", "lasp2", "zeco", "lasp2_delta", "zeco_delta")
SOFTMAX = {"ring": ring_attention, "lasp2h": allgather_attention}
LINEAR = {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention}
DELTA = {"lasp2_delta": lasp2_delta_rule, "zeco_delta": zeco_delta_rule}
PARALLEL = {**SOFTMAX, **LINEAR, **DELTA}
SINGLE = {"linear": linear_attention, "delta": delta_rule}
TOLERANCE = 0.05
MEMORY_GOAL = 1 / 6
# Methods that hold every rank's K, V by design, so the per-device memory goal does not apply.
NO_MEMORY_GOAL = {"lasp2h": "it all-gathers the whole K, V and reduce-scatters their gradient"}


def formula_bytes(method: str, a, shards: int, elem: int) -> dict[str, float]:
  """Bytes per rank per layer that `method` should send, forward and backward."""
  p = shards
  kv = a.batch * a.kv_heads * a.seq_len * a.head_dim * elem
  state = a.batch * a.heads * a.head_dim * a.head_dim * elem
  decays = a.batch * a.heads * a.head_dim * elem
  if method == "ring":
    return {"forward": 2 * (p - 1) / p * kv, "backward": 2 * (2 * p - 3) / p * kv}
  if method == "lasp2h":
    return {"forward": 2 * (p - 1) / p * kv, "backward": 2 * (p - 1) / p * kv}
  if method == "lasp2":
    return {"forward": (p - 1) * (state + decays), "backward": (p - 1) * (state + decays)}
  if method == "lasp2_delta":  # the transition is a [d_k, d_k] matrix (head_dim both ways here)
    return {"forward": (p - 1) * 2 * state, "backward": (p - 1) * 2 * state}
  return {"forward": state, "backward": state}


def family(method: str) -> str:
  return "softmax" if method in SOFTMAX else "linear" if method in LINEAR else "delta"


def _inputs(a, kind: str, rng):
  b, t, h, hk, d = a.batch, a.seq_len, a.heads, a.kv_heads, a.head_dim
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, t, hk, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, t, hk, d)), jnp.float32)
  if kind == "softmax":
    return (q, k, v)
  if kind == "delta":  # L2-normalized q, k, sigmoid write strengths, per-head log-gates
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((b, t, h)))), jnp.float32)
    g = jnp.asarray(-0.1 * rng.uniform(size=(b, t, h)), jnp.float32)
    return (unit(q), unit(k), v, beta, g)
  g = jnp.asarray(-np.log1p(np.exp(-rng.standard_normal((b, t, h, d)) - 3.0)) / 16, jnp.float32)
  return (q * d ** -0.5, k * d ** -0.5, v, g)


def _programs(op, inputs, shardings):
  """(forward, forward+backward) compiled programs of `op` on inputs placed with `shardings`."""
  placed = [jax.device_put(x, s) for x, s in zip(inputs, shardings)]
  ct = jax.device_put(jnp.ones(inputs[0].shape[:3] + (inputs[2].shape[-1],), jnp.float32)
                      / inputs[0].size, shardings[0])

  def fwd_bwd(args, ct):
    out, vjp = jax.vjp(op, *args)
    return vjp(ct)

  fwd = jax.jit(op).lower(*placed).compile()
  both = jax.jit(fwd_bwd).lower(placed, ct).compile()
  return fwd, both, (placed, ct)


def _peak_bytes(compiled) -> int:
  """Arguments + outputs + temporaries of the compiled per-device program (its buffer plan).

  XLA:CPU's `peak_memory_in_bytes` is not the buffer plan's peak (it reports less than the
  arguments alone), so the sum of the planned buffers is used: an upper bound of the peak.
  """
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def audit_method(method: str, a, devices) -> tuple[list[dict], dict]:
  """Communication rows and the memory/time row of one method."""
  p = len(devices)
  mesh = jax.make_mesh((p,), (specs.SEQ_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  kind, fn = family(method), PARALLEL[method]
  layout = SeqLayout("contiguous", p)
  if kind == "softmax":
    op = lambda q, k, v: fn(q, k, v, layout=layout, mesh=mesh)
  else:
    extra = {"scan_blocks": a.scan_blocks} if method.startswith("zeco") else {}
    op = lambda *x: fn(*x, layout=layout, chunk_size=a.chunk_size, mesh=mesh, **extra)
  inputs = _inputs(a, kind, np.random.default_rng(0))
  shardings = [NamedSharding(mesh, token_spec(x, mesh)) for x in inputs]
  with jax.set_mesh(mesh):
    fwd, both, (placed, ct) = _programs(op, inputs, shardings)
    step_ms = time_ms(lambda *x: both(*x), placed, ct, repeats=a.repeats)
  sent = {}
  for name, prog in (("forward", fwd), ("forward+backward", both)):
    ops, unparsed = hlo_collectives.collectives(prog.as_text(), p)
    if unparsed:
      raise RuntimeError(f"audit: async collectives not parsed: {unparsed[:3]}")
    sent[name] = hlo_collectives.bytes_sent_per_device(ops, p)
  sent["backward"] = sent["forward+backward"] - sent["forward"]
  expected = formula_bytes(method, a, p, 4)
  rows = []
  for direction in ("forward", "backward"):
    per_rank = sent[direction]
    measured = float(per_rank.max())
    ratio = measured / expected[direction]
    rows.append({"method": method, "direction": direction, "P": p,
                 "measured_MiB_per_rank": measured / 2**20,
                 "formula_MiB_per_rank": expected[direction] / 2**20, "ratio": ratio,
                 "min_rank_MiB": float(per_rank.min()) / 2**20,
                 "goal_5pct": "PASS" if abs(ratio - 1) <= TOLERANCE else "FAIL"})
  memory = {"method": method, "P": p, "peak_MiB_per_device": _peak_bytes(both) / 2**20,
            "step_ms": step_ms}
  return rows, memory


def unsharded(a, kind: str, device) -> dict:
  """Peak memory and step time of the single-device op of `kind` at the same global length."""
  if kind == "softmax":
    op = softmax_attention
  else:
    op = lambda *x: SINGLE[kind](*x, chunk_size=a.chunk_size)
  inputs = _inputs(a, kind, np.random.default_rng(0))
  single = jax.sharding.SingleDeviceSharding(device)
  _, both, (placed, ct) = _programs(op, inputs, [single] * len(inputs))
  return {"peak_MiB_per_device": _peak_bytes(both) / 2**20,
          "step_ms": time_ms(lambda *x: both(*x), placed, ct, repeats=a.repeats)}


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m experiments.audit", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--seq_len", type=int, default=16384)
  parser.add_argument("--shards", type=int, default=8, help="sequence-parallel degree P")
  parser.add_argument("--chunk_size", type=int, default=64)
  parser.add_argument("--scan_blocks", type=int, default=4, help="ZeCO All-Scan blocks")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="runs/audit", help="directory for the CSV files")
  a = parser.parse_args(argv)
  a.methods = [m for m in a.methods.split(",") if m]
  bad = [m for m in a.methods if m not in METHODS]
  if bad:
    parser.error(f"--methods: unknown {bad}; choose from {list(METHODS)}")
  if a.shards > len(jax.devices()):
    parser.error(f"--shards={a.shards} exceeds the {len(jax.devices())} devices (set XLA_FLAGS="
                 "--xla_force_host_platform_device_count)")
  SeqLayout("contiguous", a.shards).check_length(a.seq_len, a.chunk_size, "--seq_len")
  return a


def main(argv=None) -> dict:
  a = parse_args(sys.argv[1:] if argv is None else argv)
  devices = jax.devices()[:a.shards]
  print(f"sequence-parallel audit: B={a.batch} H={a.heads} Hk={a.kv_heads} d={a.head_dim} "
        f"T={a.seq_len} P={a.shards}, float32, one layer")
  comm, memory, baselines = [], [], {}
  for method in a.methods:
    rows, mem = audit_method(method, a, devices)
    kind = family(method)
    if kind not in baselines:
      baselines[kind] = unsharded(a, kind, devices[0])
    base = baselines[kind]
    mem.update(unsharded_MiB=base["peak_MiB_per_device"], unsharded_step_ms=base["step_ms"])
    mem["memory_fraction"] = mem["peak_MiB_per_device"] / mem["unsharded_MiB"]
    mem["goal_1_6"] = ("n/a" if method in NO_MEMORY_GOAL
                       else "PASS" if mem["memory_fraction"] <= MEMORY_GOAL else "FAIL")
    comm += rows
    memory.append(mem)
  comm_cols = ["method", "direction", "P", "measured_MiB_per_rank", "formula_MiB_per_rank",
               "ratio", "min_rank_MiB", "goal_5pct"]
  mem_cols = ["method", "P", "peak_MiB_per_device", "unsharded_MiB", "memory_fraction",
              "goal_1_6", "step_ms", "unsharded_step_ms"]
  print("\ncollective bytes sent per rank per layer (max over ranks; min_rank shows the spread)")
  print_table(comm, comm_cols)
  print("\nper-device peak memory of forward+backward, and its step time")
  print_table(memory, mem_cols)
  print("\ngoals:")
  for r in comm:
    print(f"  {r['method']} {r['direction']} bytes per rank within 5% of the formula: "
          f"{r['goal_5pct']} (ratio {r['ratio']:.3f})")
  for r in memory:
    if r["method"] in NO_MEMORY_GOAL:
      print(f"  {r['method']} per-device peak memory: {r['memory_fraction']:.3f} of one device "
            f"(no goal: {NO_MEMORY_GOAL[r['method']]})")
      continue
    print(f"  {r['method']} per-device peak memory at most 1/6 of one device: {r['goal_1_6']} "
          f"({r['memory_fraction']:.3f}; a goal at P = 8, informative at other P)")
  print(f"\nnote: the {a.shards} devices are simulated on {os.cpu_count()} CPU cores that they "
        "share, so step times only rank the methods.")
  os.makedirs(a.out, exist_ok=True)
  write_csv(os.path.join(a.out, "audit_comm.csv"), comm, comm_cols)
  write_csv(os.path.join(a.out, "audit_memory.csv"), memory, mem_cols)
  return {"comm": comm, "memory": memory}


if __name__ == "__main__":
  main()
