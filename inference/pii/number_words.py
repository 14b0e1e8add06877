"""Number words of en/fr/de/es/it/nl/pt and how adjacent ones combine into one number (``normalise`` uses it).

A ``NumberWords`` maps each lower-case word (no spaces or hyphens) to its value: digits ("sechs", "zéro"),
whole numbers written as one word ("einundzwanzig", "ventotto", "eenentwintig", "veintidós",
"dreihundertfünfundvierzig", up to 999), and the parts that spaced and hyphenated numbers are built from
("vingt", "trente", "cent"). ``combine`` says when two neighbouring values are one number ("vingt et un",
"quatre-vingt-quinze", "treinta y cuatro", "cento e vinte") rather than two numbers read one after the other
("sechs null"). Built once by ``number_words()``, on first use.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Words that join a tens word and its unit ("vingt et un", "treinta y uno", "vinte e um", "hundred and
# five"); "und"/"en" join a unit to the tens word after it ("ein und zwanzig").
TENS_THEN_UNIT_JOINERS = frozenset({"and", "et", "y", "e"})
UNIT_THEN_TENS_JOINERS = frozenset({"und", "en"})
# "plus vier neun ..." -> "+49..."; "double five" -> "55".
PLUS_WORDS = frozenset({"plus", "más", "mas", "più", "piu", "mais"})
REPEAT_WORDS = {
    "double": 2,
    "doppel": 2,
    "doppio": 2,
    "doppia": 2,
    "doble": 2,
    "dubbel": 2,
    "duplo": 2,
    "triple": 3,
    "treble": 3,
    "tripel": 3,
    "triplo": 3,
}
_FRENCH_TWENTY = frozenset({"vingt", "vingts"})  # "quatre-vingt(s)" is 4 x 20
_ENGLISH_TENS = frozenset("twenty thirty forty fifty sixty seventy eighty ninety".split())
_HUNDRED_WORDS = frozenset({"hundred", "cent", "cents", "hundert", "honderd", "cien", "cento", "cem"})

_UNITS = {
    "en": "zero one two three four five six seven eight nine",
    "fr": "zéro un deux trois quatre cinq six sept huit neuf",
    "de": "null eins zwei drei vier fünf sechs sieben acht neun",
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve",
    "it": "zero uno due tre quattro cinque sei sette otto nove",
    "nl": "nul één twee drie vier vijf zes zeven acht negen",
    "pt": "zero um dois três quatro cinco seis sete oito nove",
}
_TEENS = {
    "en": "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen",
    "fr": "dix onze douze treize quatorze quinze seize dix-sept dix-huit dix-neuf",
    "de": "zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn",
    "es": "diez once doce trece catorce quince dieciséis diecisiete dieciocho diecinueve",
    "it": "dieci undici dodici tredici quattordici quindici sedici diciassette diciotto diciannove",
    "nl": "tien elf twaalf dertien veertien vijftien zestien zeventien achttien negentien",
    "pt": "dez onze doze treze catorze quinze dezesseis dezessete dezoito dezenove",
}
_TENS = {  # 20, 30, ..., 90
    "en": "twenty thirty forty fifty sixty seventy eighty ninety",
    "fr": "vingt trente quarante cinquante soixante septante huitante nonante",
    "de": "zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig",
    "es": "veinte treinta cuarenta cincuenta sesenta setenta ochenta noventa",
    "it": "venti trenta quaranta cinquanta sessanta settanta ottanta novanta",
    "nl": "twintig dertig veertig vijftig zestig zeventig tachtig negentig",
    "pt": "vinte trinta quarenta cinquenta sessenta setenta oitenta noventa",
}
_EXTRA = {  # spelling variants and regional words, value by word
    "oh": 0, "zwo": 2, "une": 1, "una": 1, "uma": 1, "duas": 2, "meia": 6, "een": 1, "ein": 1,
    "quatorze": 14, "dezasseis": 16, "dezassete": 17, "dezanove": 19, "octante": 80, "dreissig": 30,
    "veintiún": 21, "veintiun": 21,
}  # fmt: skip
_SPANISH_HUNDREDS = (
    "ciento doscientos trescientos cuatrocientos quinientos seiscientos setecientos ochocientos novecientos"
)
_PORTUGUESE_HUNDREDS = "cento duzentos trezentos quatrocentos quinhentos seiscentos setecentos oitocentos novecentos"


@dataclass(frozen=True, slots=True)
class NumberWords:
    """Lower-case number words (accented and unaccented spellings) and their values."""

    values: dict[str, int]

    def combine(self, left: int, left_word: str, word: str, joiner: str | None) -> int | None:
        """The value of ``left`` (a number built so far, last word ``left_word``) followed by ``word``
        (after ``joiner``, a word such as "et", if any) when they are one number, else None."""
        right = self.values[word]
        if joiner in UNIT_THEN_TENS_JOINERS:  # "ein und zwanzig"
            return left + right if 1 <= left <= 9 and right % 10 == 0 and 20 <= right <= 90 else None
        if word in _FRENCH_TWENTY and left % 100 == 4 and joiner is None:
            return left + 76  # quatre-vingt(s), "cent quatre-vingts"
        if word in _HUNDRED_WORDS and 1 <= left <= 9 and joiner is None:
            return left * 100  # "deux cents", "drei hundert"
        if left >= 100 and left % 100 == 0 and right < 100:
            return left + right  # "cent vingt", "cento e vinte", "hundred and five"
        tens = left % 100
        if joiner is not None and joiner not in TENS_THEN_UNIT_JOINERS:
            return None
        if tens >= 20 and tens % 10 == 0 and 1 <= right <= 9:
            return left + right  # "vingt et un", "treinta y cuatro", "twenty-one"
        if tens in (60, 80) and 10 <= right <= 19 and left_word not in _ENGLISH_TENS:
            return left + right  # "soixante-dix", "soixante et onze", "quatre-vingt-quinze"
        if tens == 10 and 7 <= right <= 9 and joiner is None and left_word == "dix":
            return left + right  # "dix-sept" written with a space
        return None


def _strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if not unicodedata.combining(c))


def _german(n: int) -> str:
    """One word for 0 <= n <= 999 ("dreihundertfünfundvierzig"); 1 alone is "eins", inside a number "ein"."""
    units, teens, tens = _UNITS["de"].split(), _TEENS["de"].split(), _TENS["de"].split()
    hundreds, rest = divmod(n, 100)
    head = "" if not hundreds else ("" if hundreds == 1 else units[hundreds]) + "hundert"
    if rest == 0:
        return head or "null"
    if rest < 10:
        return head + units[rest]
    if rest < 20:
        return head + teens[rest - 10]
    ten, unit = divmod(rest, 10)
    if not unit:
        return head + tens[ten - 2]
    return head + ("ein" if unit == 1 else units[unit]) + "und" + tens[ten - 2]


def _dutch(n: int) -> str:
    """One word for 0 <= n <= 999 ("tweeëntwintig", "honderdzesenveertig")."""
    units, teens, tens = _UNITS["nl"].split(), _TEENS["nl"].split(), _TENS["nl"].split()
    units[1] = "een"
    hundreds, rest = divmod(n, 100)
    head = "" if not hundreds else ("" if hundreds == 1 else units[hundreds]) + "honderd"
    if rest == 0:
        return head or "nul"
    if rest < 10:
        return head + units[rest]
    if rest < 20:
        return head + teens[rest - 10]
    ten, unit = divmod(rest, 10)
    if not unit:
        return head + tens[ten - 2]
    joiner = "ën" if units[unit].endswith("e") else "en"  # twee-ën-twintig
    return head + units[unit] + joiner + tens[ten - 2]


def _italian(n: int) -> str:
    """One word for 0 <= n <= 999 ("ventotto", "centoventitré"): a tens word drops its vowel before uno/otto."""
    units, teens, tens = _UNITS["it"].split(), _TEENS["it"].split(), _TENS["it"].split()
    hundreds, rest = divmod(n, 100)
    head = "" if not hundreds else ("" if hundreds == 1 else units[hundreds]) + "cento"
    if rest == 0:
        return head or "zero"
    if rest < 10:
        return head + units[rest]
    if rest < 20:
        return head + teens[rest - 10]
    ten, unit = divmod(rest, 10)
    word = tens[ten - 2]
    if not unit:
        return head + word
    if unit in (1, 8):
        return head + word[:-1] + units[unit]
    return head + word + ("tré" if unit == 3 else units[unit])


def _spanish_twenties() -> dict[str, int]:
    units = _UNITS["es"].split()
    spelled = {1: "uno", 2: "dós", 3: "trés", 6: "séis"}
    return {"veinti" + spelled.get(u, units[u]): 20 + u for u in range(1, 10)}


@lru_cache(maxsize=1)
def number_words() -> NumberWords:
    """The lexicon, built on first use (a few thousand words)."""
    values: dict[str, int] = {}
    for language in _UNITS:
        for value, word in enumerate(_UNITS[language].split()):
            values[word] = value
        for value, word in enumerate(_TEENS[language].split(), start=10):
            if "-" not in word:  # French "dix-sept" is "dix" + "sept", combined by ``combine``
                values[word] = value
        for value, word in enumerate(_TENS[language].split(), start=2):
            values[word] = value * 10
    for n in range(1000):
        values[_german(n)] = n
        values[_dutch(n)] = n
        values[_italian(n)] = n
        if 100 <= n < 200:
            values["ein" + _german(n)] = n  # "einhundertsechzig" as well as "hundertsechzig"
        if n % 100 == 1 and n > 1:
            values[_dutch(n)[:-3] + "één"] = n  # "honderdéén"
        if n % 100 == 3 and n > 100:
            values[_italian(n)[:-3] + "tré"] = n  # "centotré"
    values[_german(1)] = 1  # "eins" (the table's own spelling)
    values.update({w.replace("zwei", "zwo"): n for w, n in values.items() if "zwei" in w})
    values.update({w.replace("cento", "cent", 1): n for w, n in values.items() if "centoo" in w})  # centotto
    values.update(_spanish_twenties())
    for value, word in enumerate(_SPANISH_HUNDREDS.split(), start=1):
        values[word] = value * 100
        values[word.replace("ientos", "ientas")] = value * 100
    for value, word in enumerate(_PORTUGUESE_HUNDREDS.split(), start=1):
        values[word] = value * 100
        values[word.replace("entos", "entas")] = value * 100
    values.update({"hundred": 100, "cent": 100, "cents": 100, "cien": 100, "cem": 100, "vingts": 20})
    values.update(_EXTRA)
    values.update({_strip_accents(w): n for w, n in list(values.items())})
    values.update({w.replace("ü", "ue").replace("ß", "ss"): n for w, n in list(values.items()) if "ü" in w or "ß" in w})
    return NumberWords(values)
