"""Rules for a lone capitalised word that the name model took for a person: a single word with no title, no
greeting or introduction before it and no other personal detail in the prompt, which is far more often a
capitalised noun, a month, a sentence opener or a brand than someone's name.

Each rule uses evidence a reader can check: the word's place (a sentence or line start, after an article or a
place preposition), the prompt's language (German capitalises every noun), the name gazetteers (a known first
name keeps most rules off) and the common-word list the name model already ships. Names in full ("Anna
Schmidt"), names after a title or a greeting, and any name in a prompt with other PII are never touched here.
"""

from __future__ import annotations

import re

from inference.pii.context import lowered
from inference.pii.names import NAME_PARTICLES, Gazetteer

# Months, weekdays and holidays of en/de/fr/es/it/nl/pt: "im August", "Lundi", "Noël" are dates, not people,
# when they stand alone (several are first names too: "April", "June", "August", "Noël", "Pascal" is not here).
CALENDAR_WORDS = frozenset(
    "january february march april may june july august september october november december"
    " monday tuesday wednesday thursday friday saturday sunday"
    " januar jänner februar märz april mai juni juli august september oktober november dezember"
    " montag dienstag mittwoch donnerstag freitag samstag sonnabend sonntag"
    " janvier février mars avril mai juin juillet août septembre octobre novembre décembre"
    " lundi mardi mercredi jeudi vendredi samedi dimanche"
    " enero febrero marzo abril mayo junio julio agosto septiembre setiembre octubre noviembre diciembre"
    " lunes martes miércoles jueves viernes sábado domingo"
    " gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre novembre dicembre"
    " lunedì martedì mercoledì giovedì venerdì sabato domenica"
    " januari februari maart april mei juni juli augustus september oktober november december"
    " maandag dinsdag woensdag donderdag vrijdag zaterdag zondag"
    " janeiro fevereiro março abril maio junho julho agosto setembro outubro novembro dezembro"
    " segunda terça quarta quinta sexta"
    " christmas easter whitsun pentecost thanksgiving halloween hanukkah ramadan diwali"
    " weihnachten ostern pfingsten silvester fasching karneval advent noël pâques toussaint"
    " navidad nochebuena pascua natale pasqua ferragosto befana kerstmis pasen pinksteren carnaval".split()
)
# Words that are almost never a name on their own in these languages, by the language's grammar: articles and
# determiners before a capitalised word make it a noun ("die Stadtbibliothek", "la Ruzafa", "the Water").
_ARTICLES = frozenset(
    "the a an this that der die das den dem des ein eine einen einem einer eines le la les un une el los las"
    " il lo gli uno het een de o os as um uma".split()
)
# Articles that are no object pronouns (Romance "la", "le", "lo" are: "Maria la llamó"), for the word after.
_DETERMINERS = frozenset("the der die das den dem des ein eine het een un une una uno el los las il gli".split())
# Prepositions of place: a capitalised word right after one that no gazetteer knows is a place ("in Ruzafa").
# Not those that also put a person ("at Jukka's desk", "bei Jukka", Spanish "llama a Jukka", "da Mario", "naar").
_LOCATIVES = frozenset("in near nach aus im à au aux en desde hacia cerca verso uit".split())
# Words before a name that make it a name whatever the word: greetings, introductions, sign-offs, addressing.
_PERSON_CUES = frozenset(
    "dear hi hello hey thanks thank regards cheers signed named called name liebe lieber hallo servus moin"
    " grüße gruß heiße heisse cher chère bonjour salut merci appelle hola querido querida estimado estimada"
    " gracias llamo caro cara ciao gentile grazie chiamo beste hoi dank heet olá prezado prezada obrigado"
    " chamo cc from von".split()
)
# Greetings and thanks that open a message on their own ("Cześć! Jak się masz?", "Olá! Sugere-me ..."): the
# model reads a capitalised word before "!" as an addressed name. One that is also a first name ("Ola", "Dag")
# stays a name (see is_lone_non_name).
GREETINGS = frozenset(
    "hello hi hey hiya howdy hallo servus moin grüezi grüß tschüss bonjour bonsoir salut coucou hola buenas buenos"
    " ciao buongiorno buonasera salve hoi goedemorgen goedemiddag goedenavond olá oi bom boa cześć witaj witam"
    " siema dzień ahoj hej hei hallå merhaba selam danke merci gracias grazie obrigado obrigada bedankt dziękuję"
    " dzięki tack".split()
)
_GERMAN_DETERMINERS = frozenset(
    "der die das den dem des ein eine einen einem einer eines kein keine keinen keinem keiner mein meine meinen"
    " meinem meiner dein deine deinen deinem deiner sein seine seinen seinem seiner ihr ihre ihren ihrem ihrer"
    " unser unsere unseren unserem unserer euer eure euren eurem eurer diese dieser dieses diesen diesem jede"
    " jeder jedes jeden jedem welche welcher welches alle beide viele einige mehrere manche im am zum zur vom"
    " beim ins ans aufs".split()
)
_GERMAN_NOUN_SUFFIXES = ("ung", "ungen", "heit", "keit", "schaft", "tion", "tät", "ismus", "tum", "nisse")
# Longer than almost every given name or surname ("Maximilian", "Friederike"), shorter than most compounds.
_GERMAN_COMPOUND_LENGTH = 13
# Capitalised words that open place names (and saints' names, which are no one's personal data either).
_PLACE_PREFIXES = frozenset("north south east west new port fort mount lake bad sankt saint st san santa são".split())
# Markers of German and English text: frequent words that the other language (and Dutch) does not use.
_GERMAN_MARKERS = frozenset(
    "der die das und ist nicht ich mit auf für von sie ein eine zu dem sich auch wir bitte kannst können wie"
    " noch bei über oder aber wenn wird werden sind haben hat mein meine unsere einen einem einer im zum zur"
    " vom beim ob dass weil kein keine schon sehr gibt".split()
)
_ENGLISH_MARKERS = frozenset(
    "the and is are was were of to in for with on that this it you we they be have has not can could would"
    " should please what how why which from at by".split()
)
# Words that open a line as a label ("Edit: ...", "Frage: ...") and are no speaker's name there.
_LABELS = frozenset(
    "edit update note nb ps answer question summary context task goal problem solution example input output"
    " result error warning hint tip step todo fix bug issue status subject re fwd betreff hinweis anmerkung"
    " frage antwort aufgabe beispiel ergebnis fehler remarque réponse exemple résumé nota pregunta respuesta"
    " ejemplo resumen domanda risposta esempio riassunto vraag antwoord voorbeeld opmerking".split()
)
# How far back the position checks look: a word and its spaces.
_LOOK_BACK = 80
_SENTENCE_END = frozenset('.!?:;"“”«»()[]-–—•*#>|')
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


