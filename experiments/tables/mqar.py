"""Zoology's Figure 2 at CPU scale: MQAR accuracy against model width, per (length, pairs).

  python -m experiments.tables.mqar [--paper] [--out DIR]

Every model has 2 mixer-only layers (no FFN, as in Zoology) of one kind: softmax attention, plain
linear attention, lightning (fixed per-head decay), GLA (data-dependent gates), and the
SpikingBrain-style hybrid (a GLA layer, then a sliding-window attention layer whose window is a
quarter of the length, so the window alone cannot reach the pairs). Each (model, width, setting)
trains at the learning rates of `--lrs` together (vmapped: one compilation, one program) on a
fixed training set of MQAR sequences from lctx's task pipeline (DataConfig.source='task:mqar'),
with AdamW (weight decay 0.1) and a cosine schedule, loss at the queries only; the reported
accuracy is that of the best learning rate, over the labelled positions of held-out sequences.

The claim (Zoology, Figure 2): attention solves every setting at every width, while the recurrent
models (linear, lightning, GLA) need a width that grows with the length. It counts as reproduced
when attention reaches `--solved` accuracy in every cell and, for every recurrent model, the
smallest width reaching it grows with the length (strictly from the shortest to the longest
setting, or never reached at the longest).

The CPU scale (the default) shrinks the paper's sweep (vocab 8192, 100K training sequences at
every length, d_model 64-512, batch 512, 64 epochs, 4 learning rates) to what 2 cores train within
45 minutes: vocab 512, d_model 32 and 64, 4 epochs of batch 8 over 8192 sequences at length 64
and as many tokens (so as many labelled queries) at the longer settings (4096 at 128, 2048 at 256),
and one learning rate, 3e-3. Small models learn MQAR from far fewer sequences with small batches:
attention at d_model 64, length 64 is at 0.23 after 2048 steps of batch 8, 0.44 after 3072 and
0.99 after 4096; 3e-3 beat 1e-3 in every cell of a 2-rate run (`--lrs 1e-3,3e-3` repeats it, at
twice the time). `--paper` runs the paper's sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from experiments import benchmarking
from experiments.tables import training
from layers.attention import AttentionConfig, SlidingWindowConfig
from layers.linear_mixers import GLAConfig, LightningConfig, LinearAttentionConfig
from lctx.config import ModelConfig
from lctx.data import DataConfig
from lctx.data.config import TaskConfig
from lctx.data.tasks import EVAL, TRAIN, TaskRows
from lctx.model import DecoderLM

MODELS = ("attention", "linear", "lightning", "gla", "hybrid")
RECURRENT = ("linear", "lightning", "gla")
HEAD_DIM = 16  # heads = width / 16: the state of a linear layer grows with the width


@dataclasses.dataclass(frozen=True)
class Scale:
  settings: tuple[tuple[int, int], ...]
  widths: tuple[int, ...]
  vocab: int
  train_examples: int
  test_examples: int
  batch_size: int
  epochs: int
  lrs: tuple[float, ...]
  equal_tokens: bool  # train_examples at the shortest length, proportionally fewer at longer ones


CPU = Scale(settings=((64, 4), (128, 8), (256, 16)), widths=(32, 64), vocab=512,
            train_examples=8192, test_examples=256, batch_size=8, epochs=4, lrs=(3e-3,),
            equal_tokens=True)
PAPER = Scale(settings=((64, 4), (128, 8), (256, 16)), widths=(64, 128, 256, 512), vocab=8192,
              train_examples=100_000, test_examples=3_000, batch_size=512, epochs=64,
              lrs=tuple(float(x) for x in np.logspace(-4, -2, 4)), equal_tokens=False)


def model_config(kind: str, width: int, length: int, vocab: int) -> ModelConfig:
  heads = max(1, width // HEAD_DIM)
  linear = dict(num_heads=heads, chunk_size=min(64, length))
  # Dense attention ("reference"): at these lengths it is faster on a CPU than the flash tiling.
  options = {
      "attention": {"attention": AttentionConfig(num_heads=heads, impl="reference")},
      "linear": {"linear": LinearAttentionConfig(**linear)},
      "lightning": {"lightning": LightningConfig(**linear)},
      "gla": {"gla": GLAConfig(**linear)},
      "hybrid": {"gla": GLAConfig(**linear),
                 "swa": SlidingWindowConfig(num_heads=heads, window=length // 4,
                                            impl="reference")},
  }[kind]
  mixers = ("gla", "swa") if kind == "hybrid" else (kind,)
  return ModelConfig(vocab_size=vocab, d_model=width, num_layers=2, d_ff=0, mixers=mixers,
                     mixer_options=options, tie_embeddings=False)


def mqar_rows(length: int, pairs: int, vocab: int, split: int, n: int) -> dict[str, np.ndarray]:
  """n rows of the task pipeline's MQAR split, stacked."""
  cfg = DataConfig(source="task:mqar", seq_len=length, batch_size=1,
                   task=TaskConfig(pairs=pairs, vocab=vocab))
  rows = TaskRows(cfg, None, split, n)
  items = [rows[i] for i in range(n)]
  return {k: np.stack([r[k] for r in items]) for k in items[0]}


