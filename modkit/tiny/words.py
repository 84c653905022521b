"""The tiny corpus's words and facts, and the few English rules it needs to use them.

Everything the tiny chat model can know comes from these lists: the names, animals and
foods of its sentences and stories (``modkit.tiny.stories``) and the facts its chat turns
ask about (``modkit.tiny.chat``): animal sounds, colors, opposites, capitals.
"""

from __future__ import annotations

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


def cap(text: str) -> str:
    """``text`` with its first letter upper-case (``str.capitalize`` would lower the rest)."""
    return text[0].upper() + text[1:]


def person(rng: Random) -> tuple[str, str]:
    """A random name and its pronoun."""
    if rng.random() < 0.5:
        return rng.choice(SHE_NAMES), "she"
    return rng.choice(HE_NAMES), "he"
