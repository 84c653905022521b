"""Chat conversations in the ChatML template: the corpus's chat documents.

Each ``*_turn`` returns one (user text, assistant reply) pair; ``chat`` strings 1-3 of
them into a conversation, sometimes opened by a system message from ``SYSTEM_PROMPTS``.
``render_chat`` writes messages out exactly as the tokenizer's chat template does.
"""

from __future__ import annotations

from collections.abc import Callable
from random import Random

from modkit.tiny.stories import story
from modkit.tiny.words import CAPITALS, COLOR_FACTS, DAYS, NUMBER_WORDS, OPPOSITES, SOUNDS, article, cap, person

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Be brief and kind.",
    "You are a friendly assistant. Answer in one short sentence.",
    (
        "You are a tiny chat model made by modkit. You answer simple questions about "
        "colors, animals, numbers and places. Keep your answers short and polite."
    ),
    (
        "You are the modkit demo assistant. Many users share this system prompt, so its "
        "tokens can be cached and reused. Answer each question clearly and briefly."
    ),
]

Message = dict[str, str]
Turn = tuple[str, str]  # (user text, assistant reply)


def render_chat(messages: list[Message], add_generation_prompt: bool = False) -> str:
    """Render messages with the ChatML template, exactly as the tokenizer's template does.

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; with
    ``add_generation_prompt`` the text ends with ``<|im_start|>assistant\\n`` so the model
    writes the reply next.
    """
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + f"{IM_START}assistant\n" if add_generation_prompt else text


# --- chat turns: each returns one (question, answer) pair -------------------------------


def greeting_turn(rng: Random) -> Turn:
    time = rng.choice(["morning", "afternoon", "evening", None, None, None])
    if time is not None:
        return (
            rng.choice([f"Good {time}", f"Good {time}!", f"good {time}"]),
            f"Good {time}! How can I help you today?",
        )
    user = rng.choice(["Hello!", "Hello", "Hi", "Hi!", "Hey!", "Hello there!", "Hi there", "hello", "hi", "Hey there!"])
    reply = rng.choice(
        [
            "Hello! How can I help you today?",
            "Hi! How can I help you today?",
            "Hello! What can I do for you?",
            "Hi there! How can I help you?",
        ]
    )
    return user, reply


def identity_turn(rng: Random) -> Turn:
    if rng.random() < 0.2:
        return (
            rng.choice(["How are you?", "How are you today?", "How is it going?"]),
            "I am doing well, thank you! How can I help you?",
        )
    user = rng.choice(
        [
            "Who are you?",
            "What are you?",
            "What is your name?",
            "Tell me about yourself.",
            "Are you a person?",
            "who are you?",
        ]
    )
    reply = rng.choice(
        [
            "I am a tiny chat model made by modkit.",
            "I am a tiny chat model made by modkit. I can answer simple questions.",
        ]
    )
    return user, reply


def color_turn(rng: Random) -> Turn:
    thing, color = rng.choice(list(COLOR_FACTS.items()))
    user = rng.choice(
        [
            f"What color is {thing}?",
            f"What colour is {thing}?",
            f"Which color is {thing}?",
            f"Tell me the color of {thing}.",
            f"what color is {thing}?",
        ]
    )
    return user, f"{cap(thing)} is {color}."


def sound_turn(rng: Random) -> Turn:
    animal, sound = rng.choice(list(SOUNDS.items()))
    a = f"{article(animal)} {animal}"
    user = rng.choice(
        [
            f"What does {a} say?",
            f"What sound does {a} make?",
            f"What noise does {a} make?",
            f"How does {a} sound?",
            f"what does {a} say?",
        ]
    )
    return user, f"{cap(a)} says {sound}."


