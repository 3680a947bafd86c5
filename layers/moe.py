"""Mixture-of-experts feed-forward block (SpikingBrain-76B style): shared plus top-k routed SwiGLUs.

For each token x the block returns
  y = sum_s SwiGLU_s(x) + sum_{e in top_k(p(x))} g_e(x) * SwiGLU_e(x),
with router probabilities p(x) = softmax(x W_router) (float32) and gates g_e the selected
probabilities (renormalized over the top k when `normalize_top_k`). Routing is dropless: every
(token, choice) assignment is computed, none is dropped for capacity.

The routed experts run as grouped matmuls: the n*k assignments are sorted by expert and fed to
`jax.lax.ragged_dot` (differentiable in the JAX version lctx pins), so the cost is that of k
dense FFNs per token rather than of all experts. The sort spans every token of the batch the
block sees.

The Switch/GShard load-balancing loss is sown into the "losses" collection, already multiplied by
`MoEConfig.balance_loss_weight`; `upcycle_params` turns a trained dense SwiGLU into MoE params.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import params as P
from layers.spiking import maybe_quantize_weight, spike_input
from sharding.validation import check_fields

_EXPERT_MATRICES = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Options of the MoE feed-forward block.

  Attributes:
    num_experts: routed experts N.
    top_k: routed experts each token uses, in [1, num_experts].
    num_shared_experts: experts S every token uses with weight 1 (0 for none).
    d_expert: hidden width of each (routed and shared) expert; None means the model's d_ff.
    dense_layers: 0-based layer indices that keep a dense SwiGLU FFN instead of the MoE.
    balance_loss_weight: weight of the load-balancing loss sown into "losses".
    normalize_top_k: renormalize the selected gate probabilities to sum to 1. With top_k = 1 and
      False the gate is the router probability itself (Switch style); with top_k = 1 and True the
      gate is always 1, so the router learns only from the balance loss.
    enabled: the model uses the MoE block only when True.
  """

  num_experts: int = 16
  top_k: int = 1
  num_shared_experts: int = 1
  d_expert: int | None = None
  dense_layers: tuple[int, ...] = ()
  balance_loss_weight: float = 0.01
  normalize_top_k: bool = False
  enabled: bool = False

  def __post_init__(self):
    check_fields(self)
    if self.num_experts < 1:
      raise ValueError(f"MoEConfig.num_experts={self.num_experts} must be >= 1")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"MoEConfig.top_k={self.top_k} must be in "
                       f"[1, num_experts={self.num_experts}]")
    if self.num_shared_experts < 0:
      raise ValueError(f"MoEConfig.num_shared_experts={self.num_shared_experts} must be >= 0")
    if self.d_expert is not None and self.d_expert < 1:
      raise ValueError(f"MoEConfig.d_expert={self.d_expert} must be >= 1 or None")
    if (any(i < 0 for i in self.dense_layers)
        or len(set(self.dense_layers)) != len(self.dense_layers)):
      raise ValueError(f"MoEConfig.dense_layers={self.dense_layers} must be distinct layer "
                       "indices >= 0")
    if not (math.isfinite(self.balance_loss_weight) and self.balance_loss_weight >= 0):
      raise ValueError(f"MoEConfig.balance_loss_weight={self.balance_loss_weight} must be "
                       "finite and >= 0")

  def expert_width(self, d_ff: int) -> int:
    """Hidden width of each expert given the model's dense FFN width `d_ff`."""
    return d_ff if self.d_expert is None else self.d_expert


class Routing(NamedTuple):
  """A router's decision for each token.

  Attributes:
    probs: [..., N] float32 router probabilities.
    gates: [..., k] float32 weights of the selected experts (descending probability).
    experts: [..., k] int32 indices of the selected experts.
  """

  probs: jax.Array
  gates: jax.Array
  experts: jax.Array


def router_probs(x: jax.Array, w_router: jax.Array) -> jax.Array:
  """softmax(x @ w_router) in float32: [..., d] x [d, N] -> [..., N]."""
  # HIGHEST because the matmul is tiny and reduced-precision logits could flip near-tied choices.
  logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), w_router.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return jax.nn.softmax(logits, axis=-1)


