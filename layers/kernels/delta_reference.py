"""Token-by-token float32 recurrence of the (gated) delta rule: the oracle for faster paths.

Per head, with the state S [d_k, d_v], key k_t and query q_t columns of d_k, value v_t of d_v,
write strength beta_t and log-gate g_t <= 0 (absent: 0, DeltaNet):
  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t,
computed as fla's naive recurrence does: S <- exp(g_t) S; u_t = beta_t (v_t - S^T k_t);
S <- S + k_t u_t^T. A token whose segment id differs from the previous token's starts from a zero
state; the initial state enters the first segment of each row.
"""

import jax.numpy as jnp
from jax import lax


def delta_step(state_bhkv, q_bhk, k_bhk, v_bhv, beta_bh, g_bh=None, *, scale: float):
  """One recurrence step on float32 arrays; returns (o_bhv, new_state_bhkv)."""
  if g_bh is not None:
    state_bhkv = state_bhkv * jnp.exp(g_bh)[..., None, None]
  u = beta_bh[..., None] * (v_bhv - jnp.einsum("bhk,bhkv->bhv", k_bhk, state_bhkv))
  state_bhkv = state_bhkv + k_bhk[..., :, None] * u[..., None, :]
  o = scale * jnp.einsum("bhk,bhkv->bhv", q_bhk, state_bhkv)
  return o, state_bhkv


def delta_rule_reference(q, k, v, beta, g=None, *, scale: float, initial_state=None,
                         segment_ids=None):
  """Sequential reference.

  Args:
    q, k: [b, t, h, dk]; v: [b, t, h, dv] (heads already matched, no GQA here).
    beta: [b, t, h] write strengths.
    g: None, or float log-gates [b, t, h].
    scale: multiplies q.
    initial_state: [b, h, dk, dv] or None (zeros).
    segment_ids: [b, t] int or None.
  Returns:
    (o [b, t, h, dv] in q's dtype, final_state [b, h, dk, dv] float32).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  f32 = lambda x: x.astype(jnp.float32)
  state0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
            else f32(initial_state))
  if segment_ids is None:
    reset = jnp.zeros((b, t), bool)
  else:
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                            axis=1)
  gates = jnp.zeros((b, t, h), jnp.float32) if g is None else f32(g)
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (f32(q), f32(k), f32(v), f32(beta), gates, reset))

  def body(state, x):
    q_t, k_t, v_t, beta_t, g_t, r_t = x
    state = jnp.where(r_t[:, None, None, None], 0.0, state)
    o_t, state = delta_step(state, q_t, k_t, v_t, beta_t, g_t, scale=scale)
    return state, o_t

  final, o = lax.scan(body, state0, xs)
  return jnp.moveaxis(o, 0, 1).astype(q.dtype), final
