"""PERK: meta-learned test-time learning of a LoRA adapter (RESEARCH.md section 5).

The base model stays frozen. For one example (context, question, answer):

  inner loop  the context is cut into segments of `segment_len` tokens, processed as one batch
              (each segment a sequence of its own); `inner_steps` steps of the weighted causal-LM
              loss of the segments update only the LoRA factors:
                lora_{k+1} = lora_k - softplus(rho_k) * d_k,
              d_k the gradient (sgd) or Adam's direction (optax.scale_by_adam, eps_root > 0 so
              that its second-order gradient is finite), rho_k a learned rate per LoRA element
              and step (softplus plus MIN_RATE: positive by construction). The loss of token t
              is weighted by w_t = 2 sigmoid(MLP([embedding(target_t), base_ce_t])), base_ce_t
              the frozen base model's loss on the token (one extra forward), so the weights are
              1 at the initialisation (the MLP's last layer starts at zero) and depend on the
              meta-parameters alone.
  outer loss  the answer's NLL given only the question, with the adapted weights (no context
              in the prompt).

The meta-parameters are the LoRA initialisation, the rates rho and the weighting MLP; the
meta-gradient is jax.grad of the outer loss through the unrolled inner loop. Truncation: only
the last `second_order_steps` inner steps carry second-order terms; each earlier step takes its
gradient at stop_gradient'ed parameters, so it passes the meta-gradient on through the identity
and to its rate only (first order). With `remat` each inner step is rematerialised
(jax.checkpoint), so memory does not grow with the stored activations of every step.

LoRA on a kernel W (a projection named in `targets`): W + (alpha / rank) * reshape(A @ B), with
A [fan_in, rank] and B [rank, fan_out]; the output projections "o" and "down" take their fan-in
from all axes but the last, the others from the first axis alone. A starts Gaussian (std
fan_in^-1/2), B at zero, so the adapter starts as the identity.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lctx.config import ModelConfig
from sharding.validation import check_fields

log = logging.getLogger("lctx")

OPTIMIZERS = ("sgd", "adam")
MIN_RATE = 1e-8  # added to every softplus'ed rate: softplus alone underflows to 0 in float32
OUTPUT_PROJECTIONS = ("o", "down")
_MODULES = ("mixer", "mlp")  # where LoRA targets live (MoE experts are not targets)


@dataclasses.dataclass(frozen=True)
class PERKConfig:
  """PERK's settings (gin/ttt/perk.gin).

  Attributes:
    enabled: `RunConfig.mode='train'` meta-trains PERK on a frozen base (TrainConfig.init_from)
      and `'longeval'` answers with PERK-adapted weights.
    rank: LoRA rank.
    alpha: LoRA scale numerator (the update is alpha / rank * A @ B).
    targets: names of the projections that get an adapter (e.g. "q", "k", "v", "o" of the
      mixers; "gate", "up", "down" of the SwiGLU FFNs).
    inner_steps: K, inner steps per example.
    second_order_steps: the last m of them that carry second-order gradients (0..K).
    segment_len: tokens per context segment of the inner loop (segments run as one batch).
    inner_optimizer: "adam" or "sgd" (the direction the learned rates scale).
    init_lr: every learned rate's initial value.
    weight_hidden: hidden width of the token-weighting MLP.
    question_tokens: tokens of the outer row (the query and the answer, padded) in
      meta-training.
    remat: rematerialise each inner step.
    seed: seed of the meta-parameters' initialisation.
  """

  enabled: bool = False
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "v")
  inner_steps: int = 4
  second_order_steps: int = 1
  segment_len: int = 128
  inner_optimizer: str = "adam"
  init_lr: float = 1e-3
  weight_hidden: int = 32
  question_tokens: int = 64
  remat: bool = True
  seed: int = 0

  def __post_init__(self):
    check_fields(self)
    for name in ("rank", "inner_steps", "weight_hidden", "question_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"PERKConfig.{name}={getattr(self, name)} must be >= 1")
    if not 0 <= self.second_order_steps <= self.inner_steps:
      raise ValueError(f"PERKConfig.second_order_steps={self.second_order_steps} must lie in "
                       f"[0, inner_steps={self.inner_steps}]")
    if self.segment_len < 2:
      raise ValueError(f"PERKConfig.segment_len={self.segment_len} must be >= 2")
    if self.inner_optimizer not in OPTIMIZERS:
      raise ValueError(f"PERKConfig.inner_optimizer={self.inner_optimizer!r} must be one of "
                       f"{OPTIMIZERS}")
    if not self.init_lr > MIN_RATE or not self.alpha > 0:
      raise ValueError(f"PERKConfig.init_lr={self.init_lr} must be > {MIN_RATE} and "
                       f"PERKConfig.alpha={self.alpha} > 0")
    if not self.targets:
      raise ValueError("PERKConfig.targets must name at least one projection")


def differentiable_model(model, perk: PERKConfig):
  """`model`, or, when `perk` takes second-order meta-gradients, its twin whose mixers are twice
  differentiable: the flash kernels' backward is a custom rule that cannot be differentiated
  again (its tile loops have traced bounds), so softmax layers then run impl="reference"
  (dense, exact) and linear layers the chunked pure-JAX "xla" path instead of Pallas. Logged."""
  if perk.second_order_steps == 0:  # every inner gradient is a constant: one level suffices
    return model
  cfg = model.config
  options, changed = dict(cfg.mixer_options), []
  for name in cfg.mixer_names():
    mixer = cfg.mixer_config(name)
    want = {"attention": "reference", "swa": "reference"}.get(name, "xla")
    if getattr(mixer, "impl", want) not in (want, "reference"):
      options[name] = dataclasses.replace(mixer, impl=want)
      changed.append(f"{name} impl={mixer.impl!r} -> {want!r}")
  if not changed:
    return model
  log.info("PERK: second-order meta-gradients differentiate the inner loop's backward again; "
           "the mixers run twice-differentiable implementations: %s", ", ".join(changed))
  return type(model)(dataclasses.replace(cfg, mixer_options=options), model.plan)


def _at_least_f32(x):
  """x in float32, or in its own wider dtype (float64 under jax_enable_x64, for checks)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _key(path) -> str:
  return ".".join(path)


