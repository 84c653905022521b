"""A synthetic training corpus from a small grammar of its own.

The tiny chat model is trained only on text made here, so it is reproducible, has no
licence questions, and knows exactly what it was taught. Three kinds of document:

- simple sentences ("Mia likes pancakes."),
- short stories, 3-6 sentences about one named character,
- chat conversations rendered with the ChatML template: greetings, who-are-you, colors,
  animal sounds, sums, opposites, capitals, counting, days of the week, thanks and
  goodbye, 1-3 turns, and about 30% with a system message from ``SYSTEM_PROMPTS``.

The words live in ``words``, sentences and stories in ``stories``, chats in ``chat``;
this module mixes them. ``make_corpus(num_docs, seed)`` is deterministic for a seed:
every choice goes through one ``random.Random(seed)``, never the global generator.
"""

from __future__ import annotations

from random import Random

from modkit.tiny.chat import chat, render_chat
from modkit.tiny.stories import simple_sentence, story


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
