"""layers/masks.py against a naive per-pair definition."""

import itertools

import numpy as np
import pytest

from layers.masks import attention_mask


def naive_mask(q_idx, k_idx, q_seg, k_seg, window, k_valid):
  b, t = q_idx.shape
  s = k_idx.shape[1]
  out = np.zeros((b, 1, t, s), bool)
  for i, j, l in itertools.product(range(b), range(t), range(s)):
    ok = k_idx[i, l] <= q_idx[i, j]
    if window is not None:
      ok = ok and q_idx[i, j] - k_idx[i, l] <= window
    if q_seg is not None:
      ok = ok and q_seg[i, j] == k_seg[i, l]
    if k_valid is not None:
      ok = ok and k_valid[i, l]
    out[i, 0, j, l] = ok
  return out


@pytest.mark.parametrize("window", [None, 0, 1, 3])
@pytest.mark.parametrize("segments", [False, True])
def test_self_attention_mask(window, segments):
  rng = np.random.default_rng(0)
  idx = np.broadcast_to(np.arange(11), (2, 11))
  seg = np.sort(rng.integers(0, 3, (2, 11)), axis=1) if segments else None
  got = np.asarray(attention_mask(idx, idx, seg, seg, window))
  np.testing.assert_array_equal(got, naive_mask(idx, idx, seg, seg, window, None))
  assert got[:, 0].diagonal(axis1=1, axis2=2).all(), "every token sees itself"


def test_cache_mask_with_offset_and_validity():
  q = np.array([[5, 6]])
  k = np.arange(9)[None]
  valid = k < 7
  got = np.asarray(attention_mask(q, k, window=2, k_valid_bs=valid))
  np.testing.assert_array_equal(got, naive_mask(q, k, None, None, 2, valid))
  assert got[0, 0, 1].tolist() == [False] * 4 + [True] * 3 + [False] * 2