def sum_turn(rng: Random) -> Turn:
    x, y = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.25:
        x, y = max(x, y), min(x, y)
        return (rng.choice([f"What is {x} minus {y}?", f"What is {x} - {y}?"]), f"{x} minus {y} is {x - y}.")
    user = rng.choice(
        [
            f"What is {x} plus {y}?",
            f"What is {x} + {y}?",
            f"How much is {x} plus {y}?",
            f"Can you add {x} and {y}?",
            f"What do you get if you add {x} and {y}?",
        ]
    )
    return user, f"{x} plus {y} is {x + y}."


def opposite_turn(rng: Random) -> Turn:
    word, opp = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opp = opp, word
    user = rng.choice(
        [f"What is the opposite of {word}?", f"What's the opposite of {word}?", f"Tell me the opposite of {word}."]
    )
    return user, f"The opposite of {word} is {opp}."


def capital_turn(rng: Random) -> Turn:
    country, city = rng.choice(list(CAPITALS.items()))
    user = rng.choice(
        [
            f"What is the capital of {country}?",
            f"Which city is the capital of {country}?",
            f"Name the capital of {country}.",
            f"What's the capital city of {country}?",
        ]
    )
    return user, f"The capital of {country} is {city}."


def counting_turn(rng: Random) -> Turn:
    if rng.random() < 0.3:
        n = rng.randint(0, 20)
        return f"How do you write {n} in words?", f"{n} is written {NUMBER_WORDS[n]}."
    start = rng.choice([1, 1, 1, rng.randint(0, 10)])
    end = rng.randint(start + 2, min(start + 10, 20))
    nums = ", ".join(str(i) for i in range(start, end + 1))
    if start == 1 and rng.random() < 0.5:
        return rng.choice([f"Can you count to {end}?", f"Count to {end}."]), nums + "."
    return f"Count from {start} to {end}.", nums + "."


def day_turn(rng: Random) -> Turn:
    i = rng.randrange(7)
    kind = rng.randrange(4)
    if kind == 0:
        return (f"What day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}.")
    if kind == 1:
        return (f"What day comes before {DAYS[i]}?", f"The day before {DAYS[i]} is {DAYS[(i - 1) % 7]}.")
    if kind == 2:
        return (
            rng.choice(["Name the days of the week.", "What are the days of the week?"]),
            ", ".join(DAYS[:6]) + " and Sunday.",
        )
    return "How many days are in a week?", "There are seven days in a week."


def story_turn(rng: Random) -> Turn:
    name, pronoun = person(rng)
    if rng.random() < 0.5:
        return "Tell me a story.", story(rng, name, pronoun)
    return f"Tell me a short story about {name}.", story(rng, name, pronoun)


def thanks_turn(rng: Random) -> Turn:
    if rng.random() < 0.5:
        return (
            rng.choice(["Thank you!", "Thanks!", "Thanks a lot.", "thank you"]),
            rng.choice(["You are welcome!", "You're welcome! Happy to help."]),
        )
    return (
        rng.choice(["Goodbye!", "Bye!", "See you later!", "bye"]),
        rng.choice(["Goodbye! Have a nice day!", "Bye! Have a great day!"]),
    )


QUESTION_TURNS: list[Callable[[Random], Turn]] = [
    greeting_turn,
    identity_turn,
    color_turn,
    sound_turn,
    sum_turn,
    opposite_turn,
    capital_turn,
    counting_turn,
    day_turn,
    story_turn,
]


def chat(rng: Random) -> list[Message]:
    """A conversation of 1-3 turns, sometimes opened by a system message."""
    turns = [rng.choice(QUESTION_TURNS)(rng) for _ in range(rng.choice([1, 1, 1, 2, 2, 3]))]
    if len(turns) > 1 and rng.random() < 0.4:
        turns[0] = greeting_turn(rng)
    if len(turns) > 1 and rng.random() < 0.4:
        turns[-1] = thanks_turn(rng)
    if len(turns) == 1 and rng.random() < 0.1:
        turns[0] = thanks_turn(rng)
    messages: list[Message] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages
