"""Attention transfer (LoLCATs stage 1; RunConfig.mode = "attention_transfer").

A hybrid converted from a dense model (lctx/convert/hybrid.py) keeps every converted layer's W_Q,
W_K, W_V and W_O and adds new parameters (GLA's low-rank gate and output norm, a hedgehog feature
map). Before LM-loss continued pretraining, attention transfer trains only those new parameters
so that each converted layer reproduces the softmax attention it replaced:

  loss = sum over converted layers l of  mean over tokens and features (y_l^student - y_l^teacher)^2

where both mixers see the same input, the teacher model's normed hidden state at layer l (each
layer is fitted on its own, in parallel, as LoLCATs does). The teacher is the dense model: every
layer softmax attention with `TransferConfig.teacher` (the dense model's AttentionConfig, written
into a converted workdir's model.gin), on the very same q/k/v/o, norm, FFN and embedding tensors,
which stay frozen. The "loss" the trainer logs in this mode is that per-layer MSE, averaged over
the converted layers; the evaluation still reports the hybrid's LM loss.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from layers.attention import AttentionConfig
from lctx.config import ModelConfig
from lctx.model import DecoderLM, abstract_params, make_mixer
from sharding.validation import check_fields

SOFTMAX = ("attention", "swa")
TRAINED, FROZEN = "trained", "frozen"


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  """Attention transfer settings.

  Attributes:
    teacher: The dense model's softmax attention (heads, RoPE, window); experiments.convert
      --to_layout binds it in the converted workdir's model.gin. Its head layout must equal every
      converted layer's.
  """

  teacher: AttentionConfig | None = None

  def __post_init__(self):
    check_fields(self)
    if self.teacher is not None and not isinstance(self.teacher, AttentionConfig):
      raise ValueError(f"TransferConfig.teacher={self.teacher!r} must be an AttentionConfig "
                       "(@AttentionConfig())")


def converted_layers(cfg: ModelConfig) -> list[int]:
  """The layers attention transfer fits: every layer that is not softmax attention."""
  return [i for i, name in enumerate(cfg.layer_mixers()) if name not in SOFTMAX]


def teacher_config(student: ModelConfig, transfer: TransferConfig) -> ModelConfig:
  """The dense teacher: the student's sizes with softmax attention (`transfer.teacher`) in
  every layer. Raises ValueError naming the setting if it cannot share the student's weights."""
  layers = converted_layers(student)
  if not layers:
    raise ValueError(f"RunConfig.mode='attention_transfer': ModelConfig.mixers="
                     f"{list(student.mixers)} has no converted (non-softmax) layer to fit")
  bad = sorted({n for n in student.layer_mixers() if "+" in n})
  if bad:
    raise ValueError(f"RunConfig.mode='attention_transfer': parallel mixers {bad} have no "
                     "single softmax teacher")
  if transfer.teacher is None:
    raise ValueError("TransferConfig.teacher: attention transfer needs the dense model's "
                     "attention (experiments.convert --to_layout writes it into model.gin)")
  teacher = transfer.teacher
  for i in layers:
    name = student.layer_mixers()[i]
    layer = student.mixer_config(name)
    for field in ("num_heads", "num_kv_heads", "head_dim", "qkv_bias"):
      mine, theirs = getattr(layer, field, None), getattr(teacher, field)
      if field == "head_dim":
        mine = layer.resolved_head_dim(student.d_model)
        theirs = teacher.resolved_head_dim(student.d_model)
      if mine != theirs:
        raise ValueError(f"TransferConfig.teacher.{field}={theirs} differs from layer {i}'s "
                         f"{name} mixer ({mine}): the teacher must be the model it was "
                         "converted from")
  if student.sequence_parallel.enabled:
    raise ValueError("RunConfig.mode='attention_transfer' runs without sequence parallelism "
                     "(SequenceParallelConfig.method='none')")
  return dataclasses.replace(student, mixers=("attention",),
                             mixer_options=(("attention", teacher),))


