"""Data mixtures over named sources (DataConfig.source = "mixture", lctx.data.pipeline)."""

import json

import numpy as np
import pytest

from lctx.data import DataConfig, eval_batches, sources, train_iterator
from lctx.data.config import SourceConfig
from tests.test_data_pipeline import _check_structure

ROW = 64


def _write(tmp_path, name, docs):
  path = tmp_path / f"{name}.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  return str(path)


def _docs(n, letters, seed, min_len, max_len):
  rng = np.random.default_rng(seed)
  alphabet = np.array(list(letters))
  return ["<" + "".join(rng.choice(alphabet, size=int(rng.integers(min_len, max_len))))
          for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mixture")
  # Lower-case documents long enough to need cutting, upper-case ones that fit a row whole.
  return (_write(tmp, "lower", _docs(60, "abcdefgh", 0, 40, 300)),
          _write(tmp, "upper", _docs(60, "ABCDEFGH", 1, 5, 60)))


def _cfg(files, **kwargs):
  lower, upper = files
  mixture = (SourceConfig(name="lower@16", weight=1.0, source="jsonl", paths=(lower,),
                          seq_len=16),
             SourceConfig(name="upper", weight=3.0, source="jsonl", paths=(upper,),
                          packing="first_fit"))
  return DataConfig(source="mixture", mixture=kwargs.pop("mixture", mixture), seq_len=ROW,
                    batch_size=4, **kwargs)


def _rows(it, n_batches):
  out = []
  for _ in range(n_batches):
    batch = next(it)
    _check_structure(batch, ROW, 4)
    out.extend(zip(batch["tokens"], batch["segment_ids"], batch["positions"]))
  return out


def test_each_source_has_its_segment_length_packing_and_share(files):
  rows = _rows(train_iterator(_cfg(files), "byte"), 100)
  kinds = []
  for tokens, seg, pos in rows:
    text = bytes(tokens[seg > 0].astype(np.uint8))
    lower = any(c in text for c in b"abcdefgh")
    upper = any(c in text for c in b"ABCDEFGH")
    assert lower != upper, "every row comes from one source"
    kinds.append(upper)
    if lower:  # segments of at most 16 tokens, concatenated: never padded
      assert (seg > 0).all() and pos.max() <= 15
      sizes = np.bincount(seg)[1:]
      assert sizes.max() <= 16 and (sizes[1:-1] == 16).sum() > 0
    else:  # first fit: whole documents (each starts with '<'), the rest of the row padded
      for s in range(1, int(seg.max()) + 1):
        assert tokens[seg == s][0] == ord("<")
  assert abs(np.mean(kinds) - 0.75) < 0.07, np.mean(kinds)
  assert not all(row[1].all() for row, kind in zip(rows, kinds) if kind), "first fit pads"


def test_mixture_state_restores_exactly_after_json(files):
  cfg = _cfg(files)
  it = train_iterator(cfg, "byte")
  _rows(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  want = _rows(it, 5)
  again = train_iterator(cfg, "byte")
  again.set_state(state)
  got = _rows(again, 5)
  for w, g in zip(want, got):
    for a, b in zip(w, g):
      np.testing.assert_array_equal(a, b)


def test_eval_reads_every_distinct_source_once(files):
  lower, upper = files
  twice = (SourceConfig(name="a", source="jsonl", paths=(lower,), seq_len=16),
           SourceConfig(name="b", source="jsonl", paths=(lower,)),
           SourceConfig(name="c", source="jsonl", paths=(upper,)))
  cfg = _cfg(files, mixture=twice, eval_every_nth=10)
  docs = sources.eval_documents(cfg)
  lower_docs = [json.loads(line)["text"] for line in open(lower)]
  upper_docs = [json.loads(line)["text"] for line in open(upper)]
  assert list(docs) == lower_docs[::10] + upper_docs[::10]
  batch = eval_batches(cfg, "byte", 1)[0]
  assert bytes(batch["tokens"][0].astype(np.uint8)) == lower_docs[0].encode()[:ROW]


def test_bad_mixtures_are_refused_naming_the_setting(files):
  lower, _ = files
  src = SourceConfig(name="x", source="jsonl", paths=(lower,))
  with pytest.raises(ValueError, match="DataConfig.source='mixture' needs DataConfig.mixture"):
    DataConfig(source="mixture")
  with pytest.raises(ValueError, match="set DataConfig.source = 'mixture'"):
    DataConfig(mixture=(src,))
  with pytest.raises(ValueError, match="two sources are named 'x'"):
    DataConfig(source="mixture", mixture=(src, src))
  with pytest.raises(ValueError, match="seq_len=128 exceeds DataConfig.seq_len=64"):
    DataConfig(source="mixture", seq_len=64,
               mixture=(SourceConfig(name="y", source="jsonl", paths=(lower,), seq_len=128),))
  with pytest.raises(ValueError, match="SourceConfig 'z': packing='pad'"):
    SourceConfig(name="z", packing="pad")
  with pytest.raises(ValueError, match="weight must be > 0"):
    SourceConfig(name="z", weight=0.0)
  with pytest.raises(ValueError, match="SourceConfig.name"):
    SourceConfig()
  with pytest.raises(ValueError, match="'z': source 'jsonl' needs paths"):
    SourceConfig(name="z", source="jsonl")


def test_gin_binds_named_sources():
  from experiments.run import load_configs
  data = load_configs(["gin/quickstart.gin"], [
      "DataConfig.source = 'mixture'",
      "DataConfig.mixture = [@long/SourceConfig(), @short/SourceConfig()]",
      "long/SourceConfig.name = 'long'", "long/SourceConfig.weight = 60",
      "short/SourceConfig.name = 'short'", "short/SourceConfig.weight = 40",
      "short/SourceConfig.source = 'stdlib_short'", "short/SourceConfig.seq_len = 32"])["data"]
  assert [s.name for s in data.mixture] == ["long", "short"]
  assert data.mixture_weights == (0.6, 0.4) and data.mixture[1].seq_len == 32
