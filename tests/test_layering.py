"""Imports run one way: experiments -> lctx -> layers -> sharding -> jax, with no cycles.

Every module's imports are read from its source (ast, including imports inside functions), so a
lazy import cannot hide a dependency against the order.
"""

import ast
import os

from tests.cli import ROOT

ORDER = ("sharding", "layers", "lctx", "experiments")  # a package may import those before it


def _modules():
  """{dotted module name: path} of every project module."""
  found = {}
  for package in ORDER:
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return found


def _imports(name: str, path: str, known) -> set[str]:
  """Project modules that module `name` imports."""
  tree = ast.parse(open(path).read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      # `from pkg import mod` imports the submodule when there is one.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in known:
        t = t.rpartition(".")[0]
      if t and t.split(".")[0] in ORDER:
        out.add(t)
  return out


def test_imports_follow_the_layer_order_and_have_no_cycles():
  modules = _modules()
  assert {"sharding.ring", "layers.softmax_parallel", "lctx.model", "experiments.run"} <= set(
      modules), sorted(modules)
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  against = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
             if ORDER.index(d.split(".")[0]) > ORDER.index(m.split(".")[0])]
  assert not against, "imports against experiments -> lctx -> layers -> sharding:\n" + "\n".join(
      sorted(against))

  # Cycles among modules (a package's __init__ importing its own modules counts too).
  state, cycles = {}, []

  def visit(m, stack):
    state[m] = "open"
    for d in sorted(graph[m]):
      if d == m:
        continue
      if state.get(d) == "open":
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d, stack + [d])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_violations(tmp_path):
  # A module of sharding/ importing layers/ (also lazily) and a relative import are both found.
  path = tmp_path / "bad.py"
  path.write_text("def f():\n  from layers import softmax_parallel\nfrom . import ring\n")
  known = set(_modules())
  assert _imports("sharding.bad", str(path), known) == {"layers.softmax_parallel", "sharding.ring"}
