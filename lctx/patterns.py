"""Hybrid layer patterns: which mixer each layer of a model runs, from a short gin spec.

`ModelConfig.mixers = @LayerPattern()` expands the pattern into one mixer name per layer
(`ModelConfig.num_layers` of them). A layer runs `special` where the pattern says so and `base`
everywhere else (layer indices are 0-based):

  kind          special layers                          example
  uniform       none                                    every layer `base`
  alternating   i % 2 == offset (offset 1: odd layers)  SpikingBrain-7B: even GLA, odd SWA
  every_n       i % period == offset                    Jamba 1:7 (period 8, offset 4),
                                                        MiniMax-01 7:1 (period 8, offset 7),
                                                        Qwen3-Next 3:1 (period 4, offset 3)
  middle        band[0]*L <= i < band[1]*L              LongGen: full attention in the middle third
  list          i in `layers`                           SpikingBrain-76B: full attention at listed
                                                        layers

A mixer name may join several registered mixers with "+" (e.g. "gla+swa"): that layer runs them
in parallel on the same input and sums their normalized outputs (layers/hybrid.py).
"""

import dataclasses
import math

from sharding.validation import check_fields

KINDS = ("uniform", "alternating", "every_n", "middle", "list")


@dataclasses.dataclass(frozen=True)
class LayerPattern:
  """A layer-pattern spec (see the module docstring for the kinds).

  Attributes:
    kind: one of KINDS.
    base: mixer name of the layers the pattern does not select.
    special: mixer name of the selected layers.
    period, offset: every_n selects i % period == offset; alternating uses period 2 and offset.
    band: middle selects floor(band[0] * L) <= i < floor(band[1] * L) (fractions of the depth).
    layers: list selects these 0-based layer indices.
  """

  kind: str = "alternating"
  base: str = "gla"
  special: str = "attention"
  period: int = 2
  offset: int = 1
  band: tuple[float, ...] = (1 / 3, 2 / 3)
  layers: tuple[int, ...] = ()

  def __post_init__(self):
    check_fields(self)
    if self.kind not in KINDS:
      raise ValueError(f"LayerPattern.kind={self.kind!r} must be one of {KINDS}")
    if self.period < 1:
      raise ValueError(f"LayerPattern.period={self.period} must be >= 1")
    period = 2 if self.kind == "alternating" else self.period
    if not 0 <= self.offset < period:
      raise ValueError(f"LayerPattern.offset={self.offset} must be in [0, {period}) "
                       f"(the period of kind {self.kind!r})")
    if len(self.band) != 2 or not 0.0 <= self.band[0] <= self.band[1] <= 1.0:
      raise ValueError(f"LayerPattern.band={self.band} must be two fractions 0 <= lo <= hi <= 1")
    if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
      raise ValueError(f"LayerPattern.layers={self.layers} must be distinct indices >= 0")

  def selected(self, num_layers: int) -> tuple[int, ...]:
    """The 0-based indices of the layers that run `special`."""
    if self.kind == "uniform":
      return ()
    if self.kind == "alternating":
      return tuple(i for i in range(num_layers) if i % 2 == self.offset)
    if self.kind == "every_n":
      return tuple(i for i in range(num_layers) if i % self.period == self.offset)
    if self.kind == "middle":
      lo, hi = (math.floor(f * num_layers + 1e-9) for f in self.band)
      return tuple(range(lo, hi))
    late = [i for i in self.layers if i >= num_layers]
    if late:
      raise ValueError(f"LayerPattern.layers={self.layers}: indices {late} are >= "
                       f"ModelConfig.num_layers={num_layers} (indices are 0-based)")
    return tuple(sorted(self.layers))

  def expand(self, num_layers: int) -> tuple[str, ...]:
    """One mixer name per layer."""
    chosen = set(self.selected(num_layers))
    return tuple(self.special if i in chosen else self.base for i in range(num_layers))
