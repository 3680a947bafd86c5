"""Checkpoint conversion between Hugging Face model directories and lctx workdirs.

  python -m experiments.convert --from_hf=DIR --workdir=W
      W/checkpoints/0: the parameters (an orbax checkpoint of step 0, parameters only);
      W/model.gin: the ModelConfig (and DataConfig.tokenizer when DIR has a tokenizer.json,
      copied to W), so `python -m experiments.run --gin_file=W/model.gin --workdir=W
      --gin.RunConfig.mode=generate` (or eval) runs the imported model.
  python -m experiments.convert --from_hf=DIR --to_layout=gin/models/spikingbrain_7b.gin --workdir=W
      the same, converted to the layout's hybrid (lctx/convert/hybrid.py): its mixers per layer,
      the dense model's sizes; W/model.gin configures the hybrid (and binds the dense model's
      attention as TransferConfig.teacher, for RunConfig.mode=attention_transfer), and the new
      parameters are listed.
  python -m experiments.convert --to_hf=OUT --workdir=W [--step=N] [--gin_file=F ...]
      OUT: config.json, safetensors and W's tokenizer files; the model is read from W/model.gin,
      else W/config.gin (a training run's operative config), else the --gin_file files; the
      newest readable checkpoint (or step N). Models of a transformers family are written as
      that family; GLA / sliding-window hybrids in SpikingBrain's layout; every other model in
      lctx's own layout (lctx/convert/lctx_layout.py). --from_hf reads all three back.

Exit status: 0 done; 2 a bad flag, file or checkpoint (the message names it), before anything is
written.
"""

import argparse
import os
import sys

import jax

MODEL_GIN = "model.gin"


def _log(message: str) -> None:
  print(message, flush=True)


def _layout(path: str, depth: int):
  """The ModelConfig of a layout gin file, its LayerPattern expanded to `depth` layers."""
  from experiments.run import load_configs
  return load_configs([path], [f"ModelConfig.num_layers = {depth}"])["model"]


def import_hf(source: str, workdir: str, layout: str | None = None) -> None:
  from lctx.checkpoint import Checkpointer
  from lctx.convert import hf
  from lctx.convert.model_gin import model_gin
  from lctx.workdir import WorkdirLock, prepare
  from sharding.mesh import MeshConfig, make_mesh

  hf.read_config(source)  # a missing directory or config fails before the workdir is made
  workdir = prepare(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f"--workdir={workdir} already holds checkpoints ({ckpt_dir}); convert into "
                     "a new workdir")
  with WorkdirLock(workdir):
    mesh = make_mesh(MeshConfig())
    cfg, params = hf.load_pretrained(source, mesh=mesh)
    new = teacher = None
    if layout:
      from lctx.convert import hybrid
      dense = cfg
      cfg = hybrid.hybrid_config(dense, _layout(layout, dense.num_layers), layout)
      params, new = hybrid.convert_params(dense, params, cfg)
      teacher = hybrid.teacher_attention(dense, cfg)
    copied = hf.copy_tokenizer_files(source, workdir)
    tokenizer = os.path.join(workdir, "tokenizer.json") if "tokenizer.json" in copied else None
    ckpt = Checkpointer(ckpt_dir)
    try:
      ckpt.save(0, {"params": params}, {})
    finally:
      ckpt.close()
    how = f" and converted to the layout {layout}" if layout else ""
    text = model_gin(cfg, tokenizer=tokenizer, teacher=teacher,
                     header=f"Imported from {os.path.abspath(source)}{how} by experiments.convert.")
    with open(os.path.join(workdir, MODEL_GIN), "w") as f:
      f.write(text)
  n = sum(x.size for x in jax.tree.leaves(params))
  _log(f"imported {n:,} parameters ({cfg.param_dtype}) from {source}")
  if new is not None:
    _log(f"converted to {layout}: mixers {cfg.layer_mixers()}; new parameters: "
         f"{', '.join(new) or 'none'}")
    if cfg.moe.enabled:
      moe_layers = [i for i in range(cfg.num_layers) if cfg.uses_moe(i)]
      _log(f"  the FFNs of layers {moe_layers} upcycled into {cfg.moe.num_experts} routed + "
           f"{cfg.moe.num_shared_experts} shared experts (lctx/upcycle.py)")
  _log(f"  checkpoint:  {ckpt_dir}/0 (parameters only)")
  _log(f"  model:       {os.path.join(workdir, MODEL_GIN)}")
  _log(f"  generate:    python -m experiments.run --gin_file={os.path.join(workdir, MODEL_GIN)} "
       f"--workdir={workdir} --gin.RunConfig.mode=generate")


def export_hf(out: str, workdir: str, step: int | None, gin_files: list[str]) -> None:
  from experiments.run import load_configs
  from lctx.checkpoint import Checkpointer
  from lctx.convert import hf
  from lctx.state import build
  from sharding.mesh import make_mesh
  import optax

  files = [os.path.join(workdir, name) for name in (MODEL_GIN, "config.gin")
           if os.path.exists(os.path.join(workdir, name))][:1] or gin_files
  if not files:
    raise ValueError(f"--workdir={workdir} has no {MODEL_GIN} or config.gin; give the model's "
                     "--gin_file")
  configs = load_configs(files, [])
  cfg = configs["model"]
  layout = hf.export_layout(cfg)[0]  # the config is checked before any array is read
  m = build(cfg, make_mesh(configs["mesh"]), optax.identity())
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.choose_step(step, f"--workdir={workdir}" if step is None else f"--step={step}")
    params = ckpt.restore_params(m.abstract_params, step)
  finally:
    ckpt.close()
  written = hf.save_pretrained(out, cfg, params, tokenizer_dir=workdir)
  _log(f"exported step {step} of {workdir} to {out} in the {layout} layout: "
       f"{', '.join(written)}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from_hf", help="a Hugging Face model directory to import")
  direction.add_argument("--to_hf", help="the directory to export to")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--to_layout", default=None,
                      help="with --from_hf: a gin model file whose mixers the import becomes")
  parser.add_argument("--step", type=int, default=None, help="the checkpoint step to export")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="the model's gin files, when the workdir has no model.gin/config.gin")
  args = parser.parse_args(argv)
  try:
    if args.to_layout and not args.from_hf:
      raise ValueError("--to_layout goes with --from_hf")
    if args.from_hf:
      import_hf(args.from_hf, args.workdir, args.to_layout)
    else:
      export_hf(args.to_hf, args.workdir, args.step, args.gin_file)
  except ValueError as e:  # ConversionError, CheckpointFileError and bad settings
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
