"""Sequence mixers and blocks of lctx.

Dimension legend used in names and docstrings across layers/:
  b batch, t query tokens, s key tokens, h query heads, k key/value heads (GQA),
  d head dim, e model (embedding) dim, f feed-forward dim, v vocabulary.

Every mixer registers itself in `layers.registry` under a name, so the model picks mixers by name
from gin without knowing their classes. Importing this package registers the built-in mixers.
"""

from layers import attention as _attention  # noqa: F401  (registers "attention")
from layers import linear_mixers as _linear_mixers  # noqa: F401  (registers linear, lightning, gla)
