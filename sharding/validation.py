"""Type checks for frozen config dataclasses, so a bad gin value fails with the setting's name.

`check_fields(cfg)` checks every field against its annotation (int, float, str, bool, optional
variants and tuple[T, ...]; lists become tuples; floats must be finite) and raises
ValueError("ClassName.field=... must be ...") otherwise. Fields with other annotations are left
to the class's own __post_init__ checks.
"""

import dataclasses
import math
import numbers
import types
import typing

_SCALARS = (int, float, str, bool)


def _matches(value, tp) -> bool:
  # bool is an Integral; `seq_len = True` is certainly a mistake. numpy scalars are accepted.
  if tp is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if tp is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  return isinstance(value, tp)


def _describe(tp) -> str:
  return getattr(tp, "__name__", str(tp))


def check_fields(cfg) -> None:
  """Validates (and normalizes lists to tuples in) the fields of a frozen dataclass instance."""
  name = type(cfg).__name__
  hints = typing.get_type_hints(type(cfg))
  for field in dataclasses.fields(cfg):
    tp, value = hints.get(field.name), getattr(cfg, field.name)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    allowed = None
    if tp in _SCALARS:
      allowed = (tp,)
    elif origin in (typing.Union, types.UnionType) and all(a in _SCALARS + (type(None),)
                                                            for a in args):
      allowed = args
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
      if isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value):
        object.__setattr__(cfg, field.name, tuple(value))
        continue
      raise ValueError(f"{name}.{field.name}={value!r} must be a list or tuple of "
                       f"{_describe(args[0])}")
    if allowed is None:
      continue
    if not any(_matches(value, a) for a in allowed):
      want = " or ".join("None" if a is type(None) else _describe(a) for a in allowed)
      raise ValueError(f"{name}.{field.name}={value!r} must be {want}")
    # Normalize to Python scalars (ints given for floats, numpy scalars) so configs hash and
    # print the same however the value was written.
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int in allowed:
      object.__setattr__(cfg, field.name, int(value))
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and float in allowed:
      if not math.isfinite(value):
        raise ValueError(f"{name}.{field.name}={value!r} must be a finite number")
      object.__setattr__(cfg, field.name, float(value))