def train_and_test(kind: str, width: int, length: int, train: dict, test: dict, scale: Scale,
                   seed: int = 0) -> list[float]:
  """Test accuracy after training at each of scale.lrs (one vmapped program)."""
  model = DecoderLM(model_config(kind, width, length, scale.vocab))
  params = training.train_at_rates(model, train, lrs=scale.lrs, batch_size=scale.batch_size,
                                   epochs=scale.epochs, seed=seed)
  return training.accuracy_at_rates(model, params, test, scale.batch_size)


def train_examples(scale: Scale, length: int) -> int:
  """Training sequences of the setting of this length. With equal_tokens the shortest setting
  has scale.train_examples and the others as many tokens, hence as many labelled queries (the
  pairs grow with the length)."""
  if not scale.equal_tokens:
    return scale.train_examples
  shortest = min(n for n, _ in scale.settings)
  return max(scale.batch_size, scale.train_examples * shortest // length)


def verdict(rows: list[dict], scale: Scale, solved: float) -> str:
  acc = {(r["model"], r["width"], r["length"]): r["accuracy"] for r in rows}
  lengths = [length for length, _ in scale.settings]
  failed = [(w, n) for w in scale.widths for n in lengths
            if ("attention", w, n) in acc and acc["attention", w, n] < solved]
  reasons = []
  if failed:
    steps = "/".join(str(train_examples(scale, n) // scale.batch_size * scale.epochs)
                     for n in lengths)
    reasons.append("attention stays below %.2f at (width, length) %s after %s training steps "
                   "of batch %d (lengths %s)" % (
                       solved, ", ".join(f"({w}, {n})" for w, n in failed), steps,
                       scale.batch_size, "/".join(map(str, lengths))))
  for kind in RECURRENT:
    if not any(k == kind for k, _, _ in acc):
      continue
    need = [min([w for w in scale.widths if acc.get((kind, w, n), 0.0) >= solved],
                default=None) for n in lengths]
    grows = need[-1] is None or (need[0] is not None and need[-1] > need[0])
    grows = grows and all(a is None or b is None or b >= a for a, b in zip(need, need[1:])
                          if a is not None)
    if need[0] is None and need[-1] is None:
      grows = False
      reasons.append(f"{kind} solves no width even at length {lengths[0]}")
    elif not grows:
      reasons.append(f"{kind}'s smallest solving width does not grow with length "
                     f"({dict(zip(lengths, need))})")
  if len(lengths) < 2:
    reasons.append("one length only, so growth with length cannot show")
  if reasons:
    return "Zoology's claim NOT reproduced at this scale: " + "; ".join(reasons) + "."
  return (f"Zoology's claim reproduced at this scale: attention reaches {solved:.2f} in every "
          "cell and the recurrent models need more width as the length grows.")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.tables.mqar", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--paper", action="store_true", help="the paper's sizes (not CPU scale)")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--widths", help="comma-separated d_model values (default: the scale's)")
  parser.add_argument("--settings", help="comma-separated length:pairs (default: the scale's)")
  parser.add_argument("--lrs", help="comma-separated learning rates (default: the scale's)")
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--train_examples", type=int)
  parser.add_argument("--test_examples", type=int)
  parser.add_argument("--solved", type=float, default=0.9,
                      help="accuracy that counts as solving a setting")
  parser.add_argument("--out", default="runs/tables/mqar")
  args = parser.parse_args(argv)
  scale = PAPER if args.paper else CPU
  override = {}
  if args.widths:
    override["widths"] = tuple(int(w) for w in args.widths.split(","))
  if args.settings:
    override["settings"] = tuple(tuple(int(x) for x in s.split(":"))
                                 for s in args.settings.split(","))
  if args.lrs:
    override["lrs"] = tuple(float(x) for x in args.lrs.split(","))
  for name in ("epochs", "batch_size", "train_examples", "test_examples"):
    if getattr(args, name) is not None:
      override[name] = getattr(args, name)
  scale = dataclasses.replace(scale, **override)
  models = tuple(args.models.split(","))
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    parser.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
  for length, pairs in scale.settings:  # every setting is checked before anything trains
    TaskRows(DataConfig(source="task:mqar", seq_len=length, batch_size=1,
                        task=TaskConfig(pairs=pairs, vocab=scale.vocab)), None, TRAIN, 1)
  if scale.train_examples < scale.batch_size:
    parser.error(f"--train_examples={scale.train_examples} is below the batch size "
                 f"{scale.batch_size}")

  start = time.perf_counter()
  rows = []
  for length, pairs in scale.settings:
    train = mqar_rows(length, pairs, scale.vocab, TRAIN, train_examples(scale, length))
    test = mqar_rows(length, pairs, scale.vocab, EVAL, scale.test_examples)
    for kind in models:
      for width in scale.widths:
        t0 = time.perf_counter()
        accs = train_and_test(kind, width, length, train, test, scale)
        best = int(np.argmax(accs))
        rows.append({"model": kind, "width": width, "length": length, "pairs": pairs,
                     "accuracy": accs[best], "best_lr": scale.lrs[best],
                     "accuracy_per_lr": " ".join(f"{a:.3f}" for a in accs),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"  {kind:>9s} d={width:<4d} L={length:<4d} pairs={pairs:<3d} accuracy "
              f"{accs[best]:.3f} (lr {scale.lrs[best]:g}; {rows[-1]['seconds']} s)", flush=True)
  columns = ["model", "width", "length", "pairs", "accuracy", "best_lr", "accuracy_per_lr",
             "seconds"]
  per_setting = ", ".join(f"{train_examples(scale, n)} at length {n}" for n, _ in scale.settings)
  print(f"\nMQAR accuracy (vocab {scale.vocab}; training sequences {per_setting}; "
        f"{scale.epochs} epochs of batch {scale.batch_size}; {scale.test_examples} test "
        f"sequences; best of lr "
        f"{', '.join(f'{x:g}' for x in scale.lrs)}; {time.perf_counter() - start:.0f} s):")
  benchmarking.print_table(rows, columns)
  benchmarking.write_csv(os.path.join(args.out, "mqar.csv"), rows, columns)
  panels = {f"length {length}, {pairs} pairs": {
      kind: (list(scale.widths), [next(r["accuracy"] for r in rows if r["model"] == kind and
                                       r["width"] == w and r["length"] == length)
                                  for w in scale.widths]) for kind in models}
      for length, pairs in scale.settings}
  if benchmarking.plot_panels(os.path.join(args.out, "mqar.png"), panels, "model width (d_model)",
                              "MQAR accuracy", ylim=(0.0, 1.02)):
    print(f"plot: {os.path.join(args.out, 'mqar.png')}")
  print(f"csv:  {os.path.join(args.out, 'mqar.csv')}")
  print(verdict(rows, scale, args.solved))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
