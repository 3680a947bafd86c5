"""Scores of hand-made outputs (lctx/evals/scoring.py)."""

import numpy as np
import pytest

from lctx.evals import scoring


def test_exact_match():
  assert scoring.exact_match([5, 6, 7, 1], [5, 6, 7])
  assert not scoring.exact_match([5, 6], [5, 6, 7])
  assert not scoring.exact_match([5, 9, 7], [5, 6, 7])


def test_ruler_and_passkey_metrics():
  assert scoring.contains_fraction("the values are 123 and 456.", ["123", "456", "789"]) == (
      pytest.approx(2 / 3))
  assert scoring.contains_fraction("nothing", ["1"]) == 0.0
  with pytest.raises(ValueError, match="no reference"):
    scoring.contains_fraction("x", [])
  assert scoring.first_number_matches(" 52586. Remember", "52586")
  assert not scoring.first_number_matches(" 1 then 52586", "52586")
  assert not scoring.first_number_matches(" 525860", "52586")
  assert not scoring.first_number_matches(" none", "52586")


def test_answer_logprob_against_a_hand_computation():
  logits = np.log(np.array([[0.1, 0.2, 0.7],    # predicts token 1 (prompt is 2 tokens)
                            [0.5, 0.25, 0.25],  # predicts answer token 0
                            [0.2, 0.6, 0.2],    # predicts answer token 1
                            [1 / 3, 1 / 3, 1 / 3]]))
  got = scoring.answer_logprob(logits + 4.0, [2, 1], prompt_len=2)  # shifts change nothing
  assert got == pytest.approx(np.log(0.25) + np.log(0.6))
  with pytest.raises(ValueError, match="cannot score 3 answer tokens"):
    scoring.answer_logprob(logits, [0, 1, 2], prompt_len=3)
