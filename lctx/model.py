"""The decoder-only language model: embedding, pre-norm blocks (mixer + FFN), RMSNorm, head.

Used functionally: `DecoderLM(cfg).init(rng, tokens)` / `.apply({"params": p}, tokens, ...)`.
A block's mixer is one registered mixer, or several in parallel ("gla+swa", layers/hybrid.py);
its FFN is a SwiGLU or, with MoEConfig.enabled outside `dense_layers`, a mixture of experts
that sows its load-balancing loss into the "losses" collection. With SpikeConfig.enabled the
projection inputs spike and sow their statistics into "intermediates" (when that collection is
mutable); the embedding and the output head stay dense.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from layers import params as P
from layers.hybrid import ParallelMixers
from layers.mlp import SwiGLU
from layers.moe import MoEFFN
from layers.norms import RMSNorm
from layers.registry import get_mixer
from lctx.config import ModelConfig
from sharding.plan import ExecutionPlan


def make_mixer(cfg: ModelConfig, i: int, plan: ExecutionPlan | None = None) -> nn.Module:
  """Layer i's sequence mixer (named "mixer", as in its Block)."""
  dt, pdt = cfg.compute_dtype, cfg.storage_dtype
  common = dict(d_model=cfg.d_model, layer_index=i, num_layers=cfg.num_layers, dtype=dt,
                param_dtype=pdt, plan=plan, spiking=cfg.spiking, name="mixer")
  parts = cfg.layer_mixers()[i].split("+")
  if len(parts) == 1:
    return get_mixer(parts[0])(config=cfg.mixer_config(parts[0]), **common)
  return ParallelMixers(config=tuple((p, cfg.mixer_config(p)) for p in parts),
                        norm_eps=cfg.norm_eps, **common)


class Block(nn.Module):
  """x + mixer(norm(x)), then x + ffn(norm(x)).

  With the "transfer" collection mutable, the mixer's input and output are sown there
  ("mixer_in", "mixer_out"; attention transfer, lctx/transfer.py)."""

  config: ModelConfig
  layer_index: int
  plan: ExecutionPlan | None = None

  @nn.compact
  def __call__(self, x_bte, positions_bt, segment_ids_bt, decode: bool = False):
    cfg, i = self.config, self.layer_index
    dt, pdt = cfg.compute_dtype, cfg.storage_dtype
    mixer = make_mixer(cfg, i, self.plan)
    h = RMSNorm(cfg.norm_eps, dt, pdt, name="mixer_norm")(x_bte)
    y = mixer(h, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, decode=decode)
    self.sow("transfer", "mixer_in", h)
    self.sow("transfer", "mixer_out", y)
    x_bte = x_bte + y
    if cfg.d_ff == 0 and not cfg.uses_moe(i):  # a mixer-only block
      return nn.with_logical_constraint(x_bte, ("batch", "length", "embed"))
    h = RMSNorm(cfg.norm_eps, dt, pdt, name="mlp_norm")(x_bte)
    if cfg.uses_moe(i):
      ffn = MoEFFN(cfg.d_model, cfg.d_ff, cfg.moe, dt, pdt, spiking=cfg.spiking, name="moe")
    else:
      ffn = SwiGLU(cfg.d_model, cfg.d_ff, dt, pdt, spiking=cfg.spiking, name="mlp")
    if cfg.uses_moe(i):  # padding (segment 0) takes no part in the load-balancing loss
      mask = None if segment_ids_bt is None else segment_ids_bt > 0
      x_bte = x_bte + ffn(h, mask)
    else:
      x_bte = x_bte + ffn(h)
    return nn.with_logical_constraint(x_bte, ("batch", "length", "embed"))


class DecoderLM(nn.Module):
  """Returns float32 logits [b, t, v].

  Call args:
    tokens_bt: int token ids.
    positions_bt: positions used by RoPE (per-document positions for packed rows); default arange.
    segment_ids_bt: document ids of a packed row (0 = padding); None means one document per row.
    decode: incremental decoding with the "cache" collection (positions are absolute).

  Sequence parallelism comes with the execution plan (sharding/plan.py; `lctx.state.build` makes
  it from ModelConfig.sequence_parallel and the mesh): with the zigzag layout the tokens, positions
  and segment ids are permuted into layout order once here and the logits permuted back, so
  callers always see natural order. Without a plan every op runs its single-device form.
  """

  config: ModelConfig
  plan: ExecutionPlan | None = None

  @nn.compact
  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, decode: bool = False):
    cfg = self.config
    dt, pdt = cfg.compute_dtype, cfg.storage_dtype
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    layout = None if decode or self.plan is None else self.plan.layout
    if layout is not None:
      layout.check_length(t, what="ModelConfig: the input length")
      tokens_bt, positions_bt = layout.to_layout(tokens_bt), layout.to_layout(positions_bt)
      if segment_ids_bt is not None:
        segment_ids_bt = layout.to_layout(segment_ids_bt)
    embedding = P.param(self, "embedding", nn.initializers.normal(1.0), (cfg.vocab_size,
                        cfg.d_model), ("vocab", "embed"), pdt)
    x = jnp.take(embedding, tokens_bt, axis=0).astype(dt)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    block = nn.remat(Block, static_argnums=(4,)) if cfg.remat else Block
    for i in range(cfg.num_layers):
      x = block(cfg, i, self.plan, name=f"layer_{i}")(x, positions_bt, segment_ids_bt, decode)
    x = RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("bte,ve->btv", x, embedding.astype(dt))
      if cfg.scale_tied_logits:
        logits = logits * cfg.d_model ** -0.5
    else:
      head = P.param(self, "head", P.dense_init(cfg.d_model), (cfg.d_model, cfg.vocab_size),
                     ("embed", "vocab"), pdt)
      logits = x @ head.astype(dt)
    logits = logits.astype(jnp.float32)
    return logits if layout is None else layout.from_layout(logits)


def abstract_params(cfg: ModelConfig) -> dict:
  """The shapes and dtypes (jax.ShapeDtypeStruct, unboxed) of DecoderLM(cfg)'s parameters,
  traced without computing them."""
  boxed = jax.eval_shape(lambda: DecoderLM(cfg).init(jax.random.key(0),
                                                     jnp.zeros((1, 2), jnp.int32)))
  return nn.unbox(boxed["params"])


def init_params(module: nn.Module, key, *args, **kwargs) -> dict:
  """module.init(key, *args, **kwargs)["params"] in one compile (args are arrays, kwargs static).

  An eager `init` runs the whole forward op by op, each primitive compiled on its own: about
  twice the time of this jitted init, whose unused forward outputs XLA drops.
  """
  return jax.jit(lambda k, *a: module.init(k, *a, **kwargs)["params"])(key, *args)
