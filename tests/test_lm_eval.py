"""lm-evaluation-harness on an lctx checkpoint (experiments/lm_eval.py, lctx/loglikelihood.py).

A tiny model's parameters (random, sharp so that greedy choices are not near-ties) are saved
into a workdir with its config.gin, as a training run would leave them. Its loglikelihood,
loglikelihood_rolling and generate_until are checked against direct computations with
model.apply and lctx.generate; then the entry (experiments.lm_eval.main) runs the harness's own CLI on
local tasks (YAML + JSONL written here, no download) and its aggregated metrics are checked
against the same direct computations.
"""

import functools
import glob
import json
import math
import os
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lm_eval.tasks  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from lm_eval.api import registry  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from experiments import lm_eval as lctx_lm_eval  # noqa: E402
from experiments.run import load_configs  # noqa: E402
from lctx.checkpoint import Checkpointer  # noqa: E402
from lctx.data.tokenizers import ByteTokenizer  # noqa: E402
from lctx.generate import generate  # noqa: E402
from lctx.loglikelihood import bucket_length  # noqa: E402
from lctx.optim import make_optimizer  # noqa: E402
from lctx.state import build  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from tests import cli  # noqa: E402

SEQ_LEN = 32  # DataConfig.seq_len: the default max_length
TINY = ["ModelConfig.d_model = 32", "ModelConfig.num_layers = 2", "ModelConfig.d_ff = 64",
        f"SEQ_LEN = {SEQ_LEN}", "BATCH_SIZE = 2"]
TOK = ByteTokenizer()
NEWLINE = 10  # the default prefix token: the byte tokenizer's "\n"


def sharp_random_params(abstract_params, seed: int = 0):
  """Random parameters of the model's shapes, drawn with numpy (initializing the model compiles
  one program per parameter): unit norm scales, unit-variance embeddings and weights of standard
  deviation 3 / sqrt(d_model), sharper than the model's own init, so that greedy choices are not
  near-ties."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(a.shape, a.dtype)
    std = 1.0 if "embedding" in name else 3.0 / math.sqrt(abstract_params["embedding"].shape[1])
    return jax.device_put(rng.normal(0.0, std, a.shape).astype(a.dtype), a.sharding)

  return jax.tree_util.tree_map_with_path(draw, abstract_params)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding config.gin and one checkpoint (step 5) of sharp random parameters."""
  path = tmp_path_factory.mktemp("lm_eval") / "w"
  configs = load_configs([os.path.join(cli.ROOT, "gin/quickstart.gin")], TINY)
  path.mkdir()
  (path / "config.gin").write_text(gin.operative_config_str())
  m = build(configs["model"], make_mesh(configs["mesh"]),
            make_optimizer(configs["optimizer"], configs["train"].steps)[0])
  ckpt = Checkpointer(str(path / "checkpoints"))
  ckpt.save(5, {"params": sharp_random_params(m.abstract_params)}, {})  # what evaluation reads
  ckpt.close()
  return str(path)


@pytest.fixture(scope="module")
def lm(workdir):
  return registry.get_model("lctx").create_from_arg_string(f"workdir={workdir},batch_size=4")


BUFFER = 4 * SEQ_LEN  # direct computations run one forward over a buffer of this many tokens


@functools.partial(jax.jit, static_argnames="model")
def _buffer_logits(model, params, tokens):
  return model.apply({"params": params}, tokens)


def direct_logits(lm, tokens):
  """The logits after every prefix of `tokens` [len, vocab]: one forward over a fixed buffer
  whose tail is zeros (the model is causal, so the tail changes nothing before it)."""
  tokens = np.asarray(tokens, np.int32)
  assert len(tokens) <= BUFFER
  buffer = np.zeros((1, BUFFER), np.int32)
  buffer[0, :len(tokens)] = tokens
  with lm.m.context():
    return np.asarray(_buffer_logits(lm.m.model, lm.params, buffer))[0, :len(tokens)]


def direct_logprobs(lm, tokens):
  """log p(tokens[i + 1] | tokens[:i + 1]) for every i: [len - 1]."""
  logp = jax.nn.log_softmax(direct_logits(lm, tokens)[:-1], axis=-1)
  return np.take_along_axis(np.asarray(logp), np.asarray(tokens)[1:, None], axis=-1)[:, 0]


def direct_greedy(lm, tokens):
  """The argmax prediction after every prefix of `tokens`: [len]."""
  return np.argmax(direct_logits(lm, tokens), axis=-1)


def continuation_score(lm, context: str, continuation: str):
  ctx, cont = TOK.encode(context), TOK.encode(continuation)
  logp = direct_logprobs(lm, np.concatenate([ctx, cont]))
  greedy = direct_greedy(lm, np.concatenate([ctx, cont]))[len(ctx) - 1:-1]
  return float(logp[len(ctx) - 1:].sum()), bool(np.array_equal(greedy, cont))


