"""Gin registration of lctx's config dataclasses.

Gin binds the config dataclasses (never layer internals): a gin file sets
`ModelConfig.d_model = 256`, `AttentionConfig.window = 128`, and so on. Code that needs the bound
values calls `configured(ModelConfig)`, which builds the dataclass through gin.
"""

import dataclasses

import gin

from layers.moe import MoEConfig
from layers.registry import available_mixers, get_mixer
from layers.rope import RopeScaling
from layers.spiking import SpikeConfig
from lctx.config import ModelConfig, mixer_defaults_unchecked
from lctx.data import DataConfig
from lctx.data.config import SourceConfig, TaskConfig
from lctx.evals.doc_loss import DocLossConfig
from lctx.evals.longeval import LongEvalConfig
from lctx.generate import GenerateConfig
from lctx.optim import OptimizerConfig
from lctx.patterns import LayerPattern
from lctx.trainer import TrainConfig
from lctx.transfer import TransferConfig
from lctx.ttt.perk import PERKConfig
from lctx.ttt.qttt import TTTConfig
from sharding.mesh import MeshConfig
from sharding.sequence import SequenceParallelConfig

# The configs an experiment is made of, by the name entry points use for them.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
            "train": TrainConfig, "mesh": MeshConfig, "generate": GenerateConfig,
            "longeval": LongEvalConfig, "doc_loss": DocLossConfig, "transfer": TransferConfig,
            "perk": PERKConfig}

_BOUND: dict[type, type] = {}


def register(cls: type) -> type:
  """Registers `cls` with gin under its class name (once per process); returns the gin wrapper."""
  if cls not in _BOUND:
    _BOUND[cls] = gin.external_configurable(cls, name=cls.__name__)
  return _BOUND[cls]


def configured(cls: type):
  """An instance of `cls` with the gin bindings applied (a ModelConfig with the bound configs of
  its mixers and nested configs, with_bound_subconfigs)."""
  if cls is ModelConfig:
    with mixer_defaults_unchecked():
      model = register(cls)()
    return with_bound_subconfigs(model)
  if cls is DataConfig:
    data = register(cls)()
    if data.task == TaskConfig():  # `TaskConfig.pairs = 4` applies without DataConfig.task = ...
      data = dataclasses.replace(data, task=configured(TaskConfig))
    return data
  return register(cls)()


def with_bound_subconfigs(model: ModelConfig) -> ModelConfig:
  """Fills in, through gin, the nested configs the model did not set explicitly.

  These are the Config of every mixer the model uses, the SequenceParallelConfig, SpikeConfig and
  MoEConfig, so `AttentionConfig.window = 128` or `SpikeConfig.enabled = True` in a gin file
  applies without also writing `ModelConfig.mixer_options = {"attention": @AttentionConfig()}` or
  `ModelConfig.spiking = @SpikeConfig()`.
  """
  options = dict(model.mixer_options)
  for name in sorted(set(model.mixer_names()) - set(options)):
    options[name] = configured(get_mixer(name).Config)
  nested = {}
  for field, cls in (("sequence_parallel", SequenceParallelConfig), ("spiking", SpikeConfig),
                     ("moe", MoEConfig)):
    if getattr(model, field) == cls():
      nested[field] = configured(cls)
  return dataclasses.replace(model, mixer_options=options, **nested)


for _cls in SECTIONS.values():
  register(_cls)
for _cls in (SequenceParallelConfig, SpikeConfig, MoEConfig, LayerPattern, TaskConfig,
             SourceConfig, RopeScaling, TTTConfig):
  register(_cls)
for _name in available_mixers():
  register(get_mixer(_name).Config)


def unused_mixer_bindings(model: ModelConfig) -> list[str]:
  """Warnings for mixer configs bound in gin that no layer of `model` uses (they have no effect)."""
  used = {type(model.mixer_config(name)).__name__ for name in model.mixer_names()}
  by_config: dict[str, list[str]] = {}
  for name in available_mixers():
    by_config.setdefault(get_mixer(name).Config.__name__, []).append(name)
  messages = []
  # The dense model's attention that a converted workdir binds as the teacher of attention
  # transfer (TransferConfig.teacher) is in use even when no layer is softmax attention.
  teacher = gin.get_bindings("TransferConfig").get("teacher")
  for config_name, mixers in sorted(by_config.items()):
    bound = gin.get_bindings(config_name)
    if teacher is not None and config_name == type(teacher).__name__:
      continue
    if bound and config_name not in used:
      settings = ", ".join(f"{config_name}.{k}" for k in sorted(bound))
      messages.append(f"{settings} bound but unused: no layer uses the {'/'.join(mixers)} "
                      f"mixer (ModelConfig.mixers={list(model.mixers)})")
  return messages
