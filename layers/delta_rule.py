"""The (gated) delta rule as one public op: DeltaNet, Gated DeltaNet and KDA.

Per head, with the state S [d_k, d_v]:
  S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t,
with a_t = exp(g_t): g None is DeltaNet (a_t = 1), g [b, t, h] a per-head log-gate <= 0 is Gated
DeltaNet (Qwen3-Next), g [b, t, h, d_k] a per-key-dim one is KDA (Kimi Linear), whose decay
diag(a_t) scales the state's rows before the delta step:
  S_t = (I - beta_t k_t k_t^T) diag(a_t) S_{t-1} + beta_t k_t v_t^T.
The call shape is `linear_attention`'s (and fla's): layout [b, t, h, d];
`scale` defaulting to d_k**-0.5; `initial_state` [b, h, d_k, d_v] float32 (gradients flow into
it); `output_final_state`; `segment_ids` [b, t] resetting the state where a new document starts;
GQA (k and v any divisor of q's heads, repeated to them; beta and g are per query head); `impl`
in {"reference", "xla", "pallas", "auto"} and `chunk_size`. The mixer normalizes q and k (L2); the
op takes them as they are.

Implementations: "reference" is the token-by-token oracle (layers/kernels/delta_reference.py),
"xla" the chunked WY form in pure JAX with autodiff's backward (delta_chunked.py), "pallas" the
chunked kernels with a hand-derived backward (delta_pallas.py; interpreted on CPU). `auto` runs
pallas on GPU and TPU and xla on CPU (layers/kernels/dispatch.py). The kernels take no KDA gate
yet: with one, `auto` runs xla everywhere (and logs why) and impl="pallas" is an error.

`delta_rule_step` is the single-token recurrence for decoding: O(1) per token.
"""

import jax.numpy as jnp

from layers.kernels import dispatch
from layers.kernels.delta_chunked import chunked_delta_rule
from layers.kernels.delta_pallas import delta_pallas
from layers.kernels.delta_reference import delta_rule_reference, delta_step
from layers.linear_attention import check_common, repeat_kv, step_inputs

FAMILY = "delta_rule"


def check_arguments(q, k, v, beta, g, initial_state, segment_ids, chunk_size):
  """The op's argument checks (ValueErrors naming the argument)."""
  check_common(FAMILY, q, k, v, initial_state, segment_ids, chunk_size)
  b, t, h, dk = q.shape
  if tuple(beta.shape) != (b, t, h):
    raise ValueError(f"delta_rule: beta has shape {tuple(beta.shape)}, expected [b, t, h]="
                     f"{(b, t, h)}")
  if g is not None and tuple(g.shape) not in ((b, t, h), (b, t, h, dk)):
    raise ValueError(f"delta_rule: gate g has shape {tuple(g.shape)}; allowed: None, [b, t, h]="
                     f"{(b, t, h)} (Gated DeltaNet) or [b, t, h, d_k]={(b, t, h, dk)} (KDA)")


def delta_rule(q, k, v, beta, g=None, *, scale: float | None = None, initial_state=None,
               output_final_state: bool = False, segment_ids=None, impl: str = "auto",
               chunk_size: int = 64):
  """Causal (gated) delta rule (see the module docstring).

  Args:
    q: [b, t, h, d_k]; k: [b, t, hk, d_k]; v: [b, t, hk, d_v] with h a multiple of hk.
    beta: [b, t, h] write strengths (sigmoid outputs in the mixers).
    g: None (DeltaNet), [b, t, h] (Gated DeltaNet) or [b, t, h, d_k] (KDA) log-gates <= 0.
    scale: query scale, default d_k**-0.5.
    initial_state: [b, h, d_k, d_v] state entering the first segment of each row.
    output_final_state: also return the state after the last token.
    segment_ids: [b, t] document ids; the state resets where the id changes.
    impl: "reference" (token-by-token), "xla" (chunked pure JAX), "pallas" (chunked kernels) or
      "auto" (pallas on GPU and TPU, xla on CPU).
    chunk_size: chunk length of the xla and pallas paths (a multiple of 16).
  Returns:
    o [b, t, h, d_v] in q's dtype, or (o, final_state [b, h, d_k, d_v] float32).
  """
  check_arguments(q, k, v, beta, g, initial_state, segment_ids, chunk_size)
  h, dk = q.shape[2], q.shape[3]
  scale = dk ** -0.5 if scale is None else scale
  k, v = repeat_kv(k, h), repeat_kv(v, h)
  per_channel = g is not None and g.ndim == 4
  chosen = dispatch.resolve_impl(FAMILY, impl, no_kernel=(
      "its Pallas kernels take a per-head gate, not KDA's per-key-dim one" if per_channel
      else None))
  kwargs = dict(scale=scale, initial_state=initial_state, segment_ids=segment_ids)
  if chosen == "reference":
    o, state = delta_rule_reference(q, k, v, beta, g, **kwargs)
  elif chosen == "pallas":
    o, state = delta_pallas(q, k, v, beta, g, chunk_size=chunk_size, **kwargs)
  else:
    o, state = chunked_delta_rule(q, k, v, beta, g, chunk_size=chunk_size, **kwargs)
  return (o, state) if output_final_state else o


def delta_rule_step(q, k, v, beta, g=None, *, state, scale: float | None = None):
  """One decoding step: the new token's output and the updated state.

  Args:
    q: [b, h, d_k]; k: [b, hk, d_k]; v: [b, hk, d_v] (one token).
    beta: [b, h]; g: None, [b, h] or [b, h, d_k] log-gate of this token.
    state: [b, h, d_k, d_v] float32.
    scale: default d_k**-0.5.
  Returns:
    (o [b, h, d_v] in q's dtype, new state [b, h, d_k, d_v] float32).
  """
  state, q32, k4, v4, scale = step_inputs("delta_rule_step", q, k, v, state, scale)
  f32 = lambda x: x.astype(jnp.float32)
  o, state = delta_step(state, q32, k4, v4, f32(beta), None if g is None else f32(g),
                        scale=scale)
  return o.astype(q.dtype), state