def greedy_tokens(lm, prompt: str, n: int) -> np.ndarray:
  """lctx.generate's greedy continuation of `prompt` alone (a batch of one): [n]."""
  with lm.m.context():
    tokens = generate(lm.m.model, lm.params, jnp.asarray([TOK.encode(prompt)]),
                      jax.random.key(0), max_new_tokens=n)
  return np.asarray(tokens)[0]


def greedy_text(lm, prompt: str, n: int) -> str:
  return TOK.decode(greedy_tokens(lm, prompt, n))


def request(kind, *args):
  return Instance(kind, {}, args, 0)


def rolling_direct(lm, text: str, max_length: int) -> float:
  """log p(text | prefix) in chunks of max_length predicted tokens, each chunk read with the
  max_length tokens before its last one (the first: the prefix and the chunk)."""
  tokens = np.concatenate([[NEWLINE], TOK.encode(text)])  # tokens[i + 1] is text token i
  total, start = 0.0, 0
  ends = list(range(min(max_length, len(tokens) - 1), len(tokens) - 1, max_length))
  for end in ends + [len(tokens) - 1]:
    begin = max(0, end - max_length)
    total += float(direct_logprobs(lm, tokens[begin:end + 1])[start - begin:].sum())
    start = end
  return total


def test_the_class_is_registered_and_reads_the_workdir(lm, workdir):
  assert registry.get_model("lctx") is lctx_lm_eval.LctxLM
  assert registry.get_model("dummy").__name__ == "DummyLM"  # the harness's own models stay
  assert lm.step == 5 and lm.max_length == SEQ_LEN and lm.batch_size == 4
  assert lm.max_gen_toks == SEQ_LEN // 2 and lm.prefix_token_id == NEWLINE
  # The harness hands over its own --batch_size too; model_args win, else it is used.
  assert registry.get_model("lctx").create_from_arg_obj(
      {"workdir": workdir, "max_length": 20}, {"batch_size": 2, "device": None}).batch_size == 2
  assert bucket_length(1, 64) == 16 and bucket_length(17, 64) == 32
  assert bucket_length(33, 40) == 40


def test_loglikelihood_equals_the_direct_logprob(lm):
  pairs = [("def f(x):\n    return", " x + 1"), ("import", " os"), ("a", "b"),
           ("x" * 40, " = 3")]  # the last is cut to max_length tokens from the left
  got = lm.loglikelihood([request("loglikelihood", c, t) for c, t in pairs])
  for (c, t), (logprob, is_greedy) in zip(pairs[:3], got):
    want_logprob, want_greedy = continuation_score(lm, c, t)
    assert logprob == pytest.approx(want_logprob, rel=1e-5, abs=1e-5), (c, t)
    assert is_greedy == want_greedy, (c, t)
  cut = "x" * (SEQ_LEN + 1 - 4)  # the context that fits beside the 4-token continuation
  assert got[3][0] == pytest.approx(continuation_score(lm, cut, " = 3")[0], rel=1e-5)
  assert got[3][0] != pytest.approx(continuation_score(lm, "x" * 40, " = 3")[0], rel=1e-3)
  # An empty context conditions on the prefix token (the harness's rule).
  (empty, _), = lm.loglikelihood([request("loglikelihood", "", "abc")])
  assert empty == pytest.approx(continuation_score(lm, "\n", "abc")[0], rel=1e-5)


def test_is_greedy_follows_the_argmax(lm):
  """Token-level requests (the harness's _loglikelihood_tokens): the model's own argmax chain
  is greedy; changing its last token, or its first, is not."""
  context = [int(t) for t in TOK.encode("def f(x):")]
  chain = []
  for _ in range(3):
    chain.append(int(direct_greedy(lm, context + chain)[-1]))
  other = lambda t: (t + 1) % 256
  conts = [chain, chain[:2] + [other(chain[2])], [other(chain[0])] + chain[1:], chain[:1]]
  got = lm._loglikelihood_tokens([(None, context, c) for c in conts])
  assert [g for _, g in got] == [True, False, False, True]
  for cont, (logprob, _) in zip(conts, got):
    assert logprob == pytest.approx(float(direct_logprobs(lm, context + cont)[-len(cont):].sum()),
                                    rel=1e-5)


