"""The toy task: prompts ("List three fruits, but not plum.") and the SFT response grammar.

Everything here is pure Python and driven by an explicit `random.Random`, so the same seed
gives the same prompts, responses and corpus. The task and its gold reward are described
in `pipeline/toy/__init__.py`; the reward itself lives in `pipeline/toy/reward.py`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

CATEGORIES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "pear", "plum", "peach",
               "kiwi", "melon", "apricot", "fig", "papaya"),
    "colors": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white",
               "gray", "violet", "teal", "cyan", "magenta"),
    "mammals": ("dog", "cat", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf",
                "fox", "rabbit", "mouse", "deer"),
    "birds": ("eagle", "sparrow", "robin", "owl", "parrot", "pigeon", "crow", "swan", "duck",
              "goose", "hawk", "penguin", "flamingo", "heron"),
    "vegetables": ("carrot", "potato", "onion", "garlic", "spinach", "celery", "cabbage",
                   "lettuce", "pepper", "broccoli", "radish", "turnip", "leek", "kale"),
    "tools": ("hammer", "wrench", "saw", "drill", "chisel", "pliers", "screwdriver", "shovel",
              "rake", "axe", "clamp", "trowel"),
    "instruments": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp",
                    "banjo", "clarinet", "oboe", "trombone", "ukulele", "saxophone"),
    "sports": ("soccer", "tennis", "golf", "hockey", "rugby", "cricket", "baseball",
               "basketball", "volleyball", "boxing", "rowing", "skiing", "cycling", "swimming"),
    "metals": ("iron", "copper", "gold", "silver", "tin", "zinc", "lead", "nickel", "cobalt",
               "platinum", "aluminum", "titanium"),
})
ALL_ITEMS: tuple[str, ...] = tuple(item for items in CATEGORIES.values() for item in items)
NUMBER_WORDS: Mapping[int, str] = MappingProxyType({2: "two", 3: "three", 4: "four", 5: "five"})
TEMPLATES: tuple[str, ...] = (
    "List {n} {category}{exclusion}.",
    "Name {n} {category}{exclusion}.",
    "Give me {n} {category}{exclusion}.",
    "Can you list {n} {category}{exclusion}?",
    "Please name {n} {category}{exclusion}.",
    "Write down {n} {category}{exclusion}.",
    "I need {n} {category}{exclusion}.",
    "Tell me {n} {category}{exclusion}.",
)
LEADS: tuple[str, ...] = ("Sure", "Okay", "Here you go", "Here are {n} {category}")

EXCLUDE_P = 0.3         # a prompt says ", but not <item>"
DIGIT_P = 0.3           # a prompt writes the count as a digit ("3") instead of a word
# Noise in the SFT responses, so that the SFT model's samples vary in quality.
EXACT_COUNT_P = 0.75    # the response lists exactly n items (else n-1, n+1 or n+2)
WRONG_ITEM_P = 0.1      # each item is swapped for one of another category
EXCLUDED_SLIP_P = 0.15  # the excluded item slips in anyway
REPEAT_P = 0.05         # an item is repeated at the end
LEAD_P = 0.3            # "Sure: ..." lead-in


@dataclass(frozen=True)
class TaskSpec:
    """What a prompt asks for: `n` distinct items of `category`, never `exclude`."""

    n: int
    category: str
    exclude: str | None = None

    @property
    def allowed(self) -> tuple[str, ...]:
        return tuple(i for i in CATEGORIES[self.category] if i != self.exclude)


_PROMPT_RE = re.compile(
    r"\b(?P<n>[2-5]|two|three|four|five) (?P<category>" + "|".join(CATEGORIES) + r")"
    r"(?:, but not (?P<exclude>[a-z]+))?[.?]"
)
_WORD_NUMBERS = {word: n for n, word in NUMBER_WORDS.items()}


def parse_prompt(prompt: str) -> TaskSpec:
    """The TaskSpec of a toy prompt (also found inside a chat-rendered prompt)."""
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"not a toy-task prompt: {prompt!r}")
    n = m["n"]
    return TaskSpec(int(n) if n.isdigit() else _WORD_NUMBERS[n], m["category"], m["exclude"])


def sample_spec(rng: random.Random) -> TaskSpec:
    category = rng.choice(sorted(CATEGORIES))
    exclude = rng.choice(CATEGORIES[category]) if rng.random() < EXCLUDE_P else None
    return TaskSpec(rng.choice(sorted(NUMBER_WORDS)), category, exclude)


def render_prompt(spec: TaskSpec, rng: random.Random) -> str:
    n = str(spec.n) if rng.random() < DIGIT_P else NUMBER_WORDS[spec.n]
    exclusion = f", but not {spec.exclude}" if spec.exclude else ""
    return rng.choice(TEMPLATES).format(n=n, category=spec.category, exclusion=exclusion)


def sample_prompts(rng: random.Random, k: int) -> list[str]:
    """`k` distinct prompts, in the order drawn."""
    prompts: dict[str, None] = {}
    for _ in range(1000 * k):
        if len(prompts) == k:
            return list(prompts)
        prompts[render_prompt(sample_spec(rng), rng)] = None
    raise ValueError(f"cannot draw {k} distinct toy prompts")


def sample_response(spec: TaskSpec, rng: random.Random) -> str:
    """A response from the SFT grammar: `[Lead: ]item, item, ..., item.` with some noise."""
    count = spec.n if rng.random() < EXACT_COUNT_P else max(1, spec.n + rng.choice((-1, 1, 2)))
    items = rng.sample(spec.allowed, count)
    items = [rng.choice(ALL_ITEMS) if rng.random() < WRONG_ITEM_P else i for i in items]
    if spec.exclude and rng.random() < EXCLUDED_SLIP_P:
        items[rng.randrange(len(items))] = spec.exclude
    if rng.random() < REPEAT_P:
        items.append(rng.choice(items))
    body = ", ".join(items) + "."
    if rng.random() < LEAD_P:
        lead = rng.choice(LEADS).format(n=NUMBER_WORDS[spec.n], category=spec.category)
        return f"{lead}: {body}"
    return body


def sample_example(rng: random.Random, prompts: list[str]) -> tuple[str, str]:
    """A (prompt, response) SFT example with the prompt drawn from `prompts`."""
    prompt = rng.choice(prompts)
    return prompt, sample_response(parse_prompt(prompt), rng)
