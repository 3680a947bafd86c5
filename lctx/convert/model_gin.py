"""A ModelConfig written back as gin bindings (the `model.gin` of a converted workdir).

Only settings that differ from the dataclass defaults are written; nested configs (a mixer's
Config, its RopeScaling, SequenceParallelConfig, SpikeConfig, MoEConfig) are bound through their
own class names, which `lctx.configurables.configured(ModelConfig)` reads back, so parsing the
text gives an equal ModelConfig.
"""

import dataclasses

from lctx.config import ModelConfig

_NESTED_MODEL_FIELDS = ("mixer_options", "sequence_parallel", "spiking", "moe")


def _changed(obj) -> list[tuple[str, object]]:
  default = type(obj)()
  return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)
          if getattr(obj, f.name) != getattr(default, f.name)]


def _bind(lines: list[str], seen: dict, obj) -> None:
  """Appends `Class.field = value` for obj's non-default fields (nested dataclasses by @ref)."""
  name = type(obj).__name__
  if name in seen:
    if seen[name] != obj:
      raise ValueError(f"model_gin: two different {name}s in one model cannot share the "
                       f"unscoped gin bindings of {name}")
    return
  seen[name] = obj
  for field, value in _changed(obj):
    if dataclasses.is_dataclass(value):
      lines.append(f"{name}.{field} = @{type(value).__name__}()")
      _bind(lines, seen, value)
    else:
      lines.append(f"{name}.{field} = {value!r}")


def model_gin(cfg: ModelConfig, *, tokenizer: str | None = None, header: str = "",
              teacher=None) -> str:
  """Gin text that configures `cfg` (and DataConfig.tokenizer when given; and
  TransferConfig.teacher, the dense model's AttentionConfig, when given)."""
  lines = [f"# {line}" for line in header.splitlines()]
  for field, value in _changed(cfg):
    if field not in _NESTED_MODEL_FIELDS:
      lines.append(f"ModelConfig.{field} = {value!r}")
  seen: dict = {}
  for _, options in cfg.mixer_options:
    _bind(lines, seen, options)
  for field in _NESTED_MODEL_FIELDS[1:]:
    _bind(lines, seen, getattr(cfg, field))
  if teacher is not None:
    lines.append("# The dense model's attention: the teacher of RunConfig.mode = "
                 "'attention_transfer'")
    lines.append(f"TransferConfig.teacher = @{type(teacher).__name__}()")
    _bind(lines, seen, teacher)
  if tokenizer is not None:
    lines.append(f"DataConfig.tokenizer = {tokenizer!r}")
  return "\n".join(lines) + "\n"
