"""Model configuration: one frozen dataclass, bound by gin (see lctx/configurables.py)."""

import contextlib
import contextvars
import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from layers.moe import MoEConfig
from layers.registry import available_mixers, get_mixer
from layers.spiking import SpikeConfig
from sharding.validation import check_fields
from lctx.patterns import LayerPattern
from sharding.sequence import SequenceParallelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(name: str, setting: str):
  try:
    return _DTYPES[name]
  except KeyError:
    raise ValueError(f"{setting}={name!r}: allowed values are {sorted(_DTYPES)}") from None


_CHECK_DEFAULT_MIXERS = contextvars.ContextVar("lctx_check_default_mixers", default=True)


@contextlib.contextmanager
def mixer_defaults_unchecked():
  """ModelConfigs built inside do not judge the head widths of mixers they hold no config for.

  Gin builds ModelConfig before the mixer configs it binds are filled in
  (configurables.with_bound_subconfigs, which builds it again and checks them); judging the
  default configs in between would refuse d_model=30 with num_heads=6 bound.
  """
  token = _CHECK_DEFAULT_MIXERS.set(False)
  try:
    yield
  finally:
    _CHECK_DEFAULT_MIXERS.reset(token)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only LM.

  Attributes:
    vocab_size: must equal the tokenizer's vocabulary size (checked at start-up).
    d_model, num_layers, d_ff: widths and depth; d_ff = 0 leaves the FFN out (mixer-only blocks,
      as in Zoology's MQAR models), except in MoE layers.
    mixers: mixer names from layers.registry, one per layer or a single name for every layer, or
      a LayerPattern (lctx/patterns.py; `ModelConfig.mixers = @LayerPattern()` in gin), expanded
      here into one name per layer. A name joining mixers with "+" ("gla+swa") makes that layer
      an intra-layer parallel hybrid (layers/hybrid.py).
    mixer_options: mixer name -> that mixer's Config (a dict; kept as sorted pairs); a missing
      entry uses the mixer's default Config.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: the output head reuses the input embedding.
    scale_tied_logits: with tie_embeddings, multiply the logits by d_model^-0.5 (lctx's own
      models); imported Hugging Face models (Qwen2.5 up to 3B) use the embedding unscaled.
    dtype: compute dtype ("float32" or "bfloat16"); logits and losses are always float32.
    param_dtype: storage dtype of the parameters.
    remat: rematerialize each block in the backward pass (saves activation memory).
    sequence_parallel: how the layers split the sequence over the `seq` mesh axis (method per
      layer type and token layout); bound in gin as `SequenceParallelConfig.method = 'ring'` etc.
    spiking: adaptive-threshold spiking of projection inputs and INT8 fake quantization
      (layers/spiking.py); off unless `SpikeConfig.enabled = True`.
    moe: mixture-of-experts FFNs (layers/moe.py); off unless `MoEConfig.enabled = True`, and then
      every layer not in `MoEConfig.dense_layers` routes its FFN over experts.
  """

  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  d_ff: int = 768
  mixers: tuple[str, ...] | LayerPattern = ("attention",)
  mixer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  scale_tied_logits: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  sequence_parallel: SequenceParallelConfig = SequenceParallelConfig()
  spiking: SpikeConfig = SpikeConfig()
  moe: MoEConfig = MoEConfig()

  def __post_init__(self):
    if isinstance(self.mixers, str):
      object.__setattr__(self, "mixers", (self.mixers,))
    elif isinstance(self.mixers, LayerPattern):
      object.__setattr__(self, "mixers", self.mixers.expand(self.num_layers))
    elif isinstance(self.mixers, list):
      object.__setattr__(self, "mixers", tuple(self.mixers))
    if not (isinstance(self.mixers, tuple) and all(isinstance(m, str) for m in self.mixers)):
      raise ValueError(f"ModelConfig.mixers={self.mixers!r} must be a mixer name, a list of "
                       "names or a LayerPattern")
    check_fields(self)
    # Stored as sorted (name, config) pairs so that the config (and modules holding it) hash.
    object.__setattr__(self, "mixer_options", tuple(sorted(dict(self.mixer_options).items())))
    for name in ("vocab_size", "d_model", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.d_ff < 0:
      raise ValueError(f"ModelConfig.d_ff must be >= 0 (0: no FFN), got {self.d_ff}")
    if len(self.mixers) not in (1, self.num_layers):
      raise ValueError(f"ModelConfig.mixers has {len(self.mixers)} entries; give one name or "
                       f"num_layers={self.num_layers} names")
    for name in self.mixers:
      parts = name.split("+")
      for part in parts:
        if part not in available_mixers():
          raise ValueError(f"ModelConfig.mixers: unknown mixer {part!r}; registered mixers: "
                           f"{available_mixers()}")
      if len(set(parts)) != len(parts):
        raise ValueError(f"ModelConfig.mixers: parallel hybrid {name!r} repeats a mixer")
    for name, cls in (("spiking", SpikeConfig), ("moe", MoEConfig),
                      ("sequence_parallel", SequenceParallelConfig)):
      if not isinstance(getattr(self, name), cls):
        raise ValueError(f"ModelConfig.{name} must be a {cls.__name__}, got "
                         f"{type(getattr(self, name)).__name__}")
    late = [i for i in self.moe.dense_layers if i >= self.num_layers]
    if self.moe.enabled and late:
      raise ValueError(f"MoEConfig.dense_layers={self.moe.dense_layers}: indices {late} are >= "
                       f"ModelConfig.num_layers={self.num_layers} (indices are 0-based)")
    if self.moe.enabled and self.d_ff == 0 and self.moe.d_expert is None:
      raise ValueError("ModelConfig.d_ff=0 with MoEConfig.enabled: the experts take their width "
                       "from d_ff; set ModelConfig.d_ff or MoEConfig.d_expert")
    for name, options in self.mixer_options:
      cls = get_mixer(name) if name in available_mixers() else None
      if cls is None:
        raise ValueError(f"ModelConfig.mixer_options: unknown mixer {name!r}; registered "
                         f"mixers: {available_mixers()}")
      if not isinstance(options, cls.Config):
        raise ValueError(f"ModelConfig.mixer_options[{name!r}] must be a {cls.Config.__name__}, "
                         f"got {type(options).__name__}")
    resolve_dtype(self.dtype, "ModelConfig.dtype")
    resolve_dtype(self.param_dtype, "ModelConfig.param_dtype")
    if self.norm_eps <= 0:
      raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
    held = dict(self.mixer_options)
    for name in self.mixer_names():  # resolve dims now so bad shapes fail before tracing
      if name not in held and not _CHECK_DEFAULT_MIXERS.get():
        continue
      options = self.mixer_config(name)
      if hasattr(options, "resolved_head_dim"):
        options.resolved_head_dim(self.d_model)

  def layer_mixers(self) -> tuple[str, ...]:
    """The mixer name of every layer."""
    return self.mixers * self.num_layers if len(self.mixers) == 1 else self.mixers

  def mixer_names(self) -> tuple[str, ...]:
    """The registered mixers the model uses (the branches of parallel hybrids included)."""
    return tuple(sorted({part for name in self.mixers for part in name.split("+")}))

  def uses_moe(self, layer_index: int) -> bool:
    """Whether layer `layer_index`'s FFN is a mixture of experts."""
    return self.moe.enabled and layer_index not in self.moe.dense_layers

  def linear_chunk_sizes(self) -> tuple[int, ...]:
    """Chunk sizes of the model's chunked (linear-attention) layers."""
    return tuple(sorted({c.chunk_size for c in map(self.mixer_config, self.mixer_names())
                         if hasattr(c, "chunk_size")}))

  def mixer_config(self, name: str):
    return dict(self.mixer_options).get(name) or get_mixer(name).Config()

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return _DTYPES[self.param_dtype]
