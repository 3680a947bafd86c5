"""Sequence mixers and blocks of lctx.

Dimension legend used in names and docstrings across layers/:
  b batch, t query tokens, s key tokens, h query heads, k key/value heads (GQA),
  d head dim, e model (embedding) dim, f feed-forward dim, v vocabulary.

Every mixer registers itself in `layers.registry` under a name, so the model picks mixers by name
from gin without knowing their classes. The registry imports the built-in mixer modules on first
lookup (layers.registry.BUILTIN_MODULES), so importing this package stays light: sharding/ uses
the kernels here while the mixers use sharding's sequence-parallel ops.
"""