class Prompt:
    """A prompt as these rules read it: the text, its lower-cased copy and whether it is German, each worked out
    once per scan and only when a rule asks (a prompt may hold many name guesses)."""

    __slots__ = ("_german", "_lower", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._lower: str | None = None
        self._german: bool | None = None

    @property
    def lower(self) -> str:
        if self._lower is None:
            self._lower = lowered(self.text)
        return self._lower

    @property
    def german(self) -> bool:
        if self._german is None:
            words = _WORD.findall(self.lower)
            german = sum(1 for w in words if w in _GERMAN_MARKERS)
            english = sum(1 for w in words if w in _ENGLISH_MARKERS)
            self._german = german >= 2 and german > english
        return self._german


def is_lone_non_name(prompt: Prompt, start: int, end: int, gazetteer: Gazetteer) -> bool:
    """Whether the one-word PERSON guess ``prompt.text[start:end]`` is no person by one of this module's rules.

    The caller has checked that the prompt holds no other PII and that no title stands before the word.
    """
    text, lower = prompt.text, prompt.lower
    word = text[start:end]
    key = word.lower()
    before = _WORD.findall(lower, max(0, start - 30), start)[-2:]
    if before and before[-1] in _PERSON_CUES:
        return False  # "Dear Zeynep", "Hallo Mitra", "thanks Oskar", "from Aino"
    if key in CALENDAR_WORDS:
        return True
    if key in GREETINGS and key not in gazetteer.first_names:
        return True  # "Cześć!", "Olá!": the message's greeting, not whom it greets
    if (
        before
        and before[-1] in _PLACE_PREFIXES
        and _adjacent(text, start, before[-1])
        and _capitalised_before(text, start)
    ):
        return True  # "East Jessica", "Port Samuel", "Bad Kreuznach", "San Lorenzo": a place, or a saint
    if len(word) > 1 and word[-1].isupper():
        return True  # "SaaS", "GmbH", "PhD": a name never ends in a capital after lower-case letters
    if key in _LABELS and text.startswith(":", end) and _sentence_start(text, start):
        return True  # "Edit: fixed the typo"
    first_name = key in gazetteer.first_names
    if _sentence_start(text, start) and key in gazetteer.common_words and _next_word(lower, end) in _DETERMINERS:
        return True  # "Water the plants", "Durante una reunión": a name is followed by a verb, not an article
    if first_name:
        return False  # the remaining rules only judge words that no first-name list knows
    known = key in gazetteer.last_names
    if before and before[-1] in _ARTICLES and _adjacent(text, start, before[-1]) and not _after_name(text, start):
        return True  # "die Stadtbibliothek", "la Ruzafa", "the Water": an article makes it a noun
    if before and before[-1] in _LOCATIVES and not known and _adjacent(text, start, before[-1]):
        return True  # "in Ruzafa": an unknown word after a place preposition is a place
    if _german_noun(key, before) and prompt.german:
        return True
    return _sentence_start(text, start) and key in gazetteer.common_words


def _capitalised_before(text: str, start: int) -> bool:
    words = _WORD.findall(text, max(0, start - 20), start)
    return bool(words) and words[-1][:1].isupper()


def _german_noun(key: str, before: list[str]) -> bool:
    # German capitalises every noun, so in a German prompt a capitalised word needs more than its capital to be a
    # name. A noun shows itself by a determiner before it, perhaps with an adjective between ("die neue Spalte",
    # "unsere Mitgliieder"), by a noun suffix ("Abrechnung", "Mannschaft"), or by the length of a compound
    # ("Musterausweisen"); a name stands bare ("Kannst du Jukka fragen", "mit Mirela").
    if before and before[-1] in _GERMAN_DETERMINERS:
        return True
    if len(before) == 2 and before[0] in _GERMAN_DETERMINERS and before[1].endswith(("e", "en", "er", "es", "em")):
        return True
    return len(key) >= _GERMAN_COMPOUND_LENGTH or key.endswith(_GERMAN_NOUN_SUFFIXES)


def _adjacent(text: str, start: int, previous: str) -> bool:
    # The previous word ends right before this one, separated by spaces only (not across a full stop).
    window = text[max(0, start - _LOOK_BACK) : start]
    head = window.rstrip(" \t")
    return head.lower().endswith(previous) and len(window) > len(head)


def _after_name(text: str, start: int) -> bool:
    # "Dean der Kijnder", "Maria de la Cruz": the "article" is a particle inside a name when a capitalised word
    # stands before it, past any other particles ("Prof. van der Brink").
    words = _WORD.findall(text, max(0, start - 60), start)[:-1]
    while words and words[-1] in NAME_PARTICLES:
        words.pop()
    return bool(words) and words[-1][:1].isupper()


def _next_word(lower: str, end: int) -> str:
    match = _WORD.match(lower, end + 1) if lower.startswith(" ", end) else None
    return match.group() if match else ""


def _sentence_start(text: str, start: int) -> bool:
    head = text[max(0, start - _LOOK_BACK) : start].rstrip(" \t")
    if not head or head.endswith(("\n", "\r")):
        return True  # the text's or a line's start (or a long run of spaces, read as one)
    return head[-1] in _SENTENCE_END