def target_paths(abstract_params, perk: PERKConfig) -> list[tuple[str, ...]]:
  """The kernels that get an adapter; ValueError for a target that names no projection."""
  flat = traverse_util.flatten_dict(abstract_params)
  projections = {p for p, x in flat.items() if len(x.shape) >= 2 and
                 any(m in p for m in _MODULES)}
  names = sorted({p[-1] for p in projections})
  paths = []
  for target in perk.targets:
    mine = sorted(p for p in projections if p[-1] == target)
    if not mine:
      raise ValueError(f"PERKConfig.targets: {target!r} names no projection of the model; its "
                       f"projections are {names}")
    paths += mine
  return sorted(set(paths))


def _fans(path, shape) -> tuple[int, int]:
  if path[-1] in OUTPUT_PROJECTIONS:
    return math.prod(shape[:-1]), shape[-1]
  return shape[0], math.prod(shape[1:])


def init_meta(cfg: ModelConfig, abstract_params, perk: PERKConfig, key=None) -> dict:
  """The meta-parameters: {"lora": {path: {"a", "b"}}, "rates": the same tree with a leading
  [inner_steps] axis (pre-softplus), "weighting": the MLP}, float32."""
  key = jax.random.key(perk.seed) if key is None else key
  key, weighting_key = jax.random.split(key)
  flat = traverse_util.flatten_dict(abstract_params)
  lora, rates = {}, {}
  raw = float(np.log(np.expm1(perk.init_lr - MIN_RATE)))  # softplus^-1
  for i, path in enumerate(target_paths(abstract_params, perk)):
    fan_in, fan_out = _fans(path, flat[path].shape)
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, perk.rank)) * fan_in ** -0.5
    lora[_key(path)] = {"a": a, "b": jnp.zeros((perk.rank, fan_out))}
    rates[_key(path)] = {"a": jnp.full((perk.inner_steps, fan_in, perk.rank), raw),
                         "b": jnp.full((perk.inner_steps, perk.rank, fan_out), raw)}
  hidden, e = perk.weight_hidden, cfg.d_model
  w1 = jax.random.normal(weighting_key, (e + 1, hidden)) * (e + 1) ** -0.5
  weighting = {"w1": w1, "b1": jnp.zeros((hidden,)), "w2": jnp.zeros((hidden, 1)),
               "b2": jnp.zeros((1,))}
  meta = {"lora": lora, "rates": rates, "weighting": weighting}
  # Strong float32 throughout (jnp.full of a Python float is weakly typed): an updated state has
  # the same types, so a jitted step compiles once.
  return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32), meta)


def apply_lora(params, lora, perk: PERKConfig):
  """The base parameters with every adapter merged into its kernel."""
  flat = dict(traverse_util.flatten_dict(params))
  scale = perk.alpha / perk.rank
  for key, ab in lora.items():
    path = tuple(key.split("."))
    w = flat[path]
    delta = (ab["a"] @ ab["b"]).reshape(w.shape)
    flat[path] = (_at_least_f32(w) + scale * delta).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def token_weights(weighting, embedding, targets, base_ce):
  """w_t in (0, 2) from the target token's embedding and the base model's loss on it (both
  fixed by the frozen base, so the weights depend on the meta-parameters alone)."""
  features = jnp.concatenate([_at_least_f32(embedding[targets]), base_ce[..., None]], axis=-1)
  h = jax.nn.gelu(features @ weighting["w1"] + weighting["b1"])
  return 2.0 * jax.nn.sigmoid((h @ weighting["w2"] + weighting["b2"])[..., 0])