def test_loglikelihood_rolling_over_one_and_several_windows(lm):
  short, long = "def f(x): return x", "".join(f"v{i} = {i}\n" for i in range(12))
  assert len(short) < SEQ_LEN < 2 * SEQ_LEN < len(long)
  got = lm.loglikelihood_rolling([request("loglikelihood_rolling", s) for s in (short, long)])
  full_short = float(direct_logprobs(lm, TOK.encode("\n" + short)).sum())
  assert got[0] == pytest.approx(full_short, rel=1e-5)
  assert got[1] == pytest.approx(rolling_direct(lm, long, SEQ_LEN), rel=1e-5)
  # The windows matter: one pass over the whole document gives another number.
  full_long = float(direct_logprobs(lm, TOK.encode("\n" + long)).sum())
  assert got[1] != pytest.approx(full_long, rel=1e-3)


def test_generate_until_is_the_greedy_continuation_cut_at_until(lm):
  n = lm.max_gen_toks
  prompts = ["def f(x):", "import os", "class A:\n", "y" * 40]  # left-padded into batches
  tokens = [greedy_tokens(lm, p, n) for p in prompts[:3]]
  tokens.append(greedy_tokens(lm, prompts[3][-(SEQ_LEN - n):], n))  # cut to fit max_length
  texts = [TOK.decode(t) for t in tokens]
  assert len(set(texts)) == 4 and all(len(t) > 6 for t in texts)
  stop = texts[0][3:6]
  reqs = [request("generate_until", prompts[0], {"until": [stop], "do_sample": False}),
          # one batch of two, with the task's own budget
          request("generate_until", prompts[1], {"until": ["\x00never"], "max_gen_toks": 5}),
          request("generate_until", prompts[2], {"until": [], "max_gen_toks": 5}),
          request("generate_until", prompts[3], {"until": "never"})]
  got = lm.generate_until(reqs)
  assert got[0] == texts[0].split(stop)[0] and len(got[0]) <= 3
  assert got[1:3] == [TOK.decode(tokens[1][:5]), TOK.decode(tokens[2][:5])]
  assert got[3] == texts[3]  # the prompt lost its oldest tokens
  with pytest.raises(ValueError, match=r"max_gen_toks=32 must lie in \[1, max_length=32\)"):
    lm.generate_until([request("generate_until", "x", {"max_gen_toks": SEQ_LEN})])


def test_generate_until_samples_when_the_task_says_so(lm, monkeypatch, caplog):
  calls = []

  def fake_generate(model, params, prompt_bt, rng, *, max_new_tokens, temperature, top_k,
                    prompt_lengths):
    assert TOK.decode(prompt_bt[0, -prompt_lengths[0]:]) == "abc"
    calls.append((prompt_bt.shape[1], int(prompt_lengths[0]), max_new_tokens, temperature,
                  top_k))
    return np.full((prompt_bt.shape[0], max_new_tokens), ord("a"), np.int32)

  monkeypatch.setattr(lctx_lm_eval, "generate", fake_generate)
  got = lm.generate_until([
      request("generate_until", "abc", {"do_sample": True, "temperature": 0.7, "top_k": 5,
                                        "until": ["aaa"]}),
      request("generate_until", "abc", {"temperature": 0.0, "top_p": 0.9})])
  # the 3-token prompt, left-padded into the smallest bucket (16 tokens)
  assert calls == [(16, 3, 16, 0.7, 5), (16, 3, 16, 0.0, 0)]
  assert got == ["", "a" * 16]
  assert "gen_kwargs ['top_p'] are ignored" in caplog.text


def test_model_args_errors_name_the_setting(tmp_path, workdir):
  make = registry.get_model("lctx")
  with pytest.raises(ValueError, match="workdir is required"):
    make.create_from_arg_string("batch_size=2")
  with pytest.raises(ValueError, match=f"workdir='{tmp_path}/nope' is not a directory"):
    make.create_from_arg_string(f"workdir={tmp_path}/nope")
  with pytest.raises(ValueError, match=f"workdir='{tmp_path}' has no config.gin"):
    make.create_from_arg_string(f"workdir={tmp_path}")
  (tmp_path / "config.gin").write_text(open(os.path.join(workdir, "config.gin")).read())
  with pytest.raises(ValueError, match=f"no checkpoint in {tmp_path}/checkpoints"):
    make.create_from_arg_string(f"workdir={tmp_path}")
  with pytest.raises(ValueError, match=r"unknown \['max_len'\]; allowed are"):
    make.create_from_arg_string(f"workdir={workdir},max_len=3")
  with pytest.raises(ValueError, match="batch_size='auto' must be a positive integer"):
    make.create_from_arg_obj({"workdir": workdir}, {"batch_size": "auto"})
  with pytest.raises(ValueError, match="max_gen_toks=32 must be below max_length=32"):
    make.create_from_arg_string(f"workdir={workdir},max_gen_toks=32")
  with pytest.raises(ValueError, match=r"prefix_token_id=256 must lie in \[0, ModelConfig.vocab_"):
    make.create_from_arg_string(f"workdir={workdir},prefix_token_id=256")