def route(x: jax.Array, w_router: jax.Array, top_k: int,
          normalize_top_k: bool = False) -> Routing:
  """Top-k routing of tokens x [..., d] with router weights [d, N]; ties go to lower indices.

  Args:
    x: tokens [..., d].
    w_router: router weights [d, N].
    top_k: experts per token.
    normalize_top_k: divide the selected probabilities by their sum.

  Returns:
    The Routing (probs, gates, experts).
  """
  probs = router_probs(x, w_router)
  gates, experts = jax.lax.top_k(probs, top_k)
  if normalize_top_k:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return Routing(probs, gates, experts.astype(jnp.int32))


def _assignment_counts(selected: jax.Array, num_experts: int) -> jax.Array:
  """[n, N] float32 count of each token's assignments to each expert."""
  if jnp.issubdtype(selected.dtype, jnp.integer):
    return jax.nn.one_hot(selected, num_experts, dtype=jnp.float32).sum(-2).reshape(
        -1, num_experts)
  # A given mask is a routing decision, not something the loss may push on.
  return jax.lax.stop_gradient(selected.astype(jnp.float32)).reshape(-1, num_experts)


def _token_weights(weights: jax.Array | None, n: int) -> jax.Array:
  if weights is None:
    return jnp.ones((n,), jnp.float32)
  return weights.reshape(-1).astype(jnp.float32)


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  # An all-padding batch has no load; 0 keeps the loss finite instead of NaN.
  return num / jnp.where(den > 0, den, 1.0)


def expert_load(selected: jax.Array, num_experts: int,
                weights: jax.Array | None = None) -> jax.Array:
  """Fraction f_e of the (token, choice) assignments routed to each expert.

  Args:
    selected: int expert indices [..., k], or a float/bool assignment mask [..., N] (entry
      (t, e) = how many of token t's choices picked e).
    num_experts: N.
    weights: optional token weights [...] (0 excludes a token, e.g. padding); default all 1.

  Returns:
    [N] float32 fractions summing to 1 (all 0 when every weight is 0).
  """
  counts = _assignment_counts(selected, num_experts)
  per_expert = jnp.einsum("n,ne->e", _token_weights(weights, counts.shape[0]), counts,
                          precision=jax.lax.Precision.HIGHEST)
  return _safe_divide(per_expert, per_expert.sum())


def balance_loss(probs: jax.Array, selected: jax.Array,
                 weights: jax.Array | None = None) -> jax.Array:
  """Switch/GShard load-balancing loss N * sum_e f_e * P_e (1 for perfectly uniform routing).

  Args:
    probs: router probabilities [..., N].
    selected: int expert indices [..., k] or an assignment mask [..., N] (see expert_load).
    weights: optional token weights [...] (0 excludes a token); default all 1.

  Returns:
    Scalar float32 loss. Gradients flow through probs only (f_e counts discrete choices).
  """
  num_experts = probs.shape[-1]
  p = probs.reshape(-1, num_experts).astype(jnp.float32)
  w = _token_weights(weights, p.shape[0])
  mean_prob = _safe_divide(jnp.einsum("n,ne->e", w, p, precision=jax.lax.Precision.HIGHEST),
                           w.sum())
  return num_experts * jnp.sum(expert_load(selected, num_experts, weights) * mean_prob)


def routed_swiglu(x_nd: jax.Array, experts_nk: jax.Array, gates_nk: jax.Array,
                  w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                  hidden_fn=None) -> jax.Array:
  """sum_j gates[t, j] * SwiGLU_{experts[t, j]}(x[t]) via grouped (ragged) matmuls.

  Args:
    x_nd: tokens [n, d].
    experts_nk: int expert indices [n, k].
    gates_nk: gate weights [n, k].
    w_gate: [N, d, f].
    w_up: [N, d, f].
    w_down: [N, f, d].
    hidden_fn: optional map of the hidden activations [n * k, f] before the down projection
      (spiking).

  Returns:
    [n, d] in x's dtype.
  """
  n, k = experts_nk.shape
  flat = experts_nk.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
  group_sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
  xs = x_nd[order // k]
  h = (jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, group_sizes))
       * jax.lax.ragged_dot(xs, w_up, group_sizes))
  if hidden_fn is not None:
    h = hidden_fn(h)
  out = jax.lax.ragged_dot(h, w_down, group_sizes)[inverse].reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", out, gates_nk.astype(out.dtype))


