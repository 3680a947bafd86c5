"""The decoder-only language model: embedding, pre-norm blocks (mixer + SwiGLU), RMSNorm, head.

Used functionally: `DecoderLM(cfg).init(rng, tokens)` / `.apply({"params": p}, tokens, ...)`.
"""

import flax.linen as nn
import jax.numpy as jnp

from layers import params as P
from layers.mlp import SwiGLU
from layers.norms import RMSNorm
from layers.registry import get_mixer
from lctx.config import ModelConfig
from sharding.sequence import active_layout


class Block(nn.Module):
  """x + mixer(norm(x)), then x + mlp(norm(x))."""

  config: ModelConfig
  layer_index: int

  @nn.compact
  def __call__(self, x_bte, positions_bt, segment_ids_bt, decode: bool = False):
    cfg = self.config
    dt, pdt = cfg.compute_dtype, cfg.storage_dtype
    name = cfg.layer_mixers()[self.layer_index]
    mixer = get_mixer(name)(config=cfg.mixer_config(name), d_model=cfg.d_model,
                            layer_index=self.layer_index, num_layers=cfg.num_layers, dtype=dt,
                            param_dtype=pdt, sequence_parallel=cfg.sequence_parallel,
                            name="mixer")
    h = RMSNorm(cfg.norm_eps, dt, pdt, name="mixer_norm")(x_bte)
    x_bte = x_bte + mixer(h, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt,
                          decode=decode)
    h = RMSNorm(cfg.norm_eps, dt, pdt, name="mlp_norm")(x_bte)
    x_bte = x_bte + SwiGLU(cfg.d_model, cfg.d_ff, dt, pdt, name="mlp")(h)
    return nn.with_logical_constraint(x_bte, ("batch", "length", "embed"))


class DecoderLM(nn.Module):
  """Returns float32 logits [b, t, v].

  Call args:
    tokens_bt: int token ids.
    positions_bt: positions used by RoPE (per-document positions for packed rows); default arange.
    segment_ids_bt: document ids of a packed row (0 = padding); None means one document per row.
    decode: incremental decoding with the "cache" collection (positions are absolute).

  Sequence parallelism (ModelConfig.sequence_parallel, inside a mesh with a `seq` axis > 1):
  with the zigzag layout the tokens, positions and segment ids are permuted into layout order once
  here and the logits permuted back, so callers always see natural order.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, decode: bool = False):
    cfg = self.config
    dt, pdt = cfg.compute_dtype, cfg.storage_dtype
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    layout = None if decode else active_layout(cfg.sequence_parallel)
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
      x = block(cfg, i, name=f"layer_{i}")(x, positions_bt, segment_ids_bt, decode)
    x = RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("bte,ve->btv", x, embedding.astype(dt)) * cfg.d_model ** -0.5
    else:
      head = P.param(self, "head", P.dense_init(cfg.d_model), (cfg.d_model, cfg.vocab_size),
                     ("embed", "vocab"), pdt)
      logits = x @ head.astype(dt)
    logits = logits.astype(jnp.float32)
    return logits if layout is None else layout.from_layout(logits)
