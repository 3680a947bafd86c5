"""The starting state of a fresh run initialised from elsewhere (TrainConfig.init_from).

`init_from` names a Hugging Face model directory (it holds config.json), a converted workdir
(experiments.convert) or another run's workdir, optionally with `@step` ("runs/stage1@5000"; the
newest checkpoint otherwise). The parameters are read into the configured model's shardings after
their tree is compared with the configured model's, so settings that hold no parameter (a raised
RoPE base, a RoPE scaling, a longer sequence) take effect on load. With `init_optimizer_state` the
optimizer state of a run's checkpoint is carried over too (ProLong's stage 2 continues stage 1's
AdamW moments) with the learning-rate schedule restarted; otherwise it is fresh. The step counter
always starts at 0.
"""

import os

import jax
import jax.numpy as jnp
import optax

from lctx import compat
from lctx.checkpoint import Checkpointer, CheckpointUnreadable
from lctx.config import ModelConfig
from lctx.state import ModelOnMesh


def parse(init_from: str) -> tuple[str, int | None]:
  """("path", step or None) of "path" or "path@step"."""
  path, sep, step = init_from.rpartition("@")
  if sep and step.isdigit():
    return path, int(step)
  return init_from, None


def _check_tree(params_signature: dict, m: ModelOnMesh, source: str) -> None:
  wanted = compat.tree_signature({"params": m.abstract_params})
  found = compat.first_mismatch(params_signature, wanted)
  if found is not None:
    raise ValueError(f"TrainConfig.init_from={source}: its parameters do not fit the configured "
                     f"model: {found[1]}; configure the model it holds (its model.gin or "
                     f"config.gin)")


def restart_schedules(opt_state):
  """opt_state with the step count of every learning-rate schedule set back to 0."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return jax.tree.map(lambda s: s._replace(count=jnp.zeros_like(s.count)) if is_schedule(s)
                      else s, opt_state, is_leaf=is_schedule)


def _from_hf(path: str, m: ModelOnMesh, model_cfg: ModelConfig):
  from lctx.convert import hf
  _, params = hf.load_pretrained(path, mesh=m.mesh, param_dtype=model_cfg.param_dtype)
  _check_tree(compat.tree_signature({"params": params}), m, path)
  return params


def _from_workdir(path: str, step, m: ModelOnMesh, carry_optimizer: bool, source: str):
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"TrainConfig.init_from={source}: {path} holds neither config.json (a "
                     f"Hugging Face model) nor checkpoints/ (an lctx workdir)")
  ckpt = Checkpointer(directory)
  try:
    step = ckpt.choose_step(step, f"TrainConfig.init_from={source}")
    saved = ckpt.tree_signature(step)
    _check_tree({k: v for k, v in saved.items() if k.startswith("params/")}, m, source)
    if not carry_optimizer:
      return ckpt.restore_params(m.abstract_params, step), None, step
    if not any(k.startswith("opt_state/") for k in saved):
      raise ValueError(f"TrainConfig.init_optimizer_state=True: the checkpoint of step {step} "
                       f"in {directory} holds no optimizer state (parameters only)")
    found = compat.first_mismatch(saved, compat.tree_signature(m.abstract_state))
    if found is not None:
      raise ValueError(f"TrainConfig.init_optimizer_state=True: the optimizer state of "
                       f"{source} does not fit the configured optimizer: {found[1]}")
    state, _ = ckpt.restore(m.abstract_state, step)
    return state["params"], state["opt_state"], step
  except CheckpointUnreadable as e:
    raise ValueError(f"TrainConfig.init_from={source}: the checkpoint of step {step} in "
                     f"{directory} is unreadable: {e}") from None
  finally:
    ckpt.close()


def initial_state(m: ModelOnMesh, model_cfg: ModelConfig, init_from: str,
                  init_optimizer_state: bool) -> dict:
  """The train state at step 0 of a run initialised from `init_from` (see the module doc)."""
  path, step = parse(init_from)
  if os.path.exists(os.path.join(path, "config.json")):
    if step is not None or init_optimizer_state:
      raise ValueError(f"TrainConfig.init_from={init_from}: a Hugging Face directory has one "
                       "set of weights and no optimizer state (no @step, no "
                       "init_optimizer_state)")
    params, opt_state, origin = _from_hf(path, m, model_cfg), None, path
  else:
    params, opt_state, step = _from_workdir(path, step, m, init_optimizer_state, init_from)
    origin = f"{path} step {step}"
  if opt_state is None:
    init_opt = jax.jit(m.tx.init, out_shardings=m.state_shardings["opt_state"])
    with m.context():
      opt_state = init_opt(params)
  else:
    opt_state = restart_schedules(opt_state)
  what = "parameters and optimizer state" if init_optimizer_state else "parameters"
  print(f"Initialised the {what} from {origin}; the step counter starts at 0", flush=True)
  step0 = jax.device_put(jnp.zeros((), jnp.int32), m.state_shardings["step"])
  return {"step": step0, "params": params, "opt_state": opt_state}