def shared_swiglu(x_nd: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array, hidden_fn=None) -> jax.Array:
  """sum_s SwiGLU_s(x) for stacked shared experts w_gate/w_up [S, d, f], w_down [S, f, d]."""
  h = jax.nn.silu(jnp.einsum("nd,sdf->nsf", x_nd, w_gate)) * jnp.einsum("nd,sdf->nsf", x_nd, w_up)
  if hidden_fn is not None:
    h = hidden_fn(h)
  return jnp.einsum("nsf,sfd->nd", h, w_down)


class MoEFFN(nn.Module):
  """Shared plus top-k routed SwiGLU experts; a drop-in replacement for layers.mlp.SwiGLU.

  Parameters: router [d, N]; routed gate/up [N, d, f], down [N, f, d]; shared_gate/shared_up
  [S, d, f], shared_down [S, f, d] (absent when S = 0), with f = config.expert_width(d_ff).

  Sows (when the collection is mutable):
    losses/moe_balance: balance_loss_weight * balance loss (add it to the training loss).
    intermediates/moe_balance: the unweighted balance loss.
    intermediates/moe_load: [N] fraction of assignments each expert received.
  With a SpikeConfig (`spiking`, layers/spiking.py) the block input ("mlp_in", before the router)
  and every expert's hidden activations ("mlp_hidden") spike, and the expert weights may be INT8
  fake-quantized group-wise; the router stays dense.

  Attributes:
    d_model: model width d.
    d_ff: the model's dense FFN width (each expert's width when config.d_expert is None).
    config: the MoE options.
    dtype: computation dtype of the experts (routing is always float32).
    param_dtype: parameter dtype.
    spiking: None or a layers.spiking.SpikeConfig.
  """

  d_model: int
  d_ff: int
  config: MoEConfig = MoEConfig()
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  spiking: Any = None

  def _experts(self, prefix: str, count: int, lead_axis: str | None, f: int):
    d, pd = self.d_model, self.param_dtype
    return (
        P.param(self, prefix + "gate", P.dense_init(d), (count, d, f),
                (lead_axis, "embed", "mlp"), pd),
        P.param(self, prefix + "up", P.dense_init(d), (count, d, f),
                (lead_axis, "embed", "mlp"), pd),
        P.param(self, prefix + "down", P.dense_init(f), (count, f, d),
                (lead_axis, "mlp", "embed"), pd),
    )

  @nn.compact
  def __call__(self, x_bte: jax.Array, token_mask_bt: jax.Array | None = None) -> jax.Array:
    """Applies the block to x [b, t, d_model].

    Args:
      x_bte: activations [b, t, d_model].
      token_mask_bt: optional [b, t] weights for the balance loss and load (0 excludes a
        token, e.g. padding); every token is still transformed.

    Returns:
      [b, t, d_model] in self.dtype.
    """
    cfg = self.config
    d, f, num = self.d_model, cfg.expert_width(self.d_ff), cfg.num_experts
    w_router = P.param(self, "router", P.dense_init(d), (d, num), ("embed", None),
                       self.param_dtype)
    routed = self._experts("", num, "experts", f)
    shared = (self._experts("shared_", cfg.num_shared_experts, None, f)
              if cfg.num_shared_experts else None)

    b, t, _ = x_bte.shape
    x_nd = spike_input(self, x_bte.astype(self.dtype).reshape(b * t, d), "mlp_in", self.spiking)
    r = route(x_nd, w_router, cfg.top_k, cfg.normalize_top_k)
    cast = lambda ws: tuple(maybe_quantize_weight(w, self.spiking, fan_in_axes=(1,))
                            .astype(self.dtype) for w in ws)
    hidden = lambda h: spike_input(self, h, "mlp_hidden", self.spiking)
    y = routed_swiglu(x_nd, r.experts, r.gates, *cast(routed), hidden_fn=hidden)
    if shared is not None:
      y = y + shared_swiglu(x_nd, *cast(shared), hidden_fn=hidden)

    weights = None if token_mask_bt is None else token_mask_bt.reshape(b * t)
    loss = balance_loss(r.probs, r.experts, weights)
    self.sow("losses", "moe_balance", cfg.balance_loss_weight * loss)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "moe_balance", loss)
      self.sow("intermediates", "moe_load", expert_load(r.experts, num, weights))
    return y.reshape(b, t, d)


