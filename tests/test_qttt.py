"""qTTT (lctx/ttt/qttt.py) and the recorded context its queries read (layers/context_cache.py):
queries of the record against full forward passes, what adaptation may change, the one
prefill, the answer path, the compute accounting and the refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from layers.attention import AttentionConfig, SlidingWindowConfig
from layers.linear_mixers import GLAConfig, LightningConfig
from lctx import flops
from lctx.config import ModelConfig
from lctx.generate import generate
from lctx.model import DecoderLM, init_params
from lctx.ttt import qttt
from sharding.sequence import SequenceParallelConfig

OPTIONS = {"attention": AttentionConfig(num_heads=4, num_kv_heads=2),
           "swa": SlidingWindowConfig(num_heads=2, window=7),
           "gla": GLAConfig(num_heads=2, chunk_size=16),
           "lightning": LightningConfig(num_heads=2, chunk_size=16)}


def _model(mixers, **kw):
  cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=len(mixers), d_ff=48,
                    mixers=tuple(mixers), mixer_options={k: v for k, v in OPTIONS.items()
                                                         if any(k in m for m in mixers)}, **kw)
  model = DecoderLM(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 45), 0, cfg.vocab_size)
  return model, nn.unbox(init_params(model, jax.random.key(0), tokens)), tokens


@pytest.fixture(scope="module")
def hybrid():
  return _model(("attention", "gla", "lightning", "gla+swa"))


def _span_nll(logits, tokens, start, span):
  logp = jax.nn.log_softmax(logits[:, start:start + span], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, start + 1:start + span + 1, None], -1))


def test_queries_of_the_record_equal_the_full_forward(hybrid):
  # Every mixer kind (swa in the parallel pair), odd length, spans at the start, the middle and the end (one length, one
  # compile), GQA, a window shorter than the spans, chunk 16 not dividing them.
  model, params, tokens = hybrid
  full, variables = model.apply({"params": params}, tokens, mutable=["context_cache"])
  record = variables["context_cache"]
  for start, span in [(0, 9), (17, 9), (36, 9)]:
    positions = jnp.broadcast_to(jnp.arange(start, start + span), (2, span))
    out = model.apply({"params": params, "context_cache": record},
                      tokens[:, start:start + span], positions)
    np.testing.assert_allclose(out, full[:, start:start + span], atol=2e-5, rtol=1e-5)
  # The decoding prefill records the same context as a plain forward.
  _, _, decoded = qttt.prefill(model, params, tokens, room=3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5),
               decoded, record)
  # One span step's loss is the full model's loss on that span.
  starts = jnp.array([13, 21])
  loss = qttt.span_loss(model, params, record, tokens, starts, 9)
  expected = (_span_nll(full[:1], tokens[:1], 13, 9) + _span_nll(full[1:], tokens[1:], 21, 9)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_a_one_layer_span_loss_equals_the_recomputed_model_at_any_w_q():
  # With one layer the keys and values do not depend on W_Q, so the record stays exact after
  # W_Q moves: the span loss over the record equals the full model recomputed with the new W_Q.
  model, params, tokens = _model(("attention",))
  _, _, record = qttt.prefill(model, params, tokens, room=1)
  moved = jax.tree.map(lambda x: x, params)
  moved["layer_0"]["mixer"]["q"] = params["layer_0"]["mixer"]["q"] * 1.7 + 0.1
  full = model.apply({"params": moved}, tokens)
  loss = qttt.span_loss(model, moved, record, tokens, jnp.array([4, 4]), 20)
  np.testing.assert_allclose(loss, _span_nll(full, tokens, 4, 20), rtol=1e-5)


def test_adaptation_changes_only_the_softmax_w_q_and_never_recomputes_the_context(hybrid):
  model, params, tokens = hybrid
  ttt = qttt.TTTConfig(steps=3, span=8, learning_rate=0.5, optimizer="adam")
  paths = tuple(qttt.trained_paths(model.config, ttt))
  assert paths == (("layer_0", "mixer", "q"), ("layer_3", "mixer", "swa", "q"))
  _, _, record = qttt.prefill(model, params, tokens, room=1)
  adapted, losses = qttt.adapt(model, params, record, tokens, jax.random.key(3), ttt=ttt,
                               paths=paths)
  before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(adapted)
  assert before.keys() == after.keys()
  for path in before:
    same = np.array_equal(np.asarray(before[path]), np.asarray(after[path]))
    assert same == (path not in paths), path
  # Keys, values and gates come from the record: with their projections NaN the steps are
  # the same, bit for bit.
  poisoned = traverse_util.unflatten_dict({
      p: x * jnp.nan if p[-1] in ("k", "v", "gate_down", "gate_up") else x
      for p, x in before.items()})
  _, poisoned_losses = qttt.adapt(model, poisoned, record, tokens, jax.random.key(3), ttt=ttt,
                                  paths=paths)
  np.testing.assert_array_equal(np.asarray(poisoned_losses), np.asarray(losses))
  # With update_linear_q the linear layers' q projections train too.
  linear = qttt.trained_paths(model.config, qttt.TTTConfig(update_linear_q=True))
  assert ("layer_1", "mixer", "q") in linear and ("layer_3", "mixer", "gla", "q") in linear


def test_one_prefill_serves_the_steps_and_the_answer():
  model, params, tokens = _model(("attention", "gla"))
  prompt = tokens[:1, :40]
  # A step too small to move W_Q: the answer is plain greedy decoding's, tokens and logits,
  # so the answer path continues the prefill's cache exactly.
  tiny = qttt.TTTConfig(steps=2, span=8, learning_rate=1e-12)
  expected, expected_logits = generate(model, params, prompt, jax.random.key(0),
                                       max_new_tokens=5, return_logits=True)
  answer = expected[:, :4]
  before = qttt.PREFILLS[0]
  result = qttt.run(model, params, prompt, tiny, max_new_tokens=5, answer_bn=answer)
  assert qttt.PREFILLS[0] - before == 1
  np.testing.assert_array_equal(np.asarray(result.tokens), np.asarray(expected))
  np.testing.assert_allclose(result.answer_logits, expected_logits[:, :4], atol=2e-5, rtol=1e-5)
  # A real adaptation lowers the span loss and still prefills once.
  ttt = qttt.TTTConfig(steps=12, span=16, learning_rate=0.3, optimizer="adam")
  before = qttt.PREFILLS[0]
  result = qttt.run(model, params, prompt, ttt, max_new_tokens=5, answer_bn=answer)
  assert qttt.PREFILLS[0] - before == 1
  losses = np.asarray(result.losses)
  assert losses.shape == (12,) and losses[-4:].mean() < losses[:4].mean()
  # Its answer logits are the adapted model's: the first from the last prompt token's query of
  # the record, the rest from decoding the answer after the prefill's cache.
  _, cache, record = qttt.prefill(model, params, prompt, room=5)
  first = qttt.last_logits(model, result.params, record, prompt)
  np.testing.assert_allclose(result.answer_logits[:, 0], first, atol=1e-6)
  assert not np.allclose(np.asarray(first), np.asarray(expected_logits[:, 0]), atol=1e-3)


def test_compute_accounting():
  model, params, _ = _model(("attention",))
  cfg, abstract = model.config, jax.eval_shape(lambda: params)
  e, f, v, h, kh, d = 32, 48, 61, 4, 2, 8
  matmul = e * (h + 2 * kh) * d + h * d * e + 3 * e * f + e * v
  assert flops.matmul_params(cfg, abstract) == matmul
  t = 100
  assert flops.forward_flops(cfg, abstract, t) == 2 * matmul * t + 4 * h * d * t * (t + 1) / 2
  ttt = qttt.TTTConfig(steps=4, span=16)
  c = qttt.compute(cfg, abstract, ttt, t)
  start = (t - 1 - 16) // 2
  span_forward = (2 * (matmul - 2 * e * kh * d) * 16 +
                  4 * h * d * sum(start + i + 1 for i in range(16)))
  assert c.step_flops == 2 * span_forward + 2 * 16 * e * h * d
  assert c.ttt_flops == 4 * c.step_flops
  assert c.prefill_flops == flops.forward_flops(cfg, abstract, t)
  assert c.decode_token_flops == 2 * matmul + 4 * h * d * (t + 1)
  assert c.thinking_tokens == round(c.ttt_flops / c.decode_token_flops)
  # The paper's rule of thumb, 2 N k, holds where the projections dominate.
  assert 0.5 < c.thinking_tokens / (2 * 4 * 16) < 2


def test_thinking_spends_the_same_compute_on_greedy_tokens():
  model, params, tokens = _model(("attention",))
  ttt = qttt.TTTConfig(method="thinking", steps=2, span=8)
  result = qttt.run(model, params, tokens[:1, :30], ttt, max_new_tokens=3)
  assert result.losses is None
  assert result.tokens.shape == (1, result.compute.thinking_tokens + 3)


def test_settings_qttt_refuses_are_named():
  with pytest.raises(ValueError, match=r"TTTConfig.steps=0 must be >= 1"):
    qttt.TTTConfig(steps=0)
  with pytest.raises(ValueError, match=r"TTTConfig.span=0 must be >= 1"):
    qttt.TTTConfig(span=0)
  with pytest.raises(ValueError, match=r"TTTConfig.method='think' must be one of"):
    qttt.TTTConfig(method="think")
  linear = ModelConfig(vocab_size=61, d_model=32, num_layers=2, mixers=("gla",))
  with pytest.raises(ValueError, match=r"TTTConfig.update_linear_q=False: .* has no softmax"):
    qttt.trained_paths(linear, qttt.TTTConfig())
  assert qttt.trained_paths(linear, qttt.TTTConfig(update_linear_q=True))
  delta = ModelConfig(vocab_size=61, d_model=32, num_layers=2,
                      mixers=("attention", "gated_deltanet"))
  with pytest.raises(ValueError, match=r"layer 1's mixer 'gated_deltanet' keeps no record"):
    qttt.trained_paths(delta, qttt.TTTConfig())
  sp = ModelConfig(vocab_size=61, d_model=32, num_layers=1,
                   sequence_parallel=SequenceParallelConfig(method="ring"))
  with pytest.raises(ValueError, match=r"SequenceParallelConfig.method='none'"):
    qttt.trained_paths(sp, qttt.TTTConfig())
  with pytest.raises(ValueError, match=r"TTTConfig.span=128 is longer than the prompt \(100"):
    qttt.check_context(qttt.TTTConfig(), 100)
