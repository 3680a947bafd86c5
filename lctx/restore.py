"""What a run starts from: the newest readable checkpoint that fits the configured model.

Used by every mode (training resumes from it; evaluation, generation and the spiking statistics
read its parameters). The checkpoint's tree is compared with the model's before any array is read
(lctx/compat.py), then it is restored and checked (lctx/checkpoint.py's newest-readable loop).
"""

from lctx import compat
from lctx.checkpoint import Checkpointer, CheckpointUnreadable, restore_newest_readable
from lctx.config import ModelConfig
from lctx.data.shards import DataShardsMismatch
from lctx.state import ModelOnMesh
from lctx.steps import all_finite


def restore_checkpoint(ckpt: Checkpointer, m: ModelOnMesh, model_cfg: ModelConfig, workdir: str,
                       gin_text: str | None, *, full_state: bool, data_iter=None,
                       move_aside: bool):
  """(step, state or params) of the newest readable checkpoint that fits the model, or None.

  The checkpoint's tree is compared with the configured model (the whole train state when
  `full_state`, else the parameters) before any array is read; a mismatch raises ValueError naming
  the parameter and the settings. A restored state must hold finite parameters, and its
  data-iterator state must apply to `data_iter`.
  """
  wanted = compat.tree_signature(m.abstract_state if full_state else
                                 {"params": m.abstract_params})

  def check_tree(step, saved):
    if not full_state:
      saved = {k: v for k, v in saved.items() if k.startswith("params/")}
    compat.check_matches(saved, wanted, step=step, step_dir=ckpt.step_dir(step),
                         workdir=workdir, gin_text=gin_text, model_cfg=model_cfg)

  def restore(step):
    if full_state:
      state, data_state = ckpt.restore(m.abstract_state, step)
      params = state["params"]
    else:
      state = params = ckpt.restore_params(m.abstract_params, step)
    if not bool(all_finite(params)):
      raise CheckpointUnreadable("its parameters hold NaN or infinite values")
    if data_iter is not None:
      try:
        data_iter.set_state(data_state)
      except DataShardsMismatch:  # a good checkpoint read by another process count
        raise
      except Exception as e:
        raise CheckpointUnreadable(f"its data-iterator state does not apply "
                                   f"({type(e).__name__}: {e})") from e
    return state

  return restore_newest_readable(ckpt, check_tree, restore, move_aside=move_aside)
