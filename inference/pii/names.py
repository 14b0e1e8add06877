"""Recogniser for person names: a small logistic-regression token classifier, trained here on generated text
(``python -m inference.pii.train_names``), scored in plain Python from ``inference/assets/pii/names.json.gz``.

There is no English spaCy model to lean on, so each capitalised word is scored from features a reader can
check: whether it is a known first or last name (gazetteers built from Faker's name lists for en, de, fr, es,
it, nl) or a frequent ordinary word, its suffix, its neighbours ("Dear", "Mr.", "patient", "my name is", a
following known surname), and whether it opens a sentence. Adjacent positive words join into one name.
Scoring is a sum of about fifteen weights per capitalised word (the word's own part cached), about a
millisecond for a 4,000-character prompt.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from inference.pii.errors import PiiModelError
from inference.pii.findings import PiiFinding, PiiKind

MODEL_PATH = Path(__file__).resolve().parent.parent / "assets" / "pii" / "names.json.gz"
MODEL_FORMAT = 2

# Words, numbers and single punctuation marks; apostrophes and hyphens stay inside names (O'Neil, Jean-Luc)
# but a possessive "'s" is split off, so that "Paul's" is looked up as "Paul".
_TOKEN = re.compile(r"[^\W\d_]+(?:['’\-](?![sS]\b)[^\W\d_]+)*|\d+|[^\w\s]")
_SENTENCE_END = frozenset('.!?:;"“”«»()[]-–—•*#>|')
TITLES = frozenset(
    "mr mrs ms miss mx dr prof sir madam dame herr frau fr hr mme mlle m sr sra srta don doña dott sig"
    " signor signora dhr mevr".split()
)
# Lower-case particles that may sit inside a name ("Ludwig van Beethoven", "María de la Cruz").
NAME_PARTICLES = frozenset("van von de der den del della di da dos du la le ten ter zu y".split())


class Token(NamedTuple):
    # A named tuple, not a dataclass: a 4,000-character prompt has ~700 tokens and this is the hot path.
    text: str
    start: int
    end: int


def tokenise(text: str) -> list[Token]:
    return [Token(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def is_capitalised(word: str) -> bool:
    """``Xxxx`` or a single capital (an initial); ALL-CAPS words are acronyms, not names, for this model."""
    return word[0].isupper() and (len(word) == 1 or not word.isupper()) and word[0].isalpha()


@dataclass(frozen=True)
class Gazetteer:
    first_names: frozenset[str]
    last_names: frozenset[str]
    # Frequent words of en/de/fr/es/it/nl (wordfreq's top lists): a capitalised word that is common in
    # some language and no known name is far more often a sentence opener or a product than a person.
    common_words: frozenset[str]


def word_features(word: str, gazetteer: Gazetteer) -> list[str]:
    """Features of a word on its own, whatever its neighbours (cached per word when scoring)."""
    lower = word.lower()
    first = lower in gazetteer.first_names
    last = lower in gazetteer.last_names
    common = lower in gazetteer.common_words
    features = ["bias", f"w={lower}", f"suf3={lower[-3:]}", f"suf2={lower[-2:]}", f"pre3={lower[:3]}"]
    features.append("first" if first else "no_first")
    features.append("last" if last else "no_last")
    if common:
        features.append("common_name" if first or last else "common_not_name")
    elif not (first or last):
        features.append("unknown")
    if len(word) == 1:
        features.append("initial")
    if "-" in word or "'" in word or "’" in word:
        features.append("joined")
    return features


def context_features(tokens: Sequence[Token], i: int, text: str, gazetteer: Gazetteer) -> list[str]:
    """Features of capitalised token ``i`` that depend on its neighbours."""
    lower = tokens[i].text.lower()
    prev = tokens[i - 1] if i > 0 else None
    prev2 = tokens[i - 2] if i > 1 else None
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    p1 = prev.text.lower() if prev else "<s>"
    p2 = prev2.text.lower() if prev2 else "<s>"
    n1 = nxt.text.lower() if nxt else "</s>"
    sentence_start = prev is None or prev.text in _SENTENCE_END or "\n" in text[prev.end : tokens[i].start]
    if prev is not None and prev.text == "." and p2 in TITLES:
        sentence_start = False  # "Mr. Smith": the full stop ends a title, not a sentence
    features = [f"p1={p1}", f"p2={p2}|{p1}", f"n1={n1}"]
    if sentence_start:
        first = lower in gazetteer.first_names or lower in gazetteer.last_names
        common = lower in gazetteer.common_words
        features.append("ss")
        features.append("ss_name" if first else "ss_common" if common else "ss_unknown")
    if p1 in TITLES or (p1 == "." and p2 in TITLES):
        features.append("titled")
    if prev is not None and is_capitalised(prev.text) and not sentence_start:
        features.append("prev_cap")
        if prev.text.lower() in gazetteer.first_names:
            features.append("prev_first")
    # A lower-case particle between two capitalised words ("Dean der Kijnder", "Jan de Vries", "Banco de España"):
    # the model weighs the pattern from the training names that have one, apart from prev_cap and next_cap.
    if prev2 is not None and prev is not None and prev.text in NAME_PARTICLES and is_capitalised(prev2.text):
        features.append("cap_particle_before")
    if nxt is not None and nxt.text in NAME_PARTICLES and i + 2 < len(tokens) and is_capitalised(tokens[i + 2].text):
        features.append("cap_particle_after")
    if nxt is not None and is_capitalised(nxt.text):
        features.append("next_cap")
        if nxt.text.lower() in gazetteer.last_names:
            features.append("next_last")
        if nxt.text.lower() in gazetteer.first_names:
            features.append("next_first")
    return features


def token_features(tokens: Sequence[Token], i: int, text: str, gazetteer: Gazetteer) -> list[str]:
    """All features of capitalised token ``i``; training uses exactly these, so scoring cannot drift."""
    return word_features(tokens[i].text, gazetteer) + context_features(tokens, i, text, gazetteer)


_WORD_CACHE_LIMIT = 50_000


@dataclass(frozen=True)
class NameModel:
    """The trained scorer: feature weights and the decision threshold, plus its gazetteers."""

    gazetteer: Gazetteer
    weights: dict[str, float]
    threshold: float
    # word -> summed weight of its word_features. Filled as words are met; a benign race between threads
    # writes the same value twice. Cleared when it grows past _WORD_CACHE_LIMIT.
    _word_logits: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, path: Path = MODEL_PATH) -> NameModel:
        try:
            payload = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
        except (OSError, ValueError, EOFError) as error:
            raise PiiModelError(f"cannot read the name model at {path}: {error}") from error
        if payload.get("format") != MODEL_FORMAT:
            raise PiiModelError(f"{path} has format {payload.get('format')!r}; this code reads {MODEL_FORMAT}")
        gazetteer = Gazetteer(
            frozenset(payload["first_names"]), frozenset(payload["last_names"]), frozenset(payload["common_words"])
        )
        return cls(gazetteer, dict(payload["weights"]), float(payload["threshold"]))

    def probability(self, features: Sequence[str]) -> float:
        return _sigmoid(sum(self.weights.get(feature, 0.0) for feature in features))

    def token_probability(self, tokens: Sequence[Token], i: int, text: str) -> float:
        """``probability(token_features(...))``, with the word's own part cached."""
        word = tokens[i].text
        word_logit = self._word_logits.get(word)
        if word_logit is None:
            if len(self._word_logits) > _WORD_CACHE_LIMIT:
                self._word_logits.clear()
            word_logit = sum(self.weights.get(f, 0.0) for f in word_features(word, self.gazetteer))
            self._word_logits[word] = word_logit
        context = context_features(tokens, i, text, self.gazetteer)
        return _sigmoid(word_logit + sum(self.weights.get(f, 0.0) for f in context))

    def find(self, text: str) -> Iterator[PiiFinding]:
        tokens = tokenise(text)
        span: list[tuple[Token, float]] = []
        for i, token in enumerate(tokens):
            if is_capitalised(token.text) and not _inside_code(text, token):
                p = self.token_probability(tokens, i, text)
                if p >= self.threshold:
                    span.append((token, p))
                    continue
            if span and _continues_name(tokens, i, span[-1][0]):
                continue
            yield from _emit(text, span)
            span = []
        yield from _emit(text, span)


def _inside_code(text: str, token: Token) -> bool:
    # A capital glued to digits is part of a code, not an initial or a name: "2024-05-03T12:30Z", "1Z999AA1".
    before = text[token.start - 1] if token.start else " "
    after = text[token.end] if token.end < len(text) else " "
    return before.isdigit() or after.isdigit()


def _sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, logit))))


def _continues_name(tokens: Sequence[Token], i: int, last: Token) -> bool:
    # An initial's full stop ("John F. Kennedy") or a particle ("van") may sit inside a name, but only
    # when a capitalised word follows; the caller then joins the pieces into one span.
    token = tokens[i]
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    if nxt is None or not is_capitalised(nxt.text):
        return False
    if token.text == "." and len(last.text) == 1 and token.start == last.end:
        return True
    return token.text in NAME_PARTICLES


def _emit(text: str, span: list[tuple[Token, float]]) -> Iterator[PiiFinding]:
    if span:
        score = max(p for _, p in span)
        yield PiiFinding.at(PiiKind.PERSON, text, span[0][0].start, span[-1][0].end, round(score, 3))