def segments(context, mask, segment_len: int):
  """The context [T] (mask [T], True where real) as [n, segment_len] rows, right-padded."""
  t = context.shape[0]
  n = -(-t // segment_len)
  pad = n * segment_len - t
  return (jnp.pad(context, (0, pad)).reshape(n, segment_len),
          jnp.pad(mask, (0, pad)).reshape(n, segment_len))


def segment_ce(model, params, seg_tokens, seg_mask):
  """Per-token next-token losses [n, S-1] of the segments, and where they count."""
  logits = model.apply({"params": params}, seg_tokens, segment_ids_bt=seg_mask.astype(jnp.int32))
  logp = jax.nn.log_softmax(_at_least_f32(logits[:, :-1]), axis=-1)
  ce = -jnp.take_along_axis(logp, seg_tokens[:, 1:, None], axis=-1)[..., 0]
  return ce, (seg_mask[:, 1:] & seg_mask[:, :-1]).astype(jnp.float32)


def inner_loss(model, base, lora, weights, seg_tokens, seg_mask, perk: PERKConfig):
  """The weighted next-token loss of the context segments with the adapter merged."""
  ce, valid = segment_ce(model, apply_lora(base, lora, perk), seg_tokens, seg_mask)
  return jnp.sum(weights * ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _direction(perk: PERKConfig):
  if perk.inner_optimizer == "adam":
    return optax.scale_by_adam(eps_root=1e-12)
  return optax.identity()


def adapt(model, base, meta, context, mask, perk: PERKConfig, *, return_losses: bool = False):
  """The LoRA factors after the inner loop on one context [T] (mask [T]); with return_losses
  also the inner loss before each step [K]."""
  seg_tokens, seg_mask = segments(context, mask, perk.segment_len)
  base_ce, _ = segment_ce(model, base, seg_tokens, seg_mask)
  weights = token_weights(meta["weighting"], base["embedding"], seg_tokens[:, 1:], base_ce)
  direction = _direction(perk)
  first_order = perk.inner_steps - perk.second_order_steps

  def step(second: bool, carry, k):
    lora, opt_state = carry
    if second:
      lora_at, w = lora, weights
    else:  # truncated: the gradient is taken at stop_gradient'ed parameters, and is a constant
      lora_at, w = jax.lax.stop_gradient(lora), jax.lax.stop_gradient(weights)
    loss, grads = jax.value_and_grad(inner_loss, argnums=2)(model, base, lora_at, w,
                                                            seg_tokens, seg_mask, perk)
    if not second:
      grads = jax.lax.stop_gradient(grads)
    d, opt_state = direction.update(grads, opt_state)
    rates = jax.tree.map(lambda r: jax.nn.softplus(r[k]) + MIN_RATE, meta["rates"])
    lora = jax.tree.map(lambda p, r, g: p - r * g, lora, rates, d)
    return (lora, opt_state), loss

  # One scan over the first-order steps, one over the second-order ones: each compiles its
  # step once, however many steps it runs.
  carry, losses = (meta["lora"], direction.init(meta["lora"])), []
  for second, ks in ((False, range(first_order)), (True, range(first_order, perk.inner_steps))):
    if len(ks):
      body = partial(step, second)
      carry, part = jax.lax.scan(jax.checkpoint(body) if perk.remat else body, carry,
                                 jnp.arange(ks.start, ks.stop))
      losses.append(part)
  lora, losses = carry[0], jnp.concatenate(losses)
  return (lora, losses) if return_losses else lora


def answer_nll(model, params, tokens, targets, weights):
  """The mean NLL over `weights` of one question + answer row [L] (no context)."""
  logits = model.apply({"params": params}, tokens[None])[0]
  logp = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  ce = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
  return jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1.0)


def example_loss(model, base, meta, example, perk: PERKConfig):
  """(outer loss, inner losses [K]) of one example: a dict of context [T], context_mask [T],
  tokens / targets / weights [L] (question + answer, the weights on the answer)."""
  lora, inner = adapt(model, base, meta, example["context"], example["context_mask"], perk,
                      return_losses=True)
  outer = answer_nll(model, apply_lora(base, lora, perk), example["tokens"], example["targets"],
                     example["weights"])
  return outer, inner


def meta_loss(meta, model, base, batch, perk: PERKConfig):
  """(mean outer loss over the batch's examples, aux: mean inner losses [K])."""
  outer, inner = jax.vmap(lambda ex: example_loss(model, base, meta, ex, perk))(batch)
  return jnp.mean(outer), jnp.mean(inner, axis=0)


def rates(meta) -> jax.Array:
  """Every learned rate, softplus'ed (positive by construction), flattened."""
  return jnp.concatenate([jax.nn.softplus(r).reshape(-1) + MIN_RATE
                          for r in jax.tree.leaves(meta["rates"])])
