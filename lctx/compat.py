"""Does a checkpoint fit the configured model? Compared from metadata, before anything is written.

A checkpoint's tree (parameter paths and shapes, read from its metadata without loading arrays)
is compared with the abstract state of the model the configs build. On a mismatch the error names
the first differing parameter and the settings likely responsible: the bindings that differ
between the workdir's `config.gin` (written by the run that saved the checkpoint) and the
configuration of this run, or, without that file, the model dimensions equal to the new size.
"""

import os

import jax

from lctx.config import ModelConfig

# Configurables whose bindings decide the parameter tree, and those that decide the optimizer's.
MODEL_CONFIGURABLES = ("ModelConfig", "LayerPattern", "MoEConfig", "SpikeConfig")
OPTIMIZER_CONFIGURABLES = ("OptimizerConfig",)


def _entry_name(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def tree_signature(tree) -> dict[str, tuple[int, ...]]:
  """{"params/layer_0/mixer/q": shape, ...} of every array leaf of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_entry_name(e) for e in path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in leaves}


def first_mismatch(saved: dict, wanted: dict) -> tuple[str, str] | None:
  """(path, description) of the first difference between two signatures, or None; parameters
  are compared before the optimizer state that mirrors them."""
  for path in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith("params/"), p)):
    if path not in saved:
      return path, f"{path} is in the configured model but not in the checkpoint"
    if path not in wanted:
      return path, f"{path} is in the checkpoint but not in the configured model"
    if saved[path] != wanted[path]:
      return path, (f"{path} has shape {saved[path]} in the checkpoint and {wanted[path]} in the "
                    f"configured model")
  return None


def parse_operative_config(text: str) -> dict[str, str]:
  """`NAME = VALUE` bindings of a gin operative config (continuation lines joined, macros
  substituted), as canonical text."""
  bindings, name = {}, None
  for raw in text.splitlines():
    line = raw.rstrip()
    if not line or line.lstrip().startswith("#"):
      name = None
      continue
    if name is not None and (raw[:1].isspace() or bindings[name].endswith("\\")):
      bindings[name] = bindings[name].rstrip("\\").rstrip() + " " + line.strip()
      continue
    key, sep, value = line.partition("=")
    if not sep:
      continue
    name = key.strip()
    bindings[name] = value.strip()
  macros = {k: v for k, v in bindings.items() if "." not in k}
  return {k: macros.get(v[1:], v) if v.startswith("%") else v for k, v in bindings.items()}


def config_differences(old_text: str, new_text: str, configurables) -> list[str]:
  """"Config.field: OLD -> NEW" for the bindings of `configurables` that differ."""
  old, new = parse_operative_config(old_text), parse_operative_config(new_text)
  prefix = lambda name: name.split(".")[0]
  # A configurable that only one run used (another mixer) shows up as ModelConfig.mixers.
  common = {prefix(n) for n in old} & {prefix(n) for n in new}
  out = []
  for name in sorted(set(old) | set(new)):
    if (prefix(name) in configurables and prefix(name) in common
        and old.get(name) != new.get(name)):
      out.append(f"{name}: {old.get(name, '(unset)')} -> {new.get(name, '(unset)')}")
  return out


def _dimension_hints(model_cfg: ModelConfig, path: str, saved, wanted) -> list[str]:
  """Model settings whose value is one of the configured sizes that differ from the checkpoint."""
  if saved is None or wanted is None:
    return ["ModelConfig.num_layers", "ModelConfig.mixers"] if "/layer_" in path else []
  sizes = {w for s, w in zip(saved, wanted) if s != w} if len(saved) == len(wanted) else set(wanted)
  hints = [f"ModelConfig.{f}={getattr(model_cfg, f)}" for f in ("d_model", "d_ff", "vocab_size")
           if getattr(model_cfg, f) in sizes]
  for name in model_cfg.mixer_names():
    cfg = model_cfg.mixer_config(name)
    for field in ("num_heads", "num_kv_heads", "head_dim"):
      value = getattr(cfg, field, None)
      if value is not None and value in sizes or (
          field == "head_dim" and hasattr(cfg, "resolved_head_dim")
          and cfg.resolved_head_dim(model_cfg.d_model) in sizes):
        hints.append(f"{type(cfg).__name__}.{field}")
  return hints


def check_matches(saved: dict, wanted: dict, *, step: int, step_dir: str, workdir: str,
                  gin_text: str | None, model_cfg: ModelConfig) -> None:
  """Raises ValueError naming the first mismatch and the likely settings, if any."""
  found = first_mismatch(saved, wanted)
  if found is None:
    return
  path, description = found
  if path.startswith("opt_state") and saved and all(k.startswith("params/") for k in saved):
    raise ValueError(f"the checkpoint at step {step} ({step_dir}) holds parameters only (an "
                     f"imported or converted model, experiments.convert): evaluate or generate "
                     f"from it here, or train from it in a new --workdir with "
                     f"--gin.TrainConfig.init_from={workdir}")
  configurables = (MODEL_CONFIGURABLES + OPTIMIZER_CONFIGURABLES
                   + tuple(type(model_cfg.mixer_config(n)).__name__
                           for n in model_cfg.mixer_names()))
  previous = os.path.join(workdir, "config.gin")
  diffs = []
  if gin_text is not None and os.path.exists(previous):
    with open(previous) as f:
      diffs = config_differences(f.read(), gin_text, configurables)
  if diffs:
    likely = (f"settings that differ from the run that saved it ({previous}): "
              + "; ".join(diffs))
  else:
    hints = ([] if path.startswith("opt_state") else
             _dimension_hints(model_cfg, path, saved.get(path), wanted.get(path)))
    likely = ("likely " + ", ".join(hints)) if hints else (
        "check the OptimizerConfig settings" if path.startswith("opt_state")
        else "check the ModelConfig and mixer settings")
  raise ValueError(f"the checkpoint at step {step} ({step_dir}) does not match the configured "
                   f"model: {description}; {likely}. Use the settings it was trained with, or "
                   f"another --workdir")
