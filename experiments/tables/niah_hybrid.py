"""SpikingBrain's hybrid ablation at CPU scale: needle recall of full attention, sliding-window
attention, GLA and the 1:1 GLA / SWA hybrid trained on the same budget, at 1x, 2x and 4x the
training length.

  python -m experiments.tables.niah_hybrid [--paper] [--out DIR]

Every model has the same width, depth and FFN, and differs only in its mixers: "attention" (full
causal softmax with RoPE), "swa" (sliding window of half the training length, as SpikingBrain's
ablation has a 4K window under 8K training), "gla", and "hybrid" (GLA and SWA layers alternating,
1:1, as in SpikingBrain-7B). Each trains at the learning rates of `--lrs` (vmapped) on the same
rows of lctx's task pipeline: passkey and a RULER single needle (niah_single), half each,
byte tokenizer, needles at uniform depths, the loss on the answer only. The rate whose held-out
answer-token accuracy (training length) is best is kept; that model is then evaluated by
`lctx.evals.longeval` (greedy continuation, the task's score) at 1x, 2x and 4x the training
prompt length over five needle depths.

The paper's figures (Qwen3-1.7B, 5B tokens at 8K, single-needle NIAH at 4K / 8K): full attention
100 / 98.4, pure SWA-4K 100 / 47.6, pure linear 36.2 / 39.4, 1:1 hybrid 96.8 / 44.4. Its claim as
checked here, at the training length (1x), where half the needles lie beyond the window: full
attention recalls (score >= `--solved`); SWA and pure linear fall clearly below it (by at least
0.25); the hybrid keeps most of it (at least 80% of attention's score). The 2x and 4x columns show
what each model does beyond its training length (RoPE unscaled; linear layers need nothing); the
verdict reports them but makes no claim on them, as the paper measured none.

The CPU scale (the default) trains 2-layer d_model 64 models for 1536 steps of 8 rows of 256
bytes at one learning rate, 3e-3 (small batches and that rate are what taught small models MQAR
fastest here, experiments/tables/mqar.py); `--lrs` adds rates, at the cost of time. `--paper`
names the ablation's own scale, far beyond this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np

from experiments import benchmarking
from experiments.tables import training
from layers.attention import AttentionConfig, SlidingWindowConfig
from layers.linear_mixers import GLAConfig
from lctx.config import ModelConfig
from lctx.data import DataConfig, make_tokenizer
from lctx.data.config import TaskConfig
from lctx.data.tasks import EVAL, TRAIN, TaskRows
from lctx.evals import longeval
from lctx.model import DecoderLM

MODELS = ("attention", "swa", "gla", "hybrid")
TASKS = ("passkey", "niah_single")
MULTIPLES = (1, 2, 4)
HEAD_DIM = 16
ANSWER_TOKENS = 16  # tokens kept for the answer at the end of each training row


@dataclasses.dataclass(frozen=True)
class Scale:
  train_len: int  # training row length (prompt + answer room)
  width: int
  layers: int
  d_ff: int
  train_examples: int  # per task
  test_examples: int  # held-out rows per task that choose the learning rate
  batch_size: int
  epochs: int
  lrs: tuple[float, ...]
  depths: tuple[float, ...]
  examples: int  # longeval examples per (task, length, depth)
  tasks: tuple[str, ...] = TASKS


CPU = Scale(train_len=256, width=64, layers=2, d_ff=128, train_examples=3072, test_examples=64,
            batch_size=8, epochs=2, lrs=(3e-3,), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
            examples=4)
# The ablation's own scale (Qwen3-1.7B-like shapes, 8K training, 5B tokens) for the record; it
# trains from scratch here, which the paper did not (it converted a pretrained model).
PAPER = Scale(train_len=8192, width=2048, layers=28, d_ff=6144, train_examples=300_000,
              test_examples=256, batch_size=64, epochs=1, lrs=(3e-4,),
              depths=tuple(float(x) for x in np.linspace(0, 1, 11)), examples=10)


def window(scale: Scale) -> int:
  return scale.train_len // 2


def model_config(kind: str, scale: Scale, vocab: int) -> ModelConfig:
  if scale.layers % 2:
    raise ValueError(f"niah_hybrid: layers={scale.layers} must be even (the hybrid alternates "
                     "GLA and SWA layers 1:1)")
  heads = max(1, scale.width // HEAD_DIM)
  gla = GLAConfig(num_heads=heads, chunk_size=64)
  # Dense attention ("reference"): at these lengths it is faster on a CPU than the flash tiling.
  swa = SlidingWindowConfig(num_heads=heads, window=window(scale), impl="reference")
  options, mixers = {
      "attention": ({"attention": AttentionConfig(num_heads=heads, impl="reference")},
                    ("attention",)),
      "swa": ({"swa": swa}, ("swa",)),
      "gla": ({"gla": gla}, ("gla",)),
      "hybrid": ({"gla": gla, "swa": swa}, ("gla", "swa") * (scale.layers // 2)),
  }[kind]
  return ModelConfig(vocab_size=vocab, d_model=scale.width, num_layers=scale.layers,
                     d_ff=scale.d_ff, mixers=mixers, mixer_options=options, tie_embeddings=True)


def task_rows(scale: Scale, tokenizer, split: int, n: int) -> dict[str, np.ndarray]:
  """n rows of each task's split, interleaved (passkey, needle, passkey, ...)."""
  per_task = []
  for seed, task in enumerate(scale.tasks):  # a seed per task: their rows draw independent depths
    cfg = DataConfig(source=f"task:{task}", seq_len=scale.train_len, batch_size=1, seed=seed,
                     task=TaskConfig(answer_tokens=ANSWER_TOKENS))
    rows = TaskRows(cfg, tokenizer, split, n)
    per_task.append([rows[i] for i in range(n)])
  items = [row for pair in zip(*per_task) for row in pair]
  return {k: np.stack([r[k] for r in items]) for k in items[0]}