def test_the_entry_reports_a_bad_workdir(monkeypatch, capsys, tmp_path):
  """main() hands its arguments to lm_eval's CLI and reports the model's errors (exit 2)."""
  seen = []

  def cli_evaluate():  # stands in for lm_eval's CLI, which builds the model from --model_args
    seen.append(list(sys.argv))
    registry.get_model("lctx").create_from_arg_string(f"workdir={tmp_path}/missing")

  monkeypatch.setattr(sys, "argv", list(sys.argv))
  monkeypatch.setattr("lm_eval.__main__.cli_evaluate", cli_evaluate)
  assert lctx_lm_eval.main(["--model", "lctx", "--tasks", "t"]) == 2
  assert seen == [["lm-eval", "--model", "lctx", "--tasks", "t"]]
  assert f"workdir='{tmp_path}/missing' is not a directory" in capsys.readouterr().err


TASKS = {
    "tiny_mc": dict(output_type="multiple_choice", doc_to_text="{{question}}",
                    doc_to_choice="{{choices}}", doc_to_target="label",
                    metric_list=[{"metric": "acc"}]),
    "tiny_ppl": dict(output_type="loglikelihood_rolling", doc_to_text="",
                     doc_to_target="{{text}}",
                     metric_list=[{"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}]),
    "tiny_gen": dict(output_type="generate_until", doc_to_text="{{prompt}}",
                     doc_to_target="{{answer}}",
                     generation_kwargs={"until": ["<never>"], "max_gen_toks": 8,
                                        "do_sample": False},
                     metric_list=[{"metric": "exact_match"}]),
}


def write_task(directory, name, docs, cache_dir):
  data = directory / f"{name}.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:",
           f"  data_files: {{test: {json.dumps(str(data))}}}",
           f"  cache_dir: {json.dumps(str(cache_dir))}", "test_split: test"]
  lines += [f"{key}: {json.dumps(value)}" for key, value in TASKS[name].items()]
  (directory / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def test_the_harness_cli_aggregates_what_the_model_scores(lm, workdir, tmp_path, monkeypatch,
                                                          capsys):
  mc = [{"question": "def f(x):", "choices": [" return x", "(((", " pass"], "label": 0},
        {"question": "import", "choices": [" os", " sys"], "label": 1},
        {"question": "x = 1 +", "choices": [" 2", " x", "\n"], "label": 2},
        {"question": "class", "choices": [" A:", " B("], "label": 0}]
  ppl = [{"text": "for i in range(3):\n    print(i)\n"},
         {"text": "".join(f"k{i}: {i * i}\n" for i in range(10))}]
  assert len(ppl[0]["text"]) <= SEQ_LEN < len(ppl[1]["text"])  # one window (full), several
  prompts = ["def g(", "while "]
  gen = [{"prompt": prompts[0], "answer": greedy_text(lm, prompts[0], 8)},
         {"prompt": prompts[1], "answer": "no such continuation"}]
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  for name, docs in (("tiny_mc", mc), ("tiny_ppl", ppl), ("tiny_gen", gen)):
    write_task(tasks, name, docs, tmp_path / "hf_cache")
  out = tmp_path / "out"
  monkeypatch.setattr(sys, "argv", list(sys.argv))  # the harness's CLI parses sys.argv
  # Its task manager indexes only the local tasks, not the ~10^4 built-in YAMLs (8-12 s here).
  monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                      functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
  assert lctx_lm_eval.main(
      ["--model", "lctx", "--model_args", f"workdir={workdir},batch_size=4", "--tasks",
       "tiny_mc,tiny_ppl,tiny_gen", "--include_path", str(tasks), "--output_path", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "tiny_mc" in printed and "lctx (" in printed  # the harness's table
  (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
  results = json.load(open(path))["results"]

  chosen = [int(np.argmax([continuation_score(lm, d["question"], " " + c)[0]
                           for c in d["choices"]])) for d in mc]
  want_acc = np.mean([c == d["label"] for c, d in zip(chosen, mc)])
  assert 0 < want_acc < 1, chosen  # the right and the wrong outcome both occur
  assert results["tiny_mc"]["acc,none"] == pytest.approx(want_acc)
  logprob = sum(rolling_direct(lm, d["text"], SEQ_LEN) for d in ppl)
  n_bytes = sum(len(d["text"].encode()) for d in ppl)
  assert results["tiny_ppl"]["byte_perplexity,none"] == pytest.approx(
      math.exp(-logprob / n_bytes), rel=1e-4)
  assert results["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
      -logprob / n_bytes / math.log(2), rel=1e-4)
  assert results["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)
