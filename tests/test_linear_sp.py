"""Sequence-parallel linear attention (LASP-2, ZeCO All-Scan) on 8 fake CPU devices.

Every case runs the method on layout-order inputs and compares the output, the final state and
all gradients (q, k, v, g, initial state) with the token-by-token reference on natural-order
inputs (relative error <= 1e-5 in float32). The cases rotate through the gate forms (none, [h],
[b,t,h] and [b,t,h,d_k] incl. log-gates down to -10 over 8K tokens per rank), odd head dims, GQA, initial states, segment
ids whose documents cross shard boundaries (also exactly at a shard start), P in {2, 4, 8}, both
layouts, composed meshes and the xla, pallas (interpreted) and reference intra kernels. The
compiled forward and gradient HLO show the communication: ZeCO sends one state per rank and leg
in each direction of the pass, LASP-2 issues one all-gather (one reduce-scatter backward).
"""

from tests.multidevice import run_with_devices

HARNESS = """
import re
import jax, jax.numpy as jnp, numpy as np
from layers.linear_attention import linear_attention
from layers.linear_parallel import lasp2_linear_attention, zeco_linear_attention
from sharding.layout import SeqLayout

METHODS = {"lasp2": lasp2_linear_attention, "zeco": zeco_linear_attention}


def mesh_of(shape, names):
  n = int(np.prod(shape))
  return jax.make_mesh(shape, names, devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def make_gate(form, rng, b, t, h, dk):
  # Inputs come from numpy: eager jax ops would each compile, which dominates small cases.
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  if form == "none":
    return None
  if form == "fixed":
    return -np.linspace(0.05, 1.0, h)
  if form == "strong":
    return -10.0 * rng.uniform(size=(b, t, h))
  if form == "strong_vector":
    return -10.0 * rng.uniform(size=(b, t, h, dk))
  x = rng.normal(size=(b, t, h) if form == "scalar" else (b, t, h, dk))
  return log_sigmoid(x) / 16 if form == "gla" else log_sigmoid(2.0 * x)


def make_segments(b, t, p):
  # Row 0: resets inside pieces and exactly at the starts of rank 1's first zigzag chunk (t/2P)
  # and of rank 1's contiguous shard (t/P); the last document spans several shards. Row 1: ids
  # 0,1,0 (non-unique) with a reset exactly at the start of the last zigzag chunk.
  c = t // (2 * p)
  starts = np.zeros((b, t), np.int32)
  starts[0, [5, c, 2 * c, t // 2 + 3]] = 1
  starts[1 % b, [c + 7, t - c]] = 1
  ids = np.cumsum(starts, axis=1)
  ids[1 % b] %= 2
  return jnp.asarray(ids, jnp.int32)


def check(name, method, kind, mesh, *, b=2, h=4, hk=2, dk=5, dv=7, gate="vector", h0=True,
          seg=True, final=True, scan_blocks=4, set_mesh=False, impl="auto", per_rank=32):
  p = mesh.shape["seq"]
  t, layout = per_rank * p, SeqLayout(kind, p)
  rng = np.random.default_rng(len(name))
  normal = lambda *shape: rng.normal(size=shape)
  args = {"q": normal(b, t, h, dk), "k": normal(b, t, hk, dk), "v": normal(b, t, hk, dv),
          "g": make_gate(gate, rng, b, t, h, dk), "h0": normal(b, h, dk, dv) if h0 else None}
  args = {key: jnp.asarray(np.float32(x)) for key, x in args.items() if x is not None}
  seg_ids = make_segments(b, t, p) if seg else None
  lay = lambda x: x if x is None or x.ndim < 2 else layout.to_layout(x, 1)
  extra = {"scan_blocks": scan_blocks} if method == "zeco" else {}

  def ours(a):
    out = METHODS[method](lay(a["q"]), lay(a["k"]), lay(a["v"]), lay(a.get("g")),
                          layout=layout, initial_state=a.get("h0"), output_final_state=final,
                          segment_ids=lay(seg_ids), chunk_size=16, impl=impl,
                          mesh=mesh, **extra)
    return (layout.from_layout(out[0], 1), out[1]) if final else layout.from_layout(out, 1)

  def ref(a):
    return linear_attention(a["q"], a["k"], a["v"], a.get("g"), initial_state=a.get("h0"),
                            output_final_state=final, segment_ids=seg_ids, impl="reference")

  ct = jnp.asarray(np.float32(normal(b, t, h, dv)))
  if final:
    ct = (ct, jnp.asarray(np.float32(normal(b, h, dk, dv))))
  compare(name, ours, ref, args, ct, mesh if set_mesh else None)


def compare(name, ours, ref, args, ct, mesh=None):
  # Output, final state and every gradient of `ours` (under `mesh` if given) against `ref`.
  def value_and_grads(f, ct):
    out, vjp = jax.vjp(f, args)
    return out, vjp(ct)[0]

  if mesh is not None:
    with jax.set_mesh(mesh):
      got = jax.jit(lambda c: value_and_grads(ours, c))(ct)
  else:
    got = jax.jit(lambda c: value_and_grads(ours, c))(ct)
  want = jax.jit(lambda c: value_and_grads(ref, c))(ct)
  rel = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))
  errs = jax.tree.map(rel, *jax.device_get((got, want)))
  worst = max(jax.tree.leaves(errs))
  assert worst <= 1e-5, (name, errs)
  print("ok", name, f"{worst:.1e}")


def communication(hlo, p, state_bytes):
  # "permutes N states s_0 .. s_P-1 all-gather A reduce-scatter R all-reduce C gathered F..":
  # the collective-permutes, the states each rank sends by them, the other collectives' counts
  # and the floats each all-gather's result holds.
  permutes, sent = collectives(hlo, "collective-permute"), np.zeros(p)
  for nbytes, pairs in permutes:
    for src, _ in pairs:
      sent[int(src)] += nbytes / state_bytes
  counts = [f"{op} {len(collectives(hlo, op))}" for op in ("all-gather", "reduce-scatter",
                                                            "all-reduce")]
  gathered = [str(n // 4) for n, _ in collectives(hlo, "all-gather")]
  return " ".join([f"permutes {len(permutes)} states", *(f"{s:g}" for s in sent), *counts,
                   "gathered", *gathered])


def collectives(hlo, op):
  # (bytes per device of one operand, source_target_pairs) of every `op` in compiled HLO text.
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= (\\w+)\\[([\\d,]*)\\][^ ]* " + op + r"(-start)?\\(", line)
    if m:
      n = int(np.prod([int(d) for d in m.group(2).split(",") if d]))
      pairs = re.search(r"source_target_pairs=\\{(.*?)\\}\\}", line)
      found.append((4 * n, re.findall(r"\\{(\\d+),(\\d+)", pairs.group(1) + "}") if pairs else []))
  return found
"""


