"""Makes the tiny Hugging Face fixtures of tests/test_convert_hf.py (run once; needs torch and
transformers, which the suite never imports):

  python tests/make_hf_fixtures.py [--out tests/data/hf]

For each family a tiny randomly initialised model is written by transformers' own
save_pretrained, with the float32 logits and greedy continuations transformers computes for
fixed prompts (expected.npz), so the suite checks lctx's import against the original framework:
  llama    GQA, llama3 RoPE scaling, untied, one model.safetensors, float32
  qwen2    q/k/v biases, tied embeddings, yarn RoPE scaling, bfloat16 tensors
  mistral  sliding window, sharded safetensors with an index, float16 tensors
  qwen3    q/k norms, an explicit head_dim wider than hidden / heads, dynamic NTK RoPE
qwen2 also gets a character-level tokenizer.json of 73 tokens (fewer than its 96 embedding rows,
as Qwen's tokenizer has fewer ids than its embedding). rope.json holds transformers' inverse frequencies (and attention factor) for every supported
rope type, for the RoPE unit test.
"""

import argparse
import json
import os

import numpy as np
import torch
import transformers
from transformers import modeling_rope_utils

VOCAB, HIDDEN, FF, LAYERS, HEADS, KV = 96, 32, 64, 2, 4, 2
PROMPT_LEN, BATCH, NEW_TOKENS = 40, 2, 6

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, torch.float32, None, dict(
        rope_theta=10000.0, max_position_embeddings=128,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, torch.bfloat16, None, dict(
        rope_theta=1000000.0, max_position_embeddings=64,
        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 16},
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, torch.float16, "20KB",
                dict(rope_theta=10000.0, max_position_embeddings=128, sliding_window=8,
                     rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, torch.float32, None, dict(
        rope_theta=10000.0, max_position_embeddings=24, head_dim=16,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False)),
}

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_beta": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                  "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3},
}


def make_family(name, out):
  config_cls, model_cls, dtype, shard, extra = FAMILIES[name]
  torch.manual_seed(0)
  config = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV, **extra)
  config._attn_implementation = "eager"
  model = model_cls(config).eval()
  with torch.no_grad():  # a visible spread in every weight (the default init is 0.02)
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  model = model.to(dtype)
  path = os.path.join(out, name)
  kwargs = {"max_shard_size": shard} if shard else {}
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, VOCAB, (BATCH, PROMPT_LEN))
  ids = torch.tensor(prompts)
  # The stored (rounded) weights, loaded the way a transformers user loads them and computed in
  # float32 (converting the live model instead would round its RoPE buffers too).
  model32 = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    logits = model32(ids).logits.numpy().astype(np.float32)
    # An explicit all-ones mask: generate would otherwise mask every prompt token equal to the
    # pad id.
    greedy = model32.generate(ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)[:, PROMPT_LEN:].numpy()
  np.savez(os.path.join(path, "expected.npz"), prompts=prompts, logits=logits, greedy=greedy)
  print(f"{name}: {sorted(os.listdir(path))}")


def make_tokenizer(path):
  import string
  import tokenizers
  chars = ["?"] + sorted(set(string.ascii_letters + string.digits + " .,!'-:;()"))
  vocab = {c: i for i, c in enumerate(chars)}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="?"))
  tok.decoder = tokenizers.decoders.Fuse()
  tok.save(os.path.join(path, "tokenizer.json"))


def make_rope(out):
  cases = {}
  for label, scaling in ROPE_CASES.items():
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                      max_position_embeddings=64, rope_theta=10000.0,
                                      rope_scaling=scaling)
    kind = "default" if scaling is None else scaling["rope_type"]
    fn = modeling_rope_utils.ROPE_INIT_FUNCTIONS.get(kind)
    if kind == "default":
      inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
      factor = 1.0
    else:
      inv, factor = fn(config, "cpu", seq_len=None)
    entry = {"scaling": scaling, "head_dim": 16, "base": 10000.0, "max_position": 64,
             "inv_freq": inv.tolist(), "attention_factor": float(factor)}
    if kind == "dynamic":  # at 100 positions (longer than max_position_embeddings)
      entry["inv_freq_at_100"] = fn(config, "cpu", seq_len=100)[0].tolist()
    cases[label] = entry
  with open(os.path.join(out, "rope.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data", "hf"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  for name in FAMILIES:
    make_family(name, args.out)
  make_tokenizer(os.path.join(args.out, "qwen2"))
  make_rope(args.out)


if __name__ == "__main__":
  main()
