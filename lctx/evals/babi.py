"""bAbI question answering over a simulated world, hidden in noise as BABILong does.

A world of actors (Mary, John, Daniel, Sandra), locations (kitchen, garden, office, hallway,
bathroom, bedroom) and objects (apple, football, milk) is simulated event by event, so every
answer is correct by construction. Events read as bAbI's facts: "{actor} moved to the
{location}." (also went to, journeyed to, travelled to, went back to), "{actor} picked up the
{object}." (also got, grabbed, took) and "{actor} dropped the {object}." (also put down,
discarded, left); a held object moves with its holder. The facts are needles in passkey filler
sentences (BABILong's noise is book text), in story order: the first supporting fact at `depth`,
the facts before it spread over [0, depth) and the rest over (depth, 1]. `distractors` facts
(6) about the other actors and objects surround the supporting ones; those before the first
supporting fact may also move the asked actor, and none after it touches the asked actor or
object. The query follows "\\nQuestion: ".

babi_qa1  single supporting fact: "{actor} moved to the {location}."; "Where is {actor}?
          Answer: {actor} is in the" and the answer is the location of the actor's last move.
babi_qa2  two supporting facts: "{actor} picked up the {object}." then the actor's move; "Where
          is the {object}? Answer: The {object} is in the".
babi_qa3  three supporting facts: the pick-up, then two moves of its holder to {first} and
          {second} (places the object has not been in); "Where was the {object} before the
          {second}? Answer: Before the {second}, the {object} was in the" and the answer is
          {first}.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lctx.evals.example import Example
from lctx.evals.needles import text_example

ACTORS = ("Mary", "John", "Daniel", "Sandra")
LOCATIONS = ("kitchen", "garden", "office", "hallway", "bathroom", "bedroom")
OBJECTS = ("apple", "football", "milk")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
GRABS = ("picked up", "got", "grabbed", "took")
DROPS = ("dropped", "put down", "discarded", "left")


@dataclasses.dataclass
class World:
  """Where every actor is (None before a first move), who holds every object, and the
  locations every object has been in, in order (its trail; empty before it is anywhere)."""

  where: dict[str, str | None] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(ACTORS))
  holder: dict[str, str | None] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(OBJECTS))
  trail: dict[str, list[str]] = dataclasses.field(
      default_factory=lambda: {o: [] for o in OBJECTS})

  def _place(self, obj: str, location: str | None) -> None:
    if location is not None and self.trail[obj][-1:] != [location]:
      self.trail[obj].append(location)

  def can_grab(self, actor: str, obj: str) -> bool:
    return self.holder[obj] is None and self.trail[obj][-1:] in ([], [self.where[actor]])

  def move(self, rng, actor: str, location: str) -> str:
    self.where[actor] = location
    for obj in OBJECTS:
      if self.holder[obj] == actor:
        self._place(obj, location)
    return f"{actor} {MOVES[rng.integers(len(MOVES))]} the {location}."

  def grab(self, rng, actor: str, obj: str) -> str:
    self.holder[obj] = actor
    self._place(obj, self.where[actor])
    return f"{actor} {GRABS[rng.integers(len(GRABS))]} the {obj}."

  def drop(self, rng, actor: str, obj: str) -> str:
    self.holder[obj] = None
    return f"{actor} {DROPS[rng.integers(len(DROPS))]} the {obj}."

  def new_place(self, rng, actor: str, avoid=()) -> str:
    """A location the actor is not in, outside `avoid`."""
    choices = [l for l in LOCATIONS if l != self.where[actor] and l not in avoid]
    return choices[rng.integers(len(choices))]


def _noise(world: World, rng, n: int, actor: str | None = None, obj: str | None = None):
  """n random facts about the actors and objects other than `actor` and `obj`."""
  actors = [a for a in ACTORS if a != actor]
  objects = [o for o in OBJECTS if o != obj]
  facts = []
  for _ in range(n):
    grabs = [(a, o) for a in actors for o in objects
             if world.where[a] is not None and world.can_grab(a, o)]
    drops = [(world.holder[o], o) for o in objects if world.holder[o] in actors]
    kind = rng.choice(3, p=_kinds(bool(grabs), bool(drops)))
    if kind == 0:
      a = actors[rng.integers(len(actors))]
      facts.append(world.move(rng, a, world.new_place(rng, a)))
    else:
      pairs = grabs if kind == 1 else drops
      a, o = pairs[rng.integers(len(pairs))]
      facts.append((world.grab if kind == 1 else world.drop)(rng, a, o))
  return facts


def _kinds(grab: bool, drop: bool) -> np.ndarray:
  """Chances of a move, a pick-up and a drop among the facts that are possible."""
  p = np.asarray([2.0, grab, drop])
  return p / p.sum()


def _split(rng, n: int, parts: int) -> list[int]:
  """n facts cut into `parts` random counts."""
  cuts = np.sort(rng.integers(0, n + 1, parts - 1))
  return [int(x) for x in np.diff(np.concatenate([[0], cuts, [n]]))]


def babi(tokenizer, length: int, depth: float, rng, *, qa: int = 1,
         distractors: int = 6) -> Example:
  """bAbI task qa1, qa2 or qa3 (see the module docstring) with `distractors` noise facts."""
  task = f"babi_qa{qa}"
  if qa not in (1, 2, 3):
    raise ValueError(f"babi: qa={qa} must be 1, 2 or 3")
  if distractors < 0:
    raise ValueError(f"task {task!r}: distractors={distractors} must be at least 0")
  world = World()
  actor = ACTORS[rng.integers(len(ACTORS))]
  obj = OBJECTS[rng.integers(len(OBJECTS))]
  asked = None if qa == 1 else obj
  before = round(depth * distractors)
  after = _split(rng, distractors - before, qa)  # noise after each supporting fact
  story = _noise(world, rng, before, obj=asked)
  if qa > 1:  # the object is untouched so far: the actor can take it wherever they are
    story.append(world.grab(rng, actor, obj))
    story += _noise(world, rng, after.pop(0), actor, obj)
  places = []  # where the actor's supporting moves go; qa3 keeps the object's trail distinct
  for _ in range(max(1, qa - 1)):
    places.append(world.new_place(rng, actor, avoid=world.trail[obj] if qa == 3 else ()))
    story.append(world.move(rng, actor, places[-1]))
    story += _noise(world, rng, after.pop(0), actor, asked)
  question = {
      1: f"Where is {actor}? Answer: {actor} is in the",
      2: f"Where is the {obj}? Answer: The {obj} is in the",
      3: f"Where was the {obj} before the {places[-1]}? Answer: Before the {places[-1]}, the "
         f"{obj} was in the",
  }[qa]
  rest = len(story) - before - 1
  depths = ([float(x) for x in np.linspace(0.0, depth, before + 1)[:-1]] + [depth]
            + [float(x) for x in np.linspace(depth, 1.0, rest + 1)[1:]])
  return text_example(task, tokenizer, story, "Question: " + question, [places[0]], length,
                      depths, depth)
