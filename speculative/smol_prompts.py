"""The chat prompts the SmolLM2 draft is distilled on: written here, plus the difficulty set's.

``chat_prompts(seed)`` returns a few thousand user messages, deduplicated and shuffled under
the seed: the prompts of ``inference/assets/difficulty/*.jsonl`` (chat, coding, maths,
rewriting, translation... in eight languages) and prompts generated from the task templates
below (English, French, German, Spanish and Italian), each template crossed with its own
subjects. ``split`` keeps a seeded share aside for the report's held-out acceptance. The
router's evaluation set (``inference/assets/router_eval``) is never used: it stays unseen.
The difficulty files change as that set grows, so a training run writes its list once and
keeps it (``train_smol``'s prompts stage).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

DIFFICULTY_DIR = Path(__file__).resolve().parent.parent / "inference" / "assets" / "difficulty"
DIFFICULTY_FILES = ("generated.jsonl", "handwritten.jsonl", "ood.jsonl", "written_more.jsonl", "written_routing.jsonl")


@dataclass(frozen=True)
class Prompt:
    id: str  # the source and a hash of the text: stable while other lines of the source change
    text: str
    lang: str
    task: str


def prompt_id(source: str, text: str) -> str:
    return f"{source}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


SUBJECTS = {
    "en": [
        "photosynthesis", "the French Revolution", "black holes", "compound interest", "the water cycle",
        "machine learning", "the Roman Empire", "climate change", "vaccines", "the internet", "volcanoes",
        "democracy", "electric cars", "sleep", "the stock market", "honey bees", "recycling", "gravity",
        "the printing press", "coffee", "the immune system", "renewable energy", "the Moon", "inflation",
        "the human heart", "rainbows", "plate tectonics", "the Olympic Games", "bread baking", "chess",
    ],
    "fr": [
        "la photosynthèse", "la Révolution française", "les trous noirs", "le cycle de l'eau", "les volcans",
        "l'intelligence artificielle", "le système solaire", "le recyclage", "le sommeil", "les abeilles",
    ],
    "de": [
        "die Photosynthese", "das Römische Reich", "Schwarze Löcher", "den Wasserkreislauf", "Vulkane",
        "künstliche Intelligenz", "das Sonnensystem", "Recycling", "den Schlaf", "Bienen",
    ],
    "es": [
        "la fotosíntesis", "el Imperio romano", "los agujeros negros", "el ciclo del agua", "los volcanes",
        "la inteligencia artificial", "el sistema solar", "el reciclaje", "el sueño", "las abejas",
    ],
    "it": [
        "la fotosintesi", "l'Impero romano", "i buchi neri", "il ciclo dell'acqua", "i vulcani",
        "l'intelligenza artificiale", "il sistema solare", "il riciclo", "il sonno", "le api",
    ],
}  # fmt: skip

TEMPLATES = {
    "en": {
        "explain": [
            "Explain {s} in simple terms.", "What is {s}?", "Give me three facts about {s}.",
            "Explain {s} to a ten-year-old.", "Why does {s} matter?", "Summarise what you know about {s} in two sentences.",
            "What are common misconceptions about {s}?", "Write a short paragraph about {s}.",
        ],
        "creative": [
            "Write a haiku about {s}.", "Write a short poem about {s}.", "Tell me a short story that involves {s}.",
            "Write a limerick about {s}.", "Give me a catchy title for a blog post about {s}.",
        ],
        "study": [
            "Write three quiz questions about {s}.", "Make a short study plan for learning about {s}.",
            "List five key terms related to {s} and define them.", "What would be a good essay question about {s}?",
        ],
    },
    "fr": {
        "explain": ["Explique {s} simplement.", "Qu'est-ce que {s} ?", "Donne-moi trois faits sur {s}."],
        "creative": ["Écris un court poème sur {s}.", "Écris un haïku sur {s}."],
    },
    "de": {
        "explain": ["Erkläre {s} in einfachen Worten.", "Nenne drei Fakten über {s}.", "Warum ist {s} wichtig?"],
        "creative": ["Schreibe ein kurzes Gedicht über {s}."],
    },
    "es": {
        "explain": ["Explica {s} de forma sencilla.", "¿Qué sabes sobre {s}?", "Dame tres datos sobre {s}."],
        "creative": ["Escribe un poema corto sobre {s}."],
    },
    "it": {
        "explain": ["Spiega {s} in parole semplici.", "Dimmi tre fatti su {s}.", "Perché è importante {s}?"],
        "creative": ["Scrivi una breve poesia su {s}."],
    },
}  # fmt: skip

# Tasks that take a value rather than a subject: arithmetic, code, rewriting, lists, advice.
NUMBERS = [(12, 7), (45, 19), (128, 64), (7, 8), (250, 4), (33, 21), (99, 11), (1000, 37), (15, 15), (64, 3)]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "counts the words in a sentence",
    "returns the largest item of a list", "computes the factorial of n", "removes duplicates from a list",
    "converts Celsius to Fahrenheit", "checks whether a string is a palindrome", "sums the even numbers in a list",
    "returns the n-th Fibonacci number", "sorts a list of names alphabetically", "merges two dictionaries",
]  # fmt: skip
LANGUAGES = ["Python", "JavaScript", "Go", "Rust", "SQL"]
SENTENCES = [
    "the meeting is moved to thursday because the room was double booked",
    "i think we should maybe consider perhaps looking into the budget again",
    "Our product is the best product and everyone should buy our product today.",
    "the cat sat on the mat and looked out of the window for a long time",
    "We regret to inform you that your order has been delayed by two weeks.",
    "pls send me the report asap its urgent",
]  # fmt: skip
ADVICE = [
    "stay focused while working from home", "start running", "save money on groceries", "learn a new language",
    "sleep better", "prepare for a job interview", "keep houseplants alive", "write a good cover letter",
    "organise a small birthday party", "make friends in a new city", "reduce stress before exams",
]  # fmt: skip


def _value_prompts() -> list[tuple[str, str, str]]:
    """(text, lang, task) for the templates that take a value rather than a subject."""
    out: list[tuple[str, str, str]] = []
    for a, b in NUMBERS:
        out += [
            (f"What is {a} times {b}?", "en", "math"),
            (f"What is {a} plus {b}? Show your steps.", "en", "math"),
            (f"If I have {a} apples and give away {b}, how many are left?", "en", "math"),
            (f"Combien font {a} fois {b} ?", "fr", "math"),
            (f"Wie viel ist {a} plus {b}?", "de", "math"),
        ]
    for task, lang in itertools.product(CODE_TASKS, LANGUAGES):
        out.append((f"Write a {lang} function that {task}.", "en", "coding"))
    for task in CODE_TASKS:
        out.append((f"Explain how to write a function that {task}.", "en", "coding"))
    for sentence in SENTENCES:
        out += [
            (f"Rewrite this sentence more formally: {sentence}", "en", "rewrite"),
            (f"Fix the grammar and punctuation: {sentence}", "en", "rewrite"),
            (f"Make this shorter: {sentence}", "en", "rewrite"),
            (f"Translate into French: {sentence}", "en", "translate"),
            (f"Translate into Spanish: {sentence}", "en", "translate"),
            (f"Translate into German: {sentence}", "en", "translate"),
        ]
    for thing in ADVICE:
        out += [
            (f"How can I {thing}?", "en", "advice"),
            (f"Give me five tips to {thing}.", "en", "advice"),
            (f"What are the first steps to {thing}?", "en", "advice"),
        ]
    return out


def generated_prompts() -> list[Prompt]:
    """Every template crossed with its subjects or values, in a fixed order."""
    rows: list[tuple[str, str, str]] = []
    for lang, tasks in TEMPLATES.items():
        for task, templates in tasks.items():
            rows += [(t.format(s=s), lang, task) for t in templates for s in SUBJECTS[lang]]
    rows += _value_prompts()
    return [Prompt(prompt_id("gen", text), text, lang, task) for text, lang, task in rows]


def difficulty_prompts(directory: Path = DIFFICULTY_DIR) -> list[Prompt]:
    prompts: list[Prompt] = []
    for name in DIFFICULTY_FILES:
        path = directory / name
        for line in path.read_text().splitlines():
            row = json.loads(line)
            prompts.append(Prompt(prompt_id(path.stem, row["prompt"]), row["prompt"], row["lang"], row["family"]))
    return prompts


def chat_prompts(seed: int, limit: int | None = None) -> list[Prompt]:
    """All prompts, deduplicated by text, in a seeded order (the first ``limit`` if given)."""
    seen: set[str] = set()
    unique = []
    for prompt in difficulty_prompts() + generated_prompts():
        if prompt.text not in seen:
            seen.add(prompt.text)
            unique.append(prompt)
    random.Random(seed).shuffle(unique)
    return unique[:limit] if limit is not None else unique


def split(prompts: list[Prompt], held_out: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): the last ``held_out`` prompts of the seeded order are kept for the report."""
    assert 0 < held_out < len(prompts), f"cannot hold out {held_out} of {len(prompts)} prompts"
    return prompts[:-held_out], prompts[-held_out:]
