"""The training loop: data, sharded state, checkpoints, metrics, evaluation, divergence checks."""

import dataclasses
import logging
import math
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from lctx import data as data_lib
from lctx import distributed
from lctx import evaluate
from lctx import transfer as transfer_lib
from lctx.checkpoint import Checkpointer
from lctx.config import ModelConfig
from lctx.data.shards import ProcessRows, resolve_shards
from lctx.data.tasks import task_vocab
from lctx.init_from import initial_state
from lctx.metrics import MetricsWriter, NullMetricsWriter
from lctx.optim import OptimizerConfig, make_optimizer
from lctx.restore import restore_checkpoint
from lctx.state import ModelOnMesh, build
from lctx.steps import all_finite, loss_sums, make_eval_step, make_train_step
from lctx.workdir import WorkdirLock
from sharding.mesh import MeshConfig, make_mesh
from sharding.sequence import required_length_multiple
from sharding.validation import check_fields

log = logging.getLogger("lctx")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Attributes:
    steps: optimizer steps in the whole run (a resumed run continues up to this step).
    grad_accum_steps: micro-batches per step (DataConfig.batch_size must divide evenly).
    log_every: write a train row to metrics.csv every this many steps (and at the last step).
    eval_every: evaluate every this many steps; 0 evaluates only at the end.
    eval_batches: held-out batches per evaluation.
    position_buckets: equal-width document-position buckets of the per-position perplexity.
    checkpoint_every: save every this many steps (and at the last step).
    keep_checkpoints: how many recent checkpoints to keep.
    unigram_batches: training batches whose byte/token frequencies define the unigram baseline.
    seed: parameter-init seed.
    init_from: start a fresh run (no checkpoint in the workdir yet) from a Hugging Face model
      directory, a converted workdir or another run's workdir ("path" or "path@step");
      lctx/init_from.py. Empty: random initialisation. A resumed run ignores it.
    init_optimizer_state: with init_from a run's workdir, carry its optimizer state over too
      (the learning-rate schedule restarts; the step counter starts at 0 either way).
    progress_bar: show a tqdm progress bar (process 0's).
    async_checkpoint: write checkpoints in the background (lctx/checkpoint.py): a save returns
      once the state is copied off the devices; still atomic, and the next save waits for it.
  """

  steps: int = 500
  grad_accum_steps: int = 1
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 8
  position_buckets: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  unigram_batches: int = 32
  seed: int = 0
  init_from: str = ""
  init_optimizer_state: bool = False
  progress_bar: bool = True
  async_checkpoint: bool = False

  def __post_init__(self):
    check_fields(self)
    for name in ("steps", "grad_accum_steps", "log_every", "eval_batches", "position_buckets",
                 "checkpoint_every", "keep_checkpoints", "unigram_batches"):
      value = getattr(self, name)
      if value < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {value}")
    if self.init_optimizer_state and not self.init_from:
      raise ValueError("TrainConfig.init_optimizer_state=True needs TrainConfig.init_from (the "
                       "run whose optimizer state to carry over)")
    if self.eval_every < 0:
      raise ValueError(f"TrainConfig.eval_every must be >= 0, got {self.eval_every}")


class TrainingDiverged(RuntimeError):
  """The loss, the gradient norm or the updated parameters became NaN or infinite."""


def check_compatible(model_cfg: ModelConfig, data_cfg: data_lib.DataConfig,
                     train_cfg: TrainConfig, tokenizer, mesh: jax.sharding.Mesh) -> None:
  """Cross-config checks that must fail before anything is compiled."""
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"ModelConfig.vocab_size={model_cfg.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary ({tokenizer.vocab_size}, DataConfig.tokenizer="
                     f"{data_cfg.tokenizer!r})")
  if data_cfg.task_name is not None:
    vocab = task_vocab(data_cfg, tokenizer)
    if vocab > model_cfg.vocab_size:
      raise ValueError(f"ModelConfig.vocab_size={model_cfg.vocab_size} is smaller than the "
                       f"vocabulary of DataConfig.source={data_cfg.source!r} ({vocab}, "
                       "TaskConfig.vocab)")
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  per_micro = data_cfg.batch_size // train_cfg.grad_accum_steps
  if data_cfg.batch_size % train_cfg.grad_accum_steps or per_micro % dp:
    raise ValueError(f"DataConfig.batch_size={data_cfg.batch_size} must split into "
                     f"TrainConfig.grad_accum_steps={train_cfg.grad_accum_steps} micro-batches "
                     f"whose size divides the data-parallel degree {dp} (data x fsdp)")
  sp, shards = model_cfg.sequence_parallel, mesh.shape["seq"]
  unit = required_length_multiple(sp, shards, model_cfg.linear_chunk_sizes())
  if data_cfg.seq_len % unit:
    detail = f"the sequence-parallel degree MeshConfig.seq={shards}"
    per_rank = unit // shards
    if per_rank > 1:
      detail += (f" x {per_rank} (SequenceParallelConfig.layout={sp.layout!r} chunks per rank"
                 f" x the linear layers' chunk_size {model_cfg.linear_chunk_sizes()})")
    raise ValueError(f"DataConfig.seq_len={data_cfg.seq_len} is not divisible by {unit}: "
                     f"{detail}")


def run_eval(m: ModelOnMesh, eval_step, params, batches, seq_len: int) -> dict[str, float]:
  """Sums over the global eval batches (every process holds them whole and puts its rows)."""
  sums = None
  for batch in batches:
    out = jax.device_get(eval_step(params, m.put_batch(batch)))
    sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
  return evaluate.summarize(sums["ce"], sums["count"], seq_len, sums["correct"])


def make_jitted_eval(m: ModelOnMesh, train_cfg: TrainConfig, seq_len: int):
  return m.jit(make_eval_step(m.model, train_cfg.position_buckets, seq_len),
               in_shardings=(m.state_shardings["params"], m.batch_sharding), out_shardings=None)


def write_operative_config(workdir: str, gin_text: str | None) -> None:
  """Writes config.gin atomically (a kill mid-write leaves the previous one)."""
  if gin_text is None:
    return
  path = os.path.join(workdir, "config.gin")
  with open(path + ".tmp", "w") as f:
    f.write(gin_text)
  os.replace(path + ".tmp", path)


def train(workdir: str, model_cfg: ModelConfig, data_cfg: data_lib.DataConfig,
          opt_cfg: OptimizerConfig, train_cfg: TrainConfig, mesh_cfg: MeshConfig,
          gin_text: str | None = None, transfer=None) -> dict:
  """Trains (or resumes) in `workdir`; returns the final evaluation and the unigram baseline.

  With `transfer` (a TransferConfig) the objective is attention transfer (lctx/transfer.py):
  only the converted layers' new parameters train, against the per-layer MSE to the teacher.

  The workdir is locked for the whole run (by process 0: the processes of one multi-process run
  share it). `gin_text` (the operative config) is written to config.gin once the workdir's
  checkpoint is known to fit the configured model.
  """
  if jax.process_index() != 0:
    return _train(workdir, model_cfg, data_cfg, opt_cfg, train_cfg, mesh_cfg, gin_text, transfer)
  with WorkdirLock(workdir):
    return _train(workdir, model_cfg, data_cfg, opt_cfg, train_cfg, mesh_cfg, gin_text, transfer)


def _train(workdir, model_cfg, data_cfg, opt_cfg, train_cfg, mesh_cfg, gin_text, transfer):
  loss_fn = loss_sums
  tx, schedule = make_optimizer(opt_cfg, train_cfg.steps)
  if transfer is not None:  # checked before any data is read or anything compiled
    if not train_cfg.init_from:
      raise ValueError("RunConfig.mode='attention_transfer' fits a converted model's new "
                       "parameters: set TrainConfig.init_from to the converted workdir "
                       "(experiments.convert --to_layout)")
    teacher = transfer_lib.teacher_config(model_cfg, transfer)
    labeler = transfer_lib.param_labeler(model_cfg, teacher)
    tx = transfer_lib.masked_optimizer(tx, labeler)
    loss_fn = transfer_lib.make_loss_sums(model_cfg, teacher, labeler)
  tokenizer = data_lib.make_tokenizer(data_cfg.tokenizer)
  mesh = make_mesh(mesh_cfg)
  check_compatible(model_cfg, data_cfg, train_cfg, tokenizer, mesh)
  shards = resolve_shards(data_cfg, jax.process_count())
  m = build(model_cfg, mesh, tx)
  rows = m.process_rows(data_cfg.batch_size, data_cfg.seq_len)
  data_iter = ProcessRows(data_cfg, tokenizer, rows, shards)
  eval_data = data_lib.eval_batches(data_cfg, tokenizer, train_cfg.eval_batches)
  primary = jax.process_index() == 0
  log.info("%s; mesh %s; training rows %d..%d of %d from data shards %s of %d",
           distributed.summary(), dict(mesh.shape), rows[0], rows[1], data_cfg.batch_size,
           data_iter.indices, shards)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=train_cfg.keep_checkpoints,
                      async_save=train_cfg.async_checkpoint)
  try:
    restored = restore_checkpoint(ckpt, m, model_cfg, workdir, gin_text, full_state=True,
                                  data_iter=data_iter, move_aside=True)
  except BaseException:
    ckpt.close()
    raise
  if primary:
    write_operative_config(workdir, gin_text)
  if restored is None and train_cfg.init_from:
    start, state = 0, initial_state(m, model_cfg, train_cfg.init_from,
                                              train_cfg.init_optimizer_state)
  elif restored is None:
    start, state = 0, m.init_state(train_cfg.seed)
  else:
    start, state = restored
    print(f"Resuming from the checkpoint at step {start} in {ckpt.directory}")
    if start >= train_cfg.steps:
      print(f"The checkpoint's step {start} is at or past TrainConfig.steps={train_cfg.steps}: "
            f"nothing to train; evaluating the checkpoint of step {start}")

  buckets = evaluate.bucket_edges(data_cfg.seq_len, train_cfg.position_buckets)
  aux_columns = ("aux_loss",) if model_cfg.moe.enabled else ()
  columns = aux_columns + tuple(evaluate.bucket_column(lo, hi) for lo, hi in buckets)
  metrics = (MetricsWriter(workdir, columns, resume_step=start) if primary
             else NullMetricsWriter(workdir))
  sample_iter = ProcessRows(data_cfg, tokenizer, rows, shards)
  counts = evaluate.unigram_counts((next(sample_iter) for _ in range(train_cfg.unigram_batches)),
                                   tokenizer.vocab_size)
  # The counts of every distinct block of rows, summed over processes: those of all rows.
  counts = distributed.sum_distinct(counts, key=rows[0])
  unigram = evaluate.unigram_loss(counts, eval_data)
  if primary:
    print(f"Unigram baseline (token frequencies of {train_cfg.unigram_batches} training "
          f"batches, scored on the eval set): {unigram:.4f} nats/token")

  train_step = m.jit(make_train_step(m.model, tx, schedule, train_cfg.grad_accum_steps,
                                     loss_fn),
                     in_shardings=(m.state_shardings, m.batch_sharding),
                     out_shardings=(m.state_shardings, None), donate_argnums=(0,))
  eval_step = make_jitted_eval(m, train_cfg, data_cfg.seq_len)
  finite = jax.jit(all_finite)

  tokens_per_step = data_cfg.batch_size * data_cfg.seq_len
  pending: list[tuple[int, dict]] = []
  last_time, last_step = time.perf_counter(), start
  last_good = start if start else None
  final_eval = None

  def diverged(what: str) -> TrainingDiverged:
    where = (f"the last good checkpoint (step {last_good}) in {ckpt.directory} is kept"
             if last_good else "no checkpoint had been saved yet")
    return TrainingDiverged(
        f"{what}: training stopped; {where}. Lower OptimizerConfig.learning_rate (now "
        f"{opt_cfg.learning_rate}) or enable OptimizerConfig.clip_norm (now "
        f"{opt_cfg.clip_norm}).")

  bar = tqdm(total=train_cfg.steps, initial=start, desc="train", unit="step",
             disable=not train_cfg.progress_bar or not primary)
  try:
    for step in range(start + 1, train_cfg.steps + 1):
      state, step_metrics = train_step(state, m.put_rows(next(data_iter), data_cfg.batch_size))
      pending.append((step, step_metrics))
      bar.update(1)
      is_last = step == train_cfg.steps
      do_eval = is_last or (train_cfg.eval_every and step % train_cfg.eval_every == 0)
      do_ckpt = is_last or step % train_cfg.checkpoint_every == 0
      if not (is_last or do_eval or do_ckpt or step % train_cfg.log_every == 0):
        continue
      # Metrics are fetched only here, so steps between logs run without host syncs; every
      # fetched loss is checked before anything is saved.
      fetched = [(s, jax.device_get(mm)) for s, mm in pending]
      pending.clear()
      for s, mm in fetched:
        for key in ("loss", "grad_norm"):
          if not math.isfinite(float(mm[key])):
            raise diverged(f"{key} is {float(mm[key])} at step {s}")
      now = time.perf_counter()
      if is_last or step % train_cfg.log_every == 0:
        mm = fetched[-1][1]
        row = {"loss": float(mm["loss"]), "learning_rate": float(mm["learning_rate"]),
               "grad_norm": float(mm["grad_norm"]),
               "tokens_per_s": tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)}
        if "aux_loss" in mm:
          row["aux_loss"] = float(mm["aux_loss"])
        metrics.write("train", step, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        last_time, last_step = now, step
      if do_eval:
        final_eval = run_eval(m, eval_step, state["params"], eval_data, data_cfg.seq_len)
        metrics.write("eval", step, final_eval)
        if primary:
          bar.write(f"step {step}: eval loss {final_eval['eval_loss']:.4f} "
                    f"(ppl {final_eval['eval_ppl']:.2f}; unigram baseline {unigram:.4f})")
      if do_ckpt:
        # Only a state that can be trained on is saved: finite updated parameters with a finite
        # loss on a held-out batch (the fetched losses above were of the pre-update parameters).
        if not bool(finite(state["params"])):
          raise diverged(f"the parameters after step {step} hold NaN or infinite values "
                         f"(not saved)")
        probe = float(np.sum(eval_step(state["params"], m.put_batch(eval_data[0]))["ce"]))
        if not math.isfinite(probe):
          raise diverged(f"the parameters after step {step} give a loss of {probe} on a "
                         f"held-out batch (not saved)")
        ckpt.save(step, state, data_iter.get_state())
        last_good = step
      if do_eval or do_ckpt:  # keep eval and save time out of the next tokens/s
        last_time = time.perf_counter()
  finally:
    bar.close()
    metrics.close()
    ckpt.close()
  if final_eval is None:  # the run had already finished: evaluate the final checkpoint
    final_eval = run_eval(m, eval_step, state["params"], eval_data, data_cfg.seq_len)
  return {"step": max(start, train_cfg.steps), "unigram_loss": unigram, **final_eval,
          "checkpoints": ckpt.directory, "metrics": metrics.path}
