"""A synthetic training corpus from a small grammar of its own.

The tiny chat model is trained only on text made here, so it is reproducible, has no
licence questions, and knows exactly what it was taught. Three kinds of document:

- simple sentences ("Mia likes pancakes."),
- short stories, 3-6 sentences about one named character,
- chat conversations rendered with the ChatML template: greetings, who-are-you, colors,
  animal sounds, sums, opposites, capitals, counting, days of the week, thanks and
  goodbye, 1-3 turns, and about 30% with a system message from ``SYSTEM_PROMPTS``.

``make_corpus(num_docs, seed)`` is deterministic for a seed: every choice goes through
one ``random.Random(seed)``, never the global generator.
"""

from __future__ import annotations

from collections.abc import Callable
from random import Random


def _words(text: str) -> list[str]:
    """Split a whitespace-separated word list (long lists read better as plain text)."""
    return text.split()


# --- word lists ------------------------------------------------------------------------
# NOTE: the lists are long on purpose: more distinct words give the BPE tokenizer more to
# merge, so the vocabulary looks more like a real one (byte-level BPE never merges across
# a word boundary, so vocabulary size is about the number of distinct words + 256 bytes).

SHE_NAMES = _words("""Anna Mia Lily Emma Sara Clara Nora Zoe Lucy Ella Maya Ruby Grace Alice Hannah
Olivia Sophie Chloe Amelia Isla Rosa Julia Laura Nina Eva Leah Ivy Hazel Stella Daisy Iris
Mira Ada Vera Elsa Freya Luna Tara Greta Paula""")
HE_NAMES = _words("""Ben Tom Sam Leo Max Jack Noah Liam Oscar Finn Hugo Theo Adam Eli Felix Jonas
Omar Ravi Luca Milo Owen Ryan Ivan Kai Arlo Henry Jasper Oliver Peter Victor Arthur Bruno
Carlos Diego Emil Frank George Harry Isaac Marco""")
ANIMALS = _words("""cat dog cow duck sheep pig horse lion owl frog bee snake mouse rooster donkey
goat wolf fox bear rabbit tiger elephant monkey giraffe zebra penguin turtle squirrel
hedgehog deer goose parrot dolphin whale fish crab butterfly ant spider camel kangaroo
koala panda otter beaver badger swan eagle crow hamster""")
FOODS = _words("""apples bread cheese soup rice pasta pizza cake cookies honey carrots bananas
grapes oranges pears peaches plums cherries strawberries blueberries pancakes waffles
noodles beans potatoes tomatoes cucumbers lettuce corn peas eggs butter jam yogurt milk
porridge muffins sandwiches dumplings salad popcorn chocolate lemonade tea cereal toast
melons mangoes pumpkins onions mushrooms sausages omelettes biscuits pies""")
PLACES = _words("""park garden forest river lake beach village town city market school library
farm barn kitchen castle mountain hill valley meadow field island harbor bakery zoo
museum station bridge cave pond playground street shop cafe hospital tower desert jungle
orchard stable attic cellar workshop square theater lighthouse""")
OBJECTS = _words("""ball book box kite hat cup spoon chair table lamp clock key bag shoe sock coat
umbrella bottle basket bucket brush pencil crayon map rope ladder bell drum flute guitar
boat train bus bicycle wagon blanket pillow mirror candle jar plate bowl fork knife
window door gate fence shell stone feather ribbon button coin ring necklace scarf glove
dress shirt toy puzzle robot doll teddy balloon whistle tent compass telescope
notebook envelope letter parcel""")
STORY_ADJECTIVES = _words("""happy sad brave kind small big tiny huge little quick slow clever
curious gentle shy proud funny sleepy hungry friendly quiet loud busy lazy tired calm
cheerful lonely lucky silly wise young old bold fluffy grumpy jolly""")
COLORS = _words("red blue green yellow orange purple pink brown black white grey gold")
NUMBER_WORDS = _words("""zero one two three four five six seven eight nine ten eleven twelve
thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty""")
DAYS = _words("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")

SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "horse": "neigh",
    "lion": "roar",
    "owl": "hoot",
    "frog": "ribbit",
    "bee": "buzz",
    "snake": "hiss",
    "mouse": "squeak",
    "rooster": "cock-a-doodle-doo",
    "donkey": "hee-haw",
    "goat": "maa",
    "wolf": "howl",
    "crow": "caw",
    "goose": "honk",
    "turkey": "gobble",
    "chick": "cheep",
    "elephant": "toot",
    "pigeon": "coo",
}
COLOR_FACTS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "a banana": "yellow",
    "the sun": "yellow",
    "a strawberry": "red",
    "coal": "black",
    "an orange": "orange",
    "a lemon": "yellow",
    "milk": "white",
    "a tomato": "red",
    "the sea": "blue",
    "a leaf": "green",
    "chocolate": "brown",
    "a carrot": "orange",
    "a cherry": "red",
    "a frog": "green",
    "a crow": "black",
    "a cloud": "white",
    "a plum": "purple",
    "a flamingo": "pink",
    "an elephant": "grey",
    "a pumpkin": "orange",
    "gold": "gold",
}
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("day", "night"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("old", "new"),
    ("open", "closed"),
    ("light", "dark"),
    ("wet", "dry"),
    ("high", "low"),
    ("full", "empty"),
    ("early", "late"),
    ("left", "right"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("long", "short"),
    ("in", "out"),
    ("yes", "no"),
    ("good", "bad"),
    ("clean", "dirty"),
    ("near", "far"),
    ("thick", "thin"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("win", "lose"),
    ("push", "pull"),
    ("first", "last"),
    ("heavy", "light"),
    ("summer", "winter"),
]
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "England": "London",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Greece": "Athens",
    "Egypt": "Cairo",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Russia": "Moscow",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Peru": "Lima",
    "Argentina": "Buenos Aires",
    "Chile": "Santiago",
    "Kenya": "Nairobi",
    "Australia": "Canberra",
    "Turkey": "Ankara",
    "Thailand": "Bangkok",
    "the Netherlands": "Amsterdam",
    "Hungary": "Budapest",
    "Cuba": "Havana",
}

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


def article(word: str) -> str:
    """``a`` or ``an`` before ``word`` (by its first letter, good enough for our lists)."""
    return "an" if word[0].lower() in "aeiou" else "a"


def plural(word: str) -> str:
    """English plural of a noun from our word lists."""
    irregular = {
        "mouse": "mice",
        "sheep": "sheep",
        "fish": "fish",
        "goose": "geese",
        "deer": "deer",
        "wolf": "wolves",
        "box": "boxes",
        "bus": "buses",
        "dress": "dresses",
        "fox": "foxes",
        "peach": "peaches",
        "knife": "knives",
    }
    if word in irregular:
        return irregular[word]
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "sh", "ch")) else "s")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _person(rng: Random) -> tuple[str, str]:
    """A random name and its pronoun."""
    if rng.random() < 0.5:
        return rng.choice(SHE_NAMES), "she"
    return rng.choice(HE_NAMES), "he"


# --- simple sentences and stories ------------------------------------------------------


def simple_sentence(rng: Random) -> str:
    """One short declarative sentence."""
    name, _ = _person(rng)
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
        f"{_cap(plural(animal))} like to play in the {place}.",
        f"{name} gave {article(obj)} {obj} to {rng.choice(SHE_NAMES + HE_NAMES)}.",
    ]
    return rng.choice(templates)


def story(rng: Random, name: str | None = None, pronoun: str = "she") -> str:
    """A short story of 3-6 sentences about one named character."""
    if name is None:
        name, pronoun = _person(rng)
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
        f"{_cap(pronoun)} found {article(obj)} {obj} under a tree.",
        f"{_cap(pronoun)} ate some {rng.choice(FOODS)} for lunch.",
        f"{_cap(pronoun)} met {article(animal2)} {animal2} called {friend}.",
        f"{name} and {friend} played with {article(obj2)} {obj2} all day.",
        f"It started to rain, so {pronoun} ran to the {rng.choice(PLACES)}.",
        f"{_cap(pronoun)} wanted to see the {rng.choice(PLACES)} with {friend}.",
        (
            f"The sky was {rng.choice(['blue', 'grey', 'dark', 'bright'])} and the wind "
            f"was {rng.choice(['soft', 'cold', 'warm', 'strong'])}."
        ),
        f"{name} counted {NUMBER_WORDS[rng.randint(2, 12)]} {plural(rng.choice(ANIMALS))}.",
        f"{_cap(pronoun)} felt {rng.choice(STORY_ADJECTIVES)} and a bit hungry.",
    ]
    endings = [
        f"In the end, {name} was very happy.",
        f"That night, {name} slept well.",
        f"{name} smiled and went home.",
        f"{name} and {friend} became best friends.",
    ]
    body = rng.sample(middles, rng.randint(1, 4))
    return " ".join([rng.choice(openings), *body, rng.choice(endings)])


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
    return user, f"{_cap(thing)} is {color}."


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
    return user, f"{_cap(a)} says {sound}."


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
    name, pronoun = _person(rng)
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


def make_document(rng: Random) -> str:
    """One document: 15% simple sentences, 20% a story, 65% a rendered chat."""
    r = rng.random()
    if r < 0.15:
        return " ".join(simple_sentence(rng) for _ in range(rng.randint(1, 4)))
    if r < 0.35:
        return story(rng)
    return render_chat(chat(rng))


def make_corpus(num_docs: int, seed: int) -> list[str]:
    """``num_docs`` documents, the same list for the same seed."""
    rng = Random(seed)
    return [make_document(rng) for _ in range(num_docs)]
