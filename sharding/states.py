"""The piece states the sequence-parallel schedules of the linear layers move, and their algebra.

A rank summarizes each of its pieces of a linear recurrence by the affine map from the state
entering the piece to the state leaving it, S_out = D S_in + M (states [d_k, d_v] per head,
float32):
  diagonal  D [..., d_k or 1]: a per-row (GLA) or scalar (decayed, plain: 1) transition, as in
            (gated) linear attention; the rows of the state are independent;
  matrix    D [..., d_k, d_k]: a full transition, as in the delta rule (the product of the tokens'
            a_t (I - beta_t k_t k_t^T)); the columns of the state are independent.
`sharding/lasp2.py` and `sharding/zeco.py` take either form; which one is told by D's rank.
"""

import jax.numpy as jnp
from jax import lax


def is_matrix(decay, state) -> bool:
  """Whether `decay` is a full [d_k, d_k] transition of `state` [..., d_k, d_v] (else diagonal)."""
  return decay.ndim == state.ndim


def advance(decay, state, m):
  """D S + M: the state leaving a piece from the state entering it."""
  if is_matrix(decay, state):
    return jnp.einsum("...ij,...jv->...iv", decay, state, precision=lax.Precision.HIGHEST) + m
  return decay[..., None] * state + m
