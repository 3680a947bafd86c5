"""lm-evaluation-harness on lctx checkpoints: the harness model `lctx` and the harness's own CLI.

  python -m experiments.lm_eval --model lctx --model_args workdir=runs/quickstart \
      --tasks my_task --include_path my_tasks/ [--output_path out/] [any lm-eval run flag]

Everything after `python -m experiments.lm_eval` is lm_eval's command line (`lm-eval run ...`,
`lm-eval ls tasks`); this module only registers the model class `LctxLM` as `lctx` in the
harness's model registry first. model_args (comma-separated, as the harness reads them):
  workdir          required: a workdir of `python -m experiments.run` (its config.gin and
                   checkpoints/); the newest readable checkpoint is evaluated.
  batch_size       rows per forward pass; default the harness's --batch_size (1 unless given).
  max_length       the most tokens the model reads at once; default DataConfig.seq_len (the
                   trained length). Contexts lose their oldest tokens beyond it.
  max_gen_toks     generate_until's budget when a task sets none; default
                   min(256, max_length // 2).
  prefix_token_id  the token an empty context and the first rolling window condition on. lctx
                   tokenizers have no BOS/EOS (documents are told apart by segment ids), so the
                   default is the first token of "\\n".

The harness's datasets are read offline (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1, unless the
environment sets them), so tasks whose data is local (a task YAML with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}`) run with no network. generate_until decodes greedily (or
samples when a task sets do_sample / temperature) with lctx.generate; prompts are left-padded
into power-of-two length buckets, and each bucket compiles once.

Exit status: what lm_eval's CLI returns; 2 for an error in the settings (a bad model_arg or
workdir, a checkpoint that does not match config.gin), 4 for an unreadable checkpoint.
"""

import collections
import logging
import os
import sys

# Read by `datasets` and `huggingface_hub` when they are imported, so set before lm_eval is.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402
import lm_eval.models  # noqa: E402,F401  (the harness's own models stay registered beside lctx)
from lm_eval.api import registry  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs  # noqa: E402
from tqdm import tqdm  # noqa: E402

from experiments import modes, run  # noqa: E402
from lctx import data as data_lib  # noqa: E402
from lctx import loglikelihood  # noqa: E402
from lctx.errors import RunFailure  # noqa: E402
from lctx.generate import generate, left_pad  # noqa: E402

log = logging.getLogger("lctx")

MODEL_ARGS = ("workdir", "batch_size", "max_length", "max_gen_toks", "prefix_token_id")
HARNESS_ARGS = ("max_batch_size", "device")  # given by the harness to every model; unused here
DEFAULT_BATCH_SIZE = 8
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k")


def _positive_int(name: str, value, default: int) -> int:
  if value is None:
    return default
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = 0
  if number < 1 or str(number) != str(value).strip():
    raise ValueError(f"lctx model_args: {name}={value!r} must be a positive integer")
  return number


def load_workdir(workdir: str) -> dict:
  """The configs of `workdir`'s training run, from its config.gin."""
  if not workdir:
    raise ValueError("lctx model_args: workdir is required (--model_args workdir=W, a workdir "
                     "of python -m experiments.run)")
  path = os.path.join(workdir, "config.gin")
  if not os.path.isdir(workdir):
    raise ValueError(f"lctx model_args: workdir={workdir!r} is not a directory")
  if not os.path.isfile(path):
    raise ValueError(f"lctx model_args: workdir={workdir!r} has no config.gin; train there "
                     "first (python -m experiments.run --gin_file=... --workdir=W)")
  try:
    return run.load_configs([path], [])
  except ValueError as e:
    raise ValueError(f"lctx model_args: workdir={workdir!r}: {path}: {e}") from None


