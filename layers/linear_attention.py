"""(Gated) linear attention as one public op: plain, scalar-decay (Lightning) and GLA gates.

The call shape follows fla, which users of this field know: layout [b, t, h, d]; `scale` defaulting
to d_k**-0.5; `initial_state` [b, h, d_k, d_v] float32 (gradients flow into it);
`output_final_state` returning (o, final_state); `segment_ids` [b, t] resetting the state where a
new document starts in a packed row; GQA (q has h heads, k and v any divisor of h); `impl` in
{"reference", "xla", "pallas", "auto"} and `chunk_size`.

The gate `g` is a log-gate (<= 0) in one of four forms:
  None            plain linear attention (G_t = 1);
  [h]             a fixed per-head log-decay (Lightning / RetNet slopes);
  [b, t, h]       a data-dependent per-head scalar log-decay;
  [b, t, h, d_k]  a per-key-dimension log-gate (GLA).

`linear_attention_step` is the single-token recurrence for decoding: O(1) per token.
"""

import jax.numpy as jnp

from layers.kernels import dispatch
from layers.kernels.gla_pallas import gla_pallas
from layers.kernels.linear_chunked import chunked_linear_attention
from layers.kernels.linear_reference import linear_attention_reference, recurrent_step


def check_common(family: str, q, k, v, initial_state, segment_ids, chunk_size):
  """The checks every linear-recurrence op shares: [b, t, h, d] q, k, v with GQA heads, the
  initial state, segment ids and chunk size (ValueErrors naming `family` and the argument)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{family}: q, k, v must be [b, t, h, d]; got q{q.shape} k{k.shape} "
                     f"v{v.shape}")
  b, t, h, dk = q.shape
  if k.shape[:2] != (b, t) or v.shape[:2] != (b, t) or k.shape[2] != v.shape[2]:
    raise ValueError(f"{family}: q{q.shape}, k{k.shape}, v{v.shape} disagree on batch, length "
                     "or key/value heads")
  if k.shape[3] != dk:
    raise ValueError(f"{family}: k's head dim {k.shape[3]} != q's {dk}")
  if h % k.shape[2]:
    raise ValueError(f"{family}: query heads {h} are not a multiple of key/value heads "
                     f"{k.shape[2]} (GQA)")
  state_shape = (b, h, dk, v.shape[3])
  if initial_state is not None and tuple(initial_state.shape) != state_shape:
    raise ValueError(f"{family}: initial_state has shape {tuple(initial_state.shape)}, "
                     f"expected [b, h, d_k, d_v]={state_shape}")
  if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
    raise ValueError(f"{family}: segment_ids has shape {tuple(segment_ids.shape)}, expected "
                     f"[b, t]={(b, t)}")
  if chunk_size < 1 or chunk_size % 16:
    raise ValueError(f"{family}: chunk_size={chunk_size} must be a positive multiple of 16")


def check_arguments(q, k, v, g, initial_state, segment_ids, chunk_size):
  """The op's argument checks (ValueErrors naming the argument); shared with sharding/."""
  check_common("linear_attention", q, k, v, initial_state, segment_ids, chunk_size)
  b, t, h, dk = q.shape
  allowed = [(h,), (b, t, h), (b, t, h, dk)]
  if g is not None and tuple(g.shape) not in allowed:
    raise ValueError(f"linear_attention: gate g has shape {tuple(g.shape)}; allowed: None, "
                     f"[h]={allowed[0]}, [b,t,h]={allowed[1]}, [b,t,h,d_k]={allowed[2]}")


def kernel_log_gate(g, b, t, h):
  """The gate in the kernels' form: None, [b, t, h, 1] (scalar) or [b, t, h, d_k], float32."""
  if g is None:
    return None
  g = g.astype(jnp.float32)
  if g.ndim == 1:
    return jnp.broadcast_to(g[None, None, :, None], (b, t, h, 1))
  if g.ndim == 3:
    return g[..., None]
  return g


