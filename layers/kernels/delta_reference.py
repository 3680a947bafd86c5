"""Token-by-token float32 recurrence of the (gated) delta rule: the oracle for faster paths.

Per head, with the state S [d_k, d_v], key k_t and query q_t columns of d_k, value v_t of d_v,
write strength beta_t and log-gate g_t <= 0 (absent: 0, DeltaNet; a scalar per head: Gated
DeltaNet; a d_k vector: KDA, whose decay scales the state's rows):
  S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,  o_t = scale S_t^T q_t,
computed as fla's naive recurrences do: S <- exp(g_t) S; u_t = beta_t (v_t - S^T k_t);
S <- S + k_t u_t^T (a scalar gate commutes with the delta step). A token whose segment id differs
from the previous token's starts from a zero state; the initial state enters the first segment of
each row.
"""

import jax.numpy as jnp

from layers.kernels.linear_reference import token_scan


def delta_step(state_bhkv, q_bhk, k_bhk, v_bhv, beta_bh, g_bh=None, *, scale: float):
  """One recurrence step on float32 arrays; returns (o_bhv, new_state_bhkv). g_bh is None, a
  scalar log-gate per head [b, h] or a per-key-dim one [b, h, dk] (KDA)."""
  if g_bh is not None:
    decay = jnp.exp(g_bh)
    state_bhkv = state_bhkv * (decay[..., None] if decay.ndim == 3 else decay[..., None, None])
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
    g: None, or float log-gates [b, t, h] (per head) or [b, t, h, dk] (per key dim, KDA).
    scale: multiplies q.
    initial_state: [b, h, dk, dv] or None (zeros).
    segment_ids: [b, t] int or None.
  Returns:
    (o [b, t, h, dv] in q's dtype, final_state [b, h, dk, dv] float32).
  """
  gates = jnp.zeros(beta.shape, jnp.float32) if g is None else g
  step = lambda state, q_t, k_t, v_t, beta_t, g_t: delta_step(state, q_t, k_t, v_t, beta_t, g_t,
                                                              scale=scale)
  return token_scan(step, q, v.shape[-1], (q, k, v, beta, gates), initial_state, segment_ids)
