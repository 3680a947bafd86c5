"""The MoE FFN: config checks, routing, balance loss, the grouped path against a per-token loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.mlp import SwiGLU
from layers.moe import (MoEConfig, MoEFFN, balance_loss, expert_load, route, upcycle_params,
                        upcycle_scale)

D, F, E, B, T = 6, 5, 4, 2, 7


def swiglu(x, w_gate, w_up, w_down):
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def top_k_choices(params, x_bte, top_k):
  """[b*t, k] experts with the largest router logits, read off in NumPy (concrete inputs only)."""
  logits = np.asarray(x_bte, np.float64).reshape(-1, D) @ np.asarray(params["router"], np.float64)
  return np.argsort(-logits, axis=1, kind="stable")[:, :top_k]


def token_reference(params, tok, picks, config):
  """The block on one token [d] whose routed experts `picks` [k] are given."""
  gates = jax.nn.softmax(tok @ params["router"])[picks]
  if config.normalize_top_k:
    gates = gates / gates.sum()
  y = sum(gates[j] * swiglu(tok, params["gate"][picks[j]], params["up"][picks[j]],
                            params["down"][picks[j]]) for j in range(config.top_k))
  for s in range(config.num_shared_experts):
    y = y + swiglu(tok, params["shared_gate"][s], params["shared_up"][s],
                   params["shared_down"][s])
  return y


def moe_reference(params, x_bte, config):
  """One token at a time, top-k read off the router logits in NumPy."""
  chosen = top_k_choices(params, x_bte, config.top_k)
  rows = [token_reference(params, tok, picks, config)
          for tok, picks in zip(x_bte.reshape(-1, D), chosen)]
  return jnp.stack(rows).reshape(x_bte.shape)


def reference_balance(params, x_bte, config):
  """N * sum_e f_e P_e written out from its definition."""
  probs = np.asarray(jax.nn.softmax(x_bte.reshape(-1, D) @ params["router"]))
  chosen = top_k_choices(params, x_bte, config.top_k)
  f = np.bincount(chosen.ravel(), minlength=config.num_experts) / chosen.size
  return config.num_experts * np.sum(f * probs.mean(0))


def param_shapes(model, x):
  """The shapes MoEFFN.init creates, without running (and compiling) the initializers."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return jax.tree.map(lambda a: a.shape, nn.meta.unbox(abstract))


def init_moe(config, seed=0):
  """The model, NumPy-drawn params of MoEFFN.init's shapes, and x [B, T, D]."""
  model = MoEFFN(d_model=D, d_ff=F, config=config)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  # Router std 1 keeps the top-k choices well separated from ties.
  params = {name: jnp.asarray(rng.normal(size=shape) * (1.0 if name == "router" else 0.5),
                              jnp.float32)
            for name, shape in param_shapes(model, x).items()}
  return model, params, x


@pytest.mark.parametrize("field,value,message", [
    ("num_experts", 0, r"MoEConfig.num_experts=0 must be >= 1"),
    ("top_k", 5, r"MoEConfig.top_k=5 must be in \[1, num_experts=4\]"),
    ("top_k", 0, r"MoEConfig.top_k=0 must be in"),
    ("top_k", 1.5, r"MoEConfig.top_k=1.5 must be int"),
    ("num_shared_experts", -1, r"MoEConfig.num_shared_experts=-1"),
    ("d_expert", 0, r"MoEConfig.d_expert=0"),
    ("dense_layers", (0, -2), r"MoEConfig.dense_layers=\(0, -2\)"),
    ("dense_layers", (1, 1), r"MoEConfig.dense_layers=\(1, 1\)"),
    ("dense_layers", 3, r"MoEConfig.dense_layers=3 must be a list or tuple of int"),
    ("balance_loss_weight", -0.1, r"MoEConfig.balance_loss_weight=-0.1"),
    ("enabled", "yes", r"MoEConfig.enabled='yes' must be bool"),
])
def test_config_errors_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    MoEConfig(**{"num_experts": 4, field: value})


