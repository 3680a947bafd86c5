"""PERK through the entry point: meta-training (`RunConfig.mode='train'` with gin/ttt/perk.gin)
and the answers `longeval` scores with PERK-adapted weights.

Meta-training examples come from a text task of lctx.evals (`DataConfig.source='task:<name>'`):
example i of a split is made from the seed (DataConfig.seed, split, i), at a prompt length of
DataConfig.seq_len and a needle depth drawn from [TaskConfig.depth_min, depth_max], as the task
rows of lctx/data/tasks.py are. Its context (the prompt before the query) feeds the inner loop;
the query and the answer (the reference strings with a closing ".", as task rows teach them) make
the outer row of `PERKConfig.question_tokens` tokens, the loss on the answer alone.

The base model is TrainConfig.init_from (frozen, never saved again); the workdir's checkpoints
hold the meta-parameters, their AdamW state (OptimizerConfig) and the next example's index, so
an interrupted run resumes exactly. metrics.csv logs the outer loss ("loss"), the inner loss
before the first and the last inner step, the mean learned rate and, at evaluations, the held-out
answer NLL ("eval_loss") and its argmax accuracy on the answer tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from lctx import data as data_lib
from lctx.checkpoint import Checkpointer, CheckpointUnreadable
from lctx.data.tasks import EVAL, TRAIN, answer_tokens
from lctx.evals import longeval
from lctx.evals.tasks import make_example
from lctx.init_from import initial_state
from lctx.metrics import MetricsWriter
from lctx.model import DecoderLM, abstract_params
from lctx.optim import make_optimizer
from lctx.state import build
from lctx.trainer import TrainingDiverged, write_operative_config
from lctx.ttt import perk as perk_lib
from lctx.workdir import WorkdirLock
from sharding.mesh import make_mesh

log = logging.getLogger("lctx")

COLUMNS = ("inner_loss_first", "inner_loss_last", "rate_mean", "eval_answer_accuracy")


def check(configs: dict) -> None:
  """Refuses, before anything is read or compiled, settings PERK cannot meta-train with."""
  data_cfg, train_cfg, model_cfg = configs["data"], configs["train"], configs["model"]
  if not train_cfg.init_from:
    raise ValueError("PERKConfig.enabled=True meta-trains an adapter of a trained base model: "
                     "set TrainConfig.init_from to its workdir or Hugging Face directory")
  name = data_cfg.task_name
  if name is None or name == "mqar":
    raise ValueError(f"PERKConfig.enabled=True: DataConfig.source={data_cfg.source!r} must be "
                     "'task:<name>' of a text task of lctx.evals (context, query and answer)")
  if model_cfg.sequence_parallel.enabled:
    raise ValueError("PERKConfig.enabled=True runs without sequence parallelism; set "
                     "SequenceParallelConfig.method='none'")
  if jax.process_count() > 1:
    raise ValueError("PERKConfig.enabled=True meta-trains in one process (each example adapts "
                     "its own adapter on one device); launch a single process")
  perk_lib.target_paths(abstract_params(model_cfg), configs["perk"])


def example_row(ex, tokenizer, context_tokens: int, question_tokens: int) -> dict:
  """The arrays of one example: context [C] + mask, and the query + answer row [Q] with
  targets and weights on the positions that predict the answer."""
  context = np.asarray(ex.prompt[:ex.context_len], np.int32)
  question = np.asarray(ex.prompt[ex.context_len:], np.int32)
  answer = answer_tokens(ex, tokenizer)
  if len(context) > context_tokens:
    raise ValueError(f"{ex.task}: a context of {len(context)} tokens exceeds {context_tokens}")
  n, a = len(question), len(answer)
  if n + a > question_tokens:
    raise ValueError(f"PERKConfig.question_tokens={question_tokens}: the {ex.task} query and "
                     f"answer take {n + a} tokens; raise it to at least {n + a}")
  tokens = np.zeros(question_tokens, np.int32)
  tokens[:n], tokens[n:n + a] = question, answer
  weights = np.zeros(question_tokens, np.float32)
  weights[n - 1:n + a - 1] = 1.0
  return {"context": np.pad(context, (0, context_tokens - len(context))),
          "context_mask": np.arange(context_tokens) < len(context),
          "tokens": tokens, "targets": np.concatenate([tokens[1:], [0]]).astype(np.int32),
          "weights": weights}


def examples(data_cfg, tokenizer, perk_cfg, split: int, start: int, count: int) -> dict:
  """Examples start..start+count-1 of `split`, stacked."""
  rows = []
  for index in range(start, start + count):
    rng = np.random.default_rng(np.random.SeedSequence([data_cfg.seed, split, index]))
    depth = float(rng.uniform(data_cfg.task.depth_min, data_cfg.task.depth_max))
    ex = make_example(data_cfg.task_name, tokenizer, data_cfg.seq_len, depth,
                      int(rng.integers(2**31)))
    rows.append(example_row(ex, tokenizer, data_cfg.seq_len, perk_cfg.question_tokens))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def base_params(configs: dict):
  """The frozen base: TrainConfig.init_from's parameters, on the host's default device."""
  model_cfg = configs["model"]
  tx, _ = make_optimizer(configs["optimizer"], 1)
  m = build(model_cfg, make_mesh(configs["mesh"]), tx)
  state = initial_state(m, model_cfg, configs["train"].init_from, False)
  if m.mesh.size > 1:
    log.info("PERK runs on one device: the base parameters are gathered there and the mesh's "
             "other %d devices stay idle", m.mesh.size - 1)
  return jax.device_put(jax.device_get(state["params"]))


def _step_fn(model, perk_cfg, tx):
  def step(state, base, batch):
    (loss, inner), grads = jax.value_and_grad(perk_lib.meta_loss, has_aux=True)(
        state["meta"], model, base, batch, perk_cfg)
    updates, opt_state = tx.update(grads, state["opt_state"], state["meta"])
    meta = optax.apply_updates(state["meta"], updates)
    out = {"loss": loss, "inner_first": inner[0], "inner_last": inner[-1],
           "grad_norm": optax.tree.norm(grads),
           "rate_mean": jnp.mean(perk_lib.rates(meta))}
    return {"step": state["step"] + 1, "meta": meta, "opt_state": opt_state}, out
  return jax.jit(step, donate_argnums=(0,))


def _eval_fn(model, perk_cfg):
  def evaluate(meta, base, batch):
    def one(ex):
      lora = perk_lib.adapt(model, base, meta, ex["context"], ex["context_mask"], perk_cfg)
      params = perk_lib.apply_lora(base, lora, perk_cfg)
      logits = model.apply({"params": params}, ex["tokens"][None])[0]
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      ce = -jnp.take_along_axis(logp, ex["targets"][:, None], axis=-1)[:, 0]
      hit = (jnp.argmax(logits, axis=-1) == ex["targets"]).astype(jnp.float32)
      return jnp.sum(ce * ex["weights"]), jnp.sum(hit * ex["weights"]), jnp.sum(ex["weights"])
    ce, hits, count = jax.vmap(one)(batch)
    return jnp.sum(ce), jnp.sum(hits), jnp.sum(count)
  return jax.jit(evaluate)


def train(workdir: str, configs: dict) -> dict:
  """Meta-trains (or resumes) PERK in `workdir`; returns the final held-out answer NLL."""
  check(configs)
  with WorkdirLock(workdir):
    return _train(workdir, configs)


def _train(workdir, configs):
  model_cfg, data_cfg, train_cfg = configs["model"], configs["data"], configs["train"]
  perk_cfg = configs["perk"]
  tokenizer = data_lib.make_tokenizer(data_cfg.tokenizer)
  eval_sets = [examples(data_cfg, tokenizer, perk_cfg, EVAL, i * data_cfg.batch_size,
                        data_cfg.batch_size) for i in range(train_cfg.eval_batches)]
  model = perk_lib.differentiable_model(DecoderLM(model_cfg), perk_cfg)
  tx, schedule = make_optimizer(configs["optimizer"], train_cfg.steps)
  meta = perk_lib.init_meta(model_cfg, abstract_params(model_cfg), perk_cfg)
  state = {"step": jnp.zeros((), jnp.int32), "meta": meta, "opt_state": tx.init(meta)}
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=train_cfg.keep_checkpoints)
  start, next_row = 0, 0
  try:
    if ckpt.all_steps():
      step = ckpt.all_steps()[-1]
      try:
        state, data_state = ckpt.restore(jax.eval_shape(lambda: state), step)
      except CheckpointUnreadable as e:
        raise ValueError(f"the PERK checkpoint of step {step} in {ckpt.directory} does not fit "
                         f"the configured PERKConfig / ModelConfig ({e}); use another workdir")
      start, next_row = step, int(data_state["next_row"])
      print(f"Resuming PERK meta-training from the checkpoint at step {start} in "
            f"{ckpt.directory}")
  except BaseException:
    ckpt.close()
    raise
  write_operative_config(workdir, configs.get("gin"))
  base = base_params(configs)
  step_fn, eval_fn = _step_fn(model, perk_cfg, tx), _eval_fn(model, perk_cfg)
  metrics = MetricsWriter(workdir, COLUMNS, resume_step=start)
  bar = tqdm(total=train_cfg.steps, initial=start, desc="perk", unit="step",
             disable=not train_cfg.progress_bar)
  result, last_time, last_step = None, time.perf_counter(), start
  b = data_cfg.batch_size
  try:
    for step in range(start + 1, train_cfg.steps + 1):
      batch = examples(data_cfg, tokenizer, perk_cfg, TRAIN, next_row, b)
      next_row += b
      state, out = step_fn(state, base, batch)
      bar.update(1)
      is_last = step == train_cfg.steps
      do_eval = is_last or (train_cfg.eval_every and step % train_cfg.eval_every == 0)
      do_ckpt = is_last or step % train_cfg.checkpoint_every == 0
      if is_last or do_eval or do_ckpt or step % train_cfg.log_every == 0:
        out = jax.device_get(out)
        if not all(math.isfinite(float(out[k])) for k in ("loss", "grad_norm")):
          raise TrainingDiverged(f"PERK meta-training: loss {float(out['loss'])} / gradient "
                                 f"norm {float(out['grad_norm'])} at step {step}; the checkpoints "
                                 f"{ckpt.all_steps()} are kept. Lower OptimizerConfig."
                                 f"learning_rate or PERKConfig.init_lr")
        now = time.perf_counter()
        metrics.write("train", step, {
            "loss": float(out["loss"]), "learning_rate": float(schedule(step - 1)),
            "grad_norm": float(out["grad_norm"]),
            "tokens_per_s": b * data_cfg.seq_len * (step - last_step) / max(now - last_time, 1e-9),
            "inner_loss_first": float(out["inner_first"]),
            "inner_loss_last": float(out["inner_last"]), "rate_mean": float(out["rate_mean"])})
        bar.set_postfix(loss=f"{float(out['loss']):.3f}")
        last_time, last_step = now, step
      if do_eval:
        sums = np.sum([jax.device_get(eval_fn(state["meta"], base, e)) for e in eval_sets], 0)
        result = {"eval_loss": float(sums[0] / sums[2]), "eval_ppl": float(np.exp(sums[0] /
                                                                               sums[2])),
                  "eval_answer_accuracy": float(sums[1] / sums[2])}
        metrics.write("eval", step, result)
        bar.write(f"step {step}: held-out answer NLL {result['eval_loss']:.4f}, answer-token "
                  f"accuracy {result['eval_answer_accuracy']:.3f}")
      if do_ckpt:
        ckpt.save(step, state, {"next_row": next_row})
  finally:
    bar.close()
    metrics.close()
    ckpt.close()
  if result is None:  # already finished: evaluate the last checkpoint
    sums = np.sum([jax.device_get(eval_fn(state["meta"], base, e)) for e in eval_sets], 0)
    result = {"eval_loss": float(sums[0] / sums[2]),
              "eval_answer_accuracy": float(sums[1] / sums[2])}
  return {"step": max(start, train_cfg.steps), **result, "metrics": metrics.path,
          "checkpoints": ckpt.directory}


def restore_meta(workdir: str, configs: dict):
  """The meta-parameters of the newest checkpoint of a PERK workdir."""
  model_cfg, perk_cfg = configs["model"], configs["perk"]
  meta = perk_lib.init_meta(model_cfg, abstract_params(model_cfg), perk_cfg)
  tx, _ = make_optimizer(configs["optimizer"], configs["train"].steps)
  abstract = jax.eval_shape(lambda: {"step": jnp.zeros((), jnp.int32), "meta": meta,
                                     "opt_state": tx.init(meta)})
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    if not ckpt.all_steps():
      raise ValueError(f"no PERK checkpoint in {ckpt.directory}; meta-train first "
                       "(RunConfig.mode='train' with gin/ttt/perk.gin)")
    step = ckpt.all_steps()[-1]
    state, _ = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  return step, state["meta"]


class Answerer:
  """longeval's answers with PERK: the adapter learns the prompt's context; the model then sees
  only the query (lctx.evals.longeval.evaluate's `answer` hook)."""

  def __init__(self, model, base, meta, perk_cfg):
    # One level of differentiation (the inner gradient): the model's own kernels serve.
    self.model, self.base, self.meta, self.perk = model, base, meta, perk_cfg
    self._adapted = jax.jit(lambda meta, base, context, mask: perk_lib.apply_lora(
        base, perk_lib.adapt(model, base, meta, context, mask, perk_cfg), perk_cfg))

  def __call__(self, ex, index: int, max_new_tokens: int):
    context = jnp.asarray(ex.prompt[:ex.context_len], jnp.int32)
    params = self._adapted(self.meta, self.base, context, jnp.ones(context.shape, bool))
    # In-context answering of the query alone, with the adapted weights.
    query = dataclasses.replace(ex, prompt=ex.prompt[ex.context_len:], context_len=0)
    return longeval.plain_answerer(self.model, params)(query, index, max_new_tokens)
