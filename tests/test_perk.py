"""PERK (lctx/ttt/perk.py): the meta-gradient against finite differences in float64, truncation
against an explicitly stop-gradient'ed unroll, positive rates, determinism, and the inner loop on
a DecoderLM."""

import dataclasses
import functools
import logging
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from layers.attention import AttentionConfig
from layers.linear_mixers import GLAConfig
from lctx.config import ModelConfig
from lctx.model import DecoderLM, abstract_params, init_params
from lctx.ttt import perk

V, E, F = 13, 6, 10


class TinyLM:
  """A causal LM in float64 with the interface PERK uses (DecoderLM computes in float32):
  embedding, a q-like projection mixed by a causal mean within segments, a tanh FFN, tied head."""

  config = types.SimpleNamespace(d_model=E)

  def apply(self, variables, tokens, segment_ids_bt=None):
    p = variables["params"]
    b, t = tokens.shape
    x = p["embedding"][tokens]
    q = jnp.einsum("bte,ehd->bthd", x, p["layer_0"]["mixer"]["q"]).reshape(b, t, E)
    seg = jnp.ones((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    y = jnp.einsum("bts,bse->bte", mask, jnp.tanh(q)) / mask.sum(-1, keepdims=True)
    h = x + y
    h = h + jnp.tanh(h @ p["layer_0"]["mlp"]["up"]) @ p["layer_0"]["mlp"]["down"]
    return h @ p["embedding"].T


def _tiny(key):
  k = jax.random.split(key, 4)
  params = {"embedding": jax.random.normal(k[0], (V, E)),
            "layer_0": {"mixer": {"q": jax.random.normal(k[1], (E, 2, E // 2)) * 0.5},
                        "mlp": {"up": jax.random.normal(k[2], (E, F)) * 0.4,
                                "down": jax.random.normal(k[3], (F, E)) * 0.4}}}
  return TinyLM(), params


def _batch(key, b=2, t=11, length=7):
  k = jax.random.split(key, 3)
  weights = jnp.zeros((b, length)).at[:, 4:].set(1.0)
  return {"context": jax.random.randint(k[0], (b, t), 0, V),
          "context_mask": jnp.arange(t)[None] < jnp.array([[t], [t - 3]]),
          "tokens": jax.random.randint(k[1], (b, length), 0, V),
          "targets": jax.random.randint(k[2], (b, length), 0, V), "weights": weights}


def _meta(params, cfg, key):
  """Meta-parameters with every path active (B and the MLP's last layer moved off zero)."""
  meta = perk.init_meta(TinyLM.config, jax.eval_shape(lambda: params), cfg, key)
  noise = lambda x, i: x + 0.3 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
  meta["lora"] = {k: {"a": ab["a"], "b": noise(ab["b"], i)}
                  for i, (k, ab) in enumerate(meta["lora"].items())}
  meta["weighting"]["w2"] = noise(meta["weighting"]["w2"], 99)
  return meta


@functools.partial(jax.jit, static_argnums=(1, 4))
def _loss(meta, model, params, batch, cfg):
  return perk.meta_loss(meta, model, params, batch, cfg)[0]


_grad = jax.jit(jax.grad(_loss), static_argnums=(1, 4))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_meta_gradient_equals_finite_differences_in_float64(optimizer):
  with jax.enable_x64(True):
    cfg = perk.PERKConfig(rank=2, targets=("q", "down"), inner_steps=3, second_order_steps=3,
                          segment_len=4, init_lr=0.05, inner_optimizer=optimizer,
                          weight_hidden=4)
    model, params = _tiny(jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    meta = jax.tree.map(lambda x: x.astype(jnp.float64), _meta(params, cfg, jax.random.key(1)))
    batch = _batch(jax.random.key(2))
    grads = _grad(meta, model, params, batch, cfg)
    leaves, tree = jax.tree.flatten(meta)
    direction = jax.tree.unflatten(tree, [
        jax.random.normal(jax.random.key(10 + i), x.shape, jnp.float64)
        for i, x in enumerate(leaves)])
    eps = 1e-6  # central differences: the error falls as eps^2 (1e-5 leaves ~2e-5 here)
    shifted = lambda s: jax.tree.map(lambda m, d: m + s * eps * d, meta, direction)
    fd = (_loss(shifted(1.0), model, params, batch, cfg) -
          _loss(shifted(-1.0), model, params, batch, cfg)) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                  jax.tree.leaves(direction)))
    assert abs(float(analytic)) > 1e-3
    np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6)
    # Every kind of meta-parameter gets a gradient: the LoRA init, the rates, the weighting.
    for part in ("lora", "rates", "weighting"):
      assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads[part])) > 0, part


def _explicit_truncated_loss(meta, model, params, batch, cfg):
  """The truncated unroll written out: the first K - m steps take their gradient at
  stop_gradient'ed LoRA factors and token weights, and that gradient is a constant."""
  adam = optax.scale_by_adam(eps_root=1e-12)

  def one(ex):
    seg, mask = perk.segments(ex["context"], ex["context_mask"], cfg.segment_len)
    base_ce, _ = perk.segment_ce(model, params, seg, mask)
    weights = perk.token_weights(meta["weighting"], params["embedding"], seg[:, 1:], base_ce)
    lora, state = meta["lora"], adam.init(meta["lora"])
    for k in range(cfg.inner_steps):
      loss = lambda l, w: perk.inner_loss(model, params, l, w, seg, mask, cfg)
      if k < cfg.inner_steps - cfg.second_order_steps:
        g = jax.lax.stop_gradient(jax.grad(loss)(jax.lax.stop_gradient(lora),
                                                 jax.lax.stop_gradient(weights)))
      else:
        g = jax.grad(loss)(lora, weights)
      d, state = adam.update(g, state)
      lora = jax.tree.map(lambda p, r, x: p - (jax.nn.softplus(r[k]) + perk.MIN_RATE) * x,
                          lora, meta["rates"], d)
    return perk.answer_nll(model, perk.apply_lora(params, lora, cfg), ex["tokens"],
                           ex["targets"], ex["weights"])

  return jnp.mean(jax.vmap(one)(batch))


def test_truncation_equals_an_explicitly_stop_gradiented_unroll():
  with jax.enable_x64(True):
    cfg = perk.PERKConfig(rank=2, targets=("q", "up"), inner_steps=3, second_order_steps=1,
                          segment_len=4, init_lr=0.05, weight_hidden=4)
    model, params = _tiny(jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    meta = jax.tree.map(lambda x: x.astype(jnp.float64), _meta(params, cfg, jax.random.key(1)))
    batch = _batch(jax.random.key(2))
    got = _grad(meta, model, params, batch, cfg)
    want = jax.jit(jax.grad(_explicit_truncated_loss), static_argnums=(1, 4))(
        meta, model, params, batch, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), got,
                 want)
    full = _grad(meta, model, params, batch,
                           dataclasses.replace(cfg, second_order_steps=3))
    assert not np.allclose(np.asarray(full["weighting"]["w2"]),
                           np.asarray(got["weighting"]["w2"]))


def test_rates_stay_positive_and_the_seed_decides_everything():
  cfg = perk.PERKConfig(rank=2, targets=("q",), segment_len=4, weight_hidden=4)
  model, params = _tiny(jax.random.key(0))
  abstract = jax.eval_shape(lambda: params)
  meta = perk.init_meta(TinyLM.config, abstract, cfg)
  np.testing.assert_allclose(perk.rates(meta), cfg.init_lr, rtol=1e-5)
  meta["rates"] = jax.tree.map(lambda r: jnp.full_like(r, -500.0), meta["rates"])
  assert bool(jnp.all(perk.rates(meta) > 0))
  again = perk.init_meta(TinyLM.config, abstract, cfg)
  same = perk.init_meta(TinyLM.config, abstract, cfg)
  jax.tree.map(np.testing.assert_array_equal, again, same)
  other = perk.init_meta(TinyLM.config, abstract, dataclasses.replace(cfg, seed=1))
  assert not np.array_equal(other["lora"]["layer_0.mixer.q"]["a"],
                            again["lora"]["layer_0.mixer.q"]["a"])
  batch = _batch(jax.random.key(2))
  assert float(_loss(again, model, params, batch, cfg)) == float(_loss(same, model, params,
                                                                       batch, cfg))


def test_the_inner_loop_adapts_a_decoder(caplog):
  cfg = ModelConfig(vocab_size=29, d_model=16, num_layers=2, d_ff=24, mixers=("attention", "gla"),
                    mixer_options={"attention": AttentionConfig(num_heads=2, head_dim=4),
                                   "gla": GLAConfig(num_heads=2, chunk_size=16)})
  pk = perk.PERKConfig(rank=4, segment_len=8, init_lr=3e-2, inner_steps=2,
                       targets=("q", "v", "o", "down"))
  assert perk.differentiable_model(DecoderLM(cfg), dataclasses.replace(
      pk, second_order_steps=0)).config == cfg  # first order: the model's own kernels
  with caplog.at_level(logging.INFO, logger="lctx"):
    perk.differentiable_model(DecoderLM(cfg), pk)
  assert "attention impl='auto' -> 'reference'" in caplog.text
  assert "gla impl='auto' -> 'xla'" in caplog.text
  # The second-order meta-gradient through a decoder (one layer: its compile is the cost).
  cfg = dataclasses.replace(cfg, num_layers=1, mixers=("attention",))
  model = perk.differentiable_model(DecoderLM(cfg), pk)
  params = nn.unbox(init_params(model, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  meta = perk.init_meta(cfg, abstract_params(cfg), pk)
  assert sorted(meta["lora"]) == [f"layer_0.{m}" for m in ("mixer.o", "mixer.q", "mixer.v",
                                                          "mlp.down")]
  assert meta["lora"]["layer_0.mixer.o"]["a"].shape == (8, 4)  # o [h, d, e]: fan-in h x d = 8
  # The adapter starts as the identity: B = 0, so the merged weights are the base's.
  jax.tree.map(np.testing.assert_array_equal, perk.apply_lora(params, meta["lora"], pk), params)
  batch = {"context": jax.random.randint(jax.random.key(1), (2, 24), 0, 29),
           "context_mask": jnp.ones((2, 24), bool),
           "tokens": jax.random.randint(jax.random.key(2), (2, 10), 0, 29),
           "targets": jax.random.randint(jax.random.key(3), (2, 10), 0, 29),
           "weights": jnp.zeros((2, 10)).at[:, 6:].set(1.0)}
  step = jax.jit(jax.value_and_grad(perk.meta_loss, has_aux=True), static_argnums=(1, 4))
  (loss, inner), grads = step(meta, model, params, batch, pk)
  inner = np.asarray(inner)
  assert np.isfinite(float(loss)) and inner[-1] < inner[0]
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_settings_perk_refuses_are_named():
  with pytest.raises(ValueError, match=r"PERKConfig.second_order_steps=5 must lie in \[0, "):
    perk.PERKConfig(second_order_steps=5)
  with pytest.raises(ValueError, match=r"PERKConfig.inner_steps=0 must be >= 1"):
    perk.PERKConfig(inner_steps=0)
  with pytest.raises(ValueError, match=r"PERKConfig.inner_optimizer='adamw' must be one of"):
    perk.PERKConfig(inner_optimizer="adamw")
  cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=1, d_ff=48)
  with pytest.raises(ValueError, match=r"PERKConfig.targets: 'wq' names no projection of the "
                                       r"model; its projections are \['down', 'gate', 'k', 'o'"):
    perk.target_paths(abstract_params(cfg), perk.PERKConfig(targets=("q", "wq")))