def param_labeler(student: ModelConfig, teacher: ModelConfig):
  """params -> a tree of TRAINED (parameters the teacher does not have: the new ones) and FROZEN
  (the rest); works on boxed and unboxed trees (build initialises the optimizer on boxed ones)."""
  shared = {k: v.shape for k, v in _flat(abstract_params(teacher)).items()}

  def labels(params):
    def label(path, leaf):
      key = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
      return FROZEN if shared.get(key) == tuple(leaf.shape) else TRAINED
    return jax.tree_util.tree_map_with_path(label, params)

  return labels


def masked_optimizer(tx: optax.GradientTransformation, labeler) -> optax.GradientTransformation:
  """`tx` on the trained parameters; the frozen ones never move.

  Gradients of frozen parameters are zeroed before `tx` (so its clipping sees only the trained
  ones) and their updates after it (so weight decay cannot move them). The optimizer state keeps
  the full tree (optax.multi_transform's masked nodes do not fit the state's shardings)."""

  def zero_frozen(updates, params=None):
    del params
    marks = labeler(updates)
    return jax.tree.map(lambda u, mark: jnp.zeros_like(u) if mark == FROZEN else u,
                        updates, marks)

  return optax.chain(optax.stateless(zero_frozen), tx, optax.stateless(zero_frozen))


def teacher_params(params, labeler):
  """The frozen subset of `params` (the teacher's tree)."""
  marks = _flat(labeler(params))
  return _unflatten({k: v for k, v in _flat(params).items() if marks[k] == FROZEN})


def _flat(tree) -> dict:
  return {tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for key, leaf in flat.items():
    node = out
    for part in key[:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = leaf
  return out


def _summed_errors(teacher_model, mixers: dict, params, frozen, batch):
  """({layer: summed token-weighted MSE over features}, number of real tokens)."""
  _, sown = teacher_model.apply({"params": frozen}, batch["tokens"], batch["positions"],
                                batch["segment_ids"], mutable=["transfer"])
  weights = (batch["segment_ids"] > 0).astype(jnp.float32)
  sums = {}
  for i, mixer in mixers.items():
    io = sown["transfer"][f"layer_{i}"]
    h, target = io["mixer_in"][0], io["mixer_out"][0]
    y = mixer.apply({"params": params[f"layer_{i}"]["mixer"]}, h,
                    positions_bt=batch["positions"], segment_ids_bt=batch["segment_ids"])
    err = jnp.mean(jnp.square(y.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    sums[i] = jnp.sum(err * weights)
  return sums, jnp.sum(weights)


def make_loss_sums(student: ModelConfig, teacher: ModelConfig, labeler):
  """`loss_sums(model, params, batch)` for the train step (lctx.steps): the summed squared
  error of every converted layer against the teacher, weighted per token, with "tokens" the
  number of real (non-padding) tokens times the number of converted layers, so the logged loss
  is the per-layer, per-feature MSE."""
  teacher_model = DecoderLM(teacher)
  mixers = {i: make_mixer(student, i) for i in converted_layers(student)}

  def loss_sums(model, params, batch):
    del model
    frozen = jax.lax.stop_gradient(teacher_params(params, labeler))
    sums, tokens = _summed_errors(teacher_model, mixers, params, frozen, batch)
    total = sum(sums.values(), jnp.zeros((), jnp.float32))
    return total, {"ce": total, "tokens": tokens * len(mixers),
                   "aux": jnp.zeros((), jnp.float32)}

  return loss_sums


def layer_errors(student: ModelConfig, teacher: ModelConfig, params, labeler,
                 batch) -> dict[int, float]:
  """Per converted layer: the token-mean MSE against the teacher on `batch` (reporting)."""
  mixers = {i: make_mixer(student, i) for i in converted_layers(student)}
  sums, tokens = jax.jit(lambda p, b: _summed_errors(
      DecoderLM(teacher), mixers, p, teacher_params(p, labeler), b))(params, batch)
  return {i: float(v / max(float(tokens), 1.0)) for i, v in sums.items()}
