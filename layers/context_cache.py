"""A frozen context that later queries read without recomputing it (qTTT, lctx/ttt/qttt.py).

Two modes, chosen by how the Flax collection `COLLECTION` is passed to `apply`:

* record: the collection is mutable. A mixer runs as usual (plain or decoding) and also stores
  what a later query of the same context needs: softmax attention its keys and values after RoPE
  ("key", "value" [b, T, kv_heads, d]); linear attention its keys after the feature map, its
  values and, when data-dependent, its log-gates ("k", "v", "g").
* query: the collection holds such a record and is not mutable. The new tokens are positions of
  the recorded context (`positions_bt`, absolute, contiguous per row): a mixer computes only
  their queries and reads keys and values from the record, so a query at position p sees exactly
  the context keys 0..p its own forward pass saw. Softmax attention masks the record by position
  (and window); linear attention starts from the state the record gives at the first position
  (its keys from there on masked out) and continues over the recorded keys of the new positions.

In query mode the mixers also sow their queries into `QUERIES` when that collection is mutable
(attention-mass measurements). Mixers without a record (gated deltanet, KDA) ignore both modes;
lctx/ttt/qttt.py refuses models that hold them before anything runs.
"""

import jax
import jax.numpy as jnp

from layers.kernels.attention_reference import dot_product_attention
from layers.masks import attention_mask

COLLECTION = "context_cache"
QUERIES = "context_queries"
RECORD, QUERY = "record", "query"


def mode(module, name: str) -> str | None:
  """RECORD, QUERY or None for `module`, whose record holds the variable `name`."""
  if module.is_mutable_collection(COLLECTION):
    return RECORD
  if module.has_variable(COLLECTION, name):
    return QUERY
  return None


def record(module, **arrays) -> None:
  """Stores `arrays` in the module's record (a no-op unless the collection is mutable)."""
  if module.is_mutable_collection(COLLECTION):
    for name, x in arrays.items():
      if x is not None:
        module.put_variable(COLLECTION, name, x)


def read(module, name: str):
  """The recorded array `name`, or None when the record has none."""
  if not module.has_variable(COLLECTION, name):
    return None
  return module.get_variable(COLLECTION, name)


def sow_queries(module, q) -> None:
  if module.is_mutable_collection(QUERIES):
    module.put_variable(QUERIES, "q", q)


def check_query(module, positions_bt, decode: bool) -> None:
  if decode:
    raise ValueError(f"{module.name}: a query of the recorded context (collection "
                     f"{COLLECTION!r}) cannot also decode")
  if positions_bt is None:
    raise ValueError(f"{module.name}: a query of the recorded context needs the absolute "
                     "positions of its tokens")


def attention_over_record(q_bthd, positions_bt, key_bskd, value_bskd, *, window=None,
                          scale=None, sinks=None, return_lse: bool = False):
  """Softmax attention of queries at `positions_bt` over recorded keys at positions 0..s-1,
  each query seeing the keys at or before its position (and within `window`)."""
  b, s = key_bskd.shape[:2]
  k_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  mask = attention_mask(positions_bt.astype(jnp.int32), k_index, window=window)
  return dot_product_attention(q_bthd, key_bskd, value_bskd, mask, scale, sinks, return_lse)


def attention_weights(q_bthd, positions_bt, key_bskd, *, window=None, scale=None):
  """The softmax weights [b, h, t, s] (float32) of `attention_over_record` without sinks."""
  b, t, h, d = q_bthd.shape
  s, kh = key_bskd.shape[1], key_bskd.shape[2]
  key = jnp.repeat(key_bskd, h // kh, axis=2) if kh != h else key_bskd
  scale = d ** -0.5 if scale is None else scale
  logits = jnp.einsum("bthd,bshd->bhts", q_bthd.astype(jnp.float32),
                      key.astype(jnp.float32)) * scale
  k_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  mask = attention_mask(positions_bt.astype(jnp.int32), k_index, window=window)
  return jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)


def take_positions(x_bs, positions_bt):
  """x [b, s, ...] at the positions [b, t] of each row: [b, t, ...]."""
  index = positions_bt.astype(jnp.int32).reshape(positions_bt.shape + (1,) * (x_bs.ndim - 2))
  return jnp.take_along_axis(x_bs, index, axis=1)


def before(x_bs, positions_bt):
  """x [b, s, ...] with every position at or after each row's first query position zeroed."""
  s = x_bs.shape[1]
  keep = jnp.arange(s)[None, :] < positions_bt[:, :1].astype(jnp.int32)
  return jnp.where(keep.reshape(keep.shape + (1,) * (x_bs.ndim - 2)), x_bs, 0)
