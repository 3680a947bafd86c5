"""Chunked (gated) linear attention in pure JAX (the "xla" implementation).

The sequence is cut into chunks of C tokens. Chunk-local work (intra-chunk attention, the chunk's
state contribution, and all of the backward) is in `linear_chunk_math`, written for one chunk of
one (batch, head) and vmapped over all of them; only the cheap [dk, dv] recurrence across the T/C
chunks is sequential (an XLA scan). The driver validates and pads the inputs, turns log-gates into
in-chunk cumulative sums and segment ids into relative segment runs (plain XLA, so autodiff
handles the padding, the layout changes and the cumsum), and wraps the chunk work in a
`jax.custom_vjp` that uses the hand-derived backward. `check_inputs` and `segment_runs` are shared
with the Pallas kernels (`gla_pallas`), which run the recurrence inside the kernels instead.

Internal layout is [N, B, H, C, d] (chunk index leading): the per-chunk matmuls become batched
matmuls with leading batch dims, and the cross-chunk scans run over the leading axis without
transposing the [N, B, H, dk, dv] states.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from layers.kernels import linear_chunk_math as cm

F32 = jnp.float32

def map_chunks(fn, args: Sequence, seg, out_specs) -> tuple:
  """Applies `fn` to every (chunk, batch, head): a vmap over the three axes flattened into one.

  fn(*blocks, seg=seg_block) -> tuple of per-chunk arrays; args are [N, B, H, ...] arrays or
  None; seg is [N, B, C] int or None; out_specs (the per-chunk (shape, dtype) of fn's outputs)
  documents the outputs and is unused.

  The three axes are flattened into one before a single vmap: XLA:CPU emits the fused
  elementwise-and-reduce loops of the gated paths many times slower over several batch dims
  (notably a size-1 batch) than over one.
  """
  del out_specs
  present = [a for a in args if a is not None]
  n, b, h = present[0].shape[:3]
  flat = lambda x: None if x is None else x.reshape((n * b * h,) + x.shape[3:])
  n_args = len(args)

  def call(*xs):
    return fn(*xs[:n_args], seg=xs[n_args])

  if seg is not None:
    seg = jnp.broadcast_to(seg[:, :, None], (n, b, h, seg.shape[-1]))
  outs = jax.vmap(call)(*(flat(a) for a in args), flat(seg))
  return tuple(o.reshape((n, b, h) + o.shape[1:]) for o in outs)


# ------------------------------------------------------------------------------------------------
# Cross-chunk recurrences (sequential over chunks, cheap: one [dk, dv] state per batch and head).


def _scale_rows(decay, s):
  # decay [..., 1, G] scales the dk rows of s [..., dk, dv].
  return s * jnp.swapaxes(decay, -1, -2)


def forward_states(u, decay, h0):
  """States entering each chunk [N, B, H, dk, dv] and the final state, from s_n = d_n s + u_n."""
  if decay is None:
    def body(s, u_n):
      return s + u_n, s
    final, s_in = lax.scan(body, h0, u)
  else:
    def body(s, x):
      u_n, d_n = x
      return _scale_rows(d_n, s) + u_n, s
    final, s_in = lax.scan(body, h0, (u, decay))
  return s_in, final


def backward_states(w, decay, d_final):
  """Gradients of the states leaving each chunk [N, B, H, dk, dv] and of the initial state.

  The state entering chunk n gets w_n + d_n * (gradient of the state leaving chunk n), and the
  state leaving chunk n-1 is the state entering chunk n.
  """
  if decay is None:
    def body(g, w_n):
      return g + w_n, g
    d_h0, ds_out = lax.scan(body, d_final, w, reverse=True)
  else:
    def body(g, x):
      w_n, d_n = x
      return _scale_rows(d_n, g) + w_n, g
    d_h0, ds_out = lax.scan(body, d_final, (w, decay), reverse=True)
  return ds_out, d_h0


# ------------------------------------------------------------------------------------------------
# The custom_vjp core on [N, B, H, C, d] arrays (T already padded to N * C).


@functools.lru_cache(maxsize=None)
def _make_core(scale: float, sub: int):
  """Builds core(q, k, v, b, h0, seg) -> (o f32 [N, B, H, C, dv], final_state) with its VJP.

  `sub` is the forward's sub-chunk for the per-key-dim gate. The backward uses at most 8: its
  [sub, sub, dk] tensors feed three reductions, which XLA:CPU materializes (fwd+bwd ~25% faster
  at T=8192 with 8); any sub-chunk size gives the same gradients.
  """
  sub_bwd = min(sub, 8)

  def states(k, v, b, seg, h0):
    dk, dv, n_g = k.shape[-1], v.shape[-1], (None if b is None else b.shape[-1])
    has_decay = b is not None or seg is not None
    specs = [((dk, dv), F32)] + ([((1, n_g or 1), F32)] if has_decay else [])

    def state_update(k_c, v_c, b_c, seg):
      u, decay = cm.chunk_state_update(k_c, v_c, b_c, seg)
      return (u, decay) if has_decay else (u,)

    outs = map_chunks(state_update, (k, v, b), seg, specs)
    decay = outs[1] if has_decay else None
    s_in, final = forward_states(outs[0], decay, h0)
    return s_in, final, decay

  def output(q, k, v, b, seg, s_in):
    def chunk_out(q_c, k_c, v_c, b_c, s_c, seg):
      return (cm.chunk_output(q_c, k_c, v_c, b_c, seg, s_c, scale=scale, sub=sub),)
    chunk = q.shape[-2]
    return map_chunks(chunk_out, (q, k, v, b, s_in), seg, [((chunk, v.shape[-1]), F32)])[0]

  @jax.custom_vjp
  def core(q, k, v, b, h0, seg):
    s_in, final, _ = states(k, v, b, seg, h0)
    return output(q, k, v, b, seg, s_in), final

  def core_fwd(q, k, v, b, h0, seg):
    # The per-chunk states are recomputed in the backward: they are twice the size of q for
    # C = 64 and d = 128, and recomputing them costs about a third of the forward.
    return core(q, k, v, b, h0, seg), (q, k, v, b, h0, seg)

  def core_bwd(res, cts):
    q, k, v, b, h0, seg = res
    do, d_final = cts
    chunk, dk, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    s_in, _, decay = states(k, v, b, seg, h0)

    def state_grad(q_c, b_c, do_c, seg):
      return (cm.chunk_state_grad(q_c, b_c, seg, do_c, scale=scale),)

    w = map_chunks(state_grad, (q, b, do), seg, [((dk, dv), F32)])[0]
    ds_out, d_h0 = backward_states(w, decay, d_final.astype(F32))

    specs = [((chunk, dk), q.dtype), ((chunk, dk), k.dtype), ((chunk, dv), v.dtype)]
    if b is not None:
      specs.append(((chunk, b.shape[-1]), F32))

    def chunk_bwd(q_c, k_c, v_c, b_c, s_c, do_c, ds_c, seg):
      grads = cm.chunk_backward(q_c, k_c, v_c, b_c, seg, s_c, do_c, ds_c, scale=scale, sub=sub_bwd)
      return grads if b_c is not None else grads[:3]

    grads = map_chunks(chunk_bwd, (q, k, v, b, s_in, do, ds_out), seg, specs)
    dq, dk_, dv_ = (g.astype(x.dtype) for g, x in zip(grads[:3], (q, k, v)))
    db = grads[3] if b is not None else None
    return dq, dk_, dv_, db, d_h0.astype(h0.dtype), None

  core.defvjp(core_fwd, core_bwd)
  return core


# ------------------------------------------------------------------------------------------------
# Validation, padding and layout.


def check_inputs(name, q, k, v, gk, initial_state, segment_ids, chunk_size, scale) -> float:
  """ValueErrors naming `name` and the argument; returns scale as a Python float (it is static)."""
  try:
    scale = float(scale)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name}: scale={scale!r} must be a Python number (it is static)") from e
  if q.ndim != 4:
    raise ValueError(f"{name}: q must be [batch, time, heads, dk], got shape {q.shape}")
  b, t, h, dk = q.shape
  if k.shape != q.shape:
    raise ValueError(f"{name}: k shape {k.shape} must equal q shape {q.shape}")
  if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"{name}: v shape {v.shape} must be [{b}, {t}, {h}, dv]")
  if gk is not None and gk.shape not in ((b, t, h, dk), (b, t, h, 1)):
    raise ValueError(f"{name}: gk shape {gk.shape} must be {(b, t, h, dk)} or {(b, t, h, 1)}")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(f"{name}: initial_state shape {initial_state.shape} must be "
                     f"{(b, h, dk, v.shape[-1])}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"{name}: segment_ids shape {segment_ids.shape} must be {(b, t)}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{name}: chunk_size={chunk_size!r} must be a positive integer")
  return scale


def split_chunks(x, n, chunk, width=None):
  """[B, T, H, d] -> [B, N, C, H, width], zero-padding T to n * chunk and d to width."""
  b, t, h, d = x.shape
  width = width or d
  x = jnp.pad(x, ((0, 0), (0, n * chunk - t), (0, 0), (0, width - d)))
  return x.reshape(b, n, chunk, h, width)


def _to_chunks(x, n, chunk):
  """[B, T, H, d] -> [N, B, H, C, d], zero-padding T to n * chunk."""
  return split_chunks(x, n, chunk).transpose(1, 0, 3, 2, 4)


def _from_chunks(x, t):
  """[N, B, H, C, d] -> [B, T, H, d]."""
  n, b, h, c, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, d)[:, :t]


def segment_runs(segment_ids, n, chunk):
  """[B, T] ids -> [N, B, C] run index relative to the run of the token before each chunk.

  Runs (not raw ids) make any id change a reset, as in the reference, even if an id repeats
  later. Chunk 0 is relative to the first token, so the initial state enters the first segment;
  padding extends the last run, so it never resets the final state.
  """
  changed = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  first = jnp.zeros((changed.shape[0], 1), jnp.int32)
  runs = jnp.concatenate([first, jnp.cumsum(changed, axis=1)], axis=1)
  runs = jnp.pad(runs, ((0, 0), (0, n * chunk - runs.shape[1])), mode="edge")
  runs = runs.reshape(runs.shape[0], n, chunk)
  prev = jnp.concatenate([jnp.zeros_like(runs[:, :1, 0]), runs[:, :-1, -1]], axis=1)
  return (runs - prev[:, :, None]).transpose(1, 0, 2)


# Jitted (inlined when the caller is traced already) so that eager calls do not dispatch the many
# small chunk ops one by one.
@functools.partial(jax.jit, static_argnames=("scale", "chunk_size"))
def _run_chunked(q, k, v, gk, *, scale, initial_state, segment_ids, chunk_size):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chunk = chunk_size
  n = -(-t // chunk)
  qc, kc, vc = (_to_chunks(x, n, chunk) for x in (q, k, v))
  cum = None
  if gk is not None:
    g = jnp.pad(gk.astype(F32), ((0, 0), (0, n * chunk - t), (0, 0), (0, 0)))
    g = g.reshape(b, n, chunk, h, gk.shape[-1])
    cum = jnp.cumsum(g, axis=2).transpose(1, 0, 3, 2, 4)
  h0 = (jnp.zeros((b, h, dk, dv), F32) if initial_state is None
        else initial_state.astype(F32))
  seg = None if segment_ids is None else segment_runs(segment_ids, n, chunk)
  core = _make_core(scale, cm.sub_chunk_size(chunk))
  o, final = core(qc, kc, vc, cum, h0, seg)
  return _from_chunks(o, t).astype(q.dtype), final


def chunked_linear_attention(q, k, v, gk=None, *, scale: float, initial_state=None,
                             segment_ids=None, chunk_size: int = 64):
  """Chunked (gated) linear attention in pure JAX; same semantics as the token-by-token reference.

  Args:
    q, k: [b, t, h, dk]; v: [b, t, h, dv] (heads already matched).
    gk: None, or log-gates (<= 0) [b, t, h, dk] (per key dim) or [b, t, h, 1] (per head).
    scale: multiplies q.
    initial_state: [b, h, dk, dv] or None (zeros).
    segment_ids: [b, t] int or None; the state resets where the id changes.
    chunk_size: tokens per chunk; t need not be a multiple (the tail is padded).
  Returns:
    (o [b, t, h, dv] in q's dtype, final_state [b, h, dk, dv] float32). Differentiable in q, k,
    v, gk and initial_state through a hand-written backward.
  """
  scale = check_inputs("chunked_linear_attention", q, k, v, gk, initial_state, segment_ids,
                       chunk_size, scale)
  return _run_chunked(q, k, v, gk, scale=scale, initial_state=initial_state,
                      segment_ids=segment_ids, chunk_size=chunk_size)