def prompt_lengths(scale: Scale) -> tuple[int, ...]:
  """The evaluation prompt lengths: multiples of the training prompt length."""
  return tuple(m * (scale.train_len - ANSWER_TOKENS) for m in MULTIPLES)


def train_and_evaluate(kind: str, scale: Scale, tokenizer, train: dict, test: dict,
                       seed: int = 0) -> tuple[dict, list[dict]]:
  """(summary of training, longeval rows) of one model."""
  model = DecoderLM(model_config(kind, scale, tokenizer.vocab_size))
  t0 = time.perf_counter()
  params = training.train_at_rates(model, train, lrs=scale.lrs, batch_size=scale.batch_size,
                                   epochs=scale.epochs, seed=seed)
  accs = training.accuracy_at_rates(model, params, test, scale.batch_size)
  best = int(np.argmax(accs))
  train_s = time.perf_counter() - t0
  params = jax.tree.map(lambda x: x[best], params)
  cfg = longeval.LongEvalConfig(tasks=scale.tasks, lengths=prompt_lengths(scale),
                                depths=scale.depths,
                                examples=scale.examples, seed=seed)
  t0 = time.perf_counter()
  rows = longeval.evaluate(model, params, tokenizer, cfg, train_len=scale.train_len)
  summary = {"model": kind, "best_lr": scale.lrs[best], "heldout_answer_accuracy": accs[best],
             "accuracy_per_lr": " ".join(f"{a:.3f}" for a in accs),
             "train_seconds": round(train_s, 1),
             "eval_seconds": round(time.perf_counter() - t0, 1)}
  return summary, rows


def score_table(results: dict[str, list[dict]], scale: Scale) -> list[dict]:
  """One row per (model, task): the mean score over depths at each length multiple."""
  table = []
  lengths = prompt_lengths(scale)
  for kind, rows in results.items():
    for task in scale.tasks:
      row = {"model": kind, "task": task}
      for m, length in zip(MULTIPLES, lengths):
        cell = [r["score"] for r in rows if r["task"] == task and r["length"] == length]
        row[f"{m}x"] = float(np.mean(cell))
      table.append(row)
  return table


