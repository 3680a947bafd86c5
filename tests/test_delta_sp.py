"""Sequence-parallel (gated) delta rule (LASP-2, ZeCO All-Scan) on 8 fake CPU devices.

Every case runs the method on layout-order inputs and compares the output, the final state and
all gradients (q, k, v, beta, g, initial state) with the token-by-token reference on natural-order
inputs (relative error <= 1e-5 in float32). The cases rotate through DeltaNet (no gate), Gated
DeltaNet with gate strengths 0.1, 1 and 10 and KDA (per-key-dim gates), odd head dims, GQA, initial states, segment ids whose
documents cross shard boundaries (also exactly at a shard start), P in {2, 4, 8}, both layouts,
ZeCO's column blocks K in {1, 2, 3, 4}, a composed mesh and the reference, xla and pallas
(interpreted) intra ops. The compiled
HLO shows the communication: ZeCO sends one state per rank and leg, LASP-2 one all-gather of
[M | A] (one reduce-scatter backward) of (P-1) B H (d_k d_v + d_k^2) floats. A layer type
without a method on a zigzag plan (linear, delta rule, softmax) runs in natural order.
"""

from tests.multidevice import run_with_devices
from tests.test_linear_sp import HARNESS as LINEAR_HARNESS

HARNESS = LINEAR_HARNESS + """
from layers.delta_rule import delta_rule
from layers.delta_parallel import lasp2_delta_rule, zeco_delta_rule

DELTA = {"lasp2": lasp2_delta_rule, "zeco": zeco_delta_rule}


def check_delta(name, method, kind, mesh, *, b=2, h=4, hk=2, dk=5, dv=7, gate=1.0, h0=True,
                seg=True, scan_blocks=4, set_mesh=False, impl="auto", per_rank=32,
                channel=False):
  p = mesh.shape["seq"]
  t, layout = per_rank * p, SeqLayout(kind, p)
  rng = np.random.default_rng(len(name))
  normal = lambda *shape: rng.normal(size=shape)
  k = normal(b, t, hk, dk)
  args = {"q": normal(b, t, h, dk), "k": k / np.linalg.norm(k, axis=-1, keepdims=True),
          "v": normal(b, t, hk, dv), "beta": 1 / (1 + np.exp(-normal(b, t, h))),
          "g": None if gate is None else -gate * rng.uniform(
              size=(b, t, h) + ((dk,) if channel else ())),
          "h0": normal(b, h, dk, dv) if h0 else None}
  args = {key: jnp.asarray(np.float32(x)) for key, x in args.items() if x is not None}
  seg_ids = make_segments(b, t, p) if seg else None
  lay = lambda x: x if x is None else layout.to_layout(x, 1)
  extra = {"scan_blocks": scan_blocks} if method == "zeco" else {}

  def ours(a):
    o, final = DELTA[method](lay(a["q"]), lay(a["k"]), lay(a["v"]), lay(a["beta"]),
                             lay(a.get("g")), layout=layout, initial_state=a.get("h0"),
                             output_final_state=True, segment_ids=lay(seg_ids), chunk_size=16,
                             impl=impl, mesh=mesh, **extra)
    return layout.from_layout(o, 1), final

  def ref(a):
    return delta_rule(a["q"], a["k"], a["v"], a["beta"], a.get("g"), initial_state=a.get("h0"),
                      output_final_state=True, segment_ids=seg_ids, impl="reference")

  ct = (jnp.asarray(np.float32(normal(b, t, h, dv))), jnp.asarray(np.float32(normal(b, h, dk, dv))))
  compare(name, ours, ref, args, ct, mesh if set_mesh else None)
"""


def test_lasp2_delta_rule_matches_reference():
  out = run_with_devices(HARNESS + """
m2, m4, m8 = (mesh_of((p,), ("seq",)) for p in (2, 4, 8))
check_delta("lasp2-c2-gate1-odd-gqa-pallas", "lasp2", "contiguous", m2, impl="pallas")
check_delta("lasp2-z4-deltanet-mqa", "lasp2", "zigzag", m4, gate=None, hk=1, dk=6, dv=3)
check_delta("lasp2-c8-gate10-noseg-ref", "lasp2", "contiguous", m8, gate=10.0, seg=False, hk=4,
            impl="reference", per_rank=16)
check_delta("lasp2-z8-gate0.1-noh0", "lasp2", "zigzag", m8, gate=0.1, dk=8, dv=4, h0=False)
check_delta("lasp2-dst-zigzag", "lasp2", "zigzag", mesh_of((2, 2, 2), ("data", "seq", "tensor")),
            set_mesh=True)

# A layer type without a method on a zigzag plan runs its single-device op in natural order.
from layers.delta_parallel import parallel_delta_rule
from layers.linear_parallel import parallel_linear_attention
from layers.softmax_attention import softmax_attention
from layers.softmax_parallel import parallel_softmax_attention
from sharding.plan import ExecutionPlan
layout = SeqLayout("zigzag", 4)
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(np.float32(rng.normal(size=(2, 128, 2, 8)))) for _ in range(3))
beta, g = jnp.full((2, 128, 2), 0.5), jnp.asarray(np.float32(-rng.uniform(size=(2, 128, 2))))
seg = make_segments(2, 128, 4)
lay = lambda x: layout.to_layout(x, 1)
unlay = lambda x: layout.from_layout(x, 1)
for name, plan, ours, ref in [
    ("linear", ExecutionPlan(m4, layout, softmax="ring"),
     lambda p: parallel_linear_attention(p, lay(q), lay(k), lay(v), lay(g),
                                         segment_ids=lay(seg), chunk_size=16),
     lambda: linear_attention(q, k, v, g, segment_ids=seg, chunk_size=16)),
    ("delta", ExecutionPlan(m4, layout, softmax="ring"),
     lambda p: parallel_delta_rule(p, lay(q), lay(k), lay(v), lay(beta), lay(g),
                                   segment_ids=lay(seg), chunk_size=16),
     lambda: delta_rule(q, k, v, beta, g, segment_ids=seg, chunk_size=16)),
    ("softmax", ExecutionPlan(m4, layout, linear="zeco"),
     lambda p: parallel_softmax_attention(p, lay(q), lay(k), lay(v), segment_ids=lay(seg)),
     lambda: softmax_attention(q, k, v, segment_ids=seg))]:
  got, want = jax.jit(lambda: unlay(ours(plan)))(), jax.jit(ref)()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  print("ok natural order", name)
""")
  assert out.count("ok ") == 8, out


