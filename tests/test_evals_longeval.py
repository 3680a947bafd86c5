"""The long-context evaluation loop (lctx/evals/longeval.py): its cells, its scores against a
continuation that is right or wrong by construction, the answer log-likelihood against a direct
computation on a real (random) model, and its config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lctx.config import ModelConfig
from lctx.data.tokenizers import ByteTokenizer
from lctx.evals import longeval
from lctx.evals.longeval import LongEvalConfig
from lctx.model import DecoderLM, init_params

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tiny():
  model = DecoderLM(ModelConfig(d_model=32, num_layers=1, d_ff=64))
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return model, params


def test_scores_follow_the_continuation(monkeypatch, tiny):
  model, params = tiny
  cfg = LongEvalConfig(tasks=("passkey", "niah_single", "selective_copy"), lengths=(300,),
                       depths=(0.0, 1.0), examples=2, max_new_tokens=40)
  answers = {}
  for key, ex in longeval.examples(cfg, TOK):
    answers[bytes(ex.prompt)] = ex

  def right(model, params, prompt, rng, *, max_new_tokens):
    ex = answers[bytes(np.asarray(prompt[0]))]
    if ex.answer_texts is None:
      out = ex.answers[0]
    else:  # every reference, in order, then filler
      out = TOK.encode(", ".join(ex.answer_texts) + ".")
    return jnp.asarray(np.resize(np.asarray(out, np.int32), max_new_tokens)[None])

  monkeypatch.setattr(longeval, "generate", right)
  rows = longeval.evaluate(model, params, TOK, cfg, train_len=256)
  assert len(rows) == 6 and all(r["examples"] == 2 for r in rows)
  assert all(r["score"] == 1.0 for r in rows), rows
  assert all(r["beyond_training"] for r in rows)
  # The first answer leads the continuation only where the answer has no leading space.
  for r in rows:
    assert r["exact_match"] == (1.0 if r["task"] == "selective_copy" else 0.0), r

  def wrong(model, params, prompt, rng, *, max_new_tokens):
    return jnp.full((1, max_new_tokens), ord("x"), jnp.int32)

  monkeypatch.setattr(longeval, "generate", wrong)
  rows = longeval.evaluate(model, params, TOK, cfg)
  assert all(r["score"] == 0.0 and r["exact_match"] == 0.0 for r in rows)
  assert not any(r["beyond_training"] for r in rows)


def test_answer_logprob_and_greedy_run_on_a_model(tiny):
  model, params = tiny
  cfg = LongEvalConfig(tasks=("passkey",), lengths=(160,), depths=(0.5,), max_new_tokens=8)
  (row,) = longeval.evaluate(model, params, TOK, cfg, train_len=256)
  (_, ex), = longeval.examples(cfg, TOK)
  tokens = np.concatenate([ex.prompt, ex.answers[0]])
  logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(tokens[None]))[0], -1)
  n = len(ex.prompt)
  want = sum(float(logp[n - 1 + i, t]) for i, t in enumerate(ex.answers[0]))
  assert row["answer_logprob"] == pytest.approx(want, rel=1e-5)
  assert row["score"] in (0.0, 1.0) and not row["beyond_training"]


def test_config_errors_name_the_setting():
  with pytest.raises(ValueError, match=r"LongEvalConfig.tasks: 'needle' is not one of"):
    LongEvalConfig(tasks=("needle",))
  with pytest.raises(ValueError, match=r"LongEvalConfig.depths: depth=2.0 must lie in"):
    LongEvalConfig(depths=(2.0,))
  with pytest.raises(ValueError, match=r"LongEvalConfig.lengths: -3 must be positive"):
    LongEvalConfig(lengths=(-3,))
  # A length a task cannot fit in is reported while the examples are made (before compiling).
  with pytest.raises(ValueError, match=r"task 'niah_multikey': length=256 is below"):
    longeval.examples(LongEvalConfig(tasks=("niah_multikey",), lengths=(256,)), TOK)
