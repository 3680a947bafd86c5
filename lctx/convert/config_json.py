"""A ModelConfig as JSON and back (the "lctx_config" of config.json files lctx writes).

Every nested config dataclass is written as {"class": its name, "fields": {...}} with only the
fields that differ from the class defaults; tuples become lists (the dataclasses turn them back
into tuples). `from_json(to_json(cfg)) == cfg` for every ModelConfig.
"""

import dataclasses

from layers.moe import MoEConfig
from layers.registry import available_mixers, get_mixer
from layers.rope import RopeScaling
from layers.spiking import SpikeConfig
from lctx.config import ModelConfig
from lctx.patterns import LayerPattern
from sharding.sequence import SequenceParallelConfig


def _classes() -> dict[str, type]:
  classes = [ModelConfig, MoEConfig, RopeScaling, SpikeConfig, SequenceParallelConfig,
             LayerPattern]
  classes += [get_mixer(name).Config for name in available_mixers()]
  return {cls.__name__: cls for cls in classes}


def _encode(value):
  if dataclasses.is_dataclass(value):
    default = type(value)()
    fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)
              if getattr(value, f.name) != getattr(default, f.name)}
    return {"class": type(value).__name__, "fields": fields}
  if isinstance(value, (tuple, list)):
    return [_encode(v) for v in value]
  return value


def to_json(cfg: ModelConfig) -> dict:
  """JSON-serialisable description of `cfg` (mixer_options as {name: config})."""
  out = _encode(dataclasses.replace(cfg, mixer_options={}))
  out["fields"]["mixer_options"] = {name: _encode(options) for name, options in cfg.mixer_options}
  return out


def _decode(value, classes: dict[str, type], where: str):
  if isinstance(value, dict) and set(value) == {"class", "fields"}:
    cls = classes.get(value["class"])
    if cls is None:
      raise ValueError(f"{where}: unknown config class {value['class']!r}")
    fields = {k: _decode(v, classes, f"{where}.{k}") for k, v in value["fields"].items()}
    if cls is ModelConfig:
      fields["mixer_options"] = {name: _decode(v, classes, f"{where}.mixer_options.{name}")
                                 for name, v in value["fields"].get("mixer_options", {}).items()}
    try:
      return cls(**fields)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: {e}") from None
  if isinstance(value, list):
    return tuple(_decode(v, classes, where) for v in value)
  return value


def from_json(data: dict, where: str = "lctx_config") -> ModelConfig:
  """The ModelConfig `to_json` described; ValueError naming `where` for anything else."""
  cfg = _decode(data, _classes(), where)
  if not isinstance(cfg, ModelConfig):
    raise ValueError(f"{where}: not a ModelConfig")
  return cfg
