"""Tests of the pipelines on the stdlib corpus: mix, eval coverage, resume."""


import numpy as np
import pytest

from lctx.data import DataConfig, eval_batches, pipeline, sources, train_iterator
from tests.test_data_pipeline import TOK, _check_structure, assert_resumes_exactly


@pytest.mark.parametrize("long_fraction", [0.3, 0.6, 0.9])
def test_long_fraction_is_the_fraction_of_tokens(long_fraction):
  cfg = DataConfig(seq_len=256, batch_size=16, long_fraction=long_fraction)
  mix = pipeline.training_pieces(cfg)
  assert mix.kind_names == ("stdlib packages", "stdlib modules and docstrings")
  # The pieces that ~200 batches pack, in order (packing keeps every token).
  tokens, long_lengths, index = [0, 0], [], 0
  while sum(tokens) < 200 * 16 * 256:
    kind, text = mix.dataset[index]
    tokens[kind] += len(TOK.encode(text))
    if kind == 0:
      long_lengths.append(len(text))
    index += 1
  # Over 20 seeds the measured fraction stays within 0.013 of the target.
  assert abs(tokens[0] / sum(tokens) - long_fraction) < 0.03
  # A piece of a package is 4 * seq_len characters unless it ends the package.
  assert max(long_lengths) == 1024
  assert np.mean(np.array(long_lengths) == 1024) > 0.9


@pytest.mark.parametrize("long_fraction", [0.0, 0.5, 1.0])
def test_stdlib_batches(long_fraction):
  cfg = DataConfig(seq_len=256, batch_size=16, long_fraction=long_fraction)
  it = train_iterator(cfg, TOK)
  for _ in range(5):
    _check_structure(next(it), 256, 16)


def test_state_restores_exactly_on_stdlib():
  cfg = DataConfig(seq_len=128, batch_size=4, seed=5)
  assert_resumes_exactly(cfg, 25, 10)


def test_stdlib_eval_covers_all_held_out_packages():
  cfg = DataConfig(seq_len=256, batch_size=16)
  batches = eval_batches(cfg, TOK, 8)
  for batch in batches:
    _check_structure(batch, 256, 16)
  packages = sources.eval_documents(cfg)
  assert len(packages) >= 2
  rows = np.concatenate([b["tokens"] for b in batches])
  assert TOK.decode(rows[0]).startswith("# file: ")
  owners = set()
  for row in rows:
    text = TOK.decode(row[:64])
    owners.update(i for i, p in enumerate(packages) if text in p)
  assert owners == set(range(len(packages)))