@registry.register_model("lctx")
class LctxLM(TemplateLM):
  """The newest checkpoint of an lctx workdir as an lm-evaluation-harness model (see the module
  docstring for its model_args)."""

  def __init__(self, workdir: str | None = None, **kwargs):
    super().__init__()
    unknown = sorted(set(kwargs) - set(MODEL_ARGS) - set(HARNESS_ARGS))
    if unknown:
      raise ValueError(f"lctx model_args: unknown {unknown}; allowed are {list(MODEL_ARGS)}")
    self.workdir = workdir
    configs = load_workdir(workdir)
    seq_len = configs["data"].seq_len
    self.batch_size = _positive_int("batch_size", kwargs.get("batch_size"), DEFAULT_BATCH_SIZE)
    self.max_length = _positive_int("max_length", kwargs.get("max_length"), seq_len)
    self.max_gen_toks = _positive_int("max_gen_toks", kwargs.get("max_gen_toks"),
                                      max(1, min(256, self.max_length // 2)))
    if self.max_gen_toks >= self.max_length:
      raise ValueError(f"lctx model_args: max_gen_toks={self.max_gen_toks} must be below "
                       f"max_length={self.max_length} (the prompt needs a token)")
    self.text_tokenizer = data_lib.make_tokenizer(configs["data"].tokenizer)
    vocab = configs["model"].vocab_size
    prefix = kwargs.get("prefix_token_id")
    if prefix is None:
      newline = self.text_tokenizer.encode("\n")
      if not len(newline):
        raise ValueError(f"lctx model_args: {self.text_tokenizer!r} encodes '\\n' to no token; "
                         "give prefix_token_id")
      prefix = int(newline[0])
    self._prefix = int(prefix) if str(prefix).strip().isdigit() else -1
    if not 0 <= self._prefix < vocab:
      raise ValueError(f"lctx model_args: prefix_token_id={prefix} must lie in "
                       f"[0, ModelConfig.vocab_size={vocab})")
    self._ignored_gen_kwargs = set()
    self.m, self.step, self.params = modes.restore_params(workdir, configs)
    log.info("lm_eval: %s, checkpoint step %d, max_length %d, batch_size %d", workdir,
             self.step, self.max_length, self.batch_size)

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    # The harness also hands over its own --batch_size (1 by default); model_args win.
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @property
  def eot_token_id(self) -> int:
    return self._prefix

  @property
  def prefix_token_id(self) -> int:
    return self._prefix

  @property
  def tokenizer_name(self) -> str:
    return repr(self.text_tokenizer)

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    return [int(t) for t in self.text_tokenizer.encode(string)]

  def tok_decode(self, tokens) -> str:
    return self.text_tokenizer.decode(np.asarray(tokens, np.int32))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(log p(continuation | context), is_greedy) of (key, context ids, continuation ids)."""
    bar = tqdm(total=len(requests), desc="lctx loglikelihood", disable=disable_tqdm)
    with self.m.context():
      results = loglikelihood.score(self.m.model, self.params,
                                    [(ctx, cont) for _, ctx, cont in requests],
                                    max_length=self.max_length, batch_size=self.batch_size,
                                    progress=bar.update)
    bar.close()
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """log p(text) of each request, over the harness's disjoint rolling windows of
    max_length tokens (the first conditioned on prefix_token_id)."""
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, ctx, cont))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[i] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def _generation_job(self, context: str, gen_kwargs: dict):
    """(prompt ids, max_new_tokens, temperature, top_k, stop strings) of one request."""
    kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks))
    until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
    new = int(kwargs.pop("max_gen_toks"))
    if not 1 <= new < self.max_length:
      raise ValueError(f"generate_until: max_gen_toks={new} must lie in [1, max_length="
                       f"{self.max_length})")
    temperature = float(kwargs.pop("temperature", 0.0))
    temperature = temperature if kwargs.pop("do_sample") else 0.0
    top_k = int(kwargs.pop("top_k", 0) or 0)
    if set(kwargs) - self._ignored_gen_kwargs:
      self._ignored_gen_kwargs |= set(kwargs)
      log.warning("generate_until: gen_kwargs %s are ignored (lctx uses %s)", sorted(kwargs),
                  list(GEN_KWARGS))
    prompt = self.tok_encode(context)[-(self.max_length - new):] or [self.prefix_token_id]
    return prompt, new, temperature, top_k, until

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """The continuation of each context, cut before the first of its `until` strings.

    Prompts are left-padded (lctx.generate.left_pad) to a power-of-two bucket and run
    `batch_size` rows at a time, short batches filled with copies of a row, so a whole task
    compiles once per (bucket, max_gen_toks, sampling settings).
    """
    jobs = [self._generation_job(*req.args) for req in requests]
    groups = collections.defaultdict(list)
    for i, (prompt, new, temperature, top_k, _) in enumerate(jobs):
      bucket = loglikelihood.bucket_length(len(prompt), self.max_length - new)
      groups[bucket, new, temperature, top_k].append(i)
    out: list[str | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="lctx generate_until", disable=disable_tqdm)
    with self.m.context():
      for (bucket, new, temperature, top_k), indices in groups.items():
        for start in range(0, len(indices), self.batch_size):
          rows = indices[start:start + self.batch_size]
          filled = rows + rows[:1] * (self.batch_size - len(rows))
          prompt_bt, lengths = left_pad([jobs[i][0] for i in filled], pad_id=self.prefix_token_id)
          prompt_bt = np.pad(prompt_bt, ((0, 0), (bucket - prompt_bt.shape[1], 0)),
                             constant_values=self.prefix_token_id)
          tokens = generate(self.m.model, self.params, prompt_bt, jax.random.key(start),
                            max_new_tokens=new, temperature=temperature, top_k=top_k,
                            prompt_lengths=lengths)
          for i, row in zip(rows, np.asarray(tokens)):
            out[i] = cut_at_stops(self.tok_decode(row), jobs[i][4])
            self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
          bar.update(len(rows))
    bar.close()
    return out


def cut_at_stops(text: str, stops) -> str:
  """`text` up to the first occurrence of any of the (non-empty) stop strings."""
  for stop in stops:
    if stop:
      text = text.split(stop)[0]
  return text


def main(argv: list[str] | None = None) -> int:
  """lm_eval's CLI with `lctx` registered; `argv` as after `lm-eval` (default sys.argv[1:])."""
  from lm_eval.__main__ import cli_evaluate

  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # The harness's CLI parses sys.argv itself (and puts `run` in front when no command is given).
  sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
  try:
    cli_evaluate()
  except RunFailure as e:
    print(f"lctx: runtime failure: {e}", file=sys.stderr)
    return run.EXIT_RUNTIME
  except ValueError as e:
    if not run.raised_in_project(e):  # the harness's own errors keep their traceback
      raise
    print(f"lctx: error: {e}", file=sys.stderr)
    return run.EXIT_CONFIG
  return 0


if __name__ == "__main__":
  sys.exit(main())
