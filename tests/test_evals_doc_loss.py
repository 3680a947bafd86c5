"""The whole-document loss curve (lctx/evals/doc_loss.py): its buckets, the documents it picks,
its per-position losses against a direct computation, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lctx.config import ModelConfig
from lctx.data import DataConfig
from lctx.data.tokenizers import ByteTokenizer
from lctx.evals import doc_loss
from lctx.evals.doc_loss import DocLossConfig
from lctx.model import DecoderLM, init_params

TOK = ByteTokenizer()


def test_bucket_edges_double_from_the_first():
  assert doc_loss.bucket_edges(DocLossConfig(length=1000, first_bucket=64)) == [
      0, 64, 128, 256, 512, 1000]
  assert doc_loss.bucket_edges(DocLossConfig(length=64, first_bucket=64)) == [0, 64]


def test_bucket_rows_average_documents_and_positions():
  losses = np.array([[1.0, 1.0, 2.0, 4.0, 6.0, 6.0], [3.0, 3.0, 2.0, 0.0, 2.0, 2.0]])
  rows = doc_loss.bucket_rows(losses, DocLossConfig(length=6, first_bucket=2), train_len=4)
  assert [(r["start"], r["end"]) for r in rows] == [(0, 2), (2, 4), (4, 6)]
  assert [r["loss"] for r in rows] == [2.0, 2.0, 4.0]
  assert [r["beyond_training"] for r in rows] == [False, False, True]
  assert rows[0]["ppl"] == pytest.approx(np.exp(2.0)) and rows[0]["documents"] == 2


def test_documents_are_the_long_held_out_ones_from_their_start():
  data = DataConfig(seq_len=32, batch_size=2)
  docs = doc_loss.documents(DocLossConfig(length=500, max_documents=1), data, TOK)
  assert docs.shape == (1, 501) and docs.dtype == np.int32
  from lctx.data import sources
  held_out = [np.asarray(TOK.encode(d), np.int32) for d in sources.eval_documents(data)]
  starts = [d[:501] for d in held_out if len(d) > 500][:1]
  np.testing.assert_array_equal(docs, np.stack(starts))


def test_errors_name_the_setting():
  data = DataConfig(seq_len=32, batch_size=2)
  with pytest.raises(ValueError, match=r"DocLossConfig.length=1000000000: none of the \d+ "
                     r"held-out documents .* \(the longest has \d+\)"):
    doc_loss.documents(DocLossConfig(length=10**9, first_bucket=64), data, TOK)
  task = DataConfig(source="task:passkey", seq_len=256, batch_size=2)
  with pytest.raises(ValueError, match=r"DataConfig.source='task:passkey' is a task"):
    doc_loss.documents(DocLossConfig(), task, TOK)
  with pytest.raises(ValueError, match=r"DocLossConfig.first_bucket=128 must be at most "
                     r"DocLossConfig.length=64"):
    DocLossConfig(length=64, first_bucket=128)
  with pytest.raises(ValueError, match=r"DocLossConfig.max_documents=0 must be >= 1"):
    DocLossConfig(max_documents=0)


def test_position_losses_count_positions_from_the_document_start():
  model = DecoderLM(ModelConfig(d_model=32, num_layers=1, d_ff=64))
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  doc = np.random.default_rng(0).integers(0, 256, (1, 41), dtype=np.int32)
  got = np.asarray(doc_loss.position_losses(model, params, jnp.asarray(doc)))
  logits = model.apply({"params": params}, jnp.asarray(doc[:, :-1]),
                       jnp.arange(40, dtype=jnp.int32)[None])
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))[0]
  np.testing.assert_allclose(got, -logp[np.arange(40), doc[0, 1:]], rtol=1e-5, atol=1e-5)
  # The same tokens read as a piece that restarts at position 0 halfway give other losses: the
  # curve is not what packed, restarting rows would measure.
  restart = np.concatenate([np.arange(20), np.arange(20)]).astype(np.int32)[None]
  logits = model.apply({"params": params}, jnp.asarray(doc[:, :-1]), jnp.asarray(restart))
  assert not np.allclose(np.asarray(logits)[0, 20:], np.asarray(
      model.apply({"params": params}, jnp.asarray(doc[:, :-1]),
                  jnp.arange(40, dtype=jnp.int32)[None]))[0, 20:], atol=1e-4)
  rows, losses = doc_loss.evaluate(model, params, doc, DocLossConfig(length=40, first_bucket=8))
  np.testing.assert_allclose(losses[0], got, rtol=1e-6)
  assert [(r["start"], r["end"]) for r in rows] == [(0, 8), (8, 16), (16, 32), (32, 40)]
  assert rows[-1]["loss"] == pytest.approx(float(np.mean(got[32:])), rel=1e-5)
