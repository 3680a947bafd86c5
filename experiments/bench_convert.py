"""Import benchmark: time and peak host memory of lctx.convert.hf.load_pretrained.

  python -m experiments.bench_convert [--size tiny|1b] [--dtype float32|bfloat16] [--out DIR]

Writes a random Llama with the exporter (save_pretrained; "1b" has TinyLlama-1.1B's shapes:
d 2048, 22 layers, d_ff 5632, 32 / 4 heads, vocab 32000), then imports it in a fresh process onto a
one-device mesh and measures the import's wall time and the process's peak resident memory (RSS,
VmHWM: the Python and JAX runtime included), next to the RSS before the import began. Prints a
table with the goal (peak RSS at most 1.3x the checkpoint's size; judged for checkpoints of 1 GiB
and more) as PASS/FAIL and writes
<out>/convert.csv.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

SIZES = {
    "tiny": dict(vocab_size=512, d_model=128, num_layers=2, d_ff=384, heads=4, kv_heads=2),
    "1b": dict(vocab_size=32000, d_model=2048, num_layers=22, d_ff=5632, heads=32, kv_heads=4),
}
COLUMNS = ["size", "dtype", "params", "checkpoint_gib", "import_s", "rss_before_gib",
           "peak_rss_gib", "peak_over_checkpoint", "goal"]
GOAL = 1.3

# VmHWM is this process image's own peak: ru_maxrss would carry the spawning parent's peak across
# fork and exec (the parent held the random model it wrote).
_CHILD = r"""
import json, sys, time
def status_gib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
import jax
from lctx.convert import hf
from sharding.mesh import MeshConfig, make_mesh
mesh = make_mesh(MeshConfig())
before = status_gib("VmRSS")
start = time.perf_counter()
cfg, params = hf.load_pretrained(sys.argv[1], mesh=mesh)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
peak = status_gib("VmHWM")
print(json.dumps({"import_s": seconds, "rss_before_gib": before, "peak_rss_gib": peak,
                  "params": sum(x.size for x in jax.tree.leaves(params))}))
"""


def write_checkpoint(directory: str, size: str, dtype: str) -> int:
  import jax
  import jax.numpy as jnp

  from layers.attention import AttentionConfig
  from lctx.config import ModelConfig
  from lctx.convert import hf
  from lctx.model import DecoderLM

  s = SIZES[size]
  cfg = ModelConfig(vocab_size=s["vocab_size"], d_model=s["d_model"], num_layers=s["num_layers"],
                    d_ff=s["d_ff"], mixers=("attention",), norm_eps=1e-5, param_dtype=dtype,
                    mixer_options={"attention": AttentionConfig(num_heads=s["heads"],
                                                                num_kv_heads=s["kv_heads"])})
  init = jax.jit(lambda key: DecoderLM(cfg).init(key, jnp.zeros((1, 2), jnp.int32))["params"])
  import flax.linen as nn
  params = nn.unbox(init(jax.random.key(0)))
  hf.save_pretrained(directory, cfg, params)
  del params
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
             if f.endswith(".safetensors"))


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m experiments.bench_convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--out", default="runs/bench_convert")
  args = parser.parse_args(argv)
  from experiments import benchmarking as bm

  os.makedirs(args.out, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="lctx-bench-convert-") as directory:
    nbytes = write_checkpoint(directory, args.size, args.dtype)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", _CHILD, directory], env=env, cwd=root,
                          capture_output=True, text=True)
    if done.returncode:
      sys.stderr.write(done.stderr)
      return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
  ratio = result["peak_rss_gib"] / (nbytes / 2**30)
  # Below 1 GiB the runtime's own fixed RSS (a few hundred MiB) is what the ratio measures.
  judged = nbytes >= 2**30
  verdict = ("PASS" if ratio <= GOAL else "FAIL") if judged else "n/a"
  row = {"size": args.size, "dtype": args.dtype, "params": result["params"],
         "checkpoint_gib": nbytes / 2**30, "import_s": result["import_s"],
         "rss_before_gib": result["rss_before_gib"], "peak_rss_gib": result["peak_rss_gib"],
         "peak_over_checkpoint": ratio, "goal": verdict}
  bm.print_table([row], COLUMNS)
  print(f"{row['goal']}: peak RSS {result['peak_rss_gib']:.2f} GiB = {ratio:.2f}x the "
        f"checkpoint's {nbytes / 2**30:.2f} GiB (goal <= {GOAL}x; the runtime's "
        f"{result['rss_before_gib']:.2f} GiB before the import included)"
        + ("" if judged else "; not judged below 1 GiB, where the runtime's fixed RSS dominates: "
           "use --size 1b"))
  bm.write_csv(os.path.join(args.out, "convert.csv"), [row], COLUMNS)
  print(f"wrote {args.out}/convert.csv")
  return 0


if __name__ == "__main__":
  sys.exit(main())
