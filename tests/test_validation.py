"""sharding/validation.py: field types of config dataclasses."""

import dataclasses

import numpy as np
import pytest

from sharding.validation import check_fields


@dataclasses.dataclass(frozen=True)
class Example:
  n: int = 1
  rate: float = 0.5
  name: str = "a"
  flag: bool = False
  window: int | None = None
  names: tuple[str, ...] = ()

  def __post_init__(self):
    check_fields(self)


def test_normalizes_values():
  cfg = Example(n=np.int64(3), rate=2, window=np.int32(4), names=["x", "y"])
  assert (cfg.n, cfg.rate, cfg.window, cfg.names) == (3, 2.0, 4, ("x", "y"))
  assert type(cfg.n) is int and type(cfg.rate) is float and type(cfg.window) is int
  hash(cfg)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n=2.0), r"Example.n=2.0 must be int"),
    (dict(n=True), r"Example.n=True must be int"),
    (dict(rate="fast"), r"Example.rate='fast' must be float"),
    (dict(name=3), r"Example.name=3 must be str"),
    (dict(flag=1), r"Example.flag=1 must be bool"),
    (dict(window="8"), r"Example.window='8' must be int or None"),
    (dict(names=["x", 2]), r"Example.names=\['x', 2\] must be a list or tuple of str"),
])
def test_rejects_wrong_types_naming_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Example(**kwargs)
