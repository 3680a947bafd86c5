"""What `experiments.run` does in each RunConfig.mode, given the built configs."""

import os

import jax
import numpy as np

from experiments import benchmarking
from experiments.spike_stats import run_spike_stats
from lctx import data as data_lib
from lctx.checkpoint import Checkpointer
from lctx.evals import doc_loss, longeval
from lctx.generate import check_request, generate
from lctx.optim import make_optimizer
from lctx.state import build
from lctx.restore import restore_checkpoint
from lctx.model import DecoderLM
from lctx.trainer import make_jitted_eval, run_eval, train
from lctx.ttt import perk_train
from sharding.mesh import make_mesh


def _model_on_mesh(configs: dict):
  tx, _ = make_optimizer(configs["optimizer"], configs["train"].steps)
  return build(configs["model"], make_mesh(configs["mesh"]), tx)


def restore_params(workdir: str, configs: dict, m=None):
  """The model on its mesh and the parameters of the newest readable checkpoint in `workdir`.

  The checkpoint is compared with the configured model first; unreadable steps are reported and
  skipped, never moved (a training run may own the workdir).
  """
  if configs["perk"].enabled:
    raise ValueError(f"PERKConfig.enabled=True: the checkpoints in {workdir} hold PERK's "
                     "meta-parameters, not a model; RunConfig.mode='longeval' answers with them, "
                     f"other modes take the base (TrainConfig.init_from="
                     f"{configs['train'].init_from!r}) as their workdir")
  m = _model_on_mesh(configs) if m is None else m
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    restored = restore_checkpoint(ckpt, m, configs["model"], workdir, configs.get("gin"),
                                  full_state=False, move_aside=False)
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"no checkpoint in {ckpt.directory}; train first (RunConfig.mode='train')")
  step, params = restored
  return m, step, params


def run_perk_train(workdir: str, configs: dict) -> int:
  result = perk_train.train(workdir, configs)
  print(f"\nFinished PERK meta-training at step {result['step']}: held-out answer NLL "
        f"{result['eval_loss']:.4f} nats/token, answer-token accuracy "
        f"{result['eval_answer_accuracy']:.3f} (adapted on the context, answering from the "
        f"query alone)")
  print(f"  metrics:      {result['metrics']}")
  print(f"  checkpoints:  {result['checkpoints']} (the meta-parameters; the base is "
        f"TrainConfig.init_from={configs['train'].init_from})")
  return 0


def run_train(workdir: str, configs: dict, transfer=None) -> int:
  if configs["perk"].enabled and transfer is None:
    return run_perk_train(workdir, configs)
  result = train(workdir, configs["model"], configs["data"], configs["optimizer"],
                 configs["train"], configs["mesh"], gin_text=configs.get("gin"),
                 transfer=transfer)
  if jax.process_index() == 0:
    if transfer is not None:
      print("\nAttention transfer: the train loss above is the per-layer MSE to the softmax "
            "teacher; the eval loss is the hybrid's LM loss")
    ratio = result["eval_loss"] / result["unigram_loss"]
    print(f"\nFinished step {result['step']}: eval loss {result['eval_loss']:.4f} nats/token "
          f"(perplexity {result['eval_ppl']:.2f}) vs unigram baseline "
          f"{result['unigram_loss']:.4f} ({ratio:.0%} of it)")
    print(f"  config:       {os.path.join(workdir, 'config.gin')}")
    print(f"  metrics:      {result['metrics']}")
    print(f"  checkpoints:  {result['checkpoints']}")
    if os.path.isdir(os.path.join(workdir, "tensorboard")):
      print(f"  tensorboard:  {os.path.join(workdir, 'tensorboard')}")
    print(f"  generate:     python -m experiments.run --gin_file=<same files> "
          f"--workdir={workdir} --gin.RunConfig.mode=generate")
  return 0


def run_eval_mode(workdir: str, configs: dict) -> int:
  data_cfg, train_cfg = configs["data"], configs["train"]
  tokenizer = data_lib.make_tokenizer(data_cfg.tokenizer)
  batches = data_lib.eval_batches(data_cfg, tokenizer, train_cfg.eval_batches)
  m, step, params = restore_params(workdir, configs)
  result = run_eval(m, make_jitted_eval(m, train_cfg, data_cfg.seq_len), params, batches,
                    data_cfg.seq_len)
  print(f"checkpoint step {step}:")
  for key, value in result.items():
    print(f"  {key:>20s}  {value:.4f}")
  return 0


def run_generate(workdir: str, configs: dict) -> int:
  gen = configs["generate"]
  tokenizer = data_lib.make_tokenizer(configs["data"].tokenizer)
  prompt = np.asarray(tokenizer.encode(gen.prompt), np.int32)
  m = _model_on_mesh(configs)
  check_request(m.model, m.abstract_params, gen, len(prompt), configs["data"].seq_len)
  m, step, params = restore_params(workdir, configs, m)
  prompt_bt = np.broadcast_to(prompt, (gen.num_samples, len(prompt)))
  with m.context():
    tokens = generate(m.model, params, prompt_bt, jax.random.key(gen.seed),
                      max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                      top_k=gen.top_k, prefill_chunk=gen.prefill_chunk)
  for i, row in enumerate(np.asarray(tokens)):
    print(f"--- sample {i} (checkpoint step {step}, temperature {gen.temperature}, "
          f"top_k {gen.top_k}) ---")
    print(gen.prompt + tokenizer.decode(row))
  return 0


