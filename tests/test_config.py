"""ModelConfig validation and the mixer registry."""

import pytest

from layers.attention import AttentionConfig
from layers.registry import available_mixers, get_mixer, register_mixer
from lctx.config import ModelConfig


def test_layer_mixers_expand_and_options_default():
  cfg = ModelConfig(num_layers=3, mixers="attention")
  assert cfg.layer_mixers() == ("attention",) * 3
  assert cfg.mixer_config("attention") == AttentionConfig()
  cfg = ModelConfig(num_layers=2, mixers=["attention", "attention"],
                    mixer_options={"attention": AttentionConfig(window=8)})
  assert cfg.mixer_config("attention").window == 8
  hash(cfg)  # modules holding the config must hash


@pytest.mark.parametrize("kwargs,message", [
    (dict(mixers=("nope",)), r"ModelConfig.mixers: unknown mixer 'nope'; registered mixers"),
    (dict(num_layers=3, mixers=("attention", "attention")), r"ModelConfig.mixers has 2 entries"),
    (dict(d_model=0), r"ModelConfig.d_model must be >= 1"),
    (dict(d_model=64.5), r"ModelConfig.d_model=64.5 must be int"),
    (dict(dtype="float16"), r"ModelConfig.dtype='float16': allowed values"),
    (dict(d_model=30), r"d_model=30 is not divisible by AttentionConfig.num_heads=4"),
    (dict(mixer_options={"attention": 3}), r"mixer_options\['attention'\] must be a"),
])
def test_bad_values_name_the_setting(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**kwargs)


def test_registry_rejects_duplicates_and_unknown_names():
  assert "attention" in available_mixers()
  with pytest.raises(ValueError, match="already registered"):
    register_mixer("attention")(type("Other", (), {"Config": AttentionConfig}))
  with pytest.raises(ValueError, match="unknown mixer 'x'"):
    get_mixer("x")


def test_d_ff_zero_builds_mixer_only_blocks():
  import jax
  import jax.numpy as jnp

  from lctx.model import DecoderLM

  params = DecoderLM(ModelConfig(d_model=16, num_layers=2, d_ff=0)).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert set(params["layer_0"]) == {"mixer", "mixer_norm"}
  with pytest.raises(ValueError, match=r"ModelConfig\.d_ff must be >= 0"):
    ModelConfig(d_ff=-1)