def test_lasp2_matches_reference():
  out = run_with_devices(HARNESS + """
m2, m4, m8 = (mesh_of((p,), ("seq",)) for p in (2, 4, 8))
check("lasp2-c2-vector-odd-gqa-pallas", "lasp2", "contiguous", m2, impl="pallas")
check("lasp2-z2-none-mqa", "lasp2", "zigzag", m2, gate="none", hk=1)
check("lasp2-c4-fixed", "lasp2", "contiguous", m4, gate="fixed", dk=8, dv=4, h0=False)
check("lasp2-z4-strong", "lasp2", "zigzag", m4, gate="strong", dk=6, dv=3)
check("lasp2-c8-scalar-noseg", "lasp2", "contiguous", m8, gate="scalar", seg=False, hk=4)
check("lasp2-z8-gla", "lasp2", "zigzag", m8, gate="gla", dk=8, final=False)
check("lasp2-dst-zigzag-vector", "lasp2", "zigzag",
      mesh_of((2, 2, 2), ("data", "seq", "tensor")), set_mesh=True)
# 8K tokens per rank with log-gates down to -10 per token: summed over a whole piece they reach
# about -40000, where float32 keeps ~3 decimals, so the piece summaries must stay chunk-local.
check("lasp2-c2-strong-8k", "lasp2", "contiguous", m2, gate="strong", b=1, h=2, hk=1, dk=4,
      dv=3, per_rank=8192)
""")
  assert out.count("ok ") == 8, out


