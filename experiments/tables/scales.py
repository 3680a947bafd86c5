"""The command-line flags of a table script's Scale dataclass: one `--<field>` per field (a
comma-separated list for a tuple field), overriding the CPU scale or, with `--paper`, the
paper's."""

from __future__ import annotations

import argparse
import dataclasses


def _parser_for(value):
  if isinstance(value, tuple):
    kind = type(value[0]) if value else str
    return lambda text: tuple(kind(x) for x in text.split(",") if x)
  return type(value)


def add_arguments(parser: argparse.ArgumentParser, cpu) -> None:
  """`--paper` and a flag per field of `cpu`'s dataclass, typed like its CPU value."""
  parser.add_argument("--paper", action="store_true",
                      help="the paper's scale (for the record; far beyond a CPU)")
  for field in dataclasses.fields(cpu):
    value = getattr(cpu, field.name)
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    parser.add_argument(f"--{field.name}", type=_parser_for(value), default=None,
                        help=f"CPU scale: {shown}")


def chosen(args: argparse.Namespace, cpu, paper):
  """The scale the flags ask for: CPU or paper, with every given field replaced."""
  base = paper if args.paper else cpu
  return dataclasses.replace(base, **{f.name: getattr(args, f.name)
                                      for f in dataclasses.fields(base)
                                      if getattr(args, f.name) is not None})
