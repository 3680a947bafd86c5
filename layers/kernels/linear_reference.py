"""Token-by-token float32 recurrence of (gated) linear attention: the oracle for faster paths.

Per head, with log-gate gk_t (absent: 0):
  S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t.
A scalar gate is gk with a last dimension of 1 (it broadcasts over d_k). A token whose segment id
differs from the previous token's starts from a zero state; the initial state enters the first
segment of each row.
"""

import jax.numpy as jnp
from jax import lax


def recurrent_step(state_bhkv, q_bhk, k_bhk, v_bhv, gk_bhk=None, *, scale: float):
  """One recurrence step on float32 arrays; returns (o_bhv, new_state_bhkv)."""
  if gk_bhk is not None:
    state_bhkv = state_bhkv * jnp.exp(gk_bhk)[..., None]
  state_bhkv = state_bhkv + k_bhk[..., :, None] * v_bhv[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q_bhk, state_bhkv)
  return o, state_bhkv


def linear_attention_reference(q, k, v, gk=None, *, scale: float, initial_state=None,
                               segment_ids=None):
  """Sequential reference.

  Args:
    q, k: [b, t, h, dk]; v: [b, t, h, dv] (heads already matched, no GQA here).
    gk: None, or float log-gates [b, t, h, dk] or [b, t, h, 1] (scalar per head).
    scale: multiplies q.
    initial_state: [b, h, dk, dv] or None (zeros).
    segment_ids: [b, t] int or None.
  Returns:
    (o [b, t, h, dv] in q's dtype, final_state [b, h, dk, dv] float32).
  """
  f32 = lambda x: x.astype(jnp.float32)
  gates = jnp.zeros(q.shape[:3] + (1,), jnp.float32) if gk is None else f32(gk)
  step = lambda state, q_t, k_t, v_t, g_t: recurrent_step(state, q_t, k_t, v_t, g_t, scale=scale)
  return token_scan(step, q, v.shape[-1], (q, k, v, gates), initial_state, segment_ids)


def segment_resets(segment_ids, b: int, t: int):
  """[b, t] bool: True where a token's segment id differs from the previous token's (never at
  token 0, where the initial state enters); all False without segment ids."""
  if segment_ids is None:
    return jnp.zeros((b, t), bool)
  return jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                         axis=1)


def token_scan(step, q, dv: int, xs, initial_state=None, segment_ids=None):
  """Runs a per-token recurrence over the sequence: (o_t, state) = step(state, *xs_t) on float32
  [b, ...] slices of the [b, t, ...] arrays `xs`, the state [b, h, dk, dv] zeroed where a new
  segment starts. The shared driver of the token-by-token oracles.

  Returns (o [b, t, h, dv] in q's dtype, final state float32).
  """
  b, t, h, dk = q.shape
  state0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
            else initial_state.astype(jnp.float32))
  reset = segment_resets(segment_ids, b, t)
  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in xs) + (jnp.moveaxis(reset, 1, 0),)

  def body(state, x):
    state = jnp.where(x[-1][:, None, None, None], 0.0, state)
    o_t, state = step(state, *x[:-1])
    return state, o_t

  final, o = lax.scan(body, state0, xs)
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), final
