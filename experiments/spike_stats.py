"""Spiking statistics of a trained checkpoint, as tables and a CSV (RunConfig.mode='spike_stats').

  python -m experiments.run --gin_file=gin/quickstart.gin \
      --gin_file=gin/models/tiny_spikingbrain_7b.gin --workdir=runs/tiny_spiking \
      --gin.RunConfig.mode=spike_stats

The latest checkpoint's parameters run forward over the held-out batches (TrainConfig.eval_batches
of them) with the "intermediates" collection mutable; every spiking input sows the sums of its
spike counts (layers/spike_stats.py), which are added up over the batches and summarized:
firing rate, sparsity over the time window, spikes per channel (per token), the fraction of
channels that never fire, the time window and the fraction of counts the window cannot represent.
`module` tells apart the branches of a parallel hybrid layer (mixer/gla, mixer/swa).

Printed: one overall row per coding (binary, ternary, sign-magnitude and two's-complement bitwise;
the counts are the same, only their spike trains differ), then one row per layer and input site
for the configured `SpikeConfig.coding`. Written: `spike_stats.csv` in the workdir with every row
of every coding. Padding tokens of a packed row count like the others.
"""

import dataclasses
import os

import jax

from experiments.benchmarking import print_table, write_csv
from layers.spike_coding import CODINGS
from layers.spike_stats import merge_trees, summarize
from lctx import data as data_lib
from lctx.model import DecoderLM

COLUMNS = ["coding", "layer", "site", "module", "firing_rate", "sparsity", "spikes_per_channel",
           "never_firing", "time_steps", "unrepresentable", "mean_abs_count", "channels",
           "tokens"]


def checkpoint_statistics(m, params, batches, spiking) -> list[dict]:
  """Summary rows (layers/spike_stats.summarize) of `params` over `batches` under `spiking`."""
  model = m.model.clone(config=dataclasses.replace(m.model.config, spiking=spiking))

  def forward(params, batch):
    _, collections = model.apply({"params": params}, batch["tokens"], batch["positions"],
                                 batch["segment_ids"], mutable=["intermediates"])
    return collections["intermediates"]

  step = m.jit(forward, in_shardings=(m.state_shardings["params"], m.batch_sharding),
               out_shardings=None)
  total = None
  for batch in batches:
    tree = jax.device_get(step(params, m.put_batch(batch)))
    total = tree if total is None else merge_trees(total, tree)
  if not total:
    raise ValueError("no spiking input sowed statistics: SpikeConfig.sites is empty")
  rows = summarize(total)
  for row in rows:  # the module inside the layer, e.g. mixer/gla in a parallel hybrid layer
    parts = row["path"].split("/")
    row["module"] = "/".join(parts[1:]) if parts[0] == row["layer"] else row["path"]
  return rows


def run_spike_stats(workdir: str, configs: dict, restore) -> int:
  """Prints the tables and writes spike_stats.csv; `restore` gives (model on mesh, step, params)."""
  spiking = configs["model"].spiking
  if not spiking.enabled:
    raise ValueError("SpikeConfig.enabled=False: this model does not spike; pass "
                     "--gin.SpikeConfig.enabled=True to measure how its activations would spike")
  data_cfg = configs["data"]
  tokenizer = data_lib.make_tokenizer(data_cfg.tokenizer)
  batches = data_lib.eval_batches(data_cfg, tokenizer, configs["train"].eval_batches)
  m, step, params = restore(workdir, configs)
  rows, overall = [], []
  for coding in CODINGS:
    coded = dataclasses.replace(spiking, coding=coding)
    coding_rows = [dict(r, coding=coding)
                   for r in checkpoint_statistics(m, params, batches, coded)]
    rows += coding_rows
    overall += [r for r in coding_rows if r["layer"] == "all"]
  if jax.process_index() != 0:
    return 0
  tokens = overall[0]["tokens"]
  time_steps = ("the paper's choice per tensor" if spiking.time_steps is None
                else f"{spiking.time_steps}")
  print(f"Spiking statistics of checkpoint step {step} over {tokens} tokens "
        f"(k={spiking.k}, time steps: {time_steps})\n")
  print_table(overall, COLUMNS)
  print(f"\nPer layer and input site, {spiking.coding} coding:\n")
  print_table([r for r in rows if r["coding"] == spiking.coding and r["layer"] != "all"],
              COLUMNS)
  path = os.path.join(workdir, "spike_stats.csv")
  write_csv(path, rows, COLUMNS)
  print(f"\n  csv: {path}")
  return 0
