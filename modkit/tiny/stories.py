"""Simple sentences and short stories: the corpus's plain-text documents."""

from __future__ import annotations

from random import Random

from modkit.tiny.words import (
    ANIMALS,
    COLORS,
    DAYS,
    FOODS,
    HE_NAMES,
    NUMBER_WORDS,
    OBJECTS,
    PLACES,
    SHE_NAMES,
    STORY_ADJECTIVES,
    article,
    cap,
    person,
    plural,
)


def simple_sentence(rng: Random) -> str:
    """One short declarative sentence."""
    name, _ = person(rng)
    animal, food, place, obj = (rng.choice(ANIMALS), rng.choice(FOODS), rng.choice(PLACES), rng.choice(OBJECTS))
    color = rng.choice(COLORS)
    n = rng.randint(2, 9)
    templates = [
        f"{name} likes {food}.",
        f"The {animal} is {rng.choice(STORY_ADJECTIVES)}.",
        f"I see {article(color)} {color} {obj}.",
        f"We went to the {place} on {rng.choice(DAYS)}.",
        f"{name} has {NUMBER_WORDS[n]} {plural(animal)}.",
        f"There is {article(obj)} {obj} in the {place}.",
        f"{name} ate {food} at the {place}.",
        f"My {obj} is {color}.",
        f"{cap(plural(animal))} like to play in the {place}.",
        f"{name} gave {article(obj)} {obj} to {rng.choice(SHE_NAMES + HE_NAMES)}.",
    ]
    return rng.choice(templates)


def story(rng: Random, name: str | None = None, pronoun: str = "she") -> str:
    """A short story of 3-6 sentences about one named character."""
    if name is None:
        name, pronoun = person(rng)
    friend = rng.choice([n for n in SHE_NAMES + HE_NAMES if n != name])
    animal, animal2, place = rng.choice(ANIMALS), rng.choice(ANIMALS), rng.choice(PLACES)
    obj, obj2 = rng.choice(OBJECTS), rng.choice(OBJECTS)
    adj = rng.choice(STORY_ADJECTIVES)
    openings = [
        f"Once upon a time, there was {article(adj)} {adj} {animal} named {name}.",
        f"{name} lived in a small house near the {place}.",
        f"One day, {name} went to the {place}.",
        f"{name} was a little {'girl' if pronoun == 'she' else 'boy'} who loved {plural(animal)}.",
    ]
    middles = [
        f"{cap(pronoun)} found {article(obj)} {obj} under a tree.",
        f"{cap(pronoun)} ate some {rng.choice(FOODS)} for lunch.",
        f"{cap(pronoun)} met {article(animal2)} {animal2} called {friend}.",
        f"{name} and {friend} played with {article(obj2)} {obj2} all day.",
        f"It started to rain, so {pronoun} ran to the {rng.choice(PLACES)}.",
        f"{cap(pronoun)} wanted to see the {rng.choice(PLACES)} with {friend}.",
        (
            f"The sky was {rng.choice(['blue', 'grey', 'dark', 'bright'])} and the wind "
            f"was {rng.choice(['soft', 'cold', 'warm', 'strong'])}."
        ),
        f"{name} counted {NUMBER_WORDS[rng.randint(2, 12)]} {plural(rng.choice(ANIMALS))}.",
        f"{cap(pronoun)} felt {rng.choice(STORY_ADJECTIVES)} and a bit hungry.",
    ]
    endings = [
        f"In the end, {name} was very happy.",
        f"That night, {name} slept well.",
        f"{name} smiled and went home.",
        f"{name} and {friend} became best friends.",
    ]
    body = rng.sample(middles, rng.randint(1, 4))
    return " ".join([rng.choice(openings), *body, rng.choice(endings)])