def test_config_normalizes_values():
  cfg = MoEConfig(dense_layers=[0, 3], balance_loss_weight=1, d_expert=np.int64(8))
  assert cfg.dense_layers == (0, 3) and cfg.balance_loss_weight == 1.0
  assert type(cfg.d_expert) is int and cfg.expert_width(64) == 8
  assert MoEConfig().expert_width(64) == 64


def test_routing_on_a_hand_made_router():
  w = 10.0 * jnp.eye(4)  # logits = 10 x, so token x = e_j prefers expert j
  x = jnp.array([[0., 0., 1., 0.], [1., 0., 0., 0.], [0., 0., 0., 1.]])
  r = route(x, w, top_k=1)
  np.testing.assert_array_equal(r.experts, [[2], [0], [3]])
  top = np.exp(10.0) / (np.exp(10.0) + 3.0)
  np.testing.assert_allclose(r.gates, [[top]] * 3, rtol=1e-6)
  np.testing.assert_allclose(r.probs[0], [(1 - top) / 3] * 2 + [top, (1 - top) / 3], rtol=1e-5)
  assert float(route(x, w, 1, normalize_top_k=True).gates[0, 0]) == 1.0

  x2 = jnp.array([[1., 0., 2., 0.], [0., 0.2, 0., 0.1]])  # second choices known too
  r2 = route(x2, w, top_k=2, normalize_top_k=True)
  np.testing.assert_array_equal(r2.experts, [[2, 0], [1, 3]])
  np.testing.assert_allclose(r2.gates[0], [1 / (1 + np.exp(-10.0)), 1 / (1 + np.exp(10.0))],
                             rtol=1e-5)
  np.testing.assert_allclose(r2.gates.sum(-1), [1.0, 1.0], rtol=1e-6)


def test_balance_loss_uniform_skewed_and_masked():
  n = 8
  uniform = jnp.full((n, E), 1.0 / E)
  np.testing.assert_allclose(balance_loss(uniform, jnp.arange(n)[:, None] % E), 1.0, rtol=1e-6)
  two = jnp.stack([jnp.arange(n) % E, (jnp.arange(n) + 1) % E], axis=1)
  np.testing.assert_allclose(balance_loss(uniform, two), 1.0, rtol=1e-6)

  probs = jnp.array([[.9, .1], [.8, .2], [.6, .4], [.3, .7]])
  chosen = jnp.array([[0], [0], [0], [1]])
  # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15.
  np.testing.assert_allclose(balance_loss(probs, chosen), 1.15, rtol=1e-6)
  mask_form = jax.nn.one_hot(chosen[:, 0], 2)
  np.testing.assert_allclose(balance_loss(probs, mask_form), 1.15, rtol=1e-6)
  # Without token 3: f = (1, 0), P_0 = (0.9 + 0.8 + 0.6) / 3, loss = 2 * P_0.
  keep = jnp.array([1., 1., 1., 0.])
  np.testing.assert_allclose(balance_loss(probs, chosen, keep), 2 * 2.3 / 3, rtol=1e-6)
  np.testing.assert_allclose(balance_loss(probs, chosen, keep),
                             balance_loss(probs[:3], chosen[:3]), rtol=1e-6)
  np.testing.assert_allclose(expert_load(chosen, 2, keep), [1.0, 0.0])
  # top-2 counts each (token, choice): f divides by n * k.
  np.testing.assert_allclose(expert_load(jnp.array([[0, 1], [0, 2]]), 3), [0.5, 0.25, 0.25])
  assert float(balance_loss(probs, chosen, jnp.zeros(4))) == 0.0
  # Gradient goes to the probabilities: d/dP_{t,e} = N f_e / n.
  g = jax.grad(balance_loss)(probs, chosen)
  np.testing.assert_allclose(g, np.tile([2 * 0.75 / 4, 2 * 0.25 / 4], (4, 1)), rtol=1e-6)


CASES = [(1, 0, False), (1, 1, False), (2, 0, False), (2, 1, False), (2, 1, True)]


@pytest.mark.parametrize("top_k,shared,normalize", CASES)
def test_forward_and_gradients_match_the_per_token_loop(top_k, shared, normalize):
  cfg = MoEConfig(num_experts=E, top_k=top_k, num_shared_experts=shared, d_expert=F,
                  normalize_top_k=normalize, balance_loss_weight=0.3)
  model, params, x = init_moe(cfg)
  assert set(params) == {"router", "gate", "up", "down"} | (
      {"shared_gate", "shared_up", "shared_down"} if shared else set())
  cot = jax.random.normal(jax.random.key(7), x.shape)
  chosen = top_k_choices(params, x, top_k)
  load = np.bincount(chosen.ravel(), minlength=E) / chosen.size

  def objective(p, xx):
    y, state = model.apply({"params": p}, xx, mutable=["losses"])
    return jnp.sum(y * cot) + sum(jax.tree.leaves(state["losses"]))

  def reference(p, xx):
    # The balance term's gradient reaches the router only through P_e (f_e is a count).
    probs = jax.nn.softmax(xx.reshape(-1, D) @ p["router"])
    balance = E * jnp.sum(load * probs.mean(0))
    # vmap runs the same per-token function; differentiating a Python loop op by op is slow.
    y = jax.vmap(token_reference, (None, 0, 0, None))(p, xx.reshape(-1, D), chosen, cfg)
    return jnp.sum(y.reshape(xx.shape) * cot) + 0.3 * balance

  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(model.apply({"params": params}, x), moe_reference(params, x, cfg),
                               rtol=1e-5, atol=1e-5)
    got = jax.grad(objective, argnums=(0, 1))(params, x)
    want = jax.grad(reference, argnums=(0, 1))(params, x)
  for name in params:
    assert float(jnp.abs(want[0][name]).max()) > 0, name  # every parameter is exercised
    np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-4, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_sown_losses_and_intermediates():
  cfg = MoEConfig(num_experts=E, top_k=2, num_shared_experts=1, balance_loss_weight=0.25)
  model, params, x = init_moe(cfg, seed=3)
  with jax.default_matmul_precision("highest"):
    y, state = model.apply({"params": params}, x, mutable=["losses", "intermediates"])
    want = reference_balance(params, x, cfg)
    (weighted,) = state["losses"]["moe_balance"]
    np.testing.assert_allclose(weighted, 0.25 * want, rtol=1e-5)
    (unweighted,) = state["intermediates"]["moe_balance"]
    np.testing.assert_allclose(unweighted, want, rtol=1e-5)
    (load,) = state["intermediates"]["moe_load"]
    chosen = route(x.reshape(-1, D), params["router"], 2).experts
    np.testing.assert_allclose(load, np.bincount(np.ravel(chosen), minlength=E) / chosen.size)

    # Sowing changes nothing else; with only "losses" mutable no intermediates come back.
    np.testing.assert_allclose(model.apply({"params": params}, x), y, rtol=1e-6)
    _, only_losses = model.apply({"params": params}, x, mutable=["losses"])
    assert set(only_losses) == {"losses"}

    # A token mask restricts the loss to the kept tokens (here batch row 0).
    mask = jnp.array([[1.0] * T, [0.0] * T])
    _, masked = model.apply({"params": params}, x, mask, mutable=["losses"])
    np.testing.assert_allclose(masked["losses"]["moe_balance"][0],
                               0.25 * reference_balance(params, x[:1], cfg), rtol=1e-5)


def test_jit_matches_eager():
  cfg = MoEConfig(num_experts=E, top_k=2, num_shared_experts=1, d_expert=F)
  model, params, x = init_moe(cfg, seed=5)
  with jax.default_matmul_precision("highest"):
    eager = model.apply({"params": params}, x)
    jitted = jax.jit(model.apply)({"params": params}, x)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grad))