def test_zeco_matches_reference():
  out = run_with_devices(HARNESS + """
m2, m4, m8 = (mesh_of((p,), ("seq",)) for p in (2, 4, 8))
check("zeco-c2-strong-k4-ref", "zeco", "contiguous", m2, gate="strong", dk=8, dv=3,
      impl="reference")
check("zeco-z2-vector-k3-pallas", "zeco", "zigzag", m2, dk=6, dv=5, impl="pallas")
check("zeco-c4-none-k2", "zeco", "contiguous", m4, gate="none", dk=8, scan_blocks=2, h0=False)
check("zeco-z4-fixed-k4", "zeco", "zigzag", m4, gate="fixed", dk=8, dv=4)
check("zeco-c8-gla-k4", "zeco", "contiguous", m8, gate="gla", dk=8, dv=4, final=False)
check("zeco-z8-scalar-k1", "zeco", "zigzag", m8, gate="scalar", hk=4)
check("zeco-ds-fixed", "zeco", "contiguous", mesh_of((2, 4), ("data", "seq")), gate="fixed",
      dk=8, set_mesh=True)
check("zeco-dst-zigzag-vector", "zeco", "zigzag", mesh_of((2, 2, 2), ("data", "seq", "tensor")),
      dk=8, dv=3)
check("zeco-z2-strong-vector-8k", "zeco", "zigzag", m2, gate="strong_vector", b=1, h=2, hk=1,
      dk=4, dv=3, per_rank=8192)
""")
  assert out.count("ok ") == 9, out


def test_communication_volume_and_errors():
  out = run_with_devices(HARNESS + """
b, h, dk, dv, p = 2, 2, 8, 4, 4
mesh, state_bytes = mesh_of((p,), ("seq",)), b * h * dk * dv * 4
x = jnp.ones((b, 32 * p, h, dk))
for kind in ("contiguous", "zigzag"):
  layout = SeqLayout(kind, p)
  zeco = lambda q: zeco_linear_attention(q, q, q[..., :dv], q[..., 0] - 1.0, layout=layout,
                                         chunk_size=16, scan_blocks=4, mesh=mesh)
  lasp2 = lambda q: lasp2_linear_attention(q, q, q[..., :dv], q, layout=layout, chunk_size=16,
                                           mesh=mesh)
  for name, f in (("zeco", zeco), ("lasp2", lasp2)):
    for mode, fn in (("fwd", f), ("grad", jax.grad(lambda q: f(q).sum()))):
      print(name, kind, mode, communication(jax.jit(fn).lower(x).compile().as_text(), p,
                                            state_bytes))
zigzag, two_shards, contiguous = SeqLayout("zigzag", p), SeqLayout("contiguous", 2), SeqLayout(
    "contiguous", p)
for method, layout, t, extra in [("zeco", zigzag, 96, {}), ("lasp2", zigzag, 96, {}),
                                 ("lasp2", two_shards, 128, {}),
                                 ("zeco", contiguous, 128, {"scan_blocks": 0})]:
  y = jnp.ones((1, t, 2, 8))
  try:
    METHODS[method](y, y, y, layout=layout, chunk_size=16, mesh=mesh, **extra)
    print("no error", method, t)
  except ValueError as e:
    print("error:", e)
""")
  # ZeCO, contiguous: P-1+K-1 = 6 pipelined steps; every rank but the last sends one state, the
  # backward sends one state back. Zigzag: two legs (12 steps), one state per neighbour.
  none = "all-gather 0 reduce-scatter 0 all-reduce 0"
  assert f"zeco contiguous fwd permutes 6 states 1 1 1 0 {none}" in out, out
  assert f"zeco contiguous grad permutes 12 states 1 2 2 1 {none}" in out, out
  assert f"zeco zigzag fwd permutes 12 states 1 2 2 1 {none}" in out, out
  assert f"zeco zigzag grad permutes 24 states 2 4 4 2 {none}" in out, out
  # LASP-2: one all-gather forward; its transpose, one reduce-scatter, backward.
  for kind in ("contiguous", "zigzag"):
    assert (f"lasp2 {kind} fwd permutes 0 states 0 0 0 0 all-gather 1 reduce-scatter 0 "
            "all-reduce 0") in out, out
    assert (f"lasp2 {kind} grad permutes 0 states 0 0 0 0 all-gather 1 reduce-scatter 1 "
            "all-reduce 0") in out, out
  assert ("error: zeco_linear_attention: sequence length 96 is not divisible by 128 "
          "(8 layout chunks x 16): SequenceParallelConfig.layout='zigzag' over MeshConfig.seq=4"
          in out), out
  assert "error: lasp2_linear_attention: sequence length 96 is not divisible by 128" in out, out
  assert "layout.shards=2 must equal the mesh's seq size 4" in out, out
  assert "scan_blocks=0 (SequenceParallelConfig.scan_blocks) must be >= 1" in out, out
  assert "no error" not in out, out