def run_longeval(workdir: str, configs: dict) -> int:
  """Recall over tasks x lengths x depths (LongEvalConfig): table, CSV and one heatmap per task
  under <workdir>/longeval."""
  cfg, seq_len = configs["longeval"], configs["data"].seq_len
  tokenizer = data_lib.make_tokenizer(configs["data"].tokenizer)
  items = longeval.examples(cfg, tokenizer)  # every example fits, before anything is compiled
  if configs["perk"].enabled:  # the adapter's meta-parameters here, the base from init_from
    if cfg.ttt is not None:
      raise ValueError("LongEvalConfig.ttt (qTTT) and PERKConfig.enabled are two ways of "
                       "answering; bind one")
    perk_train.check(configs)
    step, meta = perk_train.restore_meta(workdir, configs)
    model = DecoderLM(configs["model"])
    answer = perk_train.Answerer(model, perk_train.base_params(configs), meta, configs["perk"])
    rows = longeval.evaluate(model, None, tokenizer, cfg, train_len=seq_len, items=items,
                             answer=answer)
    print("PERK: the adapter learns each context; the model answers from the query alone")
  else:
    m, step, params = restore_params(workdir, configs)
    with m.context():
      rows = longeval.evaluate(m.model, params, tokenizer, cfg, train_len=seq_len, items=items)
  out = os.path.join(workdir, "longeval")
  columns = ["task", "length", "depth", "examples", "exact_match", "score", "answer_logprob",
             "beyond_training"] + (longeval.TTT_COLUMNS if cfg.ttt is not None else [])
  benchmarking.write_csv(os.path.join(out, "longeval.csv"), rows, columns)
  print(f"checkpoint step {step}, trained at {seq_len} tokens:")
  benchmarking.print_table(rows, columns)
  if cfg.ttt is not None:
    print(f"test-time training: {cfg.ttt}")
    for length in cfg.lengths:  # the compute at each length, from its first row
      row = next(r for r in rows if r["length"] == int(length))
      print(f"  at {length} tokens: prefill {row['prefill_gflops']:.3g} GFLOP, test-time "
            f"{row['ttt_gflops']:.3g} GFLOP = {row['thinking_tokens']} thinking tokens")
  score = {(r["task"], r["length"], r["depth"]): r["score"] for r in rows}
  for task in cfg.tasks:
    grid = np.array([[score[task, int(n), float(d)] for n in cfg.lengths] for d in cfg.depths])
    path = os.path.join(out, f"{task}.png")
    if benchmarking.plot_heatmap(path, grid, cfg.depths, cfg.lengths, "context length (tokens)",
                                 "needle depth", f"{task}: score (step {step})"):
      print(f"  heatmap: {path}")
  print(f"  csv:     {os.path.join(out, 'longeval.csv')}")
  return 0


def run_doc_loss(workdir: str, configs: dict) -> int:
  """Loss by position from each held-out document's start (DocLossConfig): table, CSV and a
  curve under <workdir>/doc_loss."""
  cfg, data_cfg = configs["doc_loss"], configs["data"]
  tokenizer = data_lib.make_tokenizer(data_cfg.tokenizer)
  docs = doc_loss.documents(cfg, data_cfg, tokenizer)  # checked before anything is compiled
  m, step, params = restore_params(workdir, configs)
  with m.context():
    rows, losses = doc_loss.evaluate(m.model, params, docs, cfg, train_len=data_cfg.seq_len)
  out = os.path.join(workdir, "doc_loss")
  columns = ["start", "end", "documents", "loss", "ppl", "beyond_training"]
  benchmarking.write_csv(os.path.join(out, "doc_loss.csv"), rows, columns)
  print(f"checkpoint step {step}, trained at {data_cfg.seq_len} tokens; {len(docs)} documents "
        f"of source {data_cfg.source!r}, loss by position from the document start:")
  benchmarking.print_table(rows, columns)
  curve = np.mean(losses, axis=0)
  positions = np.arange(1, len(curve) + 1)
  path = os.path.join(out, "doc_loss.png")
  if benchmarking.plot_panels(path, {f"step {step}, trained at {data_cfg.seq_len}": {
      "mean over documents": (list(positions), list(curve))}}, "position in the document",
                              "next-token loss (nats)"):
    print(f"  curve: {path}")
  print(f"  csv:   {os.path.join(out, 'doc_loss.csv')}")
  return 0


def run_attention_transfer(workdir: str, configs: dict) -> int:
  """Train only a converted hybrid's new parameters against each layer's softmax teacher
  (TransferConfig, lctx/transfer.py), from TrainConfig.init_from."""
  return run_train(workdir, configs, transfer=configs["transfer"])


MODES = {"train": run_train, "attention_transfer": run_attention_transfer,
         "eval": run_eval_mode, "generate": run_generate,
         "spike_stats": lambda workdir, configs: run_spike_stats(workdir, configs,
                                                                 restore_params),
         "longeval": run_longeval, "doc_loss": run_doc_loss}
