"""Tests for lctx.data.tokenizers."""

import sys

import numpy as np
import pytest

from lctx.data import tokenizers
from lctx.data.tokenizers import ByteTokenizer, make_tokenizer

_TEXT = "Grüße, 世界! naïve café — 🙂\n\ttabs"


def test_byte_round_trip_non_ascii():
  tok = make_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer)
  assert isinstance(tok, tokenizers.Tokenizer)
  assert tok.vocab_size == 256
  ids = tok.encode(_TEXT)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert len(ids) == len(_TEXT.encode("utf-8")) > len(_TEXT)
  assert ids.min() >= 0 and ids.max() < 256
  assert tok.decode(ids) == _TEXT
  assert tok.decode(ids.tolist()) == _TEXT
  assert tok.encode("").shape == (0,)


def test_byte_decode_tolerates_bad_ids():
  tok = ByteTokenizer()
  # A cut multi-byte character and ids outside the byte range decode to U+FFFD.
  cut = tok.encode("é")[:1]
  assert tok.decode(cut) == "\ufffd"
  assert tok.decode([104, 105, 300, -1, 33]) == "hi\ufffd\ufffd!"
  assert tok.decode(np.array([[104], [105]])) == "hi"


def test_unknown_tokenizer_name():
  with pytest.raises(ValueError, match=r"DataConfig\.tokenizer: unknown tokenizer 'gpt2'"):
    make_tokenizer("gpt2")


@pytest.mark.parametrize("name", ["missing.model", "missing/tokenizer.json"])
def test_missing_tokenizer_file(tmp_path, name):
  with pytest.raises(ValueError, match=r"DataConfig\.tokenizer: no such file"):
    make_tokenizer(str(tmp_path / name))


@pytest.mark.parametrize(
    "module, filename", [("sentencepiece", "sp.model"), ("tokenizers", "tokenizer.json")]
)
def test_missing_backend_package(tmp_path, monkeypatch, module, filename):
  path = tmp_path / filename
  path.write_text("{}")
  # None in sys.modules makes `import module` fail as if it were not installed.
  monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(ValueError, match=rf"needs the '{module}' package \(pip install {module}\)"):
    make_tokenizer(str(path))


def _training_lines():
  words = ["long", "context", "model", "grüße", "token", "packing", "data"]
  rng = np.random.default_rng(0)
  return [" ".join(rng.choice(words, size=12)) for _ in range(200)]


def test_sentencepiece_round_trip(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_training_lines()),
      model_prefix=str(tmp_path / "sp"),
      vocab_size=40,
      model_type="bpe",
      minloglevel=2,
  )
  tok = make_tokenizer(str(tmp_path / "sp.model"))
  assert isinstance(tok, tokenizers.SentencePieceTokenizer)
  assert tok.vocab_size == 40
  ids = tok.encode("long context packing")
  assert ids.dtype == np.int32 and len(ids) > 0
  assert tok.decode(ids) == "long context packing"


def test_hf_tokenizer_round_trip(tmp_path):
  hf = pytest.importorskip("tokenizers")
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
      vocab_size=300,
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(_training_lines(), trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  loaded = make_tokenizer(str(path))
  assert isinstance(loaded, tokenizers.HFTokenizer)
  assert loaded.vocab_size == tok.get_vocab_size()
  ids = loaded.encode(_TEXT)
  assert ids.dtype == np.int32
  assert loaded.decode(ids) == _TEXT
