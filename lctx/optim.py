"""AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask."""

import dataclasses

import jax
import optax
from sharding.validation import check_fields


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Attributes:
    learning_rate: peak learning rate, reached after `warmup_steps`.
    warmup_steps: linear warmup from 0.
    end_lr_fraction: the cosine decays to learning_rate * end_lr_fraction at the last step.
    b1, b2, eps: Adam moments.
    weight_decay: decoupled (AdamW) weight decay.
    no_decay: parameters whose name (last path entry) is listed get no weight decay.
    clip_norm: global gradient-norm clip; 0 disables clipping.
  """

  learning_rate: float = 3e-3
  warmup_steps: int = 50
  end_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  no_decay: tuple[str, ...] = ("scale", "bias", "q_bias", "k_bias", "v_bias")
  clip_norm: float = 1.0

  def __post_init__(self):
    check_fields(self)
    if not self.learning_rate > 0:
      raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
    if not 0 <= self.end_lr_fraction <= 1:
      raise ValueError(f"OptimizerConfig.end_lr_fraction must be in [0, 1], got "
                       f"{self.end_lr_fraction}")
    if self.clip_norm < 0 or self.weight_decay < 0:
      raise ValueError("OptimizerConfig.clip_norm and OptimizerConfig.weight_decay must be >= 0")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate,
      warmup_steps=min(cfg.warmup_steps, max(total_steps - 1, 0)),
      decay_steps=max(total_steps, 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)


def decay_mask(params, no_decay: tuple[str, ...]):
  """True for parameters that get weight decay."""

  def keep(path, _):
    # The last dict key names the parameter; boxed (logically partitioned) leaves add an
    # attribute entry after it, which is skipped.
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return not names or str(names[-1]) not in no_decay

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=lambda p: decay_mask(p, cfg.no_decay)))
  return optax.chain(*parts), schedule