def repeat_kv(x, h):
  """Repeats the kv heads of x [b, t, hk, d] up to h query heads (GQA)."""
  return x if x.shape[2] == h else jnp.repeat(x, h // x.shape[2], axis=2)


def linear_attention(q, k, v, g=None, *, scale: float | None = None, initial_state=None,
                     output_final_state: bool = False, segment_ids=None, impl: str = "auto",
                     chunk_size: int = 64):
  """Causal (gated) linear attention: o_t = scale * q_t S_t, S_t = G_t S_{t-1} + k_t^T v_t.

  Args:
    q: [b, t, h, d_k]; k: [b, t, hk, d_k]; v: [b, t, hk, d_v] with h a multiple of hk.
    g: log-gate, see the module docstring for its forms; None for plain linear attention.
    scale: query scale, default d_k**-0.5.
    initial_state: [b, h, d_k, d_v] state entering the first segment of each row.
    output_final_state: also return the state after the last token.
    segment_ids: [b, t] document ids; the state resets where the id changes.
    impl: "reference" (token-by-token), "xla" (chunked pure JAX), "pallas" or "auto".
    chunk_size: chunk length of the xla and pallas paths (a multiple of 16).
  Returns:
    o [b, t, h, d_v] in q's dtype, or (o, final_state [b, h, d_k, d_v] float32).
  """
  check_arguments(q, k, v, g, initial_state, segment_ids, chunk_size)
  b, t, h, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  k, v = repeat_kv(k, h), repeat_kv(v, h)
  gk = kernel_log_gate(g, b, t, h)
  chosen = dispatch.resolve_impl("linear_attention", impl)
  kwargs = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids)
  if chosen == "reference":
    o, state = linear_attention_reference(q, k, v, gk, **kwargs)
  elif chosen == "xla":
    o, state = chunked_linear_attention(q, k, v, gk, chunk_size=chunk_size, **kwargs)
  else:
    o, state = gla_pallas(q, k, v, gk, chunk_size=chunk_size, **kwargs)
  return (o, state) if output_final_state else o


def step_inputs(family: str, q, k, v, state, scale):
  """The checked float32 (state, q, k, v, scale) of one decoding step of a linear recurrence:
  k, v repeated to q's heads, scale defaulting to d_k**-0.5."""
  b, h, dk = q.shape
  if state.shape[:3] != (b, h, dk) or v.shape[-1] != state.shape[3]:
    raise ValueError(f"{family}: state {state.shape} does not match q{q.shape}, v{v.shape}")
  scale = dk ** -0.5 if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)
  k4, v4 = repeat_kv(k[:, None], h)[:, 0], repeat_kv(v[:, None], h)[:, 0]
  return f32(state), f32(q), f32(k4), f32(v4), scale


def linear_attention_step(q, k, v, g=None, *, state, scale: float | None = None):
  """One decoding step: the new token's output and the updated state.

  Args:
    q: [b, h, d_k]; k: [b, hk, d_k]; v: [b, hk, d_v] (one token).
    g: None, [h], [b, h] or [b, h, d_k] log-gate of this token.
    state: [b, h, d_k, d_v] float32.
    scale: default d_k**-0.5.
  Returns:
    (o [b, h, d_v] in q's dtype, new state [b, h, d_k, d_v] float32).
  """
  b, h, dk = q.shape
  state, q32, k4, v4, scale = step_inputs("linear_attention_step", q, k, v, state, scale)
  f32 = lambda x: x.astype(jnp.float32)
  gk = None
  if g is not None:
    g = f32(g)
    gk = (jnp.broadcast_to(g[None, :, None], (b, h, 1)) if g.ndim == 1
          else g[..., None] if g.ndim == 2 else g)
  o, state = recurrent_step(state, q32, k4, v4, gk, scale=scale)
  return o.astype(q.dtype), state
