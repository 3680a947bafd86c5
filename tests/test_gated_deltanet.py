"""The gated_deltanet mixer: config errors, packed documents, the causal convolution, and the
convolution in a sequence-parallel layout. (Decoding and training, also of the kda mixer, run with
the other linear mixers in tests/test_linear_mixers.py and tests/test_generate.py; the op in
tests/test_delta_rule.py; whole models under sequence parallelism in
tests/test_sequence_parallel.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig, causal_conv
from lctx.config import ModelConfig
from lctx.model import DecoderLM


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_kv_heads=2), "num_kv_heads=2: this mixer groups its query/key heads"),
    (dict(num_heads=4, num_key_heads=3), "num_key_heads=3 must be >= 1 and divide"),
    (dict(chunk_size=24), "chunk_size=24"),
    (dict(conv_size=-1), "conv_size=-1"),
    (dict(impl="cuda"), "impl='cuda'"),
    (dict(gate=False, per_key_gate=True), "per_key_gate=True needs GatedDeltaNetConfig.gate=True"),
])
def test_config_errors_name_the_field(kwargs, message):
  with pytest.raises(ValueError, match=f"GatedDeltaNetConfig.{message}"):
    GatedDeltaNetConfig(**kwargs)


def test_causal_conv_is_causal_and_stops_at_documents():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 10, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  y, tail = causal_conv(x, w)
  want = sum(w[j] * jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, :10] for j in range(4))
  np.testing.assert_allclose(y, jax.nn.silu(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(tail, x[:, -3:])
  seg = jnp.asarray([[1] * 6 + [2] * 4])
  y_seg, _ = causal_conv(x, w, seg)
  np.testing.assert_allclose(y_seg[:, :6], y[:, :6], rtol=1e-6)
  np.testing.assert_allclose(y_seg[:, 6:], causal_conv(x[:, 6:], w)[0], rtol=1e-6, atol=1e-6)
  # Continuing from a cache equals one pass.
  first, cache = causal_conv(x[:, :7], w)
  np.testing.assert_allclose(causal_conv(x[:, 7:], w, cache=cache)[0], y[:, 7:], rtol=1e-6,
                             atol=1e-6)


def test_packed_documents_equal_each_document_alone():
  cfg = ModelConfig(vocab_size=32, d_model=32, num_layers=1, d_ff=64, mixers=("gated_deltanet",),
                    mixer_options={"gated_deltanet": GatedDeltaNetConfig(4, num_key_heads=2,
                                                                         chunk_size=16)})
  model = DecoderLM(cfg)
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, 32, n) for n in (13, 20)]
  tokens = jnp.asarray(np.concatenate(docs)[None], jnp.int32)
  seg = jnp.asarray([[1] * 13 + [2] * 20], jnp.int32)
  pos = jnp.asarray([list(range(13)) + list(range(20))], jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  packed = jax.jit(model.apply)({"params": params}, tokens, pos, seg)
  apply = jax.jit(model.apply)
  for doc, (lo, hi) in zip(docs, [(0, 13), (13, 33)]):
    alone = apply({"params": params}, jnp.asarray(doc[None], jnp.int32))
    np.testing.assert_allclose(packed[:, lo:hi], alone, rtol=2e-5, atol=2e-5)


def test_convolution_in_layout_order_continues_across_chunks():
  # Under sequence parallelism each layout chunk's convolution starts from the last inputs of the
  # chunk before it in natural order: in zigzag order over 4 ranks it equals the natural-order
  # convolution, segment masks included (a document starts exactly at chunk 3's first token).
  from layers.gated_deltanet import layout_causal_conv
  from sharding.layout import SeqLayout
  layout = SeqLayout("zigzag", 4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 64, 3, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32)
  seg = np.zeros((2, 64), np.int32)
  seg[0, 24:], seg[1, 10:], seg[1, 37:] = 1, 1, 2
  seg = jnp.asarray(seg)
  want, _ = causal_conv(x, w, seg)
  got = layout_causal_conv(layout.to_layout(x), w, layout.to_layout(seg), layout)
  np.testing.assert_allclose(layout.from_layout(got), want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="needs layout chunks of at least 3 tokens; sequence length "
                     "16 over 8 chunks gives 2"):
    layout_causal_conv(x[:, :16], w, None, layout)
