"""Data pipelines for lctx: sources, tokenizers, packing and batching.

Typical use::

  cfg = DataConfig(seq_len=256, batch_size=16)
  tokenizer = make_tokenizer(cfg.tokenizer)
  it = train_iterator(cfg, tokenizer)
  batch = next(it)  # {"tokens", "segment_ids", "positions"}: int32 [16, 256]
  state = it.get_state()  # JSON-serializable; it.set_state(state) restores.
  evals = eval_batches(cfg, tokenizer, num_batches=4)
"""

from lctx.data.config import DataConfig
from lctx.data.pipeline import eval_batches
from lctx.data.pipeline import train_iterator
from lctx.data.tokenizers import ByteTokenizer
from lctx.data.tokenizers import HFTokenizer
from lctx.data.tokenizers import make_tokenizer
from lctx.data.tokenizers import SentencePieceTokenizer
from lctx.data.tokenizers import Tokenizer

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "eval_batches",
    "make_tokenizer",
    "train_iterator",
]