def test_bfloat16_compute_runs():
  cfg = MoEConfig(num_experts=E, top_k=2, num_shared_experts=1)
  model = MoEFFN(d_model=D, d_ff=F, config=cfg, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
  # Abstract evaluation suffices to check the dtypes ragged_dot and the einsums produce.
  variables = jax.eval_shape(model.init, jax.random.key(1), x)
  y, state = jax.eval_shape(lambda v, xx: model.apply(v, xx, mutable=["losses"]), variables, x)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  assert state["losses"]["moe_balance"][0].dtype == jnp.float32


def test_upcycle_scale():
  np.testing.assert_allclose(upcycle_scale(MoEConfig()), (1 + 1 / 16) ** (-1 / 3), rtol=1e-12)
  np.testing.assert_allclose(upcycle_scale(MoEConfig(num_experts=4, top_k=2,
                                                     num_shared_experts=0)), 2 ** (1 / 3))
  np.testing.assert_allclose(upcycle_scale(MoEConfig(num_experts=4, top_k=2,
                                                     normalize_top_k=True)), 2 ** (-1 / 3))


@pytest.mark.parametrize("top_k,shared,normalize", [(1, 1, False), (2, 0, False),
                                                    (2, 2, False), (2, 1, True)])
def test_upcycled_params_and_output(top_k, shared, normalize):
  cfg = MoEConfig(num_experts=E, top_k=top_k, num_shared_experts=shared,
                  normalize_top_k=normalize)
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  dense_vars = SwiGLU(d_model=D, d_ff=F).init(jax.random.key(1), x)  # boxed values
  dense = nn.meta.unbox(dense_vars["params"])
  moe = upcycle_params(dense_vars["params"], cfg)

  model = MoEFFN(d_model=D, d_ff=F, config=cfg)
  assert jax.tree.map(jnp.shape, moe) == param_shapes(model, x)

  alpha = ((shared + (1.0 if normalize else top_k / E)) ** (-1 / 3))
  np.testing.assert_array_equal(moe["router"], np.zeros((D, E)))
  for name in ("gate", "up", "down"):
    for e in range(E):
      np.testing.assert_allclose(moe[name][e], alpha * dense[name], rtol=1e-6)
    for s in range(shared):
      np.testing.assert_allclose(moe["shared_" + name][s], alpha * dense[name], rtol=1e-6)

  with jax.default_matmul_precision("highest"):
    got = model.apply({"params": moe}, x)
    scaled = swiglu(x, *(alpha * dense[n] for n in ("gate", "up", "down")))
    mass = shared + (1.0 if normalize else top_k / E)
    np.testing.assert_allclose(got, mass * scaled, rtol=1e-5, atol=1e-6)
    # silu is not homogeneous: the upcycled block is not the dense FFN itself.
    assert float(jnp.abs(got - SwiGLU(d_model=D, d_ff=F).apply(dense_vars, x)).max()) > 1e-3


def test_upcycle_random_router_and_errors():
  dense = {"gate": jnp.ones((D, F)), "up": jnp.ones((D, F)), "down": jnp.ones((F, D))}
  cfg = MoEConfig(num_experts=E)
  router = upcycle_params(dense, cfg, rng=jax.random.key(0))["router"]
  assert router.shape == (D, E) and 0 < float(jnp.std(router)) < 0.05
  assert "shared_gate" not in upcycle_params(dense, MoEConfig(num_experts=E,
                                                              num_shared_experts=0))
  with pytest.raises(ValueError, match=r"MoEConfig.d_expert=7 must be None or the dense"):
    upcycle_params(dense, MoEConfig(num_experts=E, d_expert=7))
  with pytest.raises(ValueError, match=r"lacks \['down'\]"):
    upcycle_params({"gate": dense["gate"], "up": dense["up"]}, cfg)
  with pytest.raises(ValueError, match="not a SwiGLU's"):
    upcycle_params({**dense, "down": jnp.ones((D, F))}, cfg)