def test_zeco_delta_rule_matches_reference_and_communication():
  out = run_with_devices(HARNESS + """
m2, m4, m8 = (mesh_of((p,), ("seq",)) for p in (2, 4, 8))
check_delta("zeco-c2-gate10-k4", "zeco", "contiguous", m2, gate=10.0, dk=6, dv=8)
check_delta("zeco-z2-gate1-k3", "zeco", "zigzag", m2, dv=6, scan_blocks=3)
check_delta("zeco-c4-deltanet-k2-noh0", "zeco", "contiguous", m4, gate=None, dv=8,
            scan_blocks=2, h0=False)
check_delta("zeco-z8-gate0.1-k1", "zeco", "zigzag", m8, gate=0.1, hk=4)
check_delta("zeco-z4-kda-k4", "zeco", "zigzag", m4, dv=8, channel=True)

b, h, dk, dv, p = 2, 2, 8, 4, 4
mesh, state_bytes = mesh_of((p,), ("seq",)), b * h * dk * dv * 4
x = jnp.ones((b, 32 * p, h, dk))
common = lambda q: (q, q, q[..., :dv], q[..., 0] * 0.5, q[..., 0] - 1.0)
# The zigzag schedules are the linear layers' (tests/test_linear_sp.py); here what the matrix
# transition changes: ZeCO's blocks and LASP-2's gathered size (also with zigzag's two pieces).
for name, kind, modes in (("zeco", "contiguous", ("fwd", "grad")),
                          ("lasp2", "contiguous", ("fwd", "grad")), ("lasp2", "zigzag", ("fwd",))):
  layout = SeqLayout(kind, p)
  f = {"zeco": lambda q: zeco_delta_rule(*common(q), layout=layout, chunk_size=16,
                                         scan_blocks=4, mesh=mesh),
       "lasp2": lambda q: lasp2_delta_rule(*common(q), layout=layout, chunk_size=16,
                                           mesh=mesh)}[name]
  for mode in modes:
    fn = f if mode == "fwd" else jax.grad(lambda q: f(q).sum())
    print(name, kind, mode, communication(jax.jit(fn).lower(x).compile().as_text(), p,
                                          state_bytes))
try:
  zeco_delta_rule(x, x, x, x[..., 0], layout=SeqLayout("zigzag", p), chunk_size=32, mesh=mesh)
  print("no error")
except ValueError as e:
  print("error:", e)
""")
  assert out.count("ok ") == 5, out
  # ZeCO sends state blocks only (the transition A stays on its rank): P-1+K-1 = 6 steps, one
  # state per rank but the last, the same back in the backward.
  none = "all-gather 0 reduce-scatter 0 all-reduce 0 gathered"
  assert f"zeco contiguous fwd permutes 6 states 1 1 1 0 {none}" in out, out
  assert f"zeco contiguous grad permutes 12 states 1 2 2 1 {none}" in out, out
  # LASP-2: one all-gather of [M | A] per piece, P * pieces * B * H * (d_k d_v + d_k^2) floats
  # (contiguous 4 * 2 * 2 * 96, zigzag twice that); one reduce-scatter backward.
  gathered = "permutes 0 states 0 0 0 0 all-gather 1 reduce-scatter {} all-reduce 0 gathered {}"
  assert "lasp2 contiguous fwd " + gathered.format(0, 4 * 2 * 2 * 96) in out, out
  assert "lasp2 contiguous grad " + gathered.format(1, 4 * 2 * 2 * 96) in out, out
  assert "lasp2 zigzag fwd " + gathered.format(0, 8 * 2 * 2 * 96) in out, out
  assert ("error: zeco_delta_rule: sequence length 128 is not divisible by 256 (8 layout chunks "
          "x 32): SequenceParallelConfig.layout='zigzag' over MeshConfig.seq=4") in out, out
  assert "no error" not in out, out