def upcycle_scale(config: MoEConfig) -> float:
  """alpha = (S + g)^(-1/3), g the total routed gate weight under a uniform router.

  With a uniform router each token's output is (S + g) x one expert's, g = k/N (or 1 with
  normalize_top_k); scaling each of an expert's three matrices by alpha scales their product by
  alpha^3 = 1/(S + g).
  """
  routed_mass = 1.0 if config.normalize_top_k else config.top_k / config.num_experts
  return (config.num_shared_experts + routed_mass) ** (-1.0 / 3.0)


def upcycle_params(dense_params, config: MoEConfig, *, rng: jax.Array | None = None,
                   router_stddev: float = 0.02) -> dict:
  """MoEFFN params whose every expert is the dense SwiGLU with each matrix scaled by alpha.

  Since silu is not homogeneous, with a uniform router the MoE output is exactly
  (S + g) * SwiGLU(x; alpha * gate, alpha * up, alpha * down) (see upcycle_scale), which is
  close to, not equal to, the dense output. With a zero router every top-k tie resolves to the
  lowest expert indices, so identical experts 0..k-1 take all tokens until the router learns;
  pass `rng` to start from a small random router that spreads them.

  Args:
    dense_params: {"gate": [d, f], "up": [d, f], "down": [f, d]}, plain arrays or flax boxed
      (nn.Partitioned) values, e.g. a SwiGLU's `variables["params"]`.
    config: the MoE options; config.d_expert must be None or f.
    rng: if given, the router is N(0, router_stddev^2); otherwise zeros (uniform routing).
    router_stddev: standard deviation of the random router.

  Returns:
    MoEFFN's params as plain arrays (use as `{"params": upcycle_params(...)}`).
  """
  dense = nn.meta.unbox(dense_params)
  missing = [name for name in _EXPERT_MATRICES if name not in dense]
  if missing:
    raise ValueError(f"upcycle_params: dense_params lacks {missing}; expected a SwiGLU's "
                     f"params {list(_EXPERT_MATRICES)}")
  w_gate, w_up, w_down = (jnp.asarray(dense[name]) for name in _EXPERT_MATRICES)
  d, f = w_gate.shape
  if w_up.shape != (d, f) or w_down.shape != (f, d):
    raise ValueError(f"upcycle_params: dense gate {w_gate.shape}, up {w_up.shape} and down "
                     f"{w_down.shape} are not a SwiGLU's [d, f], [d, f], [f, d]")
  if config.expert_width(f) != f:
    raise ValueError(f"MoEConfig.d_expert={config.d_expert} must be None or the dense FFN's "
                     f"width {f} to upcycle")

  alpha = upcycle_scale(config)
  n, s = config.num_experts, config.num_shared_experts
  if rng is None:
    router = jnp.zeros((d, n), w_gate.dtype)
  else:
    router = (router_stddev * jax.random.normal(rng, (d, n))).astype(w_gate.dtype)
  out = {"router": router}
  for name, w in zip(_EXPERT_MATRICES, (w_gate, w_up, w_down)):
    scaled = (alpha * w).astype(w.dtype)
    out[name] = jnp.broadcast_to(scaled, (n,) + w.shape)
    if s:
      out["shared_" + name] = jnp.broadcast_to(scaled, (s,) + w.shape)
  return out
