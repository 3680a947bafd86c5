"""Layer patterns (lctx/patterns.py) expand to the published layouts; bad specs name the field."""

import pytest

from lctx.config import ModelConfig
from lctx.patterns import LayerPattern


def _special(pattern, n):
  return [i for i, name in enumerate(pattern.expand(n)) if name == pattern.special]


def test_alternating_even_layers_base():
  p = LayerPattern(kind="alternating", base="gla", special="swa")
  assert p.expand(6) == ("gla", "swa", "gla", "swa", "gla", "swa")
  assert _special(LayerPattern(kind="alternating", offset=0), 5) == [0, 2, 4]


@pytest.mark.parametrize("period,offset,n,expected", [
    (8, 4, 16, [4, 12]),       # Jamba 1:7
    (8, 7, 16, [7, 15]),       # MiniMax-01 7:1
    (4, 3, 12, [3, 7, 11]),    # Qwen3-Next 3:1: (i + 1) % 4 == 0
])
def test_every_n(period, offset, n, expected):
  p = LayerPattern(kind="every_n", period=period, offset=offset)
  assert _special(p, n) == expected
  if (period, offset) == (4, 3):
    assert expected == [i for i in range(n) if (i + 1) % 4 == 0]


def test_middle_band_longgen():
  p = LayerPattern(kind="middle", base="swa", special="attention")
  assert _special(p, 6) == [2, 3]
  assert _special(p, 24) == list(range(8, 16))
  assert _special(LayerPattern(kind="middle", band=(0.25, 0.5)), 8) == [2, 3]


def test_list_and_uniform():
  assert _special(LayerPattern(kind="list", layers=(6, 13, 20, 27)), 28) == [6, 13, 20, 27]
  assert LayerPattern(kind="uniform", base="lightning").expand(3) == ("lightning",) * 3
  with pytest.raises(ValueError, match=r"LayerPattern.layers.*>= ModelConfig.num_layers=4"):
    LayerPattern(kind="list", layers=(1, 4)).expand(4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="spiral"), "LayerPattern.kind"),
    (dict(kind="every_n", period=4, offset=4), "LayerPattern.offset=4"),
    (dict(kind="alternating", offset=2), "LayerPattern.offset=2"),
    (dict(kind="middle", band=(0.7, 0.2)), "LayerPattern.band"),
    (dict(kind="list", layers=(1, 1)), "LayerPattern.layers"),
    (dict(period=0), "LayerPattern.period"),
])
def test_bad_patterns(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LayerPattern(**kwargs)


def test_model_config_expands_patterns_and_parallel_names():
  cfg = ModelConfig(num_layers=4, mixers=LayerPattern(kind="list", layers=(3,), base="gla+swa",
                                                      special="gla+attention"))
  assert cfg.layer_mixers() == ("gla+swa",) * 3 + ("gla+attention",)
  assert cfg.mixer_names() == ("attention", "gla", "swa")
  with pytest.raises(ValueError, match="unknown mixer 'mamba'"):
    ModelConfig(num_layers=2, mixers=("gla+mamba", "gla"))
  with pytest.raises(ValueError, match="repeats a mixer"):
    ModelConfig(num_layers=1, mixers=("gla+gla",))
