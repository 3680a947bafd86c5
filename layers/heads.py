"""The head layout shared by every attention-like mixer's config: heads, GQA key/value heads, width."""

import dataclasses

from sharding.validation import check_fields


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  """Base of the mixer configs that split d_model into heads.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); None means num_heads. Must divide num_heads.
    head_dim: None means d_model // num_heads.
  """

  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None

  def __post_init__(self):
    check_fields(self)
    name = type(self).__name__
    if self.num_heads < 1:
      raise ValueError(f"{name}.num_heads must be >= 1, got {self.num_heads}")
    if self.kv_heads < 1 or self.num_heads % self.kv_heads:
      raise ValueError(f"{name}.num_kv_heads={self.num_kv_heads} must be >= 1 and divide "
                       f"{name}.num_heads={self.num_heads}")
    if self.head_dim is not None and self.head_dim < 1:
      raise ValueError(f"{name}.head_dim={self.head_dim} must be >= 1")

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def resolved_head_dim(self, d_model: int) -> int:
    if self.head_dim is not None:
      return self.head_dim
    name = type(self).__name__
    if d_model % self.num_heads:
      raise ValueError(f"ModelConfig.d_model={d_model} is not divisible by "
                       f"{name}.num_heads={self.num_heads}; set {name}.head_dim")
    return d_model // self.num_heads