def verdict(table: list[dict], solved: float, scale: Scale | None = None) -> str:
  """Checks the claim on the 1x column, averaged over the tasks (see the module docstring).

  With `scale`, a SWA model that is not clearly below full attention is explained when its
  stacked windows (layers x window) reach back over the whole training prompt."""
  at_1x = {}
  for row in table:
    at_1x.setdefault(row["model"], []).append(row["1x"])
  score = {kind: float(np.mean(v)) for kind, v in at_1x.items()}
  missing = sorted(set(MODELS) - set(score))
  if missing:
    return (f"SpikingBrain's claim NOT checked at this scale: models {missing} were not run.")
  reasons = []
  full = score["attention"]
  if full < solved:
    reasons.append(f"full attention recalls only {full:.2f} at the training length (below "
                   f"{solved:.2f}): the training budget did not teach the task")
  for kind in ("swa", "gla"):
    if score[kind] > full - 0.25:
      reason = (f"{kind} scores {score[kind]:.2f} at 1x, not clearly below full attention's "
                f"{full:.2f}")
      if kind == "swa" and scale is not None:
        reach, prompt = scale.layers * window(scale), prompt_lengths(scale)[0]
        if reach >= prompt:
          reason += (f" (its {scale.layers} stacked windows of {window(scale)} reach {reach} "
                     f"tokens back, the whole {prompt}-token prompt)")
      reasons.append(reason)
  if score["hybrid"] < 0.8 * full:
    reasons.append(f"the hybrid keeps {score['hybrid']:.2f} of full attention's {full:.2f} "
                   "(below 80%)")
  beyond = ", ".join(f"{r['model']} {r['task']} {r['2x']:.2f}/{r['4x']:.2f}" for r in table)
  head = ("SpikingBrain's claim NOT reproduced at this scale: " + "; ".join(reasons) if reasons
          else "SpikingBrain's claim reproduced at this scale: full attention recalls at the "
          f"training length ({full:.2f}), SWA ({score['swa']:.2f}) and GLA ({score['gla']:.2f}) "
          f"fall clearly below it and the hybrid keeps most of it ({score['hybrid']:.2f})")
  return f"{head}. Beyond training (2x/4x): {beyond}."


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.tables.niah_hybrid",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--paper", action="store_true", help="the ablation's sizes (not CPU scale)")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--lrs", help="comma-separated learning rates (default: the scale's)")
  for name in ("train_len", "width", "layers", "d_ff", "train_examples", "test_examples",
               "batch_size", "epochs", "examples"):
    parser.add_argument(f"--{name}", type=int)
  parser.add_argument("--depths", help="comma-separated needle depths (default: the scale's)")
  parser.add_argument("--tasks", help=f"comma-separated tasks among {','.join(TASKS)} (default: "
                      "both)")
  parser.add_argument("--solved", type=float, default=0.9,
                      help="score that counts as recalling the needle")
  parser.add_argument("--out", default="runs/tables/niah_hybrid")
  args = parser.parse_args(argv)
  override = {name: getattr(args, name) for name in (
      "train_len", "width", "layers", "d_ff", "train_examples", "test_examples", "batch_size",
      "epochs", "examples") if getattr(args, name) is not None}
  if args.lrs:
    override["lrs"] = tuple(float(x) for x in args.lrs.split(","))
  if args.depths:
    override["depths"] = tuple(float(x) for x in args.depths.split(","))
  if args.tasks:
    override["tasks"] = tuple(args.tasks.split(","))
    if set(override["tasks"]) - set(TASKS):
      parser.error(f"--tasks: choose among {','.join(TASKS)}")
  scale = dataclasses.replace(PAPER if args.paper else CPU, **override)
  models = tuple(args.models.split(","))
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    parser.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
  if scale.train_examples * len(scale.tasks) < scale.batch_size:
    parser.error(f"--train_examples={scale.train_examples} per task is below the batch size "
                 f"{scale.batch_size}")
  tokenizer = make_tokenizer("byte")
  for kind in models:  # every model config is checked before anything trains
    model_config(kind, scale, tokenizer.vocab_size)
  # Every evaluation prompt is made (and fits) before anything trains.
  longeval.examples(longeval.LongEvalConfig(tasks=scale.tasks, lengths=prompt_lengths(scale),
                                            depths=scale.depths, examples=scale.examples),
                    tokenizer)

  start = time.perf_counter()
  train = task_rows(scale, tokenizer, TRAIN, scale.train_examples)
  test = task_rows(scale, tokenizer, EVAL, scale.test_examples)
  summaries, results, detail = [], {}, []
  for kind in models:
    summary, rows = train_and_evaluate(kind, scale, tokenizer, train, test)
    summaries.append(summary)
    results[kind] = rows
    detail += [{"model": kind, **r} for r in rows]
    print(f"  {kind:>9s} lr {summary['best_lr']:g}: held-out answer accuracy "
          f"{summary['heldout_answer_accuracy']:.3f} (train {summary['train_seconds']} s, "
          f"eval {summary['eval_seconds']} s)", flush=True)
  table = score_table(results, scale)
  lengths = prompt_lengths(scale)
  steps = scale.train_examples * len(scale.tasks) // scale.batch_size * scale.epochs
  print(f"\nNeedle score by length (1x = {lengths[0]} prompt bytes, the training length; SWA "
        f"window {window(scale)}; {scale.layers} layers, d_model {scale.width}; {steps} steps of "
        f"{scale.batch_size} rows; mean over depths {scale.depths} x {scale.examples} examples; "
        f"{time.perf_counter() - start:.0f} s):")
  columns = ["model", "task"] + [f"{m}x" for m in MULTIPLES]
  benchmarking.print_table(table, columns)
  print()
  summary_columns = ["model", "best_lr", "heldout_answer_accuracy", "accuracy_per_lr",
                     "train_seconds", "eval_seconds"]
  benchmarking.print_table(summaries, summary_columns)
  benchmarking.write_csv(os.path.join(args.out, "niah_hybrid.csv"), table, columns)
  benchmarking.write_csv(os.path.join(args.out, "niah_hybrid_cells.csv"), detail,
                         ["model", "task", "length", "depth", "examples", "exact_match", "score",
                          "answer_logprob", "beyond_training"])
  panels = {task: {r["model"]: (list(MULTIPLES), [r[f"{m}x"] for m in MULTIPLES])
                   for r in table if r["task"] == task} for task in scale.tasks}
  if benchmarking.plot_panels(os.path.join(args.out, "niah_hybrid.png"), panels,
                              "evaluation length / training length", "score",
                              ylim=(0.0, 1.02)):
    print(f"plot: {os.path.join(args.out, 'niah_hybrid.png')}")
  print(f"csv:  {os.path.join(args.out, 'niah_hybrid.csv')}")
  print(verdict(table, args.solved, scale))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
