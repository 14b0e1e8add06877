"""Rules that overrule the name model on capitalised words that are not a person in that place: function words and
lone letters, names inside a law or theorem ("Ohm's law", "Satz von Bayes"), and, when the prompt holds no other
personal detail, places, products and the example names of teaching and programming questions.

Why these are rules and not model features: each is a fact a reader can check (a listed place after "in", a
surname before "'s theorem"), the model mis-scores exactly these words (they are in its first- or last-name
gazetteers: "Florence", "Julia", "Bob"), and a rule can be lifted whenever other PII is present: a name near an
e-mail, phone or id is reported whatever it looks like. The word lists live in
``inference/assets/pii/non_names.json.gz`` (``python -m inference.pii.non_names_build``).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from inference.pii.errors import PiiModelError
from inference.pii.findings import PiiFinding
from inference.pii.lone_words import Prompt, is_lone_non_name
from inference.pii.names import TITLES, Gazetteer

NON_NAMES_PATH = Path(__file__).resolve().parent.parent / "assets" / "pii" / "non_names.json.gz"
NON_NAMES_FORMAT = 1

# Articles, pronouns and conjunctions of the model's languages: capitalised at a sentence start ("Die Katze"),
# never a name on their own.
FUNCTION_WORDS = frozenset(
    "the a an of and or but if in on at to for with by from as is it its this that these those what which who how"
    " why when where we you he she they i my our your his her their there here then so no not do does did be are"
    " der die das den dem des ein eine einen einem einer und oder aber mit von zu im am ist sie er es wir ich du"
    " wie was wer wo wann warum le la les un une du et ou mais avec pour dans sur est il elle nous vous je tu qui"
    " que quoi où quand pourquoi comment el los las una unos unas y o pero con para por en es yo él ella qué"
    " cómo dónde cuándo il lo gli uno e ma con per di è io che chi dove quando perché het een en maar met voor"
    " op is ik jij wij wat wie waar wanneer waarom hoe".split()
)
# After one of these a listed place is a place, even when it is also a first name ("à Virginia", "nach Florence").
_LOCATIVES = frozenset(
    "in at near from via visit visiting around across through nach aus bei um à au aux vers depuis en desde hacia"
    " cerca a da per verso naar uit bij".split()
)
_CONNECTORS = frozenset("to and or , / - – und oder et ou y o e of en".split())
# A name before one of these is a law's or a theorem's: "Ohm's law", "Fermat's last theorem", "Bayes theorem".
# No noun that is also a verb after a name ("Let Peter test the build", "Have Anna process the refund").
_EPONYM_NOUNS = (
    r"laws?|theorem|lemma|conjecture|equations?|formula|identity|algorithm|principle|constant|razor|paradox"
    r"|hypothesis|inequality|transform|distribution|chain|machine|distance|coding|equilibrium|correlation"
    r"|coefficient|effect|triangle|series|integral|sieve"
    r"|gesetz|satz|theorem|algorithmus|gleichung|vermutung|prinzip|konstante|verteilung|regel"
)
# Possessive forms name a few nouns only: "John's test results" and "Sarah's number" belong to a person.
_EPONYM_AFTER = re.compile(
    r"(?:['’]s?[ \t]+(?:[a-z]+[ \t]+){0,2}(?:laws?|theorem|lemma|conjecture|equations?|formula|identity|algorithm"
    r"|principle|constant|razor|paradox|hypothesis|inequality|transform|triangle|sieve|exclusion|uncertainty)"
    rf"|[ \t]*-?[ \t]*(?:{_EPONYM_NOUNS}))(?![^\W\d_])"
)
_EPONYM_BEFORE = re.compile(
    r"(?:theorem|law|lemma|conjecture|principle|formula|equation|algorithm|satz|gesetz|gleichung|algorithmus"
    r"|théorème|loi|formule|équation|algorithme|teorema|ley|fórmula|ecuación|algoritmo|legge|formula|equazione)"
    r"[ \t]+(?:of|von|des|der|de|du|di|del|dello|della)[ \t]+(?:la[ \t]+)?\Z"
)
# Each language's stock name for a sample person on forms and in documentation (as "John Doe" is in English).
_PLACEHOLDER_NAMES = frozenset(
    "john doe|jane doe|john roe|jane roe|richard roe|joe bloggs|fred bloggs|max mustermann|erika mustermann"
    "|mustermann|jean dupont|jeanne dupont|juan pérez|fulano de tal|mario rossi|john q. public"
    "|jan kowalski|anna kowalska|jan novák|jan jansen|jan modaal|ola nordmann|kari nordmann"
    "|matti meikäläinen|maija meikäläinen".split("|")
)
# The cast of cryptography and programming examples, and first names used as a form's sample user.
# Only names that are rare outside examples: "Victor", "Max" or "John" alone are as often a colleague.
# Names of identity documents (the passport and ID cues' words): a capitalised one is never a person
_DOCUMENT_WORD = re.compile(
    r"passports?|reisepass|passnummer|passeport|pasaporte|passaporto|paspoort|personalausweis|ausweis|"
    r"ausweisnummer|idkaart|identiteitskaart|rijbewijs|führerschein|fuhrerschein",
    re.IGNORECASE,
)
_CAST = frozenset("alice bob carol charlie dave eve mallory trent peggy".split())
_CAST_SPANS = frozenset({"john smith", "jane smith", "max", "erika", "john", "jane"})
# A teaching or programming example: the example cast is not people here.
_TEACHING = re.compile(
    r"example|e\.g\.|sample|placeholder|dummy|mock|unit test|test user|function|json|sql|python|code|script"
    r"|template|encrypt|decrypt|public key|private key|protocol|signature|game|puzzle|probability"
    r"|beispiel|platzhalter|exemple|ejemplo|esempio|voorbeeld|[`{}=<>]"
)
# A prompt about software: a product name that is also a first name ("Julia", "Cassandra") is the product.
_TECHNICAL = re.compile(
    r"instal|update|crash|version|software|logiciel|api|database|server|config|deploy|migr|compare|connect"
    r"|integration|python|code|script|library|framework"
)


@dataclass(frozen=True)
class NonNames:
    """Word lists (lower case) that a capitalised word is checked against before it is reported as a person."""

    places: frozenset[str]
    products: frozenset[str]
    eponyms: frozenset[str]

    @classmethod
    def load(cls, path: Path = NON_NAMES_PATH) -> NonNames:
        try:
            payload = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
        except (OSError, ValueError, EOFError) as error:
            raise PiiModelError(f"cannot read the non-name lists at {path}: {error}") from error
        if payload.get("format") != NON_NAMES_FORMAT:
            raise PiiModelError(f"{path} has format {payload.get('format')!r}; this code reads {NON_NAMES_FORMAT}")
        return cls(frozenset(payload["places"]), frozenset(payload["products"]), frozenset(payload["eponyms"]))

    def overrules(
        self, text: str, finding: PiiFinding, gazetteer: Gazetteer, other_pii: bool, prompt: Prompt | None = None
    ) -> bool:
        """Whether the name model's PERSON ``finding`` in ``text`` is no person.

        ``other_pii``: the prompt holds another kind of personal detail, which lifts every rule that depends on
        the reading of the prompt (places, products, example names); function words and eponyms always hold.
        ``prompt``: ``Prompt(text)``, shared by the calls of one scan so that what is read from the whole text
        (the lower-cased copy, the language) is worked out once.
        """
        words = _words(finding.text)
        if all(len(w) == 1 or w in FUNCTION_WORDS for w in words) and not _initial(text, finding.end, gazetteer):
            return True
        prompt = Prompt(text) if prompt is None else prompt
        lower = prompt.lower
        if _is_eponym(lower, finding.start, finding.end, words):
            return True
        if len(words) == 1 and _DOCUMENT_WORD.fullmatch(words[0]):
            return True  # "Reisepass: 33VT15715": the document's name, capitalised before its number
        if other_pii or _titled(lower, finding.start):
            return False
        lone = _lone_word(text, finding)
        if lone is not None and is_lone_non_name(prompt, *lone, gazetteer):
            return True
        key = " ".join(words)
        if key in _PLACEHOLDER_NAMES:
            return True
        if (key in _CAST_SPANS or all(w in _CAST for w in words)) and _teaching(lower):
            return True
        first_name = key in gazetteer.first_names
        if key in self.places and (not first_name or self._placed(lower, finding.start, finding.end)):
            return True
        if key in self.eponyms and not first_name:
            return True  # "Euler", "Gauss", "Bayes" alone: the scientist, not a client
        return key in self.products and (not first_name or _TECHNICAL.search(lower) is not None)

    def _placed(self, lower: str, start: int, end: int) -> bool:
        # A place that is also a first name is a place after "in"/"à"/"nach", or next to another place ("from
        # Osaka to Florence", "Florence or Venice").
        before = _WORD.findall(lower, max(0, start - 40), start)[-2:]
        after = _WORD.findall(lower, end, end + 40)[:2]
        if before and before[-1] in _LOCATIVES:
            return True
        if len(before) == 2 and before[1] in _CONNECTORS and before[0] in self.places:
            return True
        return len(after) == 2 and after[0] in _CONNECTORS and after[1] in self.places


_WORD = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*|[,/–-]")


def _words(span: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*", span)]


def _is_eponym(lower: str, start: int, end: int, words: list[str]) -> bool:
    last = words[-1] if words else ""
    if "-" in last and re.fullmatch(_EPONYM_NOUNS, last.rsplit("-", 1)[1]):
        return True  # "Bayes-Theorem", one token
    if _EPONYM_AFTER.match(lower, end) is not None:
        return True
    return _EPONYM_BEFORE.search(lower, max(0, start - 40), start) is not None


def _titled(lower: str, start: int) -> bool:
    before = _WORD.findall(lower, max(0, start - 12), start)
    return bool(before) and before[-1] in TITLES


def _teaching(lower: str) -> bool:
    return _TEACHING.search(lower) is not None or ("alice" in lower and "bob" in lower)


def _initial(text: str, end: int, gazetteer: Gazetteer) -> bool:
    # "J." of "Rafał J. Kloch": a letter with its full stop is an initial, kept for the name around it; but only
    # when a capitalised word follows that is a known name or no common word ("z. B. ein Beispiel", "Abschnitt K.
    # Dort steht ..." hold no initial).
    if not text.startswith(".", end):
        return False
    after = _WORD.match(text[end + 1 : end + 40].lstrip(" \t"))
    if after is None or not after.group()[0].isupper():
        return False
    word = after.group().lower()
    return word in gazetteer.last_names or word in gazetteer.first_names or word not in gazetteer.common_words


def _lone_word(text: str, finding: PiiFinding) -> tuple[int, int] | None:
    """The span of the one word a finding comes down to once a leading article or pronoun is set aside ("Die
    Stadtbibliothek" -> "Stadtbibliothek"), or None when it holds more than one word."""
    spans = [(finding.start + m.start(), finding.start + m.end()) for m in _NAME_WORD.finditer(finding.text)]
    while len(spans) > 1 and text[spans[0][0] : spans[0][1]].lower() in FUNCTION_WORDS:
        spans.pop(0)
    return spans[0] if len(spans) == 1 else None


_NAME_WORD = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*")
