#!/usr/bin/env python3
"""Build the Tandem router evaluation set (tandem-router-eval.jsonl).

Reproducible: standard library only, no network, every random choice comes from
``random.Random`` seeded with SEED and the item's position. Running it twice gives a
byte-identical file.

    python inference/assets/router_eval/build.py            # writes the .jsonl
    python inference/assets/router_eval/build.py --stats    # also prints the README tables

Prompts are written by hand below. Personal data is never written literally: a prompt
holds placeholders such as ``⟦email⟧`` or ``⟦name#a⟧`` (same slot = same person) and
the Filler replaces them with synthetic values that pass the real checksums (Luhn for
cards, ISO 13616 mod-97 for IBANs, the official check digits of each national id).
Every inserted value is recorded in ``pii_values`` so detectors can be scored per kind.
"""

from __future__ import annotations

import base64
import json
import random
import re
import string
import sys
import unicodedata
from collections import Counter
from pathlib import Path

SEED = 20250611
HERE = Path(__file__).resolve().parent
OUT = HERE / "tandem-router-eval.jsonl"


# --------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------
def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def luhn_complete(payload: str) -> str:
    for c in "0123456789":
        if luhn_valid(payload + c):
            return payload + c
    raise AssertionError


def _iban_int(s: str) -> int:
    return int("".join(str(int(c, 36)) for c in s))


def iban_make(cc: str, bban: str) -> str:
    check = 98 - _iban_int(bban + cc + "00") % 97
    return f"{cc}{check:02d}{bban}"


def iban_valid(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    return _iban_int(s[4:] + s[:4]) % 97 == 1


def icao_check(s: str) -> str:
    """ICAO 9303 check digit (weights 7,3,1); also used by German id/passport numbers."""
    total = 0
    for i, ch in enumerate(s):
        v = 0 if ch == "<" else int(ch, 36)
        total += v * (7, 3, 1)[i % 3]
    return str(total % 10)


def de_taxid_check(first10: str) -> str:
    product = 10
    for ch in first10:
        s = (int(ch) + product) % 10
        if s == 0:
            s = 10
        product = (s * 2) % 11
    c = 11 - product
    return "0" if c == 10 else str(c)


def es_dni_letter(n: int) -> str:
    return "TRWAGMYFPDXBNJZSQVHLCKE"[n % 23]


def es_ccc_digit(ten: str) -> str:
    w = [1, 2, 4, 8, 5, 10, 9, 7, 3, 6]
    d = 11 - sum(int(a) * b for a, b in zip(ten, w, strict=True)) % 11
    return {11: "0", 10: "1"}.get(d, str(d))


def fr_rib_key(bank: str, branch: str, account: str) -> str:
    return f"{97 - (89 * int(bank) + 15 * int(branch) + 3 * int(account)) % 97:02d}"


def pl_sort_code_check(seven: str) -> str:
    """Check digit of a Polish bank settlement number (weights 3,9,7,1,3,9,7)."""
    total = sum(int(c) * w for c, w in zip(seven, (3, 9, 7, 1, 3, 9, 7), strict=True))
    return str((10 - total % 10) % 10)


def pl_pesel_check(ten: str) -> str:
    total = sum(int(c) * w for c, w in zip(ten, (1, 3, 7, 9, 1, 3, 7, 9, 1, 3), strict=True))
    return str((10 - total % 10) % 10)


def kvnr_check(letter: str, eight: str) -> str:
    digits = f"{ord(letter) - 64:02d}" + eight
    total = 0
    for i, ch in enumerate(digits):
        p = int(ch) * (1 if i % 2 == 0 else 2)
        total += p // 10 + p % 10
    return str(total % 10)


# --------------------------------------------------------------------------------------
# synthetic people and values
# --------------------------------------------------------------------------------------
# lang -> (female first names, male first names, family names)
NAMES = {
    "en": (
        ["Emily", "Olivia", "Hannah", "Sophie", "Chloe", "Grace", "Megan", "Rachel", "Priya", "Aisha", "Bethany"],
        ["James", "Daniel", "Michael", "Ryan", "Ethan", "Nathan", "Tyler", "Connor", "Marcus", "Liam", "Owen"],
        [
            "Whitfield",
            "Carter",
            "Hughes",
            "Donnelly",
            "Patel",
            "Brennan",
            "Okafor",
            "Lindqvist",
            "Reyes",
            "Thornton",
            "Kowalczyk",
            "McAllister",
            "Sutherland",
            "Fairbanks",
            "Ashworth",
            "Delgado",
            "Pemberton",
            "Hollis",
            "Garrity",
            "Marsh",
            "Oyelaran",
        ],
    ),
    "de": (
        ["Lena", "Sabine", "Katrin", "Anja", "Ute", "Miriam", "Birgit", "Carola"],
        ["Jonas", "Tobias", "Matthias", "Florian", "Sebastian", "Lukas", "Henrik", "Jürgen"],
        [
            "Hoffmann",
            "Brandstätter",
            "Kessler",
            "Lindemann",
            "Vogt",
            "Reinholz",
            "Scheufele",
            "Dietrich",
            "Kühnel",
            "Osterkamp",
            "Pfeiffer",
            "Albrecht",
            "Hartung",
            "Seidlitz",
            "Rademacher",
            "Özdemir",
        ],
    ),
    "fr": (
        ["Camille", "Élodie", "Céline", "Margaux", "Aurélie", "Sandrine"],
        ["Julien", "Mathieu", "Antoine", "Nicolas", "Thibault", "Guillaume"],
        [
            "Lefèvre",
            "Moreau",
            "Garnier",
            "Fontaine",
            "Chevalier",
            "Marchand",
            "Perrin",
            "Lemaire",
            "Boucher",
            "Gauthier",
            "Roussel",
            "Benali",
        ],
    ),
    "es": (
        ["Lucía", "Carmen", "Marta", "Paula", "Elena", "Nuria"],
        ["Javier", "Alejandro", "Sergio", "Diego", "Álvaro", "Raúl"],
        [
            "García Morales",
            "Fernández Ruiz",
            "López Castillo",
            "Martín Vega",
            "Sánchez Ortega",
            "Navarro Gil",
            "Romero Prieto",
            "Domínguez Soler",
            "Herrera Campos",
            "Iglesias Mora",
        ],
    ),
    "it": (
        ["Giulia", "Chiara", "Francesca"],
        ["Marco", "Luca", "Davide"],
        ["Bianchi", "Ferraro", "Colombo", "Galli", "Moretti", "Conti"],
    ),
    "pt": (
        ["Inês", "Beatriz", "Mariana"],
        ["João", "Tiago", "Rui"],
        ["Carvalho", "Ferreira", "Sousa", "Pereira Lopes", "Almeida", "Rodrigues"],
    ),
    "nl": (
        ["Sanne", "Femke", "Lotte"],
        ["Daan", "Joost", "Bram"],
        ["de Vries", "Jansen", "van Dijk", "Bakker", "Visser", "Smit"],
    ),
    "ja": (["美咲", "由美", "彩"], ["健太", "翔", "大輔"], ["佐藤", "鈴木", "高橋", "田中", "渡辺", "伊藤"]),
    # added with the 2026-12-02 extension; the family names are the same for women and men
    "pl": (
        ["Agnieszka", "Katarzyna", "Magdalena", "Joanna"],
        ["Tomasz", "Paweł", "Krzysztof", "Marcin"],
        ["Nowak", "Wójcik", "Kaczmarek", "Mazur", "Krawczyk", "Zając", "Wróbel", "Pawlak"],
    ),
}
EMAIL_DOMAINS = {
    "en": ["gmail.com", "outlook.com", "yahoo.com", "icloud.com", "hotmail.co.uk", "proton.me"],
    "de": ["gmx.de", "web.de", "t-online.de", "gmail.com", "posteo.de"],
    "fr": ["orange.fr", "free.fr", "gmail.com", "laposte.net", "sfr.fr"],
    "es": ["gmail.com", "hotmail.es", "yahoo.es", "telefonica.net"],
    "it": ["libero.it", "gmail.com", "virgilio.it"],
    "pt": ["sapo.pt", "gmail.com"],
    "nl": ["ziggo.nl", "kpnmail.nl", "gmail.com"],
    "ja": ["gmail.com", "yahoo.co.jp"],
    "pl": ["wp.pl", "onet.pl", "gmail.com", "interia.pl"],
}
JA_ROMAJI = {
    "美咲": "misaki",
    "健太": "kenta",
    "由美": "yumi",
    "翔": "sho",
    "彩": "aya",
    "大輔": "daisuke",
    "佐藤": "sato",
    "鈴木": "suzuki",
    "高橋": "takahashi",
    "田中": "tanaka",
    "渡辺": "watanabe",
    "伊藤": "ito",
}

ADDRESSES = {
    "us": (
        ["Maple Avenue", "Oak Ridge Drive", "Lakeview Road", "Cedar Street", "Willow Creek Lane", "Hawthorne Court"],
        [
            ("Columbus", "OH", "432"),
            ("Portland", "OR", "972"),
            ("Austin", "TX", "787"),
            ("Raleigh", "NC", "276"),
            ("Denver", "CO", "802"),
        ],
    ),
    "uk": (
        ["Albert Road", "Victoria Street", "Mill Lane", "Station Road", "Church Close", "Beech Grove"],
        [("Leeds", "LS6"), ("Bristol", "BS7"), ("Manchester", "M20"), ("Norwich", "NR2"), ("Edinburgh", "EH10")],
    ),
    "de": (
        ["Lindenstraße", "Gartenweg", "Schillerstraße", "Am Mühlbach", "Bahnhofstraße", "Kastanienallee"],
        [("Berlin", "104"), ("München", "803"), ("Köln", "509"), ("Leipzig", "041"), ("Freiburg im Breisgau", "791")],
    ),
    "fr": (
        ["rue des Lilas", "avenue Jean-Jaurès", "boulevard Voltaire", "impasse des Tilleuls", "rue de la République"],
        [("Lyon", "6900"), ("Nantes", "4400"), ("Toulouse", "3100"), ("Lille", "5900"), ("Paris", "750")],
    ),
    "es": (
        ["Calle de Alcalá", "Calle Mayor", "Avenida de la Constitución", "Calle del Carmen", "Paseo de Gracia"],
        [("Madrid", "280"), ("Sevilla", "410"), ("Valencia", "460"), ("Barcelona", "080"), ("Zaragoza", "500")],
    ),
}

DIGIT_WORDS = {
    "en": "zero one two three four five six seven eight nine".split(),
    "de": "null eins zwei drei vier fünf sechs sieben acht neun".split(),
}
_FR_UNITS = [
    "zéro",
    "un",
    "deux",
    "trois",
    "quatre",
    "cinq",
    "six",
    "sept",
    "huit",
    "neuf",
    "dix",
    "onze",
    "douze",
    "treize",
    "quatorze",
    "quinze",
    "seize",
    "dix-sept",
    "dix-huit",
    "dix-neuf",
]
_FR_TENS = {20: "vingt", 30: "trente", 40: "quarante", 50: "cinquante", 60: "soixante"}


def fr_number(n: int) -> str:
    if n < 20:
        return _FR_UNITS[n]
    if n < 70:
        t, u = n // 10 * 10, n % 10
        return _FR_TENS[t] + ("" if u == 0 else " et un" if u == 1 else "-" + _FR_UNITS[u])
    if n < 80:
        return "soixante et onze" if n == 71 else "soixante-" + _FR_UNITS[n - 60]
    return "quatre-vingts" if n == 80 else "quatre-vingt-" + _FR_UNITS[n - 80]


def ascii_fold(s: str) -> str:
    s = s.replace("ß", "ss").replace("ä", "ae").replace("ö", "oe").replace("ü", "ue")
    s = s.replace("Ä", "Ae").replace("Ö", "Oe").replace("Ü", "Ue")
    return unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode()


ALNUM = string.ascii_letters + string.digits
B32 = string.ascii_uppercase + "234567"
PUBLIC_FIRST_OCTETS = [
    31,
    37,
    46,
    62,
    77,
    79,
    81,
    84,
    85,
    88,
    91,
    93,
    95,
    109,
    145,
    151,
    176,
    178,
    185,
    188,
    193,
    194,
    212,
    213,
    217,
]


class Filler:
    """Replaces ⟦kind⟧ / ⟦kind#slot⟧ placeholders with synthetic values and records them."""

    PLACEHOLDER = re.compile(r"⟦([a-z0-9_]+)(?:#(\w+))?⟧")

    def __init__(self, rng: random.Random, lang: str):
        self.r = rng
        self.lang = lang if lang in NAMES else "en"
        self.people: dict[str, dict] = {}
        self.slots: dict[tuple, str] = {}
        self.values: list[dict] = []

    # -- bookkeeping ---------------------------------------------------------------
    def rec(self, kind: str, text: str, subtype: str | None = None, canonical: str | None = None):
        v = {"kind": kind, "text": text}
        if subtype:
            v["subtype"] = subtype
        if canonical is not None and canonical != text:
            v["canonical"] = canonical
        if v not in self.values:
            self.values.append(v)
        return text

    def digits(self, n: int) -> str:
        return "".join(self.r.choice("0123456789") for _ in range(n))

    # -- people ----------------------------------------------------------------------
    def person(self, slot: str | None, lang: str | None = None, gender: str | None = None) -> dict:
        if slot is not None and slot in self.people:
            return self.people[slot]
        lang = lang if lang in NAMES else self.lang
        female, male, lasts = NAMES[lang]
        gender = gender or self.r.choice("fm")
        firsts = female if gender == "f" else male
        used = {p["full"] for p in self.people.values()}
        while True:
            first, last = self.r.choice(firsts), self.r.choice(lasts)
            full = f"{last} {first}" if lang == "ja" else f"{first} {last}"
            if full not in used:
                break
        p = {"first": first, "last": last, "full": full, "lang": lang}
        if slot is not None:
            self.people[slot] = p
        else:
            self.people[f"_anon{len(self.people)}"] = p
        return p

    def name(self, slot=None, lang=None, gender=None) -> str:
        return self.rec("name", self.person(slot, lang, gender)["full"])

    def first(self, slot=None, lang=None, gender=None) -> str:
        return self.rec("name", self.person(slot, lang, gender)["first"], subtype="first_name")

    def _email_parts(self, slot=None, lang=None):
        if slot is not None and ("email", slot) in self.slots:
            return self.slots[("email", slot)]
        p = self.person(slot, lang)
        if p["lang"] == "ja":
            first, last = JA_ROMAJI[p["first"]], JA_ROMAJI[p["last"]]
        else:
            first = ascii_fold(p["first"]).lower().replace(" ", "")
            last = ascii_fold(p["last"]).lower().replace(" ", "")
        style = self.r.randrange(5)
        local = [
            f"{first}.{last}",
            f"{first}{last}",
            f"{first[0]}.{last}",
            f"{first}_{last}",
            f"{first}.{last}{self.r.randrange(70, 99)}",
        ][style]
        domain = self.r.choice(EMAIL_DOMAINS.get(p["lang"], EMAIL_DOMAINS["en"]))
        parts = (local, domain)
        if slot is not None:
            self.slots[("email", slot)] = parts
        return parts

    def email(self, slot=None, lang=None) -> str:
        local, domain = self._email_parts(slot, lang)
        return self.rec("email", f"{local}@{domain}")

    def email_spoken(self, slot=None, lang=None, words=("dot", "at")) -> str:
        local, domain = self._email_parts(slot, lang)
        dot, at = words
        spoken = f" {at} ".join([local.replace(".", f" {dot} "), domain.replace(".", f" {dot} ")])
        return self.rec("email", spoken, subtype="obfuscated", canonical=f"{local}@{domain}")

    def email_bracket(self, slot=None, lang=None) -> str:
        local, domain = self._email_parts(slot, lang)
        text = f"{local} [at] {domain.replace('.', ' [dot] ')}"
        return self.rec("email", text, subtype="obfuscated", canonical=f"{local}@{domain}")

    def dob(self, slot=None, style=None, age=None) -> str:
        key = ("dob", slot)
        years = {None: (1942, 2006), "old": (1930, 1952), "young": (1990, 2001), "child": (2018, 2023)}[age]
        if slot is not None and key in self.slots:
            y, m, d = self.slots[key]
        else:
            y, m, d = self.r.randint(*years), self.r.randint(1, 12), self.r.randint(1, 28)
            if slot is not None:
                self.slots[key] = (y, m, d)
        style = style or {
            "de": "de",
            "fr": "fr",
            "es": "fr",
            "it": "fr",
            "pt": "fr",
            "nl": "nl",
            "ja": "ja",
            "pl": "de",
        }.get(self.lang, self.r.choice(["en_long", "us"]))
        months = [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ]
        text = {
            "de": f"{d:02d}.{m:02d}.{y}",
            "fr": f"{d:02d}/{m:02d}/{y}",
            "nl": f"{d:02d}-{m:02d}-{y}",
            "ja": f"{y}年{m}月{d}日",
            "en_long": f"{d} {months[m - 1]} {y}",
            "us": f"{m:02d}/{d:02d}/{y}",
            "iso": f"{y}-{m:02d}-{d:02d}",
        }[style]
        return self.rec("dob", text, canonical=f"{y}-{m:02d}-{d:02d}")

    def address(self, cc: str) -> str:
        streets, places = ADDRESSES[cc]
        st = self.r.choice(streets)
        if cc == "us":
            city, state, z = self.r.choice(places)
            text = f"{self.r.randint(12, 4890)} {st}, {city}, {state} {z}{self.digits(2)}"
        elif cc == "uk":
            town, pc = self.r.choice(places)
            text = (
                f"{self.r.randint(2, 180)} {st}, {town} {pc} "
                f"{self.r.randint(1, 9)}{self.r.choice('ABDEFGHJLNPQRSTUWXY')}"
                f"{self.r.choice('ABDEFGHJLNPQRSTUWXY')}"
            )
        elif cc == "de":
            city, pre = self.r.choice(places)
            text = f"{st} {self.r.randint(1, 120)}, {pre}{self.digits(2)} {city}"
        elif cc == "fr":
            city, pre = self.r.choice(places)
            cp = pre + self.digits(5 - len(pre)) if city == "Paris" else pre + "0"
            text = f"{self.r.randint(1, 140)} {st}, {cp} {city}"
        else:
            city, pre = self.r.choice(places)
            text = (
                f"{st} {self.r.randint(1, 200)}, {self.r.randint(1, 8)}º "
                f"{self.r.choice('ABCD')}, {pre}{self.digits(2)} {city}"
            )
        return self.rec("address", text, subtype=cc)

    # -- phones ----------------------------------------------------------------------
    def _phone_raw(self, cc: str, slot=None) -> str:
        key = ("phone", cc, slot)
        if slot is not None and key in self.slots:
            return self.slots[key]
        r, dg = self.r, self.digits
        if cc == "us":
            area = r.choice(
                [
                    "206",
                    "212",
                    "303",
                    "312",
                    "404",
                    "415",
                    "503",
                    "512",
                    "614",
                    "617",
                    "646",
                    "702",
                    "713",
                    "720",
                    "773",
                    "801",
                    "919",
                    "971",
                ]
            )
            while True:
                exch = f"{r.randint(2, 9)}{dg(2)}"
                if exch != "555" and not exch.endswith("11"):
                    break
            raw = f"({area}) {exch}-{dg(4)}"
        elif cc == "uk":
            while True:
                raw = f"07{r.randint(4, 9)}{dg(2)} {dg(6)}"
                if not raw.startswith("07700 900"):
                    break
        elif cc == "de":
            raw = f"+49 1{r.choice(['51', '52', '57', '60', '62', '70', '72', '76'])} {dg(4)} {dg(4)}"
        elif cc == "fr":
            raw = f"0{r.choice('67')} " + " ".join(dg(2) for _ in range(4))
        elif cc == "es":
            raw = f"6{dg(2)} {dg(3)} {dg(3)}"
        elif cc == "it":
            raw = f"+39 3{r.choice(['20', '28', '33', '39', '47', '49'])} {dg(3)} {dg(4)}"
        elif cc == "pt":
            raw = f"+351 9{r.choice('1236')}{dg(1)} {dg(3)} {dg(3)}"
        elif cc == "nl":
            raw = f"06-{r.randint(1, 6)}{dg(7)}"
        elif cc == "jp":
            raw = f"0{r.choice('789')}0-{dg(4)}-{dg(4)}"
        elif cc == "pl":
            raw = f"+48 {r.choice('5678')}{dg(2)} {dg(3)} {dg(3)}"
        else:
            raise KeyError(cc)
        if slot is not None:
            self.slots[key] = raw
        return raw

    def phone(self, cc: str, slot=None) -> str:
        return self.rec("phone", self._phone_raw(cc, slot), subtype=cc)

    def phone_words(self, cc: str, lang: str, slot=None) -> str:
        raw = self._phone_raw(cc, slot)
        ds = re.sub(r"\D", "", raw)
        if lang == "fr":
            pairs = [ds[i : i + 2] for i in range(0, len(ds), 2)]
            words = [
                (" ".join(_FR_UNITS[int(c)] for c in p) if p.startswith("0") else fr_number(int(p))) for p in pairs
            ]
            text = ", ".join(words)
        else:
            w = DIGIT_WORDS[lang]
            groups = [g for g in re.split(r"[^\d]+", raw) if g]
            text = ", ".join(" ".join(w[int(c)] for c in g) for g in groups)
            if raw.startswith("+"):
                text = "plus " + text
        return self.rec("phone", text, subtype=f"{cc}/spelled_out", canonical=raw)

    def phone_spaced(self, cc: str, slot=None) -> str:
        raw = self._phone_raw(cc, slot)
        text = " ".join(c for c in raw if c not in " ")
        return self.rec("phone", text, subtype=f"{cc}/spaced", canonical=raw)

    # -- payment -----------------------------------------------------------------------
    def _card_raw(self, slot=None, brand=None) -> str:
        key = ("card", slot)
        if slot is not None and key in self.slots:
            return self.slots[key]
        brand = brand or self.r.choice(["visa", "visa", "mc", "mc", "amex"])
        while True:
            if brand == "visa":
                num = luhn_complete("4" + self.digits(14))
            elif brand == "mc":
                num = luhn_complete(str(self.r.randint(51, 55)) + self.digits(13))
            else:
                num = luhn_complete(self.r.choice(["34", "37"]) + self.digits(12))
            if len(set(num[1:])) > 4:  # avoid 4242.../4111... style test numbers
                break
        if slot is not None:
            self.slots[key] = num
        return num

    @staticmethod
    def group_card(num: str, sep=" ") -> str:
        if len(num) == 15:
            return sep.join([num[:4], num[4:10], num[10:]])
        return sep.join(num[i : i + 4] for i in range(0, len(num), 4))

    def card(self, slot=None, brand=None, sep=" ") -> str:
        num = self._card_raw(slot, brand)
        return self.rec("card", self.group_card(num, sep), canonical=num)

    def card_compact(self, slot=None) -> str:
        num = self._card_raw(slot)
        return self.rec("card", num)

    def card_oddgroups(self, slot=None, sep=" ") -> str:
        num = self._card_raw(slot)
        parts, i = [], 0
        while i < len(num):
            k = self.r.randint(2, 5)
            parts.append(num[i : i + k])
            i += k
        return self.rec("card", sep.join(parts), subtype="obfuscated", canonical=num)

    def card_parts(self, slot=None):
        num = self._card_raw(slot)
        g = self.group_card(num)
        cut = 9 if len(num) == 16 else 11
        a, b = g[:cut].strip(), g[cut:].strip()
        self.rec("card", a, subtype="split_part_1", canonical=num)
        self.rec("card", b, subtype="split_part_2", canonical=num)
        return a, b

    def _iban_raw(self, cc: str, slot=None) -> str:
        key = ("iban", cc, slot)
        if slot is not None and key in self.slots:
            return self.slots[key]
        r, dg = self.r, self.digits
        if cc == "DE":
            bban = f"{r.randint(1, 8)}{dg(7)}" + dg(10)
        elif cc == "FR":
            bank, branch, acct = dg(5), dg(5), dg(11)
            bban = bank + branch + acct + fr_rib_key(bank, branch, acct)
        elif cc == "ES":
            bank, branch, acct = dg(4), dg(4), dg(10)
            bban = bank + branch + es_ccc_digit("00" + bank + branch) + es_ccc_digit(acct) + acct
        elif cc == "GB":
            bban = r.choice(["NWBK", "BARC", "LOYD", "HBUK", "MIDL"]) + dg(6) + dg(8)
        elif cc == "NL":
            bban = r.choice(["ABNA", "INGB", "RABO", "SNSB"]) + dg(10)
        elif cc == "PL":
            sort7 = dg(7)
            bban = sort7 + pl_sort_code_check(sort7) + dg(16)
        else:
            raise KeyError(cc)
        iban = iban_make(cc, bban)
        if slot is not None:
            self.slots[key] = iban
        return iban

    def iban(self, cc: str, slot=None, style="grouped") -> str:
        iban = self._iban_raw(cc, slot)
        if style == "grouped":
            text = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
            return self.rec("iban", text, subtype=cc, canonical=iban)
        if style == "lower":
            return self.rec("iban", iban.lower(), subtype=f"{cc}/obfuscated", canonical=iban)
        if style == "lines":
            g = [iban[i : i + 4] for i in range(0, len(iban), 4)]
            text = "\n".join([" ".join(g[:2]), " ".join(g[2:4]), " ".join(g[4:])])
            return self.rec("iban", text, subtype=f"{cc}/split_lines", canonical=iban)
        raise KeyError(style)

    # -- national ids and passports -------------------------------------------------
    def _ssn_raw(self, slot=None) -> str:
        key = ("ssn", slot)
        if slot is not None and key in self.slots:
            return self.slots[key]
        while True:
            area = self.r.randint(1, 899)
            if area != 666:
                break
        raw = f"{area:03d}-{self.r.randint(1, 99):02d}-{self.r.randint(1, 9999):04d}"
        if slot is not None:
            self.slots[key] = raw
        return raw

    def ssn(self, slot=None) -> str:
        return self.rec("national_id", self._ssn_raw(slot), subtype="us_ssn")

    def ssn_lines(self) -> str:
        raw = self._ssn_raw()
        return self.rec("national_id", raw.replace("-", "\n"), subtype="us_ssn/split_lines", canonical=raw)

    def ssn_spaced(self) -> str:
        raw = self._ssn_raw()
        return self.rec("national_id", " ".join(raw), subtype="us_ssn/spaced", canonical=raw)

    def nino(self, compact=False) -> str:
        first_ok = [c for c in string.ascii_uppercase if c not in "DFIQUV"]
        second_ok = [c for c in string.ascii_uppercase if c not in "DFIQUVO"]
        while True:
            pre = self.r.choice(first_ok) + self.r.choice(second_ok)
            if pre not in {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}:
                break
        d = self.digits(6)
        suf = self.r.choice("ABCD")
        raw = f"{pre}{d}{suf}"
        text = raw if compact else f"{pre} {d[:2]} {d[2:4]} {d[4:]} {suf}"
        return self.rec("national_id", text, subtype="uk_nino", canonical=raw)

    def de_idcard(self) -> str:
        chars = "0123456789CFGHJKLMNPRTVWXYZ"
        num = self.r.choice("LMNPRTVWXY") + "".join(self.r.choice(chars) for _ in range(8))
        return self.rec("national_id", num + icao_check(num), subtype="de_personalausweis")

    def de_taxid(self) -> str:
        while True:
            pool = self.r.sample("0123456789", 9)
            ds = pool + [self.r.choice(pool)]
            self.r.shuffle(ds)
            if ds[0] != "0":
                break
        first10 = "".join(ds)
        raw = first10 + de_taxid_check(first10)
        text = f"{raw[:2]} {raw[2:5]} {raw[5:8]} {raw[8:]}"
        return self.rec("national_id", text, subtype="de_steuer_id", canonical=raw)

    def de_kvnr(self) -> str:
        letter = self.r.choice(string.ascii_uppercase)
        eight = self.digits(8)
        raw = letter + eight + kvnr_check(letter, eight)
        return self.rec("national_id", raw, subtype="de_kvnr")

    def fr_nir(self, style="spaced") -> str:
        sex = self.r.choice("12")
        yy, mm = self.digits(2), f"{self.r.randint(1, 12):02d}"
        dept = f"{self.r.choice([x for x in range(1, 96) if x != 20]):02d}"
        commune, order = f"{self.r.randint(1, 990):03d}", f"{self.r.randint(1, 999):03d}"
        body = sex + yy + mm + dept + commune + order
        key = f"{97 - int(body) % 97:02d}"
        raw = body + key
        sep = {"spaced": " ", "dotted": "."}[style]
        text = sep.join([sex, yy, mm, dept, commune, order, key])
        sub = "fr_nir" if style == "spaced" else "fr_nir/obfuscated"
        return self.rec("national_id", text, subtype=sub, canonical=raw)

    def es_dni(self) -> str:
        n = self.r.randint(10_000_000, 79_999_999)
        return self.rec("national_id", f"{n}{es_dni_letter(n)}", subtype="es_dni")

    def es_nie(self) -> str:
        p = self.r.choice("XYZ")
        n7 = self.digits(7)
        letter = es_dni_letter(int(str("XYZ".index(p)) + n7))
        return self.rec("national_id", f"{p}{n7}{letter}", subtype="es_nie")

    def nl_bsn(self) -> str:
        while True:
            d = [self.r.randint(0, 9) for _ in range(8)]
            if d[0] == 0:
                continue
            last = sum(x * w for x, w in zip(d, range(9, 1, -1), strict=True)) % 11
            if last <= 9:
                break
        return self.rec("national_id", "".join(map(str, d)) + str(last), subtype="nl_bsn")

    def pt_nif(self) -> str:
        d = [self.r.choice([1, 2])] + [self.r.randint(0, 9) for _ in range(7)]
        c = 11 - sum(x * w for x, w in zip(d, range(9, 1, -1), strict=True)) % 11
        c = 0 if c >= 10 else c
        return self.rec("national_id", "".join(map(str, d)) + str(c), subtype="pt_nif")

    def pl_pesel(self) -> str:
        """PESEL: birth date (month + 20 for 2000s), serial, sex digit, check digit."""
        y, m, d = self.r.randint(1950, 2005), self.r.randint(1, 12), self.r.randint(1, 28)
        mm = m + (20 if y >= 2000 else 0)
        ten = f"{y % 100:02d}{mm:02d}{d:02d}" + self.digits(4)
        return self.rec("national_id", ten + pl_pesel_check(ten), subtype="pl_pesel")

    def passport(self, cc: str) -> str:
        if cc == "us":  # 9 digits (older books) or letter + 8 digits (next generation)
            raw = (self.r.choice("AC") if self.r.random() < 0.5 else self.r.choice("56")) + self.digits(8)
        elif cc == "uk":
            raw = self.r.choice("15") + self.digits(8)
        elif cc == "de":
            chars = "0123456789CFGHJKLMNPRTVWXYZ"
            num = "C" + "".join(self.r.choice(chars) for _ in range(8))
            raw = num + icao_check(num)
        elif cc == "fr":
            raw = self.digits(2) + "".join(self.r.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2)) + self.digits(5)
        else:
            raise KeyError(cc)
        return self.rec("passport", raw, subtype=cc)

    def mrz(self, lang="de") -> tuple[str, str]:
        """TD3 passport MRZ (two lines, 44 chars) with all ICAO check digits."""
        p = self.person("mrz", lang)
        chars = "0123456789CFGHJKLMNPRTVWXYZ"
        num = "C" + "".join(self.r.choice(chars) for _ in range(8))
        y, m, d = self.r.randint(1955, 2004), self.r.randint(1, 12), self.r.randint(1, 28)
        dob = f"{y % 100:02d}{m:02d}{d:02d}"
        exp = f"{self.r.randint(27, 34):02d}{self.r.randint(1, 12):02d}{self.r.randint(1, 28):02d}"
        sex = self.r.choice("MF")
        surname = ascii_fold(p["last"]).upper().replace(" ", "<")
        given = ascii_fold(p["first"]).upper()
        l1 = f"P<D<<{surname}<<{given}".ljust(44, "<")[:44]
        pers = "<" * 14
        l2 = num + icao_check(num) + "D<<" + dob + icao_check(dob) + sex + exp + icao_check(exp) + pers + "<"
        composite = l2[0:10] + l2[13:20] + l2[21:43]
        l2 = l2 + icao_check(composite)
        assert len(l1) == 44 and len(l2) == 44
        self.rec("name", l1, subtype="mrz_line1", canonical=p["full"])
        self.rec("passport", num + icao_check(num), subtype="de/mrz", canonical=l2)
        self.rec("dob", dob, subtype="mrz_yymmdd", canonical=f"{y}-{m:02d}-{d:02d}")
        return l1, l2

    # -- network and credentials ------------------------------------------------------
    def ip(self, slot=None, style="plain") -> str:
        key = ("ip", slot)
        if slot is not None and key in self.slots:
            raw = self.slots[key]
        else:
            raw = ".".join([str(self.r.choice(PUBLIC_FIRST_OCTETS))] + [str(self.r.randint(1, 254)) for _ in range(3)])
            if slot is not None:
                self.slots[key] = raw
        if style == "defanged":
            return self.rec("ip", raw.replace(".", "[.]"), subtype="obfuscated", canonical=raw)
        return self.rec("ip", raw)

    def _rand(self, alphabet: str, n: int) -> str:
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def secret(self, kind: str, slot=None, record: bool = True) -> str:
        key = ("secret", kind, slot)
        if slot is not None and key in self.slots:
            v = self.slots[key]
            return self.rec("credential", v, subtype=kind) if record else v
        if kind == "aws_key":
            v = "AKIA" + self._rand(B32, 16)
        elif kind == "aws_secret":
            v = self._rand(ALNUM + "+/", 40)
        elif kind == "gh_token":
            v = "ghp_" + self._rand(ALNUM, 36)
        elif kind == "stripe_key":
            v = "sk_live_" + self._rand(ALNUM, 24)
        elif kind == "slack_token":
            v = f"xoxb-{self.digits(12)}-{self.digits(13)}-{self._rand(ALNUM, 24)}"
        elif kind == "openai_key":
            v = "sk-proj-" + self._rand(ALNUM + "-_", 48)
        elif kind == "password":
            words = [
                "Sommer",
                "Falcon",
                "Kiwi",
                "Orchid",
                "Tango",
                "Marbella",
                "Pixel",
                "Harbor",
                "Lavande",
                "Nordwind",
            ]
            v = (
                self.r.choice(words)
                + self.r.choice(["#", "!", "$", "%", "&", "*"])
                + self.digits(2)
                + self._rand(ALNUM, 6)
                + self.r.choice(["@", "?", "+", "!"])
            )
        elif kind == "password_weak":
            v = (
                self.r.choice(["Summer", "Welcome", "Password", "Liverpool", "Hannover"])
                + str(self.r.randint(2019, 2025))
                + self.r.choice(["", "!"])
            )
        elif kind == "jwt":

            def b64(obj):
                raw = json.dumps(obj, separators=(",", ":")).encode()
                return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

            p = self.person("jwt")
            local, domain = self._email_parts("jwt")
            payload = {
                "sub": self.digits(7),
                "email": f"{local}@{domain}",
                "name": p["full"],
                "iat": 1741000000 + self.r.randint(0, 9_000_000),
            }
            payload["exp"] = payload["iat"] + 3600
            v = (
                b64({"alg": "HS256", "typ": "JWT"})
                + "."
                + b64(payload)
                + "."
                + base64.urlsafe_b64encode(self.r.randbytes(32)).rstrip(b"=").decode()
            )
        else:
            raise KeyError(kind)
        if slot is not None:
            self.slots[key] = v
        if not record:
            return v
        # a JWT's payload carries the name and email of the person it was issued to
        return self.rec("credential", v, subtype="jwt_with_email_and_name" if kind == "jwt" else kind)

    def db_url(self) -> str:
        pw = self.secret("password", "db")
        host = self.r.choice(
            ["db-prod-2.internal.hollowbrook-logistics.net", "pg-main.eu-central-1.rds.amazonaws.com", "10.40.3.17"]
        )
        text = f"postgresql://app_orders:{pw}@{host}:5432/orders"
        return self.rec("credential", text, subtype="db_url")

    def basic_auth(self) -> str:
        user = self._email_parts("basic")[0]
        pw = self.secret("password", "basic", record=False)
        token = base64.b64encode(f"{user}:{pw}".encode()).decode()
        return self.rec("credential", token, subtype="basic_auth_base64", canonical=f"{user}:{pw}")

    # -- template filling ---------------------------------------------------------------
    def fill(self, template: str) -> str:
        def sub(m):
            kind, slot = m.group(1), m.group(2)
            return self.render(kind, slot)

        return self.PLACEHOLDER.sub(sub, template)

    def render(self, kind: str, slot: str | None) -> str:
        lang = gender = None
        m = re.fullmatch(r"(name|first)_([fm])", kind)
        if m:
            kind, gender = m.group(1), m.group(2)
        m = re.fullmatch(r"(name|first|email|email_spoken|email_bracket)_([a-z]{2})", kind)
        if m:
            kind, lang = m.group(1), m.group(2)
        if kind == "name":
            return self.name(slot, lang, gender)
        if kind == "first":
            return self.first(slot, lang, gender)
        if kind == "email":
            return self.email(slot, lang)
        if kind == "email_spoken":
            words = {"es": ("punto", "arroba"), "fr": ("point", "arobase"), "de": ("punkt", "at")}.get(
                lang or self.lang, ("dot", "at")
            )
            return self.email_spoken(slot, lang, words)
        if kind == "email_bracket":
            return self.email_bracket(slot, lang)
        if kind.startswith("dob"):
            base, _, style = kind.partition("_")
            return self.dob(slot, style or None, age=base[3:] or None)
        if kind.startswith("phone_words_"):
            _, _, cc, lg = kind.split("_")
            return self.phone_words(cc, lg, slot)
        if kind.startswith("phone_spaced_"):
            return self.phone_spaced(kind.rsplit("_", 1)[1], slot)
        if kind.startswith("phone_"):
            return self.phone(kind.split("_", 1)[1], slot)
        if kind.startswith("address_"):
            return self.address(kind.split("_", 1)[1])
        if kind == "card":
            return self.card(slot)
        if kind == "card_dashed":
            return self.card(slot, sep="-")
        if kind == "card_compact":
            return self.card_compact(slot)
        if kind == "card_odd":
            return self.card_oddgroups(slot)
        if kind == "card_odd_dashes":
            return self.card_oddgroups(slot, sep="-")
        if kind.startswith("iban_"):
            parts = kind.split("_")
            return self.iban(parts[1].upper(), slot, parts[2] if len(parts) > 2 else "grouped")
        if kind.startswith("passport_"):
            return self.passport(kind.split("_", 1)[1])
        if kind in ("ip", "ip_defanged"):
            return self.ip(slot, "defanged" if kind == "ip_defanged" else "plain")
        simple = {
            "ssn": self.ssn,
            "ssn_lines": self.ssn_lines,
            "ssn_spaced": self.ssn_spaced,
            "nino": self.nino,
            "nino_compact": lambda: self.nino(compact=True),
            "de_idcard": self.de_idcard,
            "de_taxid": self.de_taxid,
            "de_kvnr": self.de_kvnr,
            "fr_nir": self.fr_nir,
            "fr_nir_dotted": lambda: self.fr_nir("dotted"),
            "es_dni": self.es_dni,
            "es_nie": self.es_nie,
            "nl_bsn": self.nl_bsn,
            "pt_nif": self.pt_nif,
            "pl_pesel": self.pl_pesel,
            "db_url": self.db_url,
            "basic_auth": self.basic_auth,
        }
        if kind in simple:
            return simple[kind]()
        if kind in (
            "aws_key",
            "aws_secret",
            "gh_token",
            "stripe_key",
            "slack_token",
            "openai_key",
            "password",
            "password_weak",
            "jwt",
        ):
            return self.secret(kind, slot)
        raise KeyError(f"unknown placeholder kind {kind!r}")


# --------------------------------------------------------------------------------------
# text helpers for the long prompts
# --------------------------------------------------------------------------------------
def add_typos(text: str, rng: random.Random, rate: float = 0.06) -> str:
    kb_near = {
        "a": "s",
        "s": "a",
        "e": "r",
        "r": "e",
        "i": "o",
        "o": "i",
        "n": "m",
        "m": "n",
        "t": "r",
        "l": "k",
        "d": "f",
        "h": "g",
        "u": "i",
        "c": "v",
        "g": "h",
    }

    def mangle(w: str) -> str:
        if len(w) < 4 or not w.isalpha() or rng.random() > rate:
            return w
        i = rng.randrange(1, len(w) - 1)
        op = rng.randrange(4)
        if op == 0:
            return w[:i] + w[i + 1] + w[i] + w[i + 2 :]
        if op == 1:
            return w[:i] + w[i + 1 :]
        if op == 2:
            return w[:i] + w[i] + w[i:]
        return w[:i] + kb_near.get(w[i], w[i]) + w[i + 1 :]

    return re.sub(r"\w+", lambda m: mangle(m.group(0)), text)


# --------------------------------------------------------------------------------------
# long source texts (no personal data in any of them; a "needle" is added where wanted)
# --------------------------------------------------------------------------------------
THREAD_EN = [
    (
        "Facilities",
        "Mon 09:02",
        "Hi all, quick update on the move to the third floor. The furniture vendor confirmed delivery for the week of the 14th, but they need the loading bay booked for two mornings instead of one. Can someone from operations check whether the bay is free on Tuesday and Wednesday before 10:00? We also still need a decision on whether the old meeting-room tables go to storage or to the recycling partner.",
    ),
    (
        "Operations",
        "Mon 11:47",
        "Loading bay is free both mornings, I've put a hold on it. On the tables: storage costs us roughly 180 per month per pallet and we'd need four pallets, so unless someone has a concrete plan to reuse them within a year, recycling is cheaper. Separately, the network team asked that nobody unplugs the switches in the comms cupboard until they've labelled everything.",
    ),
    (
        "IT Service Desk",
        "Mon 14:20",
        "Confirming we'll label the comms cupboard on Thursday afternoon. Please don't move any desks with docking stations before Friday; we need to re-map the ports to the new floor plan first. We will send a short form so each team can tell us how many monitors and docks they actually use, because the inventory spreadsheet is badly out of date.",
    ),
    (
        "Vendor account team",
        "Tue 08:15",
        "Good morning, regarding the service level for the managed print and network contract: our records show two priority-one incidents last month, both resolved within the eight-hour window. We understand your team measured the second one differently. We propose a call to align on how resolution time is recorded, specifically whether the clock stops when a workaround is in place.",
    ),
    (
        "Procurement",
        "Tue 10:31",
        "Thanks. For the record, the contract says resolution means service restored to the agreed specification, not a workaround. The second incident left the east wing printing through a single device for three days. We'd like the service credit applied as described in schedule 4, and we'd like the root-cause report that was promised within ten working days, which we have not received.",
    ),
    (
        "Vendor account team",
        "Tue 16:05",
        "Understood. We'll escalate the credit question internally and come back by Friday. The root-cause report is in review with our engineering lead; the delay was caused by a parts supplier who has not yet confirmed the firmware defect. We can share a draft now if that helps, on the understanding that the conclusions may change.",
    ),
    (
        "Finance",
        "Wed 09:40",
        "Please don't accept a draft as fulfilling the obligation. From the budget side: if the credit is applied we're back under forecast for the quarter, otherwise we're about 2,300 over. Also a reminder that invoices for the move need the cost-centre code on them or they'll bounce back from accounts payable, which has already happened twice this month.",
    ),
    (
        "Facilities",
        "Wed 13:12",
        "Noted on invoices, I'll forward the code to the furniture vendor. Small change of plan: the recycling partner can only collect on the 21st, so the tables will sit in the corridor for a week. Health and safety says that's fine as long as the fire exits stay clear and the stack is no higher than 1.2 m. I'll put up signs.",
    ),
    (
        "Operations",
        "Thu 08:55",
        "Thanks everyone. Summary of open items: credit decision from the vendor by Friday, final root-cause report still outstanding, port mapping Thursday afternoon, desk moves from Friday, table collection on the 21st. If I've missed anything, reply to this thread rather than starting a new one so we keep it all in one place.",
    ),
]

THREAD_DE = [
    (
        "Hausverwaltung",
        "Mo 08:30",
        "Guten Morgen zusammen, wie angekündigt beginnen die Arbeiten an der Fassade voraussichtlich am 3. Juni. Das Gerüst wird an der Hofseite aufgebaut, die Fahrradständer müssen dafür vorübergehend weichen. Bitte räumen Sie bis Ende Mai alle Räder aus dem Hof; nicht abgeholte Fahrräder werden in den Keller gebracht.",
    ),
    (
        "Beirat",
        "Mo 12:10",
        "Danke für die Info. In der letzten Eigentümerversammlung wurde beschlossen, dass die Balkone gleich mit abgedichtet werden, sofern das Angebot unter dem genehmigten Rahmen bleibt. Liegt dazu schon ein Nachtragsangebot vor? Außerdem fragen mehrere Bewohner, ob die Rollläden während der Arbeiten geschlossen bleiben müssen.",
    ),
    (
        "Hausverwaltung",
        "Di 09:05",
        "Das Nachtragsangebot liegt vor und bewegt sich knapp innerhalb des Rahmens, wir schicken es mit dem nächsten Rundschreiben. Die Rollläden müssen nur an den Tagen geschlossen bleiben, an denen gestrahlt wird; die Termine hängen wir im Treppenhaus aus. Für Rückfragen zum Ablauf ist die Bauleitung vor Ort montags und donnerstags erreichbar.",
    ),
    (
        "Beirat",
        "Di 18:40",
        "Prima. Wir hatten außerdem gebeten, die Rücklage nicht vollständig aufzubrauchen, weil im nächsten Jahr die Heizungsanlage geprüft werden muss. Bitte stellen Sie in der Abrechnung klar dar, welcher Anteil aus der Rücklage kommt und welcher über die Sonderumlage finanziert wird, damit es später keine Diskussionen gibt.",
    ),
    (
        "Hausverwaltung",
        "Mi 10:20",
        "Selbstverständlich. Die Sonderumlage wird anteilig nach Miteigentumsanteilen berechnet und ist in zwei Raten fällig, zum 1. Juli und zum 1. Oktober. Eigentümer, die am Lastschriftverfahren teilnehmen, müssen nichts tun. Alle anderen überweisen bitte rechtzeitig und geben als Verwendungszweck die Wohnungsnummer an.",
    ),
    (
        "Beirat",
        "Mi 15:55",
        "Eine Bitte noch: Einige ältere Bewohner haben Sorge wegen des Lärms. Wäre es möglich, die lautesten Arbeiten auf den Vormittag zu legen und die Mittagsruhe einzuhalten? Das würde viel Ärger vermeiden. Wir könnten auch einen Aushang mit den wichtigsten Terminen in großer Schrift machen.",
    ),
]

NOTES_FR = [
    "Compte rendu de la réunion du comité des fêtes du quartier. Étaient présents les représentants des trois associations, la mairie annexe et deux bénévoles du centre social. L'ordre du jour portait sur la fête de la musique, le vide-grenier de septembre et le budget restant pour l'année.",
    "Fête de la musique : la scène sera installée sur la place du marché comme l'an dernier. La mairie prête les barrières et l'éclairage, mais demande une attestation d'assurance avant le 10 juin. Les groupes amateurs joueront de 18 h à 21 h, puis la chorale du collège clôturera la soirée. Il faut encore trouver des bénévoles pour la buvette.",
    "Vide-grenier : les inscriptions ouvriront le 1er juillet. Le prix de l'emplacement reste fixé à 5 euros les deux mètres. Plusieurs habitants ont demandé que les emplacements soient attribués par tirage au sort plutôt que par ordre d'arrivée, pour éviter la file d'attente dès six heures du matin. La proposition sera votée à la prochaine réunion.",
    "Budget : il reste environ 1 400 euros. Les dépenses prévues sont la location de la sono, les boissons et une petite réserve pour les imprévus. Le trésorier rappelle que chaque dépense doit être accompagnée d'une facture au nom de l'association, faute de quoi elle ne pourra pas être remboursée.",
    "Divers : le centre social propose d'organiser un atelier de réparation de vélos pendant le vide-grenier. L'idée est bien accueillie. La mairie annexe signale aussi que les travaux de voirie de la rue principale pourraient décaler l'installation de la scène d'une journée ; une confirmation est attendue la semaine prochaine.",
    "Sécurité : la préfecture demande désormais un plan de circulation pour toute manifestation de plus de trois cents personnes. Le comité s'engage à le transmettre trois semaines avant la fête, avec l'emplacement des secours, des points d'eau et des issues. Les barrières seront posées la veille au soir pour éviter le stationnement sur la place.",
]

CIRCULAR_ES = [
    "Estimados vecinos: os escribimos desde la junta de la comunidad para informaros de las obras previstas en el portal y en los ascensores. Las obras comenzarán a mediados de septiembre y durarán aproximadamente seis semanas. Durante ese tiempo, uno de los dos ascensores estará siempre en funcionamiento, salvo dos días en los que será necesario cortar la corriente de todo el edificio.",
    "El presupuesto aprobado en la última junta asciende a 48.000 euros, que se pagarán con el fondo de reserva y con una derrama en tres plazos. El reparto se hará según el coeficiente de cada vivienda, tal como figura en la escritura. Los locales comerciales participan en el pago del portal, pero no en el de los ascensores, porque no hacen uso de ellos.",
    "Sabemos que las obras siempre generan molestias, por lo que hemos pedido a la empresa que los trabajos más ruidosos se realicen entre las diez de la mañana y las dos de la tarde. También se instalará una rampa provisional para facilitar el acceso a las personas con movilidad reducida y a los carritos de bebé.",
    "Por último, recordamos que está prohibido dejar bicicletas, macetas o muebles en los rellanos, ya que dificultan el paso en caso de emergencia. La empresa de limpieza ha avisado de que a partir del mes que viene no retirará objetos voluminosos; para ello hay que llamar al servicio municipal de recogida.",
    "Si tenéis dudas sobre la derrama o sobre las fechas de las obras, podéis consultarlas en el tablón del portal o preguntar en la próxima reunión, que se celebrará el último jueves de mes en el local de la planta baja. Gracias a todos por vuestra colaboración y paciencia.",
]

BLOG_EN = [
    "Growing vegetables on a balcony is easier than most people think, but it rewards a little planning. Before buying a single pot, spend a week noticing how the light moves across the space. A balcony that gets six or more hours of direct sun can support tomatoes, peppers and most herbs. Four hours is enough for lettuce, spinach, chard and peas, while a shady balcony is best kept for mint, parsley and ferns.",
    "Containers matter more than the plants. Tomatoes want at least twenty litres of soil each, and the bigger the pot, the less often you will have to water in July. Terracotta looks lovely but dries out quickly; glazed ceramic or plastic holds moisture better. Whatever you choose, make sure there are drainage holes, and raise the pots slightly on feet so water can escape instead of pooling underneath.",
    "Use a good peat-free potting compost rather than soil dug from a garden. Garden soil compacts in containers and drains badly. Mix in a handful of slow-release organic fertiliser at planting time, then switch to a liquid feed every ten days once the first flowers appear. Tomatoes in particular need potassium when they start fruiting, which is why tomato feeds are higher in it.",
    "Watering is where most balcony gardens fail. Wind dries pots faster than you would expect, and on a hot afternoon a small container can go from damp to bone dry in a few hours. Water deeply in the early morning, until it runs out of the bottom, rather than giving a little splash every evening. A saucer under each pot helps in summer, but empty it in spring and autumn so the roots do not sit in water.",
    "Think vertically. Climbing beans and cucumbers can be trained up a trellis fixed to the wall, and a simple hanging basket of strawberries keeps the fruit away from slugs. Small fruit trees on dwarfing rootstock, such as a patio apple or a fig, will live happily for years in a half barrel, although they need a frost-proof pot and some shelter in winter.",
    "Finally, check the rules. Many buildings limit the weight on a balcony, and wet soil is heavy: a large planter can easily weigh more than a hundred kilograms after rain. Spread the load, keep the heaviest containers close to the wall, and never block drainage outlets. With those basics in place, even a tiny balcony can produce salads from April to October.",
]

FAQ_EN = [
    "How long does delivery take? Orders placed before 2 pm on a working day are usually dispatched the same day. Standard delivery takes two to four working days within the country and five to eight working days to most other European countries. During sales periods and the weeks before public holidays, please allow an extra two days.",
    "Can I change or cancel my order? You can change or cancel an order free of charge until it has been packed. Open your account, choose the order and click Edit. Once the status shows Packed, the parcel is already with the carrier and the order can no longer be changed, but you can still return it after delivery.",
    "What is your returns policy? You have thirty days from delivery to return unused items in their original packaging. Print the prepaid label from your account and drop the parcel at any collection point. Refunds are issued to the original payment method within five working days of the parcel arriving at our warehouse. Sale items are returnable too, unless they are marked as final sale.",
    "Do you offer gift wrapping? Yes. Select gift wrapping at checkout and add a message of up to two hundred characters. Prices are not shown on the packing slip of gift orders. Please note that gift wrapping is not available for oversized items such as furniture or bicycles.",
    "How do I look after my purchase? Every product comes with a care card. In general, wash textiles inside out at thirty degrees, avoid tumble drying wool, and treat leather with a neutral conditioner twice a year. If something breaks within the two-year warranty period, contact us with a photo and a short description and we will arrange a repair or replacement.",
    "Is my payment secure? All payments are processed by a certified payment provider and we never store full card details on our own servers. You can pay by card, bank transfer or with a digital wallet. For business customers we also offer payment by invoice after a short credit check.",
]

MEMO_EN = [
    "Subject: Updated hybrid working guidelines. Over the past year we have collected feedback from every department on how the hybrid arrangement is working. The headline is positive: most teams report that focused work goes better at home, while onboarding, planning and difficult conversations go better in person. These guidelines replace the interim rules from last spring.",
    "Core days. Each team will agree two core days per week on which everyone is expected in the office, unless they are travelling, on leave or have an agreed exception. Teams should publish their core days on the intranet so that other departments can plan meetings. Outside core days, people may choose where to work, subject to the needs of their role.",
    "Desks and rooms. Because attendance peaks on Tuesdays and Wednesdays, fixed desks will be phased out on the second floor and replaced with bookable desks. Meeting rooms can be booked for a maximum of two hours at a time, and recurring bookings will be reviewed monthly. Please release rooms you no longer need; last quarter a third of booked rooms were never used.",
    "Equipment and costs. Employees working from home at least two days a week can claim a one-off allowance for a chair or monitor, up to the limit in the expenses policy. Internet and electricity costs are not reimbursed. Company laptops must not be left in vehicles, and all devices must receive security updates within seven days of release.",
    "Working abroad. Working from another country, even briefly, can create tax and social security obligations for both the company and the employee. Requests to work abroad for more than ten working days per year must be approved in advance by HR and the finance team. Requests for shorter periods still need manager approval and must be recorded in the HR system.",
    "Review. These guidelines will be reviewed after six months. Managers are asked to collect feedback from their teams and to report any problems with space, equipment or collaboration. The aim is not to maximise office attendance, but to make the time people spend together worthwhile.",
]

NEWSLETTER_DE = [
    "Liebe Mitglieder, die Saison neigt sich dem Ende zu und wir möchten uns bei allen bedanken, die beim Sommerfest geholfen haben. Trotz des unbeständigen Wetters kamen über zweihundert Gäste, und der Kuchenverkauf hat so viel eingebracht wie nie zuvor. Der Erlös fließt vollständig in die neue Bewässerungsanlage für die Gemeinschaftsbeete.",
    "Die Bewässerungsanlage soll im Frühjahr eingebaut werden. Dafür müssen die Wege zwischen den Parzellen an zwei Wochenenden teilweise gesperrt werden. Wir bitten alle Pächter, in dieser Zeit keine schweren Geräte über die Wege zu fahren und die Schläuche an den Wasserstellen aufzurollen, damit die Arbeiten zügig vorankommen.",
    "Zur Erinnerung: Laut Gartenordnung muss mindestens ein Drittel jeder Parzelle für den Anbau von Obst und Gemüse genutzt werden. Bei der letzten Begehung ist aufgefallen, dass einige Gärten fast nur noch aus Rasen bestehen. Bitte sprecht uns an, wenn ihr Hilfe bei der Planung braucht; der Vorstand vermittelt gern Tipps und Saatgut.",
    "Die Wasseruhren werden Ende Oktober abgelesen. Bitte sorgt dafür, dass sie frei zugänglich sind, und tragt den Zählerstand zusätzlich in die Liste am Vereinsheim ein. Wer seine Leitung noch nicht entleert hat, sollte das vor dem ersten Frost erledigen, sonst drohen teure Schäden an den Rohren.",
    "Für das kommende Jahr suchen wir noch Freiwillige für die Arbeitsgruppe Kompost und für die Betreuung der Bienenstöcke. Vorkenntnisse sind nicht nötig, nur etwas Zeit und Neugier. Die Jahreshauptversammlung findet im März statt; die Einladung mit der Tagesordnung verschicken wir rechtzeitig per Aushang und Rundbrief.",
]

RELEASE_NOTES_MD = """# Release 4.12

## Highlights
- **Offline mode**: the mobile app now keeps the last 30 days of notes available without a connection. Changes made offline are synced automatically when you reconnect.
- **Faster search**: full-text search results now appear in under 200 ms for most workspaces, thanks to a new index format.
- **Shared templates**: workspace admins can publish templates that every member sees in the *New note* menu.

## Improvements
1. Attachments up to **250 MB** are now supported (previously 100 MB).
2. The editor remembers the cursor position when you switch between notes.
3. Dark mode has better contrast for code blocks and tables.
4. Exported PDFs include page numbers and a table of contents.
5. Keyboard shortcut `Ctrl+Shift+K` opens the command palette on all platforms.

## Fixes
- Fixed a crash when pasting very large tables from spreadsheets.
- Fixed an issue where reminders fired twice after a daylight-saving change.
- Fixed wrong sorting of notes whose titles start with numbers.
- Fixed the *Share* button being hidden on small screens.
- Fixed images losing their captions after export to Markdown.

## Deprecations
> The legacy API (`/v1/notes`) will be switched off at the end of next quarter. Please migrate integrations to `/v2/notes`; the migration guide is in the developer portal.

## Known issues
- Sync can take several minutes for workspaces with more than 50,000 notes.
- Handwriting recognition is not yet available in offline mode.
- On some Android tablets the split-view layout flickers when rotating the screen.

Thanks to everyone who reported bugs and tested the beta!
"""

POSTMORTEM_EN = [
    "Incident summary. On the evening of the 9th, checkout requests in the EU region failed for 47 minutes. Around 31% of checkout attempts returned an error, and a further share completed but took over ten seconds. No payment was captured twice and no order data was lost. The incident was declared at severity two and escalated to severity one after twenty minutes.",
    "Timeline. At 18:02 a routine deployment of the inventory service introduced a new database index migration. The migration was expected to run online, but on the largest tenant partition it took an exclusive lock for several minutes. Checkout calls inventory synchronously to reserve stock, so checkout threads started to block waiting for inventory responses. At 18:09 the on-call engineer received the first latency alert.",
    "Why it spread. The checkout service has a timeout of thirty seconds for inventory calls, which is far longer than the user is willing to wait. Blocked requests therefore held their worker threads for the full thirty seconds, the worker pool was exhausted, and even requests that did not need inventory, such as loading the payment page, began to queue. Client retries then doubled the load.",
    "Detection and response. The latency alert fired seven minutes after the deployment, but it was routed to the platform team rather than the team owning inventory, and it took a further twelve minutes to connect the alert to the deployment. Rolling back the application did not help because the migration was already running; the team eventually killed the migration at 18:46 and service recovered within two minutes.",
    "What went well. Payment idempotency keys prevented double charges even though many clients retried. The status page was updated within fifteen minutes. Customer support had a prepared message ready and used it consistently.",
    "What we will change. We will add a pre-deployment check that estimates lock duration for migrations on the largest partitions, and require such migrations to run in a maintenance window or with an online schema-change tool. Checkout will use a two-second timeout and a circuit breaker for inventory, with a fallback that reserves stock asynchronously. Alerts will be routed by owning service, and deployment markers will be shown on every latency dashboard.",
]

PRIVACY_POLICY_EN = [
    "1. Who we are. This policy explains how the provider of the fitness-tracking app processes personal data. We act as controller for account data and as processor for data that employers upload as part of corporate wellness programmes.",
    "2. What we collect. We collect your name, email address, date of birth, height, weight, heart-rate data, sleep data, GPS traces of recorded workouts and, if you connect a smart scale, body-fat percentage. We also collect device identifiers and advertising identifiers to measure the effectiveness of our campaigns.",
    "3. Why we collect it. We process your data to provide the service, to personalise training plans, to improve our algorithms, and for marketing. The legal basis for all processing is our legitimate interest in running and growing the business. Where you have given consent, we may also rely on consent.",
    "4. Sharing. We share aggregated statistics with corporate wellness customers. Employers can see the weekly activity score of each participating employee. We use analytics and advertising partners, some of which are located outside the European Economic Area; transfers are covered by appropriate safeguards.",
    "5. Retention. We keep your data for as long as your account exists and for ten years afterwards to defend legal claims. GPS traces are kept indefinitely because they help us improve route recommendations for all users.",
    "6. Your rights. You can request a copy of your data by sending a letter to our registered office. We will respond within three months. Requests to delete data will be honoured unless we need the data for the purposes described above. You cannot object to processing based on legitimate interest.",
    "7. Children. The service is intended for users aged 13 and above. We do not knowingly collect data from younger children. Parents who believe their child has registered may contact us.",
    "8. Changes. We may change this policy at any time. The current version is always available in the app. Continued use of the app after a change means you accept the new policy.",
]

CONTRACT_DE = [
    "Dienstleistungsvertrag über die Erstellung und Pflege einer Webanwendung. § 1 Vertragsgegenstand. Der Auftragnehmer entwickelt für den Auftraggeber eine Webanwendung zur Terminbuchung nach Maßgabe des als Anlage 1 beigefügten Lastenhefts und übernimmt nach Abnahme deren Wartung für die Dauer von vierundzwanzig Monaten.",
    "§ 2 Vergütung. Für die Entwicklung erhält der Auftragnehmer eine Pauschalvergütung von 38.000 Euro zuzüglich Umsatzsteuer, fällig zu 30 % bei Vertragsschluss, zu 40 % nach Bereitstellung der Testversion und zu 30 % nach Abnahme. Die Wartung wird mit 650 Euro monatlich vergütet. Mehraufwand aufgrund von Änderungswünschen wird nach Aufwand zu einem Stundensatz von 95 Euro abgerechnet, auch wenn er nicht vorab schriftlich vereinbart wurde.",
    "§ 3 Abnahme. Der Auftraggeber hat die Anwendung innerhalb von fünf Werktagen nach Bereitstellung zu prüfen. Erklärt er sich innerhalb dieser Frist nicht, gilt die Anwendung als abgenommen. Unwesentliche Mängel berechtigen nicht zur Verweigerung der Abnahme; als unwesentlich gelten alle Mängel, die der Auftragnehmer als solche einstuft.",
    "§ 4 Nutzungsrechte. Der Auftraggeber erhält mit vollständiger Zahlung ein einfaches, nicht übertragbares Nutzungsrecht an der Anwendung. Der Quellcode verbleibt beim Auftragnehmer. Eine Bearbeitung durch Dritte ist ohne Zustimmung des Auftragnehmers nicht gestattet.",
    "§ 5 Haftung. Die Haftung des Auftragnehmers ist, gleich aus welchem Rechtsgrund, auf die Höhe der im jeweiligen Vertragsjahr gezahlten Wartungsvergütung beschränkt. Dies gilt auch für Schäden aus der Verletzung des Lebens, des Körpers oder der Gesundheit sowie für grob fahrlässig verursachte Schäden.",
    "§ 6 Laufzeit und Kündigung. Der Wartungsvertrag verlängert sich nach Ablauf der Mindestlaufzeit automatisch um jeweils weitere vierundzwanzig Monate, sofern er nicht mit einer Frist von sechs Monaten zum Laufzeitende gekündigt wird. Das Recht zur außerordentlichen Kündigung bleibt unberührt.",
    "§ 7 Schlussbestimmungen. Gerichtsstand ist der Sitz des Auftragnehmers. Änderungen dieses Vertrags bedürfen der Schriftform. Sollte eine Bestimmung unwirksam sein, bleibt die Wirksamkeit der übrigen Bestimmungen unberührt.",
]

DISCHARGE_FR = [
    "Compte rendu d'hospitalisation – service de cardiologie. Motif d'admission : douleur thoracique constrictive survenue au repos, irradiant au bras gauche, d'une durée d'environ quarante minutes. Antécédents : hypertension artérielle traitée, dyslipidémie, tabagisme sevré depuis cinq ans. Traitement habituel : ramipril 5 mg, atorvastatine 20 mg.",
    "À l'admission : pression artérielle 158/92 mmHg, fréquence cardiaque 88/min, saturation 97 % en air ambiant. L'ECG montre un sous-décalage du segment ST de 1 mm en V4-V6, sans sus-décalage. La troponine T hypersensible est à 64 ng/L à l'admission puis 212 ng/L à la troisième heure. Le diagnostic retenu est un syndrome coronarien aigu sans sus-décalage du segment ST (NSTEMI).",
    "Une coronarographie réalisée le lendemain par voie radiale met en évidence une sténose serrée de l'artère interventriculaire antérieure moyenne, traitée par angioplastie avec pose d'un stent actif. Les autres artères présentent des lésions non significatives. L'échocardiographie retrouve une fraction d'éjection ventriculaire gauche à 52 % avec une légère hypokinésie antérieure.",
    "Les suites ont été simples. Le patient sort sous double antiagrégation plaquettaire (aspirine 75 mg et ticagrélor 90 mg deux fois par jour) pour une durée de douze mois, bisoprolol 2,5 mg, ramipril 5 mg et atorvastatine augmentée à 80 mg. Une réadaptation cardiaque est programmée. Objectif de LDL-cholestérol inférieur à 0,55 g/L.",
    "Consignes : ne pas interrompre le ticagrélor sans avis cardiologique, consulter en urgence en cas de récidive de douleur thoracique, de saignement important ou d'essoufflement inhabituel. Contrôle biologique (bilan lipidique, transaminases, créatinine) à six semaines. Consultation de cardiologie à trois mois.",
]

CALL_TRANSCRIPT_EN = [
    "Agent: Thanks for calling, you're through to billing support. How can I help today?",
    "Customer: Hi, yes, I was charged for the annual plan but I'm sure I picked monthly. It went through on the 2nd and it's quite a lot more than I expected.",
    "Agent: I'm sorry about that. Let me pull up the account. Can you confirm the email address on the account? ... Thank you. I can see an annual subscription started on the 2nd, and the monthly plan was active before that. It looks like the switch happened when the app updated.",
    "Customer: I didn't switch anything. I opened the app, there was a pop-up about a new plan and I closed it. That's all.",
    "Agent: Understood. The pop-up had two buttons and it's possible the close gesture registered as a tap. Our policy allows a full refund of an annual plan within fourteen days if the subscription hasn't been used heavily, and I can see very little usage since the change. So you're eligible.",
    "Customer: Okay, good. Will I go back to monthly?",
    "Agent: I can cancel the annual plan, refund it in full and restart your monthly plan from today, so you won't lose any of your saved data. The refund usually shows within five to ten working days depending on your bank.",
    "Customer: Five to ten days is a long time. Can it be faster?",
    "Agent: I'm afraid the timing depends on the card issuer, we send it the same day. I'll also add a note that you didn't intend to upgrade so this doesn't happen again, and I'll report the pop-up behaviour to our product team.",
    "Customer: Fine. Do you need anything else from me?",
]

CODE_NOTIFY_PY = '''"""Outbound notifications: webhooks, email digests and the GitHub status bridge."""
import hashlib
import json
import logging
import sqlite3
import time

import requests

log = logging.getLogger(__name__)
DB_PATH = "/var/lib/notify/notify.db"
MAX_RETRIES = 5


def _db():
    return sqlite3.connect(DB_PATH)


def subscribers_for(event_type, tenant):
    conn = _db()
    rows = conn.execute(
        f"SELECT url, secret FROM webhooks WHERE tenant = '{tenant}' AND event = '{event_type}'"
    ).fetchall()
    conn.close()
    return rows


def sign(body: bytes, secret: str) -> str:
    return hashlib.md5(secret.encode() + body).hexdigest()


def deliver(url, secret, payload):
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "X-Signature": sign(body, secret)}
    for attempt in range(MAX_RETRIES):
        try:
            resp = requests.post(url, data=body, headers=headers, timeout=30, verify=False)
            if resp.status_code < 500:
                return resp.status_code
        except requests.RequestException as exc:
            log.warning("delivery to %s failed: %s (payload=%s)", url, exc, payload)
        time.sleep(2 ** attempt)
    return None


def fan_out(event_type, tenant, payload):
    results = {}
    for url, secret in subscribers_for(event_type, tenant):
        results[url] = deliver(url, secret, payload)
    return results


def digest(tenant, since):
    conn = _db()
    rows = conn.execute(
        "SELECT event, COUNT(*) FROM deliveries WHERE tenant = ? AND ts > ? GROUP BY event",
        (tenant, since),
    ).fetchall()
    conn.close()
    return {event: count for event, count in rows}


def render_digest_html(tenant, counts):
    items = "".join(f"<li>{event}: {count}</li>" for event, count in counts.items())
    return f"<h1>Weekly digest for {tenant}</h1><ul>{items}</ul>"


# --- GitHub commit-status bridge -------------------------------------------------
GITHUB_API = "https://api.github.com"
'''

CODE_NOTIFY_TAIL = """

def set_commit_status(repo, sha, state, description, token=None):
    token = token or FALLBACK_GITHUB_TOKEN
    resp = requests.post(
        f"{GITHUB_API}/repos/{repo}/statuses/{sha}",
        headers={"Authorization": f"token {token}"},
        json={"state": state, "description": description[:140], "context": "notify/bridge"},
        timeout=10,
    )
    log.info("status %s for %s@%s -> %s (token=%s)", state, repo, sha, resp.status_code, token)
    return resp.ok
"""

CODE_CACHE_PY = '''import threading
import time

import requests


class TokenCache:
    """Caches OAuth access tokens per tenant and refreshes them shortly before expiry."""

    def __init__(self, token_url, client_id, client_secret_provider):
        self._token_url = token_url
        self._client_id = client_id
        self._secret_provider = client_secret_provider
        self._tokens = {}            # tenant -> (token, expires_at)
        self._lock = threading.Lock()
        self._refreshing = set()

    def get(self, tenant):
        entry = self._tokens.get(tenant)
        if entry and entry[1] - time.time() > 30:
            return entry[0]
        if tenant in self._refreshing:
            while tenant in self._refreshing:
                time.sleep(0.01)
            return self._tokens[tenant][0]
        self._refreshing.add(tenant)
        try:
            token, ttl = self._fetch(tenant)
            self._tokens[tenant] = (token, time.time() + ttl)
            return token
        finally:
            self._refreshing.discard(tenant)

    def _fetch(self, tenant):
        with self._lock:
            secret = self._secret_provider(tenant)
            resp = requests.post(self._token_url, data={
                "grant_type": "client_credentials",
                "client_id": self._client_id,
                "client_secret": secret,
                "audience": tenant,
            }, timeout=10)
            resp.raise_for_status()
            body = resp.json()
            return body["access_token"], body["expires_in"]


class RateLimiter:
    """Token bucket per tenant, shared by all worker threads."""

    def __init__(self, rate, burst):
        self.rate = rate
        self.burst = burst
        self.buckets = {}
        self.lock = threading.Lock()

    def acquire(self, tenant):
        with self.lock:
            tokens, last = self.buckets.get(tenant, (self.burst, time.monotonic()))
            now = time.monotonic()
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                wait = (1 - tokens) / self.rate
                time.sleep(wait)
                tokens = 1
            self.buckets[tenant] = (tokens - 1, now)


class Client:
    def __init__(self, base_url, cache, limiter):
        self.base_url = base_url
        self.cache = cache
        self.limiter = limiter
        self.session = requests.Session()

    def call(self, tenant, path, **kw):
        self.limiter.acquire(tenant)
        token = self.cache.get(tenant)
        resp = self.session.get(f"{self.base_url}{path}",
                                headers={"Authorization": f"Bearer {token}"}, **kw)
        if resp.status_code == 401:
            self.cache._tokens.pop(tenant, None)
            token = self.cache.get(tenant)
            resp = self.session.get(f"{self.base_url}{path}",
                                    headers={"Authorization": f"Bearer {token}"}, **kw)
        return resp


def secret_provider_with_client(client):
    """Secrets live behind our own API, so fetching one needs a client call."""
    def provider(tenant):
        return client.call("platform", f"/secrets/{tenant}/oauth").json()["value"]
    return provider
'''

LOG_FILLER = [
    "INFO  [worker-{w}] orders.sync: batch {n} committed ({r} rows, {ms} ms)",
    "INFO  [http-{w}] GET /api/v2/catalog/items?page={p} 200 {ms}ms",
    "DEBUG [scheduler-1] cache.warmup: refreshed {r} keys in {ms} ms",
    "WARN  [http-{w}] payments.RetryPolicy: upstream timeout after 5000 ms, retry {t}/3",
    "INFO  [http-{w}] POST /api/v2/cart/checkout 201 {ms}ms",
    "ERROR [worker-{w}] inventory.cache: redis GET failed: connection reset by peer",
    "INFO  [metrics] jvm heap used={h}MB committed=2048MB gc.pause={g}ms",
    "WARN  [worker-{w}] search.indexer: slow bulk request ({ms} ms, {r} docs)",
    "INFO  [http-{w}] GET /healthz 200 1ms",
    "DEBUG [http-{w}] session.store: touched session (ttl=1800s)",
    "ERROR [http-{w}] api.ErrorHandler: 502 from shipping-rates upstream (attempt {t})",
    "INFO  [worker-{w}] mail.queue: {r} messages handed to relay",
]


def log_lines(rng: random.Random, n: int, start_s: int = 9 * 3600) -> list[str]:
    lines, t = [], start_s
    for _ in range(n):
        t += rng.randint(1, 40)
        tpl = rng.choice(LOG_FILLER)
        ts = f"2025-03-14T{t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d}.{rng.randint(0, 999):03d}Z"
        lines.append(
            ts
            + " "
            + tpl.format(
                w=rng.randint(1, 8),
                n=rng.randint(1000, 9999),
                r=rng.randint(3, 900),
                ms=rng.randint(2, 2400),
                p=rng.randint(1, 40),
                t=rng.randint(1, 3),
                h=rng.randint(600, 1900),
                g=rng.randint(3, 180),
            )
        )
    return lines


def log_with_needle(rng: random.Random, n: int, needle: str) -> str:
    """n filler lines plus one needle line, placed third from the end with a matching timestamp."""
    lines = log_lines(rng, n + 3)
    ts = lines[n].split(" ", 1)[0]
    lines[n] = f"{ts} {needle}"
    return "\n".join(lines)


def pick_until(rng: random.Random, blocks: list[str], lo: int, hi: int, sep="\n\n", keep_order=True) -> str:
    """Join a random run of blocks (in source order) whose total length is in [lo, hi]."""
    for _ in range(500):
        idx = sorted(rng.sample(range(len(blocks)), rng.randint(2, len(blocks))))
        text = (
            sep.join(blocks[i] for i in idx) if keep_order else sep.join(rng.sample([blocks[i] for i in idx], len(idx)))
        )
        if lo <= len(text) <= hi:
            return text
    raise AssertionError("no combination in range")


def thread_text(rng, msgs, lo, hi, header="--- {who}, {when} ---"):
    blocks = [header.format(who=w, when=t) + "\n" + body for w, t, body in msgs]
    return pick_until(rng, blocks, lo, hi)


# --------------------------------------------------------------------------------------
# items
# --------------------------------------------------------------------------------------
# d: "r"  = routine                                  -> edge
#    "hs" = hard, a strong open model handles it     -> speculative
#    "hc" = hard, needs frontier knowledge/reasoning -> cloud
# PII overrides: routine -> edge, hard (hs or hc) -> speculative.
ITEMS: list[dict] = []


def _add(d, cat, prompt, lang="en", notes="", adv=None):
    ITEMS.append({"d": d, "cat": cat, "prompt": prompt, "lang": lang, "notes": notes, "adv": adv})


def R(cat, prompt, lang="en", notes="", adv=None):
    _add("r", cat, prompt, lang, notes, adv)


def S(cat, prompt, lang="en", notes="", adv=None):
    _add("hs", cat, prompt, lang, notes, adv)


def C(cat, prompt, lang="en", notes="", adv=None):
    _add("hc", cat, prompt, lang, notes, adv)


LOOK = "pii_lookalike"
OBF = "obfuscated_pii"
LONGPII = "long_context_pii"
SHORTHARD = "short_hard"
LONGROUTINE = "long_routine"
NOVALUE = "pii_kind_without_value"

# ===================================== routine, no PII ==================================
R("chat", "hey! how's it going? just testing this thing out")
R("chat", "Thanks, that worked perfectly. Have a good evening!")
R("chat", "Can you suggest a name for a grey kitten? Something short.")
R("chat", "Tell me a clean joke about programmers.")
R("chat", "Guten Morgen! Kannst du mir einen kurzen Spruch für den Montag geben?", "de")
R("chat", "Salut ! Tu peux me conseiller un film léger pour ce soir ?", "fr")
R("chat", "¿Qué me recomiendas cenar hoy si tengo arroz, huevos y tomates?", "es")
R("chat", "I'm bored. Give me three quick ideas for something to do indoors on a rainy afternoon.")
R("chat", "おはようございます！忙しい朝でも作れる簡単な朝ごはんを三つ教えてください。", "ja")
R("chat", "Ciao! Mi dai tre idee per un regalo di compleanno per un collega, sotto i 20 euro?", "it")

R("factual_qa", "What is the capital of Australia?")
R("factual_qa", "How many centimetres are in a foot?")
R("factual_qa", "Who wrote Pride and Prejudice?")
R("factual_qa", "What's the boiling point of water in Fahrenheit?")
R("factual_qa", "Which planet is closest to the sun?")
R("factual_qa", "What does HTTP stand for?")
R("factual_qa", "When did the Berlin Wall fall?")
R("factual_qa", "Wie viele Bundesländer hat Deutschland?", "de")
R("factual_qa", "Quelle est la différence entre un crocodile et un alligator, en une phrase ?", "fr")
R("factual_qa", "¿Cuántos días tiene un año bisiesto?", "es")
R("factual_qa", "Is a tomato a fruit or a vegetable?")
R("factual_qa", "What time zone is Lisbon in?")
R("factual_qa", "Qual é o maior rio do Brasil?", "pt")
R("factual_qa", "Hoeveel provincies heeft Nederland?", "nl")
R("factual_qa", "What's the chemical symbol for sodium?")

R("translation", "Translate to German: 'Where is the nearest train station?'")
R("translation", "Translate into French: 'The meeting has been moved to Thursday at 3 pm.'")
R("translation", "How do you say 'thank you for your patience' in Spanish?")
R("translation", "Übersetze ins Englische: 'Ich komme heute etwas später, der Zug hat Verspätung.'", "de")
R("translation", "Traduis en anglais : « Nous avons bien reçu votre commande et elle sera expédiée demain. »", "fr")
R("translation", "Traduce al inglés: 'La tienda abre a las nueve de la mañana y cierra a las ocho.'", "es")
R("translation", "Translate 'good luck with the exam' to Italian.")
R("translation", "What's 'Feierabend' in English? Is there a direct translation?")
R("translation", "「よろしくお願いします」を英語に訳してください。", "ja")
R("translation", "Traduci in inglese: 'Il treno per Milano parte dal binario 4.'", "it")

R("rewriting", "Make this sound more polite: 'Send me the report now.'")
R("rewriting", "Rewrite in the passive voice: 'The committee approved the budget.'")
R(
    "rewriting",
    "Shorten this sentence: 'Due to the fact that the weather was not good, we made the decision to stay at home.'",
)
R("rewriting", "Fix the grammar: 'Me and him goes to the store yesterday.'")
R("rewriting", "Formuliere das freundlicher: 'Ihre Rechnung ist immer noch nicht bezahlt.'", "de")
R("rewriting", "Corrige les fautes : « Je suis aller au marché et j'ai acheter des pommes. »", "fr")
R("rewriting", "Reescribe esta frase de forma más formal: 'Oye, ¿me mandas el archivo cuando puedas?'", "es")
R("rewriting", "Turn this into a bullet list: eggs, milk, two onions, bread and some coffee.")
R("rewriting", "Change this to title case: the quick guide to growing tomatoes on a balcony")
R("rewriting", "Make this tweet more upbeat: 'Our new release is out. It has bug fixes.'")

R(
    "summarising",
    "Summarise in one sentence: 'The city council voted on Tuesday to extend the bike lane on Main Street by two kilometres. Construction will begin in spring and is expected to last four months. Residents raised concerns about parking, which the council said it would address in a separate plan.'",
)
R(
    "summarising",
    "TL;DR this: 'Our office will be closed on Monday for the public holiday. Support tickets submitted over the weekend will be answered on Tuesday. For urgent outages, the status page will be updated as usual.'",
)
R(
    "summarising",
    "Fasse in einem Satz zusammen: 'Die Stadtbibliothek bleibt wegen Umbauarbeiten vom 1. bis 15. August geschlossen. Ausgeliehene Medien können in dieser Zeit am Rückgabeautomaten im Foyer abgegeben werden. Die Leihfristen werden automatisch verlängert.'",
    "de",
)
R(
    "summarising",
    "Résume en une phrase : « Le marché de Noël ouvrira le 29 novembre sur la place centrale. Il accueillera une soixantaine d'exposants et une patinoire gratuite pour les enfants. Les horaires seront prolongés le week-end. »",
    "fr",
)
R(
    "summarising",
    "Give me a three-word summary of: 'The package arrived late and the box was damaged, but everything inside worked fine.'",
)

R("extraction", "Extract the date from this sentence: 'The conference takes place on 12 October 2025 in Vienna.'")
R("extraction", "List the colours mentioned: 'She wore a red scarf, blue jeans and green sneakers.'")
R("extraction", "From this text, what's the price? 'The basic plan costs $12 per month, billed annually.'")
R("extraction", "Pull out the city names: 'We flew from Madrid to Lisbon, then took the train to Porto.'")
R("extraction", "Extrae los ingredientes: 'Mezcla harina, azúcar, dos huevos y un poco de leche.'", "es")
R("classification", "Is this review positive or negative? 'The battery died after two days. Not impressed.'")
R("classification", "Classify this support ticket as billing, technical or other: 'I was charged twice this month.'")
R("classification", "What's the sentiment of: 'Honestly the food was average but the service made the evening.'")

R("coding", "How do I reverse a list in Python?")
R("coding", "Write a one-liner in JavaScript to get the last element of an array.")
R("coding", "What's the git command to see which branch I'm on?")
R("coding", "How do I make a directory including its parents in bash?")
R("coding", "Convert this to a Python f-string: 'Hello ' + name + ', you are ' + str(age)")
R("coding", "What does `ls -la` do?")
R("coding", "SQL: how do I select all rows from a table called orders where status is 'shipped'?")
R("coding", "How do I check the Python version from the command line?")
R("coding", "Wie kommentiere ich in YAML eine Zeile aus?", "de")
R("coding", "In CSS, how do I center text horizontally?")
R("coding", "What's the difference between == and === in JavaScript, briefly?")
R("coding", "Write a Python function that returns True if a number is even.")
R("coding", "Comment afficher « Bonjour » dans la console en Python ?", "fr")
R("coding", "Rename a git branch locally — what's the command?")

R("math", "What's 15% of 240?")
R("math", "12 x 17 = ?")
R("math", "Convert 72°F to Celsius.")
R("math", "If I drive 180 km in 2 hours, what's my average speed?")
R("math", "What's the square root of 144?")
R("math", "Round 3.14159 to two decimal places.")
R("math", "Wie viel sind 3/4 plus 1/8?", "de")
R("math", "¿Cuánto es 250 dividido entre 8?", "es")
R("math", "How many minutes are in 3.5 hours?")
R("math", "A shirt costs €40 and is 25% off. What's the sale price?")

R("creative_writing", "Write a haiku about coffee.")
R("creative_writing", "Give me a catchy slogan for a neighbourhood bakery.")
R("creative_writing", "Write a two-line birthday wish for a coworker.")
R("creative_writing", "Suggest five names for a fantasy football team.")
R("creative_writing", "Écris un petit poème de quatre vers sur l'automne.", "fr")
R("creative_writing", "Escribe una frase motivadora para empezar la semana.", "es")
R("creative_writing", "Schreib einen kurzen Reim über einen Hund, der gern schwimmt.", "de")
R("creative_writing", "Write a limerick about a cat who hates Mondays.")

# look-alikes and kind-mentions, routine
R(
    "coding",
    "Stripe test mode: which expiry date and CVC do I use with the test card 4242 4242 4242 4242?",
    notes="4242 4242 4242 4242 is Stripe's published test card (Luhn-valid) in a documentation question; not a real card.",
    adv=LOOK,
)
R(
    "coding",
    "In the Django docs every example uses user@example.com. Why example.com specifically, and can I use it in my own tests?",
    notes="user@example.com is an RFC 2606 documentation placeholder, asked about as such.",
    adv=LOOK,
)
R(
    "factual_qa",
    "Is 192.168.0.1 a private or a public IP address?",
    notes="RFC 1918 address asked about as a textbook fact; identifies no one.",
    adv=LOOK,
)
R(
    "factual_qa",
    "Why do so many home routers use 10.0.0.1 or 192.168.1.1 as their admin address?",
    notes="Private router defaults discussed generically; not anyone's address.",
    adv=LOOK,
)
R(
    "factual_qa",
    "In which city did John F. Kennedy give his 'Ich bin ein Berliner' speech, and in what year?",
    notes="Public figure in a public role.",
    adv=LOOK,
)
R(
    "factual_qa",
    "Warum steht auf Musterausweisen und in Formularbeispielen immer 'Erika Mustermann'?",
    "de",
    notes="Erika/Max Mustermann is the German placeholder name, not a person.",
    adv=LOOK,
)
R(
    "factual_qa",
    "What format does a UK National Insurance number have?",
    notes="Asks about a PII kind but contains no value.",
    adv=NOVALUE,
)
R(
    "factual_qa",
    "How do I change the email address on my Amazon account?",
    notes="Mentions the user's email but contains no value.",
    adv=NOVALUE,
)
R(
    "coding",
    "What is 127.0.0.1 and why does my Flask app say it's running there?",
    notes="Loopback address; not personal.",
    adv=LOOK,
)
R(
    "factual_qa",
    "What does the 978 at the start of ISBN 978-0-306-40615-7 mean?",
    notes="Long check-digited number that is not PII (an ISBN).",
    adv=LOOK,
)
R(
    "factual_qa",
    "¿Qué letra lleva el DNI y cómo se calcula? Solo la regla, sin ejemplos.",
    "es",
    notes="Asks about the DNI check letter; no DNI value in the prompt.",
    adv=NOVALUE,
)
R(
    "coding",
    "In semantic versioning, is 10.0.0.1 a valid version string? Why or why not?",
    notes="IP-shaped version string in a versioning question; no address of anyone.",
    adv=LOOK,
)
R(
    "creative_writing",
    "Write a short dialogue in which Sherlock Holmes explains a smartphone to Dr Watson.",
    notes="Fictional characters, not private individuals.",
    adv=LOOK,
)
S(
    "factual_qa",
    "Was Ada Lovelace really the first programmer? Summarise the historians' debate about her notes on the Analytical Engine.",
    notes="Historical public figure.",
    adv=LOOK,
)
R(
    "coding",
    "Which HTTP status code should an API return when the API key header is missing?",
    notes="Mentions API keys but contains none.",
    adv=NOVALUE,
)

# long but routine (no PII)
LR_NOTE = "Long input, but the task is mechanical; length alone must not push it off the edge."
R(
    "rewriting",
    lambda f: (
        "Fix the typos in this blog post before I publish it:\n\n"
        + add_typos(pick_until(f.r, BLOG_EN, 1800, 3600), f.r)
    ),
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: (
        "Fix the typos, keep everything else exactly as it is:\n\n"
        + add_typos(pick_until(f.r, MEMO_EN, 1800, 3600), f.r)
    ),
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: (
        "Korrigiere bitte nur die Tippfehler in unserem Rundbrief:\n\n"
        + add_typos(pick_until(f.r, NEWSLETTER_DE, 1500, 3600), f.r)
    ),
    "de",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: (
        "Corrige les fautes de frappe dans ce compte rendu, sans changer le style :\n\n"
        + add_typos(pick_until(f.r, NOTES_FR, 1600, 3600), f.r)
    ),
    "fr",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "translation",
    lambda f: "Translate this FAQ into French:\n\n" + pick_until(f.r, FAQ_EN, 1600, 3600),
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "translation",
    lambda f: (
        "Traduce al inglés este aviso para los vecinos extranjeros:\n\n" + pick_until(f.r, CIRCULAR_ES, 1500, 3600)
    ),
    "es",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "translation",
    lambda f: "Übersetze diesen Rundbrief ins Englische:\n\n" + pick_until(f.r, NEWSLETTER_DE, 1500, 3600),
    "de",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "summarising",
    lambda f: "Summarise this blog post in three bullet points:\n\n" + pick_until(f.r, BLOG_EN, 1800, 3600),
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "summarising",
    lambda f: (
        "Give me a five-line summary of this memo for the team channel:\n\n" + pick_until(f.r, MEMO_EN, 1800, 3600)
    ),
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: "Strip the markdown from these release notes and give me plain text:\n\n" + RELEASE_NOTES_MD,
    notes=LR_NOTE,
    adv=LONGROUTINE,
)

# ============================ hard, no PII, strong open model ============================
S(
    "coding",
    "Write a Python function that merges overlapping intervals, e.g. [[1,3],[2,6],[8,10]] -> [[1,6],[8,10]], and add a few pytest cases including touching intervals like [1,2],[2,3].",
)
S(
    "coding",
    "Write Django models and admin registration for a small library: books, authors (many-to-many), and loans with a due date. Add a method on Loan that says whether it's overdue and a custom admin filter for overdue loans.",
)
S(
    "coding",
    "Implement an LRU cache class in TypeScript with get/put in O(1). Explain which data structures you use and why.",
)
S(
    "coding",
    """Refactor this function to remove the nested ifs and make it easy to unit test:

```python
def price(user, cart):
    if user:
        if user.is_premium:
            if cart.total > 100:
                return cart.total * 0.8
            else:
                return cart.total * 0.9
        else:
            if cart.total > 100:
                return cart.total * 0.95
            else:
                return cart.total
    else:
        return cart.total
```""",
)
S(
    "coding",
    "Write a bash script that finds all .log files older than 14 days under /var/log/myapp, gzips them, and deletes .gz files older than 90 days. It must be safe to run from cron (no globbing surprises, handles spaces in names, logs what it did).",
)
S(
    "coding",
    "Explain why this prints 3 three times and show two different ways to fix it:\n\nfor (var i = 0; i < 3; i++) { setTimeout(() => console.log(i), 0); }",
)
S(
    "coding",
    'Write a Go HTTP handler that accepts a JSON body {"items": [...]}, checks that there are between 1 and 100 items, and returns 400 with a helpful JSON error otherwise. Include a table-driven test.',
)
S(
    "coding",
    """Port this to Python 3 and explain each change:

print 'total:', total
if d.has_key('a'):
    for k, v in d.iteritems():
        print k, v
result = map(lambda x: x / 2, values)
""",
)
S(
    "coding",
    "Write a React hook useDebounce(value, delay) and show how to use it in a search box that calls an API only after the user stops typing.",
)
S(
    "coding",
    "Write pytest tests for a function parse_duration('1h30m') -> 5400 (seconds). Cover edge cases such as '90s', '2h', '', '1h-5m' and whitespace.",
)
S(
    "coding",
    "Schreibe eine Python-Funktion, die eine CSV-Datei mit Semikolon als Trenner und deutschem Dezimalkomma (z. B. 1.234,56) einliest und die Summe der Spalte 'Betrag' als Decimal zurückgibt.",
    "de",
)
S(
    "coding",
    "Escribe una función en JavaScript que agrupe una lista de objetos por una clave y devuelva un objeto con los grupos. Incluye un ejemplo y explica la complejidad.",
    "es",
)
S(
    "coding",
    "Écris un Dockerfile multi-étapes pour une application Node.js (build avec npm ci, image finale légère, utilisateur non-root) et explique chaque étape.",
    "fr",
)
S(
    "coding",
    """This Go function never returns. Why?

```go
func process(items []string) map[string]int {
    var wg sync.WaitGroup
    var mu sync.Mutex
    counts := map[string]int{}
    for _, it := range items {
        wg.Add(1)
        go func(wg sync.WaitGroup, s string) {
            defer wg.Done()
            mu.Lock()
            counts[s]++
            mu.Unlock()
        }(wg, it)
    }
    wg.Wait()
    return counts
}
```""",
)
S(
    "coding",
    "At -O0 this returns 0 for INT_MAX, at -O2 it returns 1. Explain and give a standards-compliant version:\n\nint will_increase(int x) { return x + 1 > x; }",
)
S(
    "coding",
    "Write a Luhn check in Python plus pytest tests. Use 4111 1111 1111 1111 as the valid case and the same number with the last digit changed as the invalid one.",
    notes="4111 1111 1111 1111 is the classic published test card number inside a coding task; not a real card.",
    adv=LOOK,
)
S(
    "coding",
    "Write a regex for validating email addresses in a signup form and pytest cases with user@example.com, first.last+tag@example.org (should pass) and a few invalid ones.",
    notes="example.com/example.org are documentation placeholders used as test data.",
    adv=LOOK,
)
S(
    "coding",
    "Write a Django test that creates a user with email alice@example.com and password 'testpass123', logs in through the client, and checks the dashboard returns 200.",
    notes="Placeholder email and throwaway test password in a test fixture; clearly documentation-style values, not a real credential.",
    adv=LOOK,
)
S(
    "coding",
    "Generate 10 rows of fake customer data (name, email, phone, city) as CSV for seeding my local dev database. Make the emails use example.com.",
    notes="Asks the model to invent fake PII; the prompt itself contains none.",
    adv=NOVALUE,
)

S(
    "coding",
    "Given tables customers(id, name, country) and orders(id, customer_id, amount, created_at), write SQL for the top 5 countries by total order amount in 2024, counting countries whose customers placed no orders as zero.",
)
S(
    "coding",
    "PostgreSQL: for each user return their most recent row from logins(user_id, ts, country). Show a DISTINCT ON version and a window-function version and say which is faster with an index on (user_id, ts).",
)
S(
    "coding",
    "Why is this slow and which index would help? SELECT * FROM events WHERE tenant_id = 42 AND created_at > now() - interval '7 days' ORDER BY created_at DESC LIMIT 50;",
)
S(
    "coding",
    "Plan a migration that splits a full_name column into first_name and last_name in a Postgres table with 2 million rows, without long locks. Give the SQL for each step.",
)

S(
    "factual_qa",
    "Explain step by step how a browser establishes an HTTPS connection (TLS 1.3), for someone who knows basic networking.",
)
S(
    "factual_qa",
    "What is the difference between a process and a thread, and when would you use multiprocessing instead of threading in Python?",
)
S("factual_qa", "Explain gradient descent and the role of the learning rate with a small worked numeric example.")
S(
    "factual_qa",
    "Explain how a Bloom filter works, give the false-positive rate formula, and size one for 1 million items at 1% false positives.",
)
S(
    "factual_qa",
    "Erkläre den Unterschied zwischen TCP und UDP und nenne je zwei typische Anwendungen mit Begründung.",
    "de",
)
S(
    "factual_qa",
    "Explique le fonctionnement de la photosynthèse à un élève de lycée, avec les équations principales des phases claire et sombre.",
    "fr",
)
S(
    "factual_qa",
    "Explica qué es la inflación, cómo la mide un banco central y por qué sube los tipos de interés para frenarla.",
    "es",
)
S(
    "factual_qa",
    "Explain the CAP theorem with a concrete example of a system that chooses availability over consistency, and what the user sees during a partition.",
)

S(
    "math",
    "A train leaves at 9:40 at 80 km/h; another leaves the same station at 10:10 at 110 km/h in the same direction. When and how far from the station does the second one catch up?",
)
S("math", "Solve 2x + 3y - z = 5, x - y + 2z = 3, 3x + y + z = 10 and show the elimination steps.")
S(
    "math",
    "I invest €5,000 at 4% a year compounded monthly. How much do I have after 7 years, and how long until it doubles?",
)
S("math", "Differentiate f(x) = x² ln(x) / (1 + x) and simplify the result.")
S(
    "math",
    "A bag has 5 red and 7 blue marbles. I draw 3 without replacement. What's the probability that at least 2 are red?",
)
S(
    "math",
    "Estimate how many piano tuners work in Germany. Lay out a Fermi estimate with explicit assumptions and a sanity check.",
)
S(
    "math",
    "Subnetting exercise: split 10.0.0.0/22 into four equal subnets and list the network address, broadcast address and usable host range of each.",
    notes="Private 10.x range in a textbook subnetting exercise: addresses describe no person or device owner, so pii=false.",
    adv=LOOK,
)

S(
    "summarising",
    lambda f: (
        "Turn this postmortem into a one-page brief for executives: what happened, customer impact, root cause in plain words, and the three actions that matter most, with owners as roles.\n\n"
        + pick_until(f.r, POSTMORTEM_EN, 1800, 3800)
    ),
    notes="Long, multi-part synthesis; no personal data.",
)
S(
    "summarising",
    lambda f: (
        "Summarise these hybrid-working guidelines as a table: rule, who it applies to, what changes compared with 'before', and open questions an employee might ask.\n\n"
        + pick_until(f.r, MEMO_EN, 1800, 3800)
    ),
)

S(
    "translation",
    "Translate this marketing line into German, keep the playful tone and find an equivalent pun: 'Our coffee is so strong it files its own taxes. Wake up and smell the productivity.'",
)
S(
    "translation",
    "Translate into Spanish (Spain), formal legal register: 'The tenant shall notify the landlord in writing of any defects within fourteen days of discovering them, failing which the tenant shall bear the cost of any resulting damage.'",
)
S(
    "translation",
    "Traduis ce paragraphe en anglais en gardant la terminologie exacte : « La mise en cache côté serveur réduit la latence perçue, mais impose une stratégie d'invalidation rigoureuse lorsque les données sources sont modifiées par plusieurs services. »",
    "fr",
)
S(
    "translation",
    "Übersetze ins Französische und erkläre, wo du frei übersetzen musstest: 'Da haben wir den Salat. Jetzt müssen wir in den sauren Apfel beißen und das Projekt neu planen.'",
    "de",
)

S(
    "extraction",
    "Turn this job ad into JSON with fields title, locations, salary_min, salary_max, currency, remote (bool) and skills (list): 'Senior Backend Engineer (Go) – Berlin or remote within the EU. €75–90k plus equity. You'll work with Kafka, PostgreSQL and Kubernetes, and help us migrate a PHP monolith to services.'",
)
S(
    "extraction",
    "Extract every deadline from this update as a table (task, owning team, date, depends on): 'Design freeze is 4 March (product). Backend API must be ready a week after that (platform). QA starts when the API is ready and takes ten working days (QA). Marketing needs screenshots three days before launch; launch is the Tuesday after QA ends.'",
)
S(
    "extraction",
    "Parse these invoice lines into CSV with columns sku, qty, unit_price, line_total, and tell me if any total is wrong:\nA-113 x4 @ 12.50 = 50.00\nB-207 x12 @ 3.15 = 37.80\nC-019 x1 @ 199.00 = 189.00\nA-113 x2 @ 12.50 = 25.00",
)
S(
    "extraction",
    "Extrae en JSON los datos de este anuncio: 'Piso luminoso de 85 m² en Valencia, barrio de Ruzafa, 3 habitaciones, 2 baños, cuarta planta con ascensor, 1.150 €/mes, gastos de comunidad incluidos, sin mascotas, disponible desde el 1 de octubre.'",
    "es",
)

S(
    "rewriting",
    "Rewrite this for a 10-year-old without losing any facts: 'Vaccines train the immune system by exposing it to a harmless piece or weakened form of a pathogen, so that memory cells can respond faster and more strongly if the real pathogen appears later.'",
)
S(
    "rewriting",
    "Rewrite this cover-letter paragraph in under 80 words, confident but not arrogant: 'I believe that I am probably a good fit for this role because I have done quite a lot of work with data pipelines and I think I could learn your stack fairly quickly if given the chance to do so.'",
)
S(
    "rewriting",
    "Make this product description SEO-friendly for 'ergonomic office chair' without keyword stuffing: 'Our chair has adjustable height, a mesh back and armrests that move. It is comfortable for long days.'",
)
S(
    "rewriting",
    "Schreibe diese E-Mail an einen Kunden um: deeskalierend, klar, höchstens 120 Wörter. Inhalt: Die Lieferung verzögert sich um drei Wochen wegen eines Engpasses bei Chips; wir bieten 10 % Rabatt oder kostenlose Stornierung.",
    "de",
)

S(
    "creative_writing",
    "Write a 300-word short story about a lighthouse keeper who receives a letter from the future. End with a twist.",
)
S(
    "creative_writing",
    "Write a two-minute wedding toast for my older sister. Funny but warm; she loves hiking and terrible puns.",
)
S(
    "creative_writing",
    "Écris une courte nouvelle (250 mots) qui se passe dans un café parisien pendant une panne d'électricité.",
    "fr",
)
S("creative_writing", "Escribe un poema de cuatro estrofas sobre el mar, con rima consonante ABAB.", "es")

S(
    "domain_finance",
    "Explain the difference between a Roth IRA and a traditional IRA, and which kinds of people typically benefit from each.",
)
S(
    "domain_law",
    "Under the UK Consumer Rights Act, what's the difference between my statutory rights and a manufacturer's guarantee when a laptop breaks after 8 months?",
)
S(
    "domain_medicine",
    "What are the common side effects of ibuprofen, and why shouldn't it be combined with other NSAIDs?",
)
S(
    "domain_engineering",
    "Explain how a four-stroke petrol engine works and what the compression ratio means for efficiency and knock.",
)
S(
    "domain_law",
    "Was ist der Unterschied zwischen einer GmbH und einer UG (haftungsbeschränkt), und wann lohnt sich welche Rechtsform?",
    "de",
)
S("domain_finance", "What does a P/E ratio tell you, what are its limits, and how does it compare with EV/EBITDA?")
S(
    "domain_finance",
    "Walk me through validating the IBAN DE89 3704 0044 0532 0130 00 by hand — it's the standard example from the IBAN documentation. Show the mod-97 steps.",
    notes="Well-known published example IBAN (checksum-valid) in a how-does-it-work question; belongs to no customer.",
    adv=LOOK,
)
S(
    "creative_writing",
    "Summarise the main arguments of Martin Luther King Jr.'s 'I Have a Dream' speech and the rhetorical devices he uses.",
    notes="Public figure in a public role.",
    adv=LOOK,
)
S(
    "coding",
    "I'm writing internal docs for our AWS setup. Using the documented example values AKIAIOSFODNN7EXAMPLE / wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY, show a ~/.aws/credentials file with two profiles and a boto3 snippet that selects one.",
    notes="AWS's own documentation placeholder key pair (contains 'EXAMPLE'); not a live secret.",
    adv=LOOK,
)
S(
    "coding",
    "Write a JavaScript form validator for UK National Insurance numbers. HMRC's own example is QQ 12 34 56 C — accept it with and without spaces, and reject the prefixes that are never issued.",
    notes="QQ123456C is HMRC's documentation example (QQ is never issued).",
    adv=LOOK,
)
S(
    "coding",
    "Design a Redis sliding-window rate limiter for an API: give the Lua script and explain which race conditions doing it in Lua avoids.",
)

# ============================ hard, no PII, frontier model ============================
SH_NOTE = "Short prompt, but it needs a real proof or frontier-level reasoning."
C("math", "Prove there are infinitely many primes p with p ≡ 1 mod 4.", notes=SH_NOTE, adv=SHORTHARD)
C("math", "Show that every group of order p² is abelian.", notes=SH_NOTE, adv=SHORTHARD)
C("math", "Prove that the sum of the reciprocals of the primes diverges.", notes=SH_NOTE, adv=SHORTHARD)
C("math", "Find all f: ℝ→ℝ with f(x + y) + f(xy) = f(x)f(y) + 1.", notes=SH_NOTE, adv=SHORTHARD)
C(
    "math",
    "Construct a continuous, nowhere differentiable function on [0,1] and prove it has both properties.",
    notes=SH_NOTE,
    adv=SHORTHARD,
)
C(
    "math",
    "For positive reals a, b, c with abc = 1, prove 1/(a³(b+c)) + 1/(b³(c+a)) + 1/(c³(a+b)) ≥ 3/2.",
    notes=SH_NOTE,
    adv=SHORTHARD,
)
C("math", "Montrer que A₅ est simple.", "fr", notes=SH_NOTE, adv=SHORTHARD)
C(
    "math",
    "Prove that in every tournament some player beats every other player either directly or through one intermediary.",
    notes=SH_NOTE,
    adv=SHORTHARD,
)
C("math", "Why doesn't P ≠ NP follow from the time hierarchy theorem?", notes=SH_NOTE, adv=SHORTHARD)
C(
    "math",
    "Is 3-colourability of planar graphs NP-complete? Justify, and explain why 4-colourability is trivial as a decision problem.",
    notes=SH_NOTE,
    adv=SHORTHARD,
)
C(
    "math",
    "How many ways are there to tile a 2×n board with dominoes and L-trominoes? Derive the recurrence and a closed form.",
)
C("math", "Compute ∫₀^∞ sin(x)/x dx rigorously, justifying every interchange of limit and integral.")
C("math", "Beweise den Vier-Quadrate-Satz von Lagrange oder skizziere den Beweis mit allen wesentlichen Lemmata.", "de")
C(
    "math",
    "What's the expected number of fair coin flips until HTHT first appears? Derive it and explain why the answer differs from HHTT.",
)
C(
    "math",
    "Prove the halting problem is undecidable, then use Rice's theorem to show that 'L(M) is regular' is undecidable, checking each hypothesis of the theorem.",
)
C("math", "Prove that randomized quicksort makes 2n ln n + O(n) comparisons in expectation.")

C(
    "domain_science",
    "Explain why the Higgs mechanism gives mass to the W and Z bosons but leaves the photon massless, including the role of the weak mixing angle.",
)
C(
    "domain_science",
    "Derive the Schwarzschild radius from the metric and explain why a distant observer never sees an infalling object cross the horizon.",
)
C(
    "domain_science",
    "What are the leading explanations for the Hubble tension, and which observations could discriminate early-dark-energy models from distance-ladder systematics?",
)
C(
    "domain_science",
    "Compare CRISPR base editing and prime editing: mechanism, which edits each can make, off-target profiles, and the delivery problems for in vivo therapy.",
)
C(
    "domain_science",
    "Why did multiple sequence alignments matter so much for AlphaFold2, and where does structure prediction still fail (orphan proteins, conformational ensembles, complexes)?",
)
C(
    "domain_science",
    "Why does BCS theory fail for the cuprate superconductors, and what are the main competing explanations?",
)
C(
    "domain_science",
    "Erkläre, warum der Quanten-Hall-Effekt so präzise quantisiert ist und welche Rolle die Chern-Zahl dabei spielt.",
    "de",
)
C(
    "domain_science",
    "Quelles sont les limites des modèles CMIP6 sur la sensibilité climatique à l'équilibre, et pourquoi certains modèles sont-ils jugés « trop chauds » ?",
    "fr",
)
C(
    "domain_science",
    "量子誤り訂正における表面符号のしきい値定理を説明し、論理量子ビットの誤り率を下げた最近の実験がなぜ重要なのか教えてください。",
    "ja",
)

C(
    "coding",
    "Design a globally distributed rate limiter for an API gateway handling 2M req/s across 6 regions with under 5 ms added latency. Discuss consistency, failure modes and how you'd test it.",
)
C(
    "coding",
    "Design the storage layer of a multi-tenant time-series database: compression, indexing of high-cardinality labels, retention and compaction. Compare with Prometheus TSDB and ClickHouse.",
)
C(
    "coding",
    "Tree with n ≤ 2·10⁵ weighted edges, q ≤ 10⁵ queries 'how many vertex pairs have path length ≤ k'. Design an algorithm, analyse its complexity, and explain how to make it fast enough in practice.",
)
C(
    "coding",
    "How does Raft handle a leader that is partitioned away but still believes it's the leader? Construct a scenario where an implementation without pre-vote and check-quorum loses availability.",
)
C(
    "coding",
    "Our JVM service (G1, 24 GB heap, allocation rate 1.5 GB/s) shows p99 latency spikes every ~2 minutes while CPU stays flat. Rank the hypotheses and give the exact diagnostics that would confirm each.",
)
C(
    "coding",
    "Design a CRDT for a collaborative rich-text editor with concurrent inserts, deletes and formatting spans. How do you avoid interleaving anomalies and keep tombstones bounded?",
)
C(
    "coding",
    "A small draft model runs on user devices and a large verifier in a datacenter (speculative decoding). How should the draft length adapt to RTT and acceptance rate? Derive the expected speed-up.",
)
C(
    "coding",
    "Write a lock-free multi-producer single-consumer queue in C++ and argue why each memory ordering you use is sufficient.",
)
C(
    "coding",
    "Diseña un sistema de pagos sobre Kafka y PostgreSQL con idempotencia y semántica de exactamente una vez de cara al usuario. Explica cómo manejas los fallos parciales entre el cobro y la confirmación.",
    "es",
)
C(
    "coding",
    """This asyncio service hangs under load, but only for some users. Find the bug and fix it without losing the de-duplication:

```python
import asyncio

_lock = asyncio.Lock()
_cache: dict[str, object] = {}

async def cached(key, loader):
    if key in _cache:
        return _cache[key]
    async with _lock:
        if key not in _cache:
            _cache[key] = await loader(key)
    return _cache[key]

async def load_profile(user_id):
    return await db.fetch_profile(user_id)

async def load_dashboard(user_id):
    profile = await cached(f"profile:{user_id}", load_profile)
    if profile.is_admin:
        teams = await cached(f"teams:{user_id}", load_teams)
    ...

async def load_teams(user_id):
    org = await cached(f"org:{user_id}", load_org)
    return await db.fetch_teams(org.id)
```""",
)
C(
    "coding",
    "Our Postgres hot standby cancels long analytics queries with 'canceling statement due to conflict with recovery'. Explain the mechanism and compare hot_standby_feedback, max_standby_streaming_delay and a logical replica, including the cost of each for the primary.",
)
C(
    "coding",
    "Pods get OOMKilled although -Xmx is 70% of the container limit. Walk through the non-heap consumers (metaspace, direct buffers, thread stacks, code cache, glibc arenas) and how to measure and cap each.",
)
C(
    "coding",
    "Throughput between two datacenters (80 ms RTT, 10 Gbit/s, 0.1% packet loss) tops out near 50 Mbit/s per TCP flow. Explain with the Mathis formula and compare what CUBIC vs BBR and buffer tuning would change.",
)
C(
    "coding",
    lambda f: (
        "Under load this client occasionally deadlocks and sometimes refreshes the same tenant's token many times in parallel. Find every concurrency bug, explain the interleavings, and give a fixed version.\n\n```python\n"
        + CODE_CACHE_PY
        + "```"
    ),
    notes="Long code paste; several interacting bugs (unsynchronised check-then-act, sleep under lock, re-entrant lock via secret provider).",
)

C(
    "domain_law",
    "A German SaaS company wants to let its US subsidiary access EU support tickets containing personal data. After Schrems II and the EU-US Data Privacy Framework, what are the options and the residual risk if the DPF is struck down?",
)
C(
    "domain_law",
    "Under English law, can a B2B SaaS contract exclude liability for data loss caused by the supplier's negligence? Discuss UCTA 1977 reasonableness and the relevant case law.",
)
C(
    "domain_law",
    "Ein Berliner Vermieter will nach einem Wasserschaden die Miete wegen 'Modernisierung' erhöhen. Wann liegt eine Modernisierung nach § 555b BGB vor und wann nur Instandsetzung? Welche Rechte hat der Mieter?",
    "de",
)
C(
    "domain_law",
    "Dans quelles conditions une clause de non-concurrence est-elle valable en droit du travail français, et que se passe-t-il si la contrepartie financière manque ?",
    "fr",
)
C(
    "domain_law",
    "¿Qué diferencias hay entre un despido objetivo y uno disciplinario en España en indemnización, preaviso e impugnación, y qué pasa si el juez lo declara improcedente?",
    "es",
)
C(
    "domain_law",
    "How does the EU AI Act classify a CV-screening model versus a general-purpose chat model, and what obligations fall on the provider versus the deployer in each case?",
)
C(
    "domain_law",
    lambda f: (
        "Review this privacy policy for GDPR problems. For each problem cite the article it conflicts with and propose compliant wording.\n\n"
        + pick_until(f.r, PRIVACY_POLICY_EN, 1800, 3800)
    ),
    notes="Long document, needs legal judgement across many articles.",
)

C(
    "domain_medicine",
    "A 67-year-old on warfarin for atrial fibrillation is started on clarithromycin for pneumonia. What interaction risks exist, how should INR be managed, and which antibiotics avoid the interaction?",
    notes="Anonymous clinical vignette (age only); not PII.",
)
C(
    "domain_medicine",
    "Differential diagnosis for a 30-year-old with episodes of fever, abdominal pain and raised CRP lasting 2–3 days every few weeks, well in between. Which tests distinguish the main candidates?",
    notes="Anonymous vignette; not PII.",
)
C(
    "domain_medicine",
    "Summarise the evidence for SGLT2 inhibitors in heart failure with preserved ejection fraction, citing the key trials and their endpoints.",
)
C(
    "domain_medicine",
    "Worin unterscheiden sich Typ-1- und Typ-2-Myokardinfarkt nach der Universal Definition, und warum ist das therapeutisch relevant?",
    "de",
)
C(
    "domain_medicine",
    "How should empirical antibiotics for community-acquired pneumonia change for a patient hospitalised with IV antibiotics in the last 90 days, per ATS/IDSA 2019?",
)
C(
    "domain_medicine",
    "¿Cuándo está indicada la anticoagulación en fibrilación auricular con CHA2DS2-VASc de 1, y cómo cambia la recomendación en mujeres?",
    "es",
)

C(
    "domain_finance",
    "Price a European call with S=100, K=105, r=3%, σ=25%, T=0.5 with Black–Scholes, then explain how a volatility smile changes the picture and how a trader would hedge vega.",
)
C(
    "domain_finance",
    "A company has $400M of floating-rate debt and fears a rate spike. Compare a cap, a collar and a swap, with rough cost intuition and the hedge-accounting consequences under IFRS 9.",
)
C(
    "domain_finance",
    "Explain the 2023 collapse of Silicon Valley Bank in terms of duration risk, HTM accounting and deposit concentration, and summarise the regulatory responses that followed.",
)
C(
    "domain_finance",
    "Wie wird in Deutschland der Verkauf einer vermieteten Eigentumswohnung nach 8 Jahren besteuert, wenn sie zwischendurch 2 Jahre selbst genutzt wurde? Welche Sonderfälle gibt es?",
    "de",
)
C(
    "domain_finance",
    "Build a delta-neutral position from a stock and two options and explain when gamma scalping it is profitable after transaction costs.",
)
C(
    "domain_finance",
    "Expliquez le canal de transmission des TLTRO de la BCE et pourquoi la modification de leurs conditions en 2022 a été controversée.",
    "fr",
)
C(
    "domain_finance",
    "Does a rise in interest rates make bank runs more likely? Argue within the Diamond–Dybvig model and say what the model leaves out.",
    notes=SH_NOTE,
    adv=SHORTHARD,
)

C(
    "domain_engineering",
    "Size a steel I-beam for a 6 m simply supported span carrying 12 kN/m including self-weight, to Eurocode 3: check bending, shear and deflection (L/250). State your assumptions.",
)
C(
    "domain_engineering",
    "A 48 V to 5 V, 10 A buck converter rings at 120 MHz on the switch node. What causes it, how do you size an RC snubber, and what layout changes help?",
)
C(
    "domain_engineering",
    "Design a PID controller for a quadcopter's roll axis and explain tuning, actuator saturation and integrator wind-up handling.",
)
C(
    "domain_engineering",
    "Wie dimensioniere ich eine Wärmepumpe für ein teilsaniertes Einfamilienhaus (150 m², Baujahr 1985)? Welche Kennwerte brauche ich und welche Fehler passieren typischerweise?",
    "de",
)
C(
    "domain_engineering",
    "Why do lithium-ion cells degrade faster at high state of charge and temperature? Explain SEI growth and lithium plating, and how a BMS should set charge limits for a fleet of delivery vans.",
)
C(
    "domain_engineering",
    "For a 5 Gbps differential pair on a 4-layer PCB, how do I choose trace width and spacing for 100 Ω, place return-path vias and handle a layer transition?",
)

C(
    "reasoning",
    "Twelve coins, one counterfeit that is heavier or lighter. With three weighings on a balance, find it and tell whether it's heavier or lighter. Give the full decision tree.",
)
C(
    "reasoning",
    "Plan a 10-day rail trip from Lisbon to Vienna through at least five cities, at most 6 hours of travel a day, under €600 in train fares, and not arriving in a museum city on a Monday. Justify the route and budget.",
)
C(
    "reasoning",
    "100 prisoners and a light bulb: give a strategy that guarantees eventual release and estimate the expected number of days.",
)
C(
    "reasoning",
    "Monty Hall variant: the host doesn't know where the car is and happens to open a door with a goat. Should you switch? Derive it with Bayes.",
)
C(
    "reasoning",
    "What are the main differences between Mamba-style selective state-space models and transformers, and where does Mamba-2's state-space duality fit in?",
)
C(
    "reasoning",
    "Summarise the NIST post-quantum signature standards (ML-DSA, SLH-DSA, FN-DSA): key and signature sizes, performance, and deployment gotchas in TLS.",
)
C(
    "reasoning",
    "How does io_uring differ from epoll for network servers, and what security problems led some vendors to restrict it?",
)
C(
    "reasoning",
    "What's the current state of the matrix-multiplication exponent ω, and which techniques produced the recent improvements?",
)
C(
    "reasoning",
    lambda f: (
        "Here's the application log from the 20 minutes around yesterday's checkout outage. Find the root cause (not just the symptoms), explain the causal chain, and say what we should change.\n\n```\n"
        + "\n".join(outage_log(f.r))
        + "\n```"
    ),
    notes="Long log, no personal data; root cause must be inferred across lines.",
)

C(
    "reasoning",
    "Compare the economic arguments in Franklin D. Roosevelt's first inaugural address with Ronald Reagan's first inaugural: how did each frame the role of government?",
    notes="Public figures in public roles.",
    adv=LOOK,
)
C(
    "reasoning",
    "Wie hat Angela Merkel 2015 ihren Satz 'Wir schaffen das' begründet, und wie hat sich die Bewertung dieser Politik in der deutschen Debatte seitdem verändert?",
    "de",
    notes="Public figure in a public role.",
    adv=LOOK,
)
C(
    "reasoning",
    "Analysez la stratégie rhétorique d'Emmanuel Macron dans son discours de la Sorbonne sur l'Europe (2017) et comparez-la à celle du discours de 2024.",
    "fr",
    notes="Public figure in a public role.",
    adv=LOOK,
)
C(
    "factual_qa",
    "Why is 078-05-1120 called the most misused Social Security number in history, and what did the SSA do about it?",
    notes="A famous SSN printed on sample wallet cards in 1938 and voided by the SSA; public trivia, not a live identifier. Needs niche historical knowledge.",
    adv=LOOK,
)

# ==================================== routine, with PII ===================================
R(
    "rewriting",
    "Fix the typos: 'Hi ⟦first#a⟧, pls call me back on ⟦phone_us⟧ when you get a chnace, its about the lease. Thx, ⟦name#b⟧'",
)
R(
    "rewriting",
    "Make this more professional: 'hey its ⟦name⟧, my card ⟦card⟧ got charged twice for the same order, fix it pls'",
)
R(
    "translation",
    "Translate to German: 'My name is ⟦name#a⟧ and my passport number is ⟦passport_us⟧. I'd like to check in for my flight to Frankfurt.'",
)
R(
    "translation",
    "Übersetze ins Englische: 'Bitte überweisen Sie die Kaution auf mein Konto ⟦iban_de⟧, Kontoinhaberin ⟦name_f#a⟧.'",
    "de",
)
R(
    "rewriting",
    "Corrige l'orthographe : « Bonjour, je m'apelle ⟦name#a⟧, mon numero est le ⟦phone_fr⟧, rapelez moi svp pour le rendez vous. »",
    "fr",
)
R(
    "translation",
    "Traduce al inglés: 'Hola, soy ⟦name#a⟧, mi DNI es ⟦es_dni⟧ y quería cambiar la dirección de envío de mi pedido.'",
    "es",
)
R(
    "extraction",
    "Extract the email and phone number from this signature as JSON:\n\n⟦name#a⟧\nSenior Account Manager\nM: ⟦phone_uk⟧\n⟦email#a⟧",
)
R("rewriting", "Format this number in E.164, it's my German mobile: ⟦phone_de⟧")
R("creative_writing", "Write a short thank-you note to my neighbour ⟦name⟧ for watering my plants while I was away.")
R(
    "extraction",
    "Put this into a table with columns name, date of birth, email: ⟦name#a⟧, born ⟦dob#a⟧, ⟦email#a⟧; ⟦name#b⟧, born ⟦dob#b⟧, ⟦email#b⟧.",
)
R(
    "rewriting",
    "Turn this into a tidy note to myself: cabin wifi password is ⟦password⟧, router admin login is admin / ⟦password#r⟧.",
)
R(
    "summarising",
    "Shorten this message: 'Hello, this is ⟦name⟧ from apartment 4B. I wanted to let you know that the package delivered yesterday was not mine, it was addressed to someone else, so I left it with the concierge. If you have any questions you can reach me at ⟦phone_us⟧. Thanks a lot and have a nice day.'",
)
R(
    "creative_writing",
    "Schreib mir eine kurze Abwesenheitsnotiz. In dringenden Fällen bitte an meine Kollegin ⟦name_f#a⟧ wenden: ⟦email#a⟧, ⟦phone_de⟧.",
    "de",
)
R("coding", "Is this a valid email format? ⟦email⟧")
R("rewriting", "Sort these names alphabetically by last name: ⟦name⟧, ⟦name⟧, ⟦name⟧, ⟦name⟧.")
R("chat", "Write a one-line Slack message asking ⟦name⟧ to send me the slides before 3pm.")
R("coding", "Convert to a vCard: ⟦name#a⟧, mobile ⟦phone_us⟧, email ⟦email#a⟧, address ⟦address_us⟧.")
R(
    "creative_writing",
    "Rédige un court SMS pour confirmer le rendez-vous avec ⟦name⟧ mardi à 10 h ; son numéro est le ⟦phone_fr⟧.",
    "fr",
)
R(
    "creative_writing",
    "Hazme un mensaje corto para mi casero con mi IBAN para que me devuelva la fianza: ⟦iban_es⟧.",
    "es",
)
R(
    "translation",
    "Traduci in inglese: 'Gentile ⟦name⟧, la sua prenotazione è confermata. Per modifiche chiami il ⟦phone_it⟧.'",
    "it",
)
R("translation", "Vertaal naar het Engels: 'Mijn BSN is ⟦nl_bsn⟧ en mijn geboortedatum is ⟦dob⟧.'", "nl")
R("math", "How old am I if I was born on ⟦dob⟧? Today is 1 June 2025.")
R(
    "rewriting",
    "Fill in this template: 'Dear [NAME], your order will be shipped to [ADDRESS].' Name: ⟦name⟧, address: ⟦address_uk⟧.",
)
R(
    "translation",
    "Translate to Spanish: 'I can't connect from home — my IP is ⟦ip⟧, can you whitelist it on the office VPN?'",
)
R(
    "creative_writing",
    "Mach daraus eine kurze, freundliche WhatsApp: Hallo ⟦first⟧, Treffen am Samstag bei mir, ⟦address_de⟧, ab 19 Uhr, bring gern Salat mit.",
    "de",
)
R(
    "rewriting",
    "Check my spelling: 'My Social Secuirty number is ⟦ssn⟧ and my date of birth is ⟦dob⟧, please update my file.'",
)
R("rewriting", "Reformat this NI number with the usual spaces: ⟦nino_compact⟧")
R(
    "rewriting",
    "Mets en forme ces coordonnées pour l'en-tête d'une lettre : ⟦name⟧, ⟦address_fr⟧, tél. ⟦phone_fr⟧.",
    "fr",
)
R(
    "summarising",
    "Summarise this voicemail in one line: 'Hi, it's ⟦name⟧ from the dental practice, calling to confirm your appointment on Thursday at 2:15. If you need to reschedule, call us back on ⟦phone_us⟧. Bye.'",
)
R(
    "rewriting",
    "Corrige: 'mi numero de tarjeta es ⟦card⟧ y la fecha de caducidad 08/27, porfavor cobrar la reserva de la habitacion.'",
    "es",
)
R("coding", "Write this key into a .env line named AWS_ACCESS_KEY_ID: ⟦aws_key⟧")
R(
    "rewriting",
    "Make a markdown table of the on-call rotation: week 1 ⟦name⟧ (⟦phone_us⟧), week 2 ⟦name⟧ (⟦phone_us⟧), week 3 ⟦name⟧ (⟦phone_us⟧).",
)
R("rewriting", "Bitte in Großbuchstaben umwandeln: ⟦name⟧, geboren am ⟦dob⟧, Ausweisnummer ⟦de_idcard⟧.", "de")
R("translation", "Translate into French: 'Please send the refund to IBAN ⟦iban_gb⟧ (account holder ⟦name⟧).'")
R(
    "translation",
    "Traduza para inglês: 'Olá, sou ⟦name#a⟧. O meu telemóvel é ⟦phone_pt⟧ e o meu email é ⟦email#a⟧.'",
    "pt",
)
R("translation", "次の文を英語に訳してください：「⟦name⟧と申します。電話番号は⟦phone_jp⟧です。」", "ja")
R(
    "creative_writing",
    "Write a two-sentence email introducing ⟦name#a⟧ (⟦email#a⟧) to ⟦name#b⟧ (⟦email#b⟧) — they both do pottery and live nearby.",
)
R("factual_qa", "Save this as a contact line in the format 'Name – +1 number': my aunt ⟦name_f⟧, ⟦phone_us⟧.")
R("rewriting", "Remove the duplicates from this list: ⟦email#a⟧, ⟦email#b⟧, ⟦email#a⟧, ⟦email#c⟧, ⟦email#b⟧")
R(
    "extraction",
    "From this booking confirmation, pull out the guest name and the passport number only:\n\nGuest: ⟦name⟧\nPassport: ⟦passport_uk⟧\nRoom: double, 3 nights",
)

# obfuscated PII, routine
R(
    "rewriting",
    "my email is ⟦email_spoken#a⟧ — write it normally so I can paste it in the form",
    notes="Email written out in words.",
    adv=OBF,
)
R(
    "rewriting",
    "Turn this into digits: my number is ⟦phone_words_uk_en⟧.",
    notes="Phone number spelled out digit by digit.",
    adv=OBF,
)
R(
    "rewriting",
    "Clean up the spacing of my card number for the booking form: ⟦card_odd⟧, exp 11/28",
    notes="Card number with irregular grouping.",
    adv=OBF,
)
R(
    "rewriting",
    "Schreib mir das sauber in Vierergruppen ab: meine iban ist ⟦iban_de_lower⟧",
    "de",
    notes="IBAN lower-case without spaces.",
    adv=OBF,
)
R(
    "rewriting",
    "Contact details from my CV got mangled, clean them up:\n⟦name#a⟧\nph: ⟦phone_spaced_us⟧\nmail: ⟦email_bracket#a⟧",
    notes="Phone with every character spaced; email with [at]/[dot].",
    adv=OBF,
)
R(
    "rewriting",
    "Écris-le en chiffres : mon numéro c'est ⟦phone_words_fr_fr⟧.",
    "fr",
    notes="French mobile number spoken in pairs (soixante-dix-huit...).",
    adv=OBF,
)
R(
    "rewriting",
    "Put my SSN back on one line with dashes, the form split it into three boxes:\n⟦ssn_lines⟧",
    notes="SSN split across lines.",
    adv=OBF,
)
R(
    "rewriting",
    "Pásalo a formato normal: mi correo es ⟦email_spoken_es#a⟧",
    "es",
    notes="Email dictated with 'punto' and 'arroba'.",
    adv=OBF,
)
R(
    "rewriting",
    "The IP of my home NAS is ⟦ip_defanged⟧ — rewrite it as a normal address.",
    notes="Defanged IP address.",
    adv=OBF,
)
R(
    "rewriting",
    "Schreib die Nummer als Ziffern: ⟦phone_words_de_de⟧. Das ist die Handynummer von meinem Vater.",
    "de",
    notes="German mobile number spelled out in words.",
    adv=OBF,
)


# long texts with one piece of PII near the end
def _msg(who, when, body):
    return f"--- {who}, {when} ---\n{body}"


def needle_thread_en(f, needle, typos=False, lo=1500, hi=3300, tail=True):
    body = thread_text(f.r, THREAD_EN, lo, hi)
    if typos:
        body = add_typos(body, f.r)
    out = body + "\n\n" + _msg("Facilities", "Thu 17:30", f.fill(needle))
    if tail:
        out += "\n\n" + _msg("Operations", "Thu 17:52", "Thanks, all noted. Have a good weekend everyone.")
    return out


LC_NOTE = "One personal value buried near the end of a long, otherwise PII-free text."

R(
    "rewriting",
    lambda f: (
        "Fix the typos in this email thread before I forward it to the whole floor:\n\n"
        + needle_thread_en(
            f,
            "One more thing: I'm off tomorrow but reachable for anything urgent about the delivery on my mobile, ⟦phone_uk⟧. Otherwise it can wait until Monday.",
            typos=True,
        )
    ),
    notes=LC_NOTE,
    adv=LONGPII,
)
R(
    "summarising",
    lambda f: (
        "Summarise this thread in three bullet points for a colleague who was on holiday:\n\n"
        + needle_thread_en(
            f,
            "Could whoever signs for the furniture send the delivery note to my personal address, ⟦email⟧? My work inbox is over quota until IT fixes it.",
        )
    ),
    notes=LC_NOTE,
    adv=LONGPII,
)
R(
    "summarising",
    lambda f: (
        "Fasse diese Mail-Kette in fünf Sätzen zusammen:\n\n"
        + thread_text(f.r, THREAD_DE, 1400, 3300)
        + "\n\n"
        + _msg(
            "Eigentümer Whg. 7",
            "Do 07:45",
            f.fill(
                "Ich nehme nicht am Lastschriftverfahren teil. Bitte erstatten Sie die doppelt gezahlte erste Rate auf mein neues Konto ⟦iban_de⟧, das alte ist aufgelöst."
            ),
        )
    ),
    "de",
    notes=LC_NOTE,
    adv=LONGPII,
)
R(
    "translation",
    lambda f: (
        "Translate this post into French for our gardening club's Lyon chapter:\n\n"
        + pick_until(f.r, BLOG_EN, 1500, 3300)
        + f.fill(
            "\n\nIf anyone would like cuttings from my tomato plants this spring, text me on ⟦phone_uk⟧ and I'll set some aside. — ⟦first⟧"
        )
    ),
    notes=LC_NOTE,
    adv=LONGPII,
)
R(
    "summarising",
    lambda f: (
        "Résume ce compte rendu en cinq lignes :\n\n"
        + pick_until(f.r, NOTES_FR, 1400, 3300)
        + f.fill(
            "\n\nBuvette : les bénévoles peuvent s'inscrire directement auprès de la coordinatrice, joignable le soir au ⟦phone_fr⟧. Prochaine réunion le 14 à 19 h."
        )
    ),
    "fr",
    notes=LC_NOTE,
    adv=LONGPII,
)
R(
    "summarising",
    lambda f: (
        "Resume esta circular en tres frases:\n\n"
        + pick_until(f.r, CIRCULAR_ES, 1400, 3300)
        + f.fill(
            "\n\nNota de administración: el justificante del primer plazo de la derrama del 4ºB está a nombre de ⟦name⟧, DNI ⟦es_dni⟧; queda pendiente de conciliar con el banco."
        )
    ),
    "es",
    notes=LC_NOTE,
    adv=LONGPII,
)
R(
    "extraction",
    lambda f: (
        "Turn this log excerpt into a bullet list of the distinct error types, with how often each occurs:\n\n```\n"
        + log_with_needle(
            f.r,
            26,
            f.fill("WARN  [http-2] auth.LoginService: account locked after 5 failed logins for ⟦email⟧ from ⟦ip⟧"),
        )
        + "\n```"
    ),
    notes=LC_NOTE,
    adv=LONGPII,
)

# ===================================== hard, with PII =====================================
C(
    "domain_law",
    "Draft a formal complaint to my bank. On 3 March an unauthorised card payment of €1,240 was debited from my account ⟦iban_de⟧. I'm ⟦name⟧, a customer since 2011. Cite my refund rights for unauthorised transactions under PSD2 as implemented in German law and set a deadline.",
)
S(
    "coding",
    "My script can't connect to Postgres ('password authentication failed') although psql with the same password works. DATABASE_URL=⟦db_url⟧. I build the engine with create_engine(os.environ['DATABASE_URL']). What's wrong and how do I fix it properly?",
    notes="Special characters in the password need URL-encoding; a strong open model handles it. Contains a live-looking credential.",
)
S(
    "coding",
    "This throws SignatureDoesNotMatch only for buckets in us-east-1:\n\n```python\nclient = boto3.client('s3', aws_access_key_id='⟦aws_key⟧', aws_secret_access_key='⟦aws_secret⟧', region_name='eu-central-1')\nclient.put_object(Bucket=bucket, Key=key, Body=data)\n```\nWhy, and how should I restructure the credentials?",
)
S(
    "coding",
    "I accidentally pushed this GitHub token to a public repo: ⟦gh_token⟧. Walk me through revoking it, purging it from the git history, and checking whether anyone used it.",
)
C(
    "domain_medicine",
    "My father ⟦name_m#a⟧ (born ⟦dobold#a⟧) had a right hemicolectomy for colon cancer; pathology: pT3 N1b (4/22 nodes), MSI-high. What adjuvant options are usually discussed, and what should we ask the oncologist about immunotherapy given the MSI status?",
)
C(
    "domain_medicine",
    "Patient: ⟦name#a⟧, DOB ⟦dob#a⟧. Na 128, K 5.9, fasting glucose 62 mg/dL, 8 am cortisol 3 µg/dL, ACTH high. Fatigue, salt craving, hyperpigmentation. Write a structured assessment and next steps for the referral letter.",
)
C(
    "domain_finance",
    "Ich (⟦name_f⟧, Steuer-ID ⟦de_taxid⟧) habe 2024 als Angestellte 58.000 € verdient und nebenbei 9.000 € als Freiberuflerin. Welche Anlagen brauche ich für die Steuererklärung, wie laufen Vorauszahlungen, und kann ich mein Arbeitszimmer oder die Homeoffice-Pauschale ansetzen?",
    "de",
)
C(
    "domain_law",
    "Je m'appelle ⟦name⟧, n° de sécurité sociale ⟦fr_nir⟧. Mon employeur n'a pas payé mes heures supplémentaires pendant six mois. Rédige une lettre de réclamation en citant le Code du travail et explique mes recours devant les prud'hommes, y compris la prescription.",
    "fr",
)
C(
    "domain_law",
    "Soy ⟦name⟧ (NIE ⟦es_nie⟧). Mi contrato de alquiler en Madrid termina en marzo y el propietario quiere subir la renta un 15 %. ¿Es legal con la Ley de Vivienda de 2023 si la zona está declarada tensionada? Redacta una respuesta al propietario.",
    "es",
)


def auth_log(f):
    lines = []
    t = 3 * 3600 + 12 * 60
    users = ["admin", "test", "oracle", "ubuntu", "postgres", "git", "deploy", "support"]
    for i in range(14):
        t += f.r.randint(1, 4)
        u = f.r.choice(users)
        inv = "invalid user " if u not in ("deploy", "ubuntu") else ""
        lines.append(
            f"Mar 14 {t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d} vps-fra1 sshd[{21400 + i}]: "
            f"Failed password for {inv}{u} from {f.ip('x')} port {f.r.randint(30000, 65000)} ssh2"
        )
    lines.append(
        f"Mar 14 03:19:02 vps-fra1 sshd[21501]: Accepted publickey for deploy from {f.ip('me')} port 52114 ssh2: ED25519 SHA256:{f._rand(ALNUM, 43)}"
    )
    for i in range(6):
        t += 60 + f.r.randint(1, 30)
        lines.append(
            f"Mar 14 {t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d} vps-fra1 sshd[{21600 + i}]: "
            f"Failed password for root from {f.ip('y')} port {f.r.randint(30000, 65000)} ssh2"
        )
    return "\n".join(lines)


S(
    "coding",
    lambda f: (
        "Does this look like brute force or credential stuffing? Which of these addresses should I block, and what fail2ban jail would you add?\n\n```\n"
        + auth_log(f)
        + "\n```"
    ),
    notes="Attacker and owner IP addresses in an auth log; IPs count as personal data here.",
)
S(
    "domain_law",
    "Write a GDPR Article 15 subject access request from ⟦name#a⟧ (⟦email#a⟧, ⟦address_uk⟧) to a company that keeps texting marketing to ⟦phone_uk⟧, and explain which deadlines and exemptions apply under UK GDPR.",
)
S(
    "domain_finance",
    "Here's my budget. Net pay £3,100 into ⟦iban_gb⟧; rent £1,250; car loan £310 at 9.9% APR with 28 months left; credit card ⟦card⟧ with £4,800 at 24.9%; £2,000 savings at 4.5%. Should I clear the card with my savings? Make a 12-month plan.",
)
C(
    "domain_law",
    "Our support agent pasted this into a ticket: 'Customer ⟦name#a⟧, card ⟦card⟧, exp 04/27, CVV 381, billing address ⟦address_us⟧'. Under PCI DSS 4.0, what must we do now, what goes in the incident report, and what do we tell the customer?",
)
C(
    "domain_law",
    "I'm ⟦name_de⟧, German citizen, passport ⟦passport_de⟧, on an H-1B since 2021 with an approved I-140. My employer is being acquired by a larger company. What happens to my status and priority date in an asset vs. stock acquisition, and what documents should I collect now?",
)
S(
    "domain_law",
    "Someone opened a credit card with my SSN ⟦ssn⟧. Give me a step-by-step identity-theft plan: FTC report, credit freezes at all three bureaus, disputing under the FCRA, and the police report.",
)
S(
    "coding",
    "Token validation fails since the last deploy. Token: ⟦jwt⟧\nThe secret in .env is JWT_SECRET=⟦password⟧. Decode the header and payload for me and list the likely reasons verification fails.",
)
S(
    "coding",
    "Write a Python script that reads contacts.csv and emails each person a personalised renewal reminder over SMTP (smtp.office365.com, STARTTLS). For testing use my own details: ⟦name#a⟧, ⟦email#a⟧, SMTP password ⟦password⟧.",
)
C(
    "domain_law",
    "Meine Mutter ⟦name_f#a⟧ (geb. ⟦dobold#a⟧) muss ins Pflegeheim: Pflegegrad 3, Rente 1.450 €, Ersparnisse 32.000 €. Wie hoch ist der Eigenanteil ungefähr, ab wann zahlt das Sozialamt Hilfe zur Pflege, und müssen wir Kinder Elternunterhalt zahlen (100.000-€-Grenze)?",
    "de",
)
C(
    "domain_finance",
    "My NI number is ⟦nino⟧. In 2023/24 I had two jobs and HMRC put the second one on BR. Job 1 paid £24,000 and job 2 £9,000. Roughly how much did I overpay, how does the refund work, and draft a message to HMRC.",
)
C(
    "domain_medicine",
    "Mi hijo ⟦name_m#a⟧ (nacido el ⟦dobchild#a⟧) lleva tres días con fiebre de 39,5, tos, y ahora respira rápido y se le hunden las costillas al respirar. ¿Qué signos de alarma debo vigilar y cuándo debo ir a urgencias?",
    "es",
)
S(
    "coding",
    "Create a Kubernetes Secret and a Deployment that mounts it for these credentials, and explain why they must not live in a ConfigMap:\nSTRIPE_KEY=⟦stripe_key⟧\nSLACK_BOT_TOKEN=⟦slack_token⟧",
)
S(
    "domain_finance",
    "I expected three rent transfers of €450 from ⟦name⟧ (IBAN ⟦iban_nl⟧) for Jan–Mar, but got €450, €405 and €495 with references 'huur jan', 'huur feb -45 correctie', 'huur mrt +45'. Explain what happened and write a friendly message saying whether anything is still owed.",
)
S(
    "factual_qa",
    "Voici mon passeport : ⟦passport_fr⟧, ⟦name_m⟧, né le ⟦dob⟧. Je dois demander un e-Visa touristique pour l'Inde. Quelles étapes, quels documents, et quels pièges pour la photo et la preuve d'hébergement ?",
    "fr",
)
S(
    "coding",
    "Write SQL to find duplicate customers in our CRM. A real example pair: (⟦name#a⟧, ⟦email#a⟧, ⟦phone_us#p⟧) and a second row with the same phone written as ⟦phone_spaced_us#p⟧ and the email in capitals. Normalise phones and emails in the query.",
)
C(
    "domain_finance",
    "I'm ⟦name#a⟧, born ⟦dobyoung#a⟧, living in Ohio, earning $92k. My employer matches 50% up to 6% in a 401(k) and offers an HSA. How should I prioritise 401(k), Roth IRA, HSA and my 6.8% student loans? Show numbers.",
)


def nginx_log(f):
    lines = []
    for i in range(12):
        ip = f.ip("bot") if i % 3 != 2 else f.ip(f"u{i}")
        path = "/wp-login.php" if ip == f.ip("bot") else f.r.choice(["/", "/blog/", "/contact", "/feed"])
        method = "POST" if path == "/wp-login.php" else "GET"
        lines.append(
            f'{ip} - - [14/Mar/2025:10:{i * 2:02d}:{f.r.randint(0, 59):02d} +0000] "{method} {path} HTTP/1.1" '
            f'{200 if method == "GET" else 401} {f.r.randint(300, 9000)} "-" "Mozilla/5.0"'
        )
    return "\n".join(lines)


S(
    "coding",
    lambda f: (
        "One client keeps hammering /wp-login.php. Write an nginx limit_req config and a fail2ban jail for it, based on this access log:\n\n```\n"
        + nginx_log(f)
        + "\n```"
    ),
)
C(
    "domain_law",
    "Schreibe einen Widerspruch gegen den Bescheid meiner Krankenkasse. Versicherte: ⟦name_f⟧, geb. ⟦dob⟧, Versichertennummer ⟦de_kvnr⟧. Abgelehnt wurde eine Reha nach Bandscheiben-OP. Begründe mit § 40 SGB V und der ärztlichen Empfehlung.",
    "de",
)
S(
    "domain_finance",
    "Our customer ⟦name_f⟧ says she never got her refund; it went to card ⟦card⟧ on 3 March. Explain what an ARN is, typical refund timelines, and write a reply she can show her bank.",
)
C(
    "domain_law",
    "Analiza mi contrato: trabajador ⟦name_m⟧, DNI ⟦es_dni⟧, periodo de prueba de 8 meses para un puesto de técnico no titulado. ¿Es legal según el Estatuto de los Trabajadores? ¿Qué pasa si me despiden en el séptimo mes?",
    "es",
)
S(
    "creative_writing",
    "Write a 350-word reference letter for my former employee ⟦name_f⟧, a data analyst here from 2019 to 2024. Highlight SQL, stakeholder management, and how she rebuilt our churn model.",
)
C(
    "domain_law",
    "Sono ⟦name#a⟧ (⟦email#a⟧). Il padrone di casa trattiene tutto il deposito cauzionale per 'normale usura'. Scrivi una diffida citando il Codice Civile e spiega i miei diritti e i termini.",
    "it",
)


def ssh_debug(f):
    host = f.ip("vps")
    return "\n".join(
        [
            "OpenSSH_9.6p1, OpenSSL 3.0.13 30 Jan 2024",
            "debug1: Reading configuration data /home/me/.ssh/config",
            f"debug1: Connecting to {host} [{host}] port 22.",
            "debug1: Connection established.",
            "debug1: identity file /home/me/.ssh/id_ed25519 type 3",
            "debug1: Authenticating to " + host + ":22 as 'deploy'",
            "debug1: Authentications that can continue: publickey",
            "debug1: Offering public key: /home/me/.ssh/id_ed25519 ED25519 SHA256:" + f._rand(ALNUM, 43) + " explicit",
            "debug1: Authentications that can continue: publickey",
            "debug1: No more authentication methods to try.",
            f"deploy@{host}: Permission denied (publickey).",
        ]
    )


S(
    "coding",
    lambda f: (
        "SSH to my VPS keeps failing although I ran ssh-copy-id. Server side, ~deploy is mode 775. Here's the verbose output — what's wrong?\n\n```\n"
        + ssh_debug(f)
        + "\n```"
    ),
)
S(
    "factual_qa",
    "I got a phishing email at ⟦email⟧ pretending to be my bank and asking me to confirm card ⟦card⟧. I already typed the card into their page 20 minutes ago. What should I do in the next hour, and what are the red flags I missed?",
)
C(
    "domain_law",
    "My late aunt ⟦name_f#a⟧ (born ⟦dobold#a⟧, died March 2025) left a handwritten will in England, signed but with only one witness. Is it valid, and what does intestacy give a niece if it isn't?",
)
C(
    "domain_finance",
    "Sou ⟦name_m⟧, NIF ⟦pt_nif⟧. Trabalho em Lisboa como trabalhador independente e tenho 27 anos. Posso aderir ao IRS Jovem em 2025? Quais as condições e como calculo a poupança?",
    "pt",
)
S(
    "coding",
    "Write a script that pseudonymises this CSV before we send it to analytics, keeping re-identification possible with a key held by us:\n\nname,email,dob,last_ip\n⟦name#a⟧,⟦email#a⟧,⟦dob_iso#a⟧,⟦ip⟧\n⟦name#b⟧,⟦email#b⟧,⟦dob_iso#b⟧,⟦ip⟧",
)
S(
    "domain_finance",
    "HR export for the audit: employee ⟦name_f⟧, SSN ⟦ssn⟧, salary $128,400, 12,000 RSUs vesting over 4 years with a 1-year cliff, monthly after. She leaves after 2 years 3 months. Compute the vested shares and explain withholding on RSU vesting.",
)
C(
    "domain_law",
    "Mietvertrag: Mieter ⟦name_m⟧, Kaution 2.700 € auf dem Konto ⟦iban_de⟧ angelegt. Auszug vor sieben Monaten, der Vermieter zahlt nicht zurück und verweist auf die noch ausstehende Nebenkostenabrechnung. Wie lange darf er einbehalten, und formuliere eine Fristsetzung.",
    "de",
)
C(
    "reasoning",
    "I'm planning a surprise trip for my partner ⟦name_f⟧; her passport ⟦passport_uk⟧ expires in five months. Which of Thailand, the USA (ESTA), Turkey and the Schengen area will admit her, and build a 7-day itinerary for the best option.",
)
S(
    "coding",
    "Draft a password policy for my team and tell me which of our current passwords are weak and why: admin ⟦password⟧, ⟦name⟧ ⟦password_weak⟧, backup user ⟦password_weak#2⟧.",
)
S(
    "coding",
    "Write a Python Slack bot using this token ⟦slack_token⟧ that posts a standup reminder at 9:30 Europe/Berlin on weekdays and collects replies in a thread.",
)
S(
    "domain_finance",
    "Aidez-moi à contester un prélèvement SEPA non autorisé sur mon compte ⟦iban_fr⟧ (créancier : un opérateur télécom que je n'ai jamais utilisé). Quels délais s'appliquent, 8 semaines ou 13 mois, et rédigez la lettre à la banque au nom de ⟦name⟧.",
    "fr",
)
S(
    "coding",
    "My key ⟦openai_key⟧ gets 429s at about 3 requests per minute although we're on a paid tier. Write a Python client with exponential backoff and a token bucket so a batch of 20k prompts finishes overnight.",
)
C(
    "domain_finance",
    "Ik ben ⟦name⟧ (BSN ⟦nl_bsn⟧), zzp'er met €48.000 winst in 2024. Hoeveel zelfstandigenaftrek en MKB-winstvrijstelling krijg ik en hoeveel inkomstenbelasting betaal ik ongeveer?",
    "nl",
)
S(
    "creative_writing",
    "Write a cover letter for me — ⟦name#a⟧, ⟦email#a⟧, ⟦phone_uk⟧ — for a Clinical Data Manager role. Background: six years as a research nurse, GCP certified, built REDCap databases for three trials.",
)
C(
    "domain_law",
    "Our contract with freelance developer ⟦name_f⟧ (US passport ⟦passport_us⟧) says: 'All IP created during the engagement vests in the Client upon payment.' Does that transfer copyright in software under US law, or do we need a separate assignment? What changes if she works from France?",
)
S(
    "coding",
    "This Authorization header gets a 401 from our internal API: 'Authorization: Basic ⟦basic_auth⟧'. Decode it and tell me whether the format is right.",
    notes="Credential hidden in base64; decoding reveals a username and password.",
    adv=OBF,
)
S(
    "factual_qa",
    lambda f: (
        "The airline's kiosk rejects my passport scan. Here's the MRZ as OCR read it — are the check digits consistent, and which field is likely misread?\n\n"
        + "\n".join(f.mrz("de"))
    ),
    "en",
    notes="Name, passport number and date of birth encoded in a machine-readable zone with valid ICAO check digits.",
    adv=OBF,
)

# obfuscated PII, hard
S(
    "domain_law",
    "Someone on a forum posted my details, written like this to dodge filters: '⟦name#a⟧ / ⟦email_bracket#a⟧ / phone ⟦phone_words_us_en⟧ / ssn ⟦ssn_spaced⟧'. What should I do, step by step, to protect myself and get it taken down?",
    notes="Email with [at]/[dot], phone spelled out, SSN with spaced digits.",
    adv=OBF,
)
C(
    "domain_law",
    "Meine Bankdaten für die Rückzahlung (extra auseinandergeschrieben):\n⟦iban_de_lines⟧\nDer Händler erstattet trotz fristgerechtem Widerruf seit 30 Tagen nicht. Formuliere ein Schreiben mit Verweis auf § 357 BGB und sag mir, welche Schritte danach möglich sind.",
    "de",
    notes="IBAN split across three lines.",
    adv=OBF,
)
S(
    "domain_law",
    lambda f: (
        lambda a, b: (
            "A customer sent their card number split over two chat messages: first '"
            + a
            + "', then a minute later '"
            + b
            + " exp 09/26'. Draft our PCI-compliant policy for card numbers pasted into chat, and the reply to this customer."
        )
    )(*f.card_parts()),
    notes="Card number split across two messages.",
    adv=OBF,
)
S(
    "coding",
    lambda f: (
        "I OCR'd a screenshot a contractor posted in a public channel, it shows our config:\n\n"
        + ocr_aws_config(f)
        + "\n\nWhat's the blast radius, and how do I rotate these without downtime for our ECS services?"
    ),
    notes="AWS key with every character spaced, secret wrapped over two lines.",
    adv=OBF,
)
C(
    "domain_law",
    "La CPAM me réclame un trop-perçu d'indemnités journalières de 2 300 €. Mon numéro de sécu, je l'écris avec des points : ⟦fr_nir_dotted⟧. Comment contester, et puis-je demander une remise de dette ?",
    "fr",
    notes="French social security number with dots instead of spaces.",
    adv=OBF,
)
S(
    "domain_finance",
    "Mi tarjeta (te la pongo con guiones raros por si acaso: ⟦card_odd_dashes⟧) tiene un cargo duplicado de un hotel en Italia. ¿Cómo hago un contracargo, qué plazos hay y qué le escribo al banco?",
    "es",
    notes="Card number with irregular dash grouping.",
    adv=OBF,
)

# long texts with PII near the end, hard
C(
    "domain_law",
    lambda f: (
        "Here's the full thread with our vendor. Are they in breach of the SLA as described, and draft a reply that preserves our right to the service credit and to terminate if it happens again.\n\n"
        + needle_thread_en(
            f,
            "Forwarding the vendor's latest reply: 'We accept the credit in principle but maintain that the clock stopped once the workaround was in place. For anything urgent before Friday, my direct mobile is ⟦phone_uk⟧ — ⟦name⟧, Account Director.'",
        )
    ),
    notes=LC_NOTE,
    adv=LONGPII,
)
S(
    "coding",
    lambda f: (
        "Find the root cause of the errors in this log and propose fixes:\n\n```\n"
        + log_with_needle(
            f.r,
            27,
            f.fill(
                "WARN  [http-5] auth.LoginService: password reset requested for ⟦email⟧ from ⟦ip⟧, reset mail queued"
            ),
        )
        + "\n```"
    ),
    notes=LC_NOTE,
    adv=LONGPII,
)
S(
    "coding",
    lambda f: (
        "Review this module for security problems and rank them by severity:\n\n```python\n"
        + CODE_NOTIFY_PY
        + f'FALLBACK_GITHUB_TOKEN = "{f.secret("gh_token")}"  # TODO move to vault\n'
        + CODE_NOTIFY_TAIL
        + "```"
    ),
    notes=LC_NOTE + " (a hard-coded token near the bottom)",
    adv=LONGPII,
)
C(
    "domain_law",
    lambda f: (
        "Prüfe diesen Vertragsentwurf aus Sicht des Auftraggebers: Welche Klauseln sind nach AGB-Recht (§§ 305 ff. BGB) unwirksam oder nachteilig, und was sollten wir nachverhandeln?\n\n"
        + pick_until(f.r, CONTRACT_DE, 1600, 3400)
        + f.fill(
            "\n\nAuftragnehmer: ⟦name_m⟧, Einzelunternehmer, ausgewiesen durch Personalausweis Nr. ⟦de_idcard⟧\nAuftraggeber: Praxisgemeinschaft am Markt GbR"
        )
    ),
    "de",
    notes=LC_NOTE,
    adv=LONGPII,
)
S(
    "domain_law",
    lambda f: (
        "Transcript of a billing support call. Did the agent follow our refund policy (full refund of an annual plan within 14 days if lightly used) and our data-handling rules? Write coaching feedback.\n\n"
        + "\n".join(CALL_TRANSCRIPT_EN)
        + f.fill(
            "\nAgent: One last thing, can you read me the card number the refund should go to?\nCustomer: Sure, it's ⟦card⟧, expiry 03/28.\nAgent: Thank you, that's all done.\nCustomer: Thanks, bye."
        )
    ),
    notes=LC_NOTE + " The card is read out near the end (itself a policy breach the model should notice).",
    adv=LONGPII,
)
C(
    "domain_medicine",
    lambda f: (
        "Voici le compte rendu d'hospitalisation de mon père. Explique-le simplement, dis-moi si le traitement de sortie suit les recommandations et liste les questions à poser au cardiologue.\n\n"
        + pick_until(f.r, DISCHARGE_FR, 1500, 3400)
        + f.fill("\n\nDocument édité le 12/03/2025 pour : ⟦name_m#a⟧, né le ⟦dobold#a⟧ – copie au médecin traitant.")
    ),
    "fr",
    notes=LC_NOTE,
    adv=LONGPII,
)
C(
    "domain_law",
    lambda f: (
        "¿Es legal el reparto de la derrama que describe esta circular (los locales no pagan los ascensores)? Explica qué dice la Ley de Propiedad Horizontal y cómo impugnar el acuerdo.\n\n"
        + pick_until(f.r, CIRCULAR_ES, 1400, 3300)
        + f.fill(
            "\n\nP. D.: Consta en acta que ⟦name_m⟧, DNI ⟦es_dni⟧, propietario del 2ºA, votó en contra del reparto y pidió que se recogiera su oposición."
        )
    ),
    "es",
    notes=LC_NOTE,
    adv=LONGPII,
)


def ocr_aws_config(f: Filler) -> str:
    key, secret = f.secret("aws_key", record=False), f.secret("aws_secret", record=False)
    spaced = " ".join(key)
    f.rec("credential", spaced, subtype="aws_key/spaced", canonical=key)
    f.rec("credential", secret[:20], subtype="aws_secret/split_part_1", canonical=secret)
    f.rec("credential", secret[20:], subtype="aws_secret/split_part_2", canonical=secret)
    return f"AWS_ACCESS_KEY_ID = {spaced}\nAWS_SECRET_ACCESS_KEY = {secret[:20]}\n    {secret[20:]}"


def outage_log(rng: random.Random) -> list[str]:
    key = [
        (
            14 * 3600 + 2 * 60 + 11,
            "INFO  [main] deploy: checkout-service v2.31.0 started, flags: checkout.reserve_inventory_tx=on",
        ),
        (14 * 3600 + 3 * 60 + 5, "INFO  [metrics] HikariPool-1 stats (total=50, active=14, idle=36, waiting=0)"),
        (14 * 3600 + 5 * 60 + 40, "WARN  [http-4] payments.Client: upstream latency p99=4800ms (baseline 350ms)"),
        (14 * 3600 + 6 * 60 + 2, "INFO  [metrics] HikariPool-1 stats (total=50, active=50, idle=0, waiting=37)"),
        (
            14 * 3600 + 6 * 60 + 31,
            "ERROR [http-7] o.h.e.j.s.SqlExceptionHelper: HikariPool-1 - Connection is not available, request timed out after 30000ms",
        ),
        (
            14 * 3600 + 6 * 60 + 58,
            "ERROR [http-2] api.ErrorHandler: GET /api/v2/catalog/items 500 (CannotCreateTransactionException)",
        ),
        (
            14 * 3600 + 8 * 60 + 12,
            "WARN  [http-1] resilience.CircuitBreaker: 'payments' state CLOSED -> OPEN (failure rate 61%)",
        ),
        (14 * 3600 + 8 * 60 + 40, "INFO  [metrics] HikariPool-1 stats (total=50, active=50, idle=0, waiting=112)"),
        (
            14 * 3600 + 11 * 60 + 3,
            "WARN  [http-6] checkout.Service: reserveInventory held tx for 29712 ms (payments authorize inside tx)",
        ),
        (14 * 3600 + 15 * 60 + 20, "INFO  [admin] flags: checkout.reserve_inventory_tx=off (manual)"),
        (14 * 3600 + 16 * 60 + 1, "INFO  [metrics] HikariPool-1 stats (total=50, active=9, idle=41, waiting=0)"),
        (14 * 3600 + 16 * 60 + 30, "INFO  [http-3] POST /api/v2/cart/checkout 201 412ms"),
    ]
    lines = []
    for s, msg in key:
        lines.append((s, msg))
    t = 14 * 3600
    for _ in range(20):
        t += rng.randint(20, 60)
        lines.append(
            (
                t,
                rng.choice(LOG_FILLER).format(
                    w=rng.randint(1, 8),
                    n=rng.randint(1000, 9999),
                    r=rng.randint(3, 900),
                    ms=rng.randint(2, 2400),
                    p=rng.randint(1, 40),
                    t=rng.randint(1, 3),
                    h=rng.randint(600, 1900),
                    g=rng.randint(3, 180),
                ),
            )
        )
    lines.sort(key=lambda x: x[0])
    return [f"2025-03-14T{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}Z {m}" for s, m in lines]


# ==================== extension 2026-12-02: everyday routine traffic ====================
# Real chat traffic is mostly routine, so 170 everyday prompts were appended here (after
# every original item, so tre-0001..tre-0378 and their values are unchanged).
EXT_NOTE = "Everyday request added on 2026-12-02 so the mix is closer to real chat traffic."

STOCK_EN = [
    "Ceramic mug 350 ml",
    "Bamboo cutting board",
    "Glass jar with lid",
    "Linen tea towel",
    "Stainless steel kettle",
    "Cotton tote bag",
    "Wooden spoon set",
    "Enamel pie dish",
    "Cast iron skillet 26 cm",
    "Beeswax food wrap",
    "Herb scissors",
    "Oven mitt pair",
    "Salad spinner",
    "Measuring cups",
    "Silicone spatula",
    "Pepper mill",
    "Butter dish",
    "Bread bin",
    "Citrus press",
    "Dish brush",
]

ORDERS_EN = [
    "Paperback notebook A5",
    "Gel pens (pack of 10)",
    "Desk lamp",
    "USB-C cable 2 m",
    "Laptop stand",
    "Sticky notes",
    "Wireless mouse",
    "Monitor cleaning kit",
    "Cable ties",
    "Desk organiser",
    "Whiteboard markers",
    "Mouse pad",
    "Stapler",
    "Printer paper (500 sheets)",
]


def csv_rows(rng: random.Random, header: str, make_row, lo: int, hi: int) -> str:
    """A CSV header plus generated rows until the text is between lo and hi characters."""
    lines = [header]
    while len("\n".join(lines)) < lo:
        lines.append(make_row(rng))
    text = "\n".join(lines)
    assert len(text) <= hi, len(text)
    return text


def _stock_row(rng: random.Random) -> str:
    sku = f"KT-{rng.randint(1000, 9999)}"
    return f"{sku},{rng.choice(STOCK_EN)},{rng.randint(0, 140)},{rng.randint(3, 89)}.{rng.choice(['00', '50', '95', '99'])}"


def _order_row(rng: random.Random) -> str:
    day = f"2026-11-{rng.randint(1, 28):02d}"
    return f"{day},ORD-{rng.randint(20000, 99999)},{rng.choice(ORDERS_EN)},{rng.randint(1, 6)},shipped"


CHAT_LOG_EN = [
    "ops: morning all, quick heads-up that the team lunch moves from Thursday to Friday",
    "design: Friday works for me, same place?",
    "ops: yes, the noodle bar on the corner, table booked for 12:30",
    "backend: can we make it 12:45? I have a call until half past",
    "ops: I'll ask them, they were flexible last time",
    "frontend: I'm in, but I need to leave by 13:30 for the dentist",
    "design: does anyone know if they have vegetarian options now?",
    "backend: they do, the tofu ramen is actually good",
    "ops: booked for 12:45, ten people, they said it's fine",
    "qa: sorry just catching up, count me in too",
    "ops: that makes eleven, I'll update the booking",
    "frontend: should we bring the leaving card for Sam's farewell?",
    "design: good idea, I have it in my drawer, it still needs a few signatures",
    "qa: I'll sign it this afternoon",
    "backend: me too, where is your desk again, third floor?",
    "design: third floor by the window, next to the big plant",
    "ops: also the budget this time is 20 per person, the rest is on us",
    "frontend: fair enough",
    "qa: will there be a vote on dessert or is that too ambitious",
    "ops: let's not push our luck",
    "design: ha, ok. see you all Friday",
    "backend: reminder set",
    "ops: I'll post the address in here on Friday morning in case anyone goes straight from home",
    "qa: thanks for organising!",
    "frontend: thanks, looking forward to it",
    "ops: one more thing, it might rain, so bring an umbrella, it's a ten-minute walk",
]


def chat_log(rng: random.Random, lines: list[str], lo: int, hi: int) -> str:
    out, t = [], 9 * 60 + rng.randint(0, 20)
    for line in lines:
        t += rng.randint(1, 6)
        out.append(f"[{t // 60:02d}:{t % 60:02d}] {line}")
        if len("\n".join(out)) >= lo:
            break
    text = "\n".join(out)
    assert lo <= len(text) <= hi, len(text)
    return text


RECIPE_HTML = """<article class="recipe">
  <h1>Lemon and Poppy Seed Muffins</h1>
  <p class="intro">These muffins are light, tangy and ready in about half an hour. They keep well for
  two days in a tin and freeze nicely, so it is worth making a full batch.</p>
  <h2>Ingredients (makes 12)</h2>
  <ul>
    <li>250 g plain flour</li>
    <li>2 tsp baking powder</li>
    <li>1/2 tsp bicarbonate of soda</li>
    <li>150 g caster sugar</li>
    <li>2 tbsp poppy seeds</li>
    <li>Zest of 2 lemons and the juice of 1</li>
    <li>2 eggs</li>
    <li>120 ml milk</li>
    <li>120 g plain yoghurt</li>
    <li>90 g butter, melted and cooled</li>
  </ul>
  <h2>Method</h2>
  <ol>
    <li>Heat the oven to 190&nbsp;&deg;C (170&nbsp;&deg;C fan) and line a 12-hole muffin tin with paper cases.</li>
    <li>In a large bowl, mix the flour, baking powder, bicarbonate of soda, sugar, poppy seeds and lemon zest.</li>
    <li>In a jug, whisk the eggs, milk, yoghurt, lemon juice and melted butter until smooth.</li>
    <li>Pour the wet ingredients into the dry ones and stir <em>just</em> until combined; a few lumps are fine.</li>
    <li>Divide the batter between the cases, filling each about three-quarters full.</li>
    <li>Bake for 18&ndash;20 minutes, until risen and golden and a skewer comes out clean.</li>
    <li>Leave in the tin for 5 minutes, then move to a wire rack to cool.</li>
  </ol>
  <h2>Optional glaze</h2>
  <p>Mix 100 g icing sugar with 1&ndash;2 tbsp lemon juice and drizzle over the cooled muffins.</p>
  <p class="tip"><strong>Tip:</strong> do not overmix the batter, or the muffins will be tough.</p>
</article>"""

TERMINE_DE = [
    "Zahnarzt, Kontrolle",
    "Elternabend Klasse 3b",
    "Friseur",
    "Autowerkstatt, Reifenwechsel",
    "Chorprobe",
    "Yoga im Gemeindehaus",
    "Steuerberater, Unterlagen abgeben",
    "Geburtstag Tante Gisela",
    "Schornsteinfeger kommt",
    "Fußballtraining Kinder",
    "Bürgeramt, Personalausweis abholen",
    "Tierarzt, Impfung Katze",
    "Sperrmüll rausstellen",
    "Kinoabend",
    "Hausversammlung",
    "Physiotherapie",
]


def _termin_line(rng: random.Random) -> str:
    return (
        f"{rng.randint(1, 28)}.{rng.randint(1, 12)}. um {rng.randint(8, 19)}"
        f"{rng.choice([' Uhr', ':30 Uhr', ':15 Uhr'])} - {rng.choice(TERMINE_DE)}"
    )


MOIS_FR = [
    "janvier",
    "février",
    "mars",
    "avril",
    "mai",
    "juin",
    "juillet",
    "août",
    "septembre",
    "octobre",
    "novembre",
    "décembre",
]
EVENEMENTS_FR = [
    "réunion de parents",
    "vide-grenier",
    "collecte des encombrants",
    "match de l'équipe junior",
    "dîner de l'association",
    "sortie au musée",
    "fête du quartier",
    "atelier de couture",
    "permanence de la mairie",
    "concert de la chorale",
]


def _date_line_fr(rng: random.Random) -> str:
    y, m, d = rng.randint(2025, 2027), rng.randint(1, 12), rng.randint(1, 28)
    style = rng.randrange(3)
    date = [f"{d}/{m}/{y}", f"{d} {MOIS_FR[m - 1]} {y}", f"{d:02d}.{m:02d}.{str(y)[2:]}"][style]
    return f"{rng.choice(EVENEMENTS_FR)} : {date}"


AVISO_GIMNASIO_ES = [
    "Estimados socios: a partir del lunes 12 de enero entran en vigor las nuevas normas de uso del gimnasio. Os pedimos que las leáis con calma y que las respetéis para que todos podamos entrenar a gusto.",
    "El horario de apertura será de 6:30 a 22:30 de lunes a viernes, y de 8:00 a 20:00 los sábados, domingos y festivos. La sala de musculación cerrará media hora antes para poder limpiarla.",
    "Es obligatorio usar una toalla en todas las máquinas y limpiar el equipo con el pulverizador después de cada uso. Encontraréis papel y desinfectante junto a cada columna.",
    "Las clases colectivas se reservan a través de la aplicación con un máximo de cuarenta y ocho horas de antelación. Si no podéis asistir, cancelad la reserva para que otra persona pueda ocupar la plaza.",
    "Las taquillas son de uso diario. Cualquier candado que siga puesto después del cierre se retirará y las pertenencias se guardarán en recepción durante una semana.",
    "No se permite entrar en la sala con calzado de calle ni comer en las zonas de entrenamiento. Las bebidas deben llevarse en botellas cerradas.",
    "Los menores de dieciséis años solo pueden entrenar acompañados de un adulto y en la franja de 17:00 a 20:00.",
    "La piscina climatizada mantiene su horario actual. Recordad que el gorro es obligatorio y que antes de entrar en el agua hay que pasar por la ducha. Los carriles rápidos están reservados para quienes nadan de forma continua.",
    "Durante el mes de febrero se cambiará el suelo de la sala de ciclo indoor. Mientras duren las obras, las clases de ciclo se darán en la sala dos, junto a los vestuarios.",
    "Hemos instalado un nuevo sistema de acceso con código QR. Cada socio puede descargar su código en la aplicación; la tarjeta de plástico seguirá funcionando hasta el 31 de marzo.",
    "Si queréis invitar a un amigo, cada socio dispone de dos pases gratuitos al trimestre. El invitado tiene que ser mayor de edad y registrarse en recepción con su documento.",
    "Para cualquier duda o sugerencia podéis dirigiros a recepción o dejar una nota en el buzón de la entrada. Muchas gracias por vuestra colaboración y ¡a entrenar!",
]

GITA_SCOLASTICA_IT = [
    "Gentili famiglie, vi informiamo che martedì 14 aprile le classi quarte parteciperanno a una gita di un giorno al parco naturale del lago.",
    "La partenza è prevista alle ore 7:45 dal piazzale davanti alla scuola; vi chiediamo di essere puntuali perché il pullman non potrà aspettare. Il rientro è previsto intorno alle 18:00 nello stesso luogo.",
    "Durante la mattinata i ragazzi faranno una passeggiata guidata lungo il sentiero del bosco con una guida del parco, che spiegherà come riconoscere gli alberi e gli uccelli della zona.",
    "Il pranzo sarà al sacco: ogni alunno dovrà portare un panino, un frutto e una borraccia d'acqua. Vi chiediamo di evitare bevande gassate e confezioni di vetro.",
    "Nel pomeriggio è prevista una visita al piccolo museo del parco e, se il tempo lo permette, un laboratorio all'aperto sulla raccolta delle foglie.",
    "Si consiglia un abbigliamento comodo, scarpe da ginnastica o da trekking, un cappellino e una giacca impermeabile leggera.",
    "Gli alunni che soffrono di allergie o che devono prendere medicine durante la giornata devono segnalarlo per iscritto ai docenti almeno una settimana prima della partenza.",
    "I cellulari potranno essere usati solo durante il viaggio e nella pausa pranzo. Per comunicazioni urgenti le famiglie possono contattare la segreteria della scuola, che sarà in contatto con gli accompagnatori.",
    "In caso di pioggia forte la gita sarà rinviata al martedì successivo; la decisione verrà comunicata entro le ore 18:00 del giorno prima tramite il registro elettronico.",
    "Ricordiamo infine che il comportamento durante le uscite didattiche fa parte della valutazione e che i ragazzi dovranno seguire sempre le indicazioni degli insegnanti e della guida.",
    "La quota di partecipazione è di 18 euro e comprende il viaggio in pullman, la guida e l'ingresso al museo. La quota va consegnata ai docenti entro venerdì 3 aprile insieme all'autorizzazione firmata.",
    "Per qualsiasi domanda potete rivolgervi ai docenti di classe durante l'orario di ricevimento. Grazie per la collaborazione.",
]

TAREFAS_PT = [
    "lavar a loiça do jantar",
    "regar as plantas da varanda",
    "levar o lixo reciclável",
    "comprar pão e leite",
    "pagar a conta da luz",
    "marcar consulta no dentista",
    "devolver os livros à biblioteca",
    "arrumar o quarto das crianças",
    "aspirar a sala",
    "trocar os lençóis",
    "levar o carro à inspeção",
    "ligar à avó",
    "passar a ferro as camisas",
    "limpar o frigorífico",
    "responder aos emails da escola",
    "ir buscar a encomenda aos correios",
    "cortar a relva",
    "fazer a lista de compras da semana",
]

DIAS_PT = ["segunda-feira", "terça-feira", "quarta-feira", "quinta-feira", "sexta-feira", "sábado", "domingo"]


def _tarefas_line(rng: random.Random) -> str:
    return f"{rng.choice(DIAS_PT)}: {', '.join(rng.sample(TAREFAS_PT, 3))}"


NIEUWSBRIEF_NL = [
    "Beste buurtbewoners, de zomer is voorbij en dat betekent dat onze buurtvereniging weer volop activiteiten organiseert. In deze nieuwsbrief leest u wat er de komende maanden op het programma staat.",
    "Op zaterdag 10 oktober houden we de jaarlijkse opruimdag. We verzamelen om tien uur bij het speelveld aan de Lindelaan. Handschoenen, grijpers en vuilniszakken worden door de gemeente geleverd. Na afloop is er soep en koffie in het buurthuis.",
    "De moestuin achter het buurthuis heeft dit jaar een mooie oogst opgeleverd. Er zijn nog twee tuinbakken vrij voor volgend seizoen. Wie interesse heeft, kan zich melden bij de balie van het buurthuis.",
    "Vanaf november is er elke woensdagmiddag een taalcafé voor nieuwe buurtbewoners die hun Nederlands willen oefenen. Vrijwilligers die een uurtje willen meepraten zijn van harte welkom.",
    "De verlichting op het fietspad langs de vaart is na onze melding eindelijk gerepareerd. Dank aan iedereen die de petitie heeft getekend.",
    "In het buurthuis is sinds kort een ruilkast geplaatst. U kunt er boeken, spelletjes en kleine huishoudelijke spullen in zetten en er gratis iets uit meenemen. Graag alleen schone en complete spullen.",
    "De gemeente gaat in het voorjaar de stoepen in de Berkenstraat en de Wilgenstraat vernieuwen. Tijdens de werkzaamheden kunt u niet voor de deur parkeren; er komen tijdelijke plekken op het parkeerterrein bij de sporthal.",
    "Elke eerste zaterdag van de maand is er een repaircafé. Vrijwilligers repareren dan gratis kapotte lampen, fietsen, kleding en kleine apparaten. U betaalt alleen voor eventuele onderdelen.",
    "We zoeken nog mensen die willen helpen met het rondbrengen van deze nieuwsbrief. Het gaat om ongeveer een uur werk, vier keer per jaar. Meld u aan bij de balie als u een straat wilt overnemen.",
    "Op 5 december komt Sinterklaas langs in het buurthuis. Kinderen tot en met acht jaar kunnen zich tot 20 november aanmelden. Er is ruimte voor maximaal veertig kinderen.",
    "Tot slot: de contributie voor volgend jaar blijft gelijk, tien euro per huishouden. Het bestuur bedankt alle vrijwilligers voor hun inzet en wenst iedereen een fijn najaar.",
]

BIBLIOTEKA_PL = [
    "Drodzy czytelnicy, informujemy, że od poniedziałka 2 marca biblioteka miejska wprowadza nowe godziny otwarcia oraz kilka zmian w zasadach wypożyczania książek.",
    "Wypożyczalnia dla dorosłych będzie czynna od poniedziałku do piątku w godzinach od 9:00 do 19:00, a w soboty od 9:00 do 14:00. Oddział dla dzieci będzie otwarty od 10:00 do 18:00.",
    "Jednorazowo można wypożyczyć do ośmiu książek na okres jednego miesiąca. Termin zwrotu można przedłużyć dwa razy przez internet albo telefonicznie, o ile na książkę nie czeka inny czytelnik.",
    "Nowości wydawnicze można rezerwować w katalogu internetowym. Zarezerwowane książki czekają na odbiór przez pięć dni roboczych.",
    "W czytelni na pierwszym piętrze są dostępne komputery z dostępem do internetu oraz bezpłatna sieć bezprzewodowa. Prosimy o zachowanie ciszy i niespożywanie posiłków przy stanowiskach.",
    "W każdą środę o 17:00 zapraszamy dzieci na głośne czytanie bajek, a w ostatni czwartek miesiąca odbywa się spotkanie dyskusyjnego klubu książki dla dorosłych.",
    "Książki można zwracać także poza godzinami otwarcia. Przy wejściu głównym stoi wrzutnia, która jest opróżniana każdego dnia rano. Prosimy nie wrzucać do niej płyt ani gier planszowych.",
    "Czytelnicy, którzy nie oddadzą książek w terminie, zapłacą karę w wysokości dwudziestu groszy za każdy dzień zwłoki. Przypomnienie o zbliżającym się terminie zwrotu wysyłamy pocztą elektroniczną na trzy dni przed końcem wypożyczenia.",
    "Od kwietnia w bibliotece będzie można również wypożyczać audiobooki oraz czytniki książek elektronicznych. Szczegóły podamy na naszej stronie internetowej.",
    "Seniorzy, którzy mają trudności z dotarciem do biblioteki, mogą skorzystać z bezpłatnej usługi dostarczania książek do domu. Wystarczy zgłosić się w wypożyczalni.",
    "Dziękujemy za cierpliwość w czasie remontu i zapraszamy do odwiedzania naszej biblioteki.",
]

ZAKUPY_PL = [
    "mleko",
    "chleb razowy",
    "masło",
    "jajka",
    "ser żółty",
    "pomidory",
    "ogórki",
    "ziemniaki",
    "cebula",
    "jabłka",
    "banany",
    "makaron",
    "ryż",
    "kawa",
    "herbata",
    "cukier",
    "mąka",
    "jogurt naturalny",
    "szynka",
    "płyn do naczyń",
    "papier toaletowy",
    "sok pomarańczowy",
    "marchew",
    "kapusta",
    "śmietana",
    "kiełbasa",
    "woda mineralna",
    "olej",
    "sól",
    "czekolada",
]


def _zakupy_line(rng: random.Random) -> str:
    return f"{rng.choice(ZAKUPY_PL)} - {rng.randint(1, 4)} {rng.choice(['szt.', 'opak.', 'kg'])}"


def lines_until(rng: random.Random, make_line, lo: int, hi: int) -> str:
    lines: list[str] = []
    while len("\n".join(lines)) < lo:
        lines.append(make_line(rng))
    text = "\n".join(lines)
    assert len(text) <= hi, len(text)
    return text


# ---- routine, no PII ----
R("chat", "Morning! Before my coffee kicks in: if yesterday was Sunday, what day is it today?", notes=EXT_NOTE)
R("chat", "Thank you so much, you saved my afternoon 🙏", notes=EXT_NOTE)
R("chat", "I just accepted a new job offer! Say something nice to celebrate.", notes=EXT_NOTE)
R("chat", "Suggest a board game for four adults that takes less than an hour.", notes=EXT_NOTE)
R("chat", "What's a good short answer to 'how was your weekend?' when it was really quiet?", notes=EXT_NOTE)
R("factual_qa", "Quick check for my kid's homework: do spiders have six legs or eight?", notes=EXT_NOTE)
R("translation", "Translate 'I'm allergic to peanuts' into Portuguese.", notes=EXT_NOTE)
R("translation", "Translate to Polish: 'Good morning, how are you?'", notes=EXT_NOTE)
R("rewriting", "Fix the typos: 'Teh meeting is definately on wendsday at noon.'", notes=EXT_NOTE)
R("rewriting", "Make this less blunt: 'No, we can't do that by Friday.'", notes=EXT_NOTE)
R(
    "rewriting",
    "Say this in plain English: 'Please be advised that the aforementioned parcel has been dispatched.'",
    notes=EXT_NOTE,
)
R("rewriting", "Convert this list to one comma-separated line:\n- red\n- amber\n- green", notes=EXT_NOTE)
R("rewriting", "Write these dates as YYYY-MM-DD: July 9, 2024; 1st Dec 2023; 03/04/2025 (US style).", notes=EXT_NOTE)
R(
    "rewriting",
    "Make a markdown table with columns Day and Task: Mon laundry, Tue gym, Wed groceries, Thu nothing, Fri cinema",
    notes=EXT_NOTE,
)
R("creative_writing", "Write a two-sentence email telling my team the printer on floor 2 works again.", notes=EXT_NOTE)
R("creative_writing", "Write a short caption for a photo of my dog running on the beach.", notes=EXT_NOTE)
R("coding", "How do I count the lines in a file from the shell?", notes=EXT_NOTE)
R("coding", "Python: how do I turn the string '42' into an integer?", notes=EXT_NOTE)
R("coding", "Give me a regex that matches a five-digit US ZIP code.", notes=EXT_NOTE)
R("coding", "git: how do I undo my last commit but keep the changes in my working tree?", notes=EXT_NOTE)
R("coding", "In Excel, which formula adds up cells A1 to A10?", notes=EXT_NOTE)
R("math", "How many kilometres is 10 miles?", notes=EXT_NOTE)
R(
    "math",
    "We ordered a pizza cut into 8 slices and I ate 3 of them. What fraction of the pizza is still there?",
    notes=EXT_NOTE,
)
R(
    "summarising",
    "Summarise in one sentence: 'From next month the gym opens at 6 am instead of 7 am on weekdays. Weekend hours stay the same. Members who want early access to the pool should book a slot in the app.'",
    notes=EXT_NOTE,
)
R(
    "extraction",
    "What's the deadline here? 'Please submit your timesheet no later than Friday, 14 March.'",
    notes=EXT_NOTE,
)
R("extraction", "Extract the flight number: 'Your flight LH 1234 to Munich departs from gate B12.'", notes=EXT_NOTE)
R("classification", "Positive, negative or neutral? 'The hotel was fine, nothing special.'", notes=EXT_NOTE)
R(
    "classification",
    "Spam or not spam? 'Congratulations!!! You have WON a free cruise, click here to claim now'",
    notes=EXT_NOTE,
)
R("creative_writing", "Two-line rhyme for a card congratulating my sister on her new flat.", notes=EXT_NOTE)
R("creative_writing", "Write a one-sentence bedtime story about a sleepy turtle.", notes=EXT_NOTE)

R("chat", "Na, alles klar bei dir? Erzähl mir einen kurzen Witz.", "de", notes=EXT_NOTE)
R("factual_qa", "Wie hoch ist die Zugspitze ungefähr?", "de", notes=EXT_NOTE)
R(
    "rewriting",
    "Korrigiere die Rechtschreibung: 'Ich hab gestern einen Brief an meine Oma geschrieben, aber vergesen ihn abzuschiken.'",
    "de",
    notes=EXT_NOTE,
)
R("translation", "Übersetze ins Französische: 'Wo kann man hier Fahrräder mieten?'", "de", notes=EXT_NOTE)
R("math", "Wie viele Sekunden hat eine Stunde?", "de", notes=EXT_NOTE)
R("creative_writing", "Schreib einen Zweizeiler zum 60. Geburtstag meines Onkels.", "de", notes=EXT_NOTE)
R(
    "classification",
    "Ist diese Bewertung positiv oder negativ? 'Lieferung kam zwei Wochen zu spät und die Ware war beschädigt.'",
    "de",
    notes=EXT_NOTE,
)
R(
    "extraction",
    "Welches Datum steht in diesem Satz? 'Die Jahreshauptversammlung findet am 21. März 2026 im Vereinsheim statt.'",
    "de",
    notes=EXT_NOTE,
)

R("chat", "Coucou ! Tu as une idée de dessert rapide avec des pommes ?", "fr", notes=EXT_NOTE)
R("factual_qa", "Combien y a-t-il de jours en février cette année, 2026 ?", "fr", notes=EXT_NOTE)
R("rewriting", "Rends ce message plus poli : « Envoie-moi le devis avant ce soir. »", "fr", notes=EXT_NOTE)
R("translation", "Traduis en espagnol : « Le magasin est fermé le dimanche. »", "fr", notes=EXT_NOTE)
R("math", "Combien font 45 % de 200 ?", "fr", notes=EXT_NOTE)
R(
    "summarising",
    "Résume en une phrase : « La piscine municipale fermera pour travaux du 3 au 24 juillet. Les abonnements seront prolongés d'autant. Pendant la fermeture, les nageurs pourront utiliser le bassin de la commune voisine au tarif habituel. »",
    "fr",
    notes=EXT_NOTE,
)
R("creative_writing", "Écris un message d'anniversaire de deux lignes pour ma grand-mère.", "fr", notes=EXT_NOTE)
R("coding", "En JavaScript, comment mettre une chaîne en majuscules ?", "fr", notes=EXT_NOTE)

R("chat", "¡Hola! ¿Me cuentas un dato curioso sobre los pingüinos?", "es", notes=EXT_NOTE)
R("factual_qa", "¿En qué continente está Egipto?", "es", notes=EXT_NOTE)
R("rewriting", "Corrige las faltas: 'Mañana boy a ir al medico porque me duele la cavesa.'", "es", notes=EXT_NOTE)
R("translation", "Traduce al francés: 'Necesito una habitación para dos noches.'", "es", notes=EXT_NOTE)
R("math", "¿Cuántos gramos son 3,5 kilos?", "es", notes=EXT_NOTE)
R(
    "extraction",
    "Saca la fecha de esta frase: 'La entrega está prevista para el 7 de mayo de 2026.'",
    "es",
    notes=EXT_NOTE,
)
R("creative_writing", "Escribe un mensaje corto para felicitar a mi compañero por su jubilación.", "es", notes=EXT_NOTE)
R("rewriting", "Conviértelo en una lista con viñetas: pan, leche, tomates, aceite y jabón.", "es", notes=EXT_NOTE)

R("chat", "Buonasera! Mi consigli un libro leggero da leggere in spiaggia?", "it", notes=EXT_NOTE)
R("factual_qa", "Mi ricordi come si chiama il fiume più lungo che attraversa l'Italia?", "it", notes=EXT_NOTE)
R("translation", "Traduci in tedesco: 'A che ora chiude la farmacia?'", "it", notes=EXT_NOTE)
R(
    "rewriting",
    "Correggi gli errori: 'Ieri sono andato al mare con i miei amici e abbiamo mangiato un gelato bouno.'",
    "it",
    notes=EXT_NOTE,
)
R("math", "Quanto fa 15 per 12?", "it", notes=EXT_NOTE)
R(
    "summarising",
    "Riassumi in una frase: 'Da lunedì la linea 4 dell'autobus cambierà percorso per lavori in via Roma. Le fermate di piazza Garibaldi e via Manzoni saranno sospese per tre settimane. Ci sarà una navetta sostitutiva ogni 15 minuti.'",
    "it",
    notes=EXT_NOTE,
)
R("creative_writing", "Scrivi un augurio di due righe per il matrimonio di due amici.", "it", notes=EXT_NOTE)
R(
    "classification",
    "Questa recensione è positiva o negativa? 'Pizza fredda e consegna in ritardo di un'ora. Mai più.'",
    "it",
    notes=EXT_NOTE,
)

R("chat", "Olá! Sugere-me um nome giro para um peixinho dourado.", "pt", notes=EXT_NOTE)
R("translation", "Traduz para inglês: 'A reunião foi adiada para a próxima semana.'", "pt", notes=EXT_NOTE)
R("rewriting", "Corrige os erros: 'Eu fui no mercado e comprei trez laranjas.'", "pt", notes=EXT_NOTE)
R("math", "Quanto é 30% de 150?", "pt", notes=EXT_NOTE)
R("coding", "Como vejo a versão do Node.js no terminal?", "pt", notes=EXT_NOTE)
R("creative_writing", "Escreve uma mensagem curta de boas-vindas para um novo colega de equipa.", "pt", notes=EXT_NOTE)
R("extraction", "Qual é o preço nesta frase? 'O bilhete de comboio custa 12,40 euros.'", "pt", notes=EXT_NOTE)

R("chat", "Hoi! Heb je een leuk idee voor een regenachtige zondagmiddag?", "nl", notes=EXT_NOTE)
R("factual_qa", "Welke stad is de hoofdstad van België, Brussel of Antwerpen?", "nl", notes=EXT_NOTE)
R("translation", "Vertaal naar het Duits: 'Ik heb een tafel gereserveerd voor vier personen.'", "nl", notes=EXT_NOTE)
R(
    "rewriting",
    "Verbeter de spelfouten: 'Ik hep gisteren de hond uitgelaten en toen begon het te regenen.'",
    "nl",
    notes=EXT_NOTE,
)
R("math", "Hoeveel is 64 gedeeld door 8?", "nl", notes=EXT_NOTE)
R(
    "classification",
    "Is deze recensie positief of negatief? 'Snelle levering en het product werkt prima.'",
    "nl",
    notes=EXT_NOTE,
)
R("creative_writing", "Schrijf een kort verjaardagsrijmpje voor mijn collega.", "nl", notes=EXT_NOTE)

R("chat", "Cześć! Jak się masz? Opowiedz mi krótki dowcip.", "pl", notes=EXT_NOTE)
R("factual_qa", "Ile województw ma Polska?", "pl", notes=EXT_NOTE)
R("translation", "Przetłumacz na angielski: 'Gdzie jest najbliższa apteka?'", "pl", notes=EXT_NOTE)
R("rewriting", "Popraw błędy: 'Wczoraj poszedłem do skelpu i kupiłem chleb i mleko.'", "pl", notes=EXT_NOTE)
R("math", "Ile to jest 25% z 80?", "pl", notes=EXT_NOTE)
R(
    "summarising",
    "Streść w jednym zdaniu: 'W sobotę biblioteka miejska będzie otwarta krócej, do godziny 13. W niedzielę pozostanie zamknięta. Od poniedziałku wracają normalne godziny otwarcia.'",
    "pl",
    notes=EXT_NOTE,
)
R("creative_writing", "Napisz krótkie życzenia imieninowe dla koleżanki z pracy.", "pl", notes=EXT_NOTE)
R("coding", "Jak w bashu wyświetlić bieżący katalog?", "pl", notes=EXT_NOTE)
R(
    "extraction",
    "Wypisz datę z tego zdania: 'Spotkanie odbędzie się 3 czerwca 2026 roku o 10:00.'",
    "pl",
    notes=EXT_NOTE,
)

R("chat", "こんにちは！週末に気軽に始められる趣味を三つ教えてください。", "ja", notes=EXT_NOTE)
R("factual_qa", "富士山は日本で一番高い山ですか？高さも教えてください。", "ja", notes=EXT_NOTE)
R("translation", "次の英文を日本語に訳してください：'The store opens at 10 am.'", "ja", notes=EXT_NOTE)
R("math", "1時間半は何分ですか？", "ja", notes=EXT_NOTE)
R("rewriting", "次の文を丁寧語に直してください：「明日は行けない。」", "ja", notes=EXT_NOTE)
R("creative_writing", "友だちの誕生日に送る短いお祝いメッセージを書いてください。", "ja", notes=EXT_NOTE)
R("classification", "このレビューは肯定的ですか、否定的ですか？「すぐに壊れました。残念です。」", "ja", notes=EXT_NOTE)
R("coding", "Pythonで文字列の長さを調べるにはどうすればいいですか？", "ja", notes=EXT_NOTE)

# ---- routine look-alikes (not PII) ----
R(
    "factual_qa",
    "Ist 'Max Mustermann' ein echter Name oder nur ein Platzhalter?",
    "de",
    notes="Max Mustermann is the German placeholder name, asked about as such.",
    adv=LOOK,
)
R(
    "factual_qa",
    "Dlaczego w przykładowych formularzach zawsze pojawia się 'Jan Kowalski'?",
    "pl",
    notes="Jan Kowalski is the Polish placeholder name, not a person.",
    adv=LOOK,
)
R(
    "coding",
    r"Does test.user@example.org match the regex ^[^@\s]+@[^@\s]+\.[^@\s]+$ ?",
    notes="RFC 2606 documentation address in a regex question.",
    adv=LOOK,
)
R(
    "factual_qa",
    "What is 8.8.8.8 and who runs it?",
    notes="Google's public DNS resolver; a well-known service address, identifies no person.",
    adv=LOOK,
)
R(
    "factual_qa",
    "Le numéro 112 fonctionne-t-il partout en Europe ?",
    "fr",
    notes="The European emergency number; a phone-number look-alike that belongs to no one.",
    adv=LOOK,
)
R(
    "rewriting",
    "Put a space after every four characters in the standard example IBAN DE89370400440532013000.",
    notes="The IBAN standard's published example, used as a placeholder.",
    adv=LOOK,
)
R(
    "factual_qa",
    "Chi era Giuseppe Garibaldi, in una frase?",
    "it",
    notes="Historical public figure.",
    adv=LOOK,
)

# ---- long but routine (no PII) ----
R(
    "rewriting",
    lambda f: (
        "Turn this CSV into a markdown table, same columns and order:\n\n"
        + csv_rows(f.r, "sku,item,in_stock,price_eur", _stock_row, 1500, 3000)
    ),
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: (
        "Remove the timestamps from this chat export and keep the rest exactly as it is:\n\n"
        + chat_log(f.r, CHAT_LOG_EN, 1500, 3000)
    ),
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    "Strip the HTML tags from this recipe and give me plain text with the lists kept as lines:\n\n" + RECIPE_HTML,
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: (
        "Mach aus dieser Terminliste eine Tabelle mit den Spalten Datum, Uhrzeit und Termin:\n\n"
        + lines_until(f.r, _termin_line, 1500, 3000)
    ),
    "de",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: (
        "Réécris toutes les dates de cette liste au format AAAA-MM-JJ, sans rien changer d'autre :\n\n"
        + lines_until(f.r, _date_line_fr, 1500, 3000)
    ),
    "fr",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "translation",
    lambda f: "Traduce al inglés este aviso del gimnasio:\n\n" + pick_until(f.r, AVISO_GIMNASIO_ES, 1500, 3000),
    "es",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: (
        "Correggi solo i refusi in questa circolare, senza cambiare il testo:\n\n"
        + add_typos(pick_until(f.r, GITA_SCOLASTICA_IT, 1500, 3000), f.r)
    ),
    "it",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: (
        "Transforma este plano numa lista numerada, uma entrada por linha, pela mesma ordem:\n\n"
        + lines_until(f.r, _tarefas_line, 1500, 3000)
    ),
    "pt",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "summarising",
    lambda f: (
        "Vat deze nieuwsbrief samen in drie korte opsommingstekens:\n\n" + pick_until(f.r, NIEUWSBRIEF_NL, 1500, 3000)
    ),
    "nl",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)
R(
    "rewriting",
    lambda f: (
        "Popraw tylko literówki w tym ogłoszeniu:\n\n" + add_typos(pick_until(f.r, BIBLIOTEKA_PL, 1500, 3000), f.r)
    ),
    "pl",
    notes=LR_NOTE,
    adv=LONGROUTINE,
)

# ---- routine, with PII ----
R(
    "creative_writing",
    "Write a two-line birthday message for my colleague ⟦name_f#a⟧; she turns 40 on Friday.",
    notes=EXT_NOTE,
)
R(
    "rewriting",
    "Fix the grammar: 'Hi, me and ⟦name#a⟧ was wondering if we can pick up the keys at ⟦address_uk⟧ tomorow.'",
    notes=EXT_NOTE,
)
R(
    "chat",
    "Reply in one friendly sentence: 'Hey, it's ⟦name⟧ from the running club, still on for Sunday?'",
    notes=EXT_NOTE,
)
R("rewriting", "Write this phone number in E.164 format: ⟦phone_us⟧", notes=EXT_NOTE)
R(
    "rewriting",
    "Make this shorter: 'Dear Sir or Madam, my name is ⟦name#a⟧ and I am writing to you today in order to let you know that I have moved house. My new address is ⟦address_us⟧. I would be grateful if you could update your records accordingly. Kind regards.'",
    notes=EXT_NOTE,
)
R(
    "rewriting",
    "Put these into CSV with the header name,email:\n⟦name#a⟧ ⟦email#a⟧\n⟦name#b⟧ ⟦email#b⟧\n⟦name#c⟧ ⟦email#c⟧",
    notes=EXT_NOTE,
)
R("rewriting", "Mask all but the last four digits of my card: ⟦card⟧", notes=EXT_NOTE)
R(
    "rewriting",
    "Write this as a short sticky note for the fridge: garage door app login is ⟦email#a⟧, password ⟦password_weak⟧.",
    notes=EXT_NOTE,
)
R(
    "coding",
    "What's the curl option to send this as a bearer token to https://api.example.net/v1/me? ⟦openai_key⟧",
    notes=EXT_NOTE,
)
R("rewriting", "Write my date of birth ⟦dob_us⟧ as YYYY-MM-DD.", notes=EXT_NOTE)
R(
    "classification",
    "Is this ticket about billing, delivery or account access? 'Hello, I'm ⟦name#a⟧, I can't log in since I changed my email to ⟦email#a⟧.'",
    notes=EXT_NOTE,
)
R(
    "rewriting",
    "Fill in this line with my details: 'Traveller: ___, Passport no.: ___'. I'm ⟦name#a⟧, passport ⟦passport_uk⟧.",
    notes=EXT_NOTE,
)
R(
    "creative_writing",
    "Write a short text to my plumber ⟦name_m⟧ asking if he can come on Thursday morning; we're at ⟦address_us⟧.",
    notes=EXT_NOTE,
)
R("coding", "Write a hosts-file line that maps nas.home to my home server's public IP, ⟦ip⟧.", notes=EXT_NOTE)
R(
    "translation",
    "Translate to French: 'My National Insurance number is ⟦nino⟧ and I start work on 2 June.'",
    notes=EXT_NOTE,
)
R("coding", "Turn this into a JSON object: name=⟦name#a⟧, phone=⟦phone_uk⟧, dob=⟦dob#a⟧", notes=EXT_NOTE)
R("classification", "Is this a UK or a US phone number: ⟦phone_uk⟧?", notes=EXT_NOTE)
R("rewriting", "Fix the typo in my email signature: '⟦name#a⟧ | Sales Asistant | ⟦phone_us⟧'", notes=EXT_NOTE)
R("rewriting", "Write my SSN ⟦ssn⟧ without the dashes, the form only takes digits.", notes=EXT_NOTE)
R(
    "creative_writing",
    "Write a two-sentence message to my landlord ⟦name⟧ saying the May rent went to IBAN ⟦iban_gb⟧ this morning.",
    notes=EXT_NOTE,
)
R("coding", "Write this as a YAML line under the key slack_token: ⟦slack_token⟧", notes=EXT_NOTE)

R(
    "creative_writing",
    "Schreib eine kurze SMS an ⟦name_m#a⟧: Das Paket liegt bei mir, er kann es ab 18 Uhr abholen. Meine Adresse: ⟦address_de⟧.",
    "de",
    notes=EXT_NOTE,
)
R("rewriting", "Schreib diese Handynummer ohne Leerzeichen: ⟦phone_de⟧", "de", notes=EXT_NOTE)
R(
    "translation",
    "Übersetze ins Englische: 'Meine Krankenversichertennummer lautet ⟦de_kvnr⟧, mein Geburtsdatum ist der ⟦dob⟧.'",
    "de",
    notes=EXT_NOTE,
)
R("rewriting", "Formuliere das höflicher: 'Überweis mir endlich die 50 Euro auf ⟦iban_de⟧!'", "de", notes=EXT_NOTE)
R(
    "rewriting",
    "Korrigiere die Tippfehler: 'Sehr geehrte Frau ⟦name_f#a⟧, anbei meine Steur-ID ⟦de_taxid⟧ für die Lohnabrechung. Mit freundlichen Grüßen'",
    "de",
    notes=EXT_NOTE,
)
R(
    "extraction",
    "Welche E-Mail-Adresse steht in diesem Text? 'Rückfragen bitte an ⟦email_de⟧ oder telefonisch am Vormittag.'",
    "de",
    notes=EXT_NOTE,
)

R(
    "creative_writing",
    "Écris un court message pour prévenir ⟦name_f⟧ que j'aurai dix minutes de retard.",
    "fr",
    notes=EXT_NOTE,
)
R("rewriting", "Mets cette adresse sur trois lignes pour une enveloppe : ⟦name⟧, ⟦address_fr⟧", "fr", notes=EXT_NOTE)
R(
    "translation",
    "Traduis en anglais : « Mon passeport numéro ⟦passport_fr⟧ expire en mars, je dois le renouveler. »",
    "fr",
    notes=EXT_NOTE,
)
R(
    "creative_writing",
    "Rédige une phrase aimable pour demander à ⟦name⟧ de me rembourser les 45 € du concert sur mon compte ⟦iban_fr⟧.",
    "fr",
    notes=EXT_NOTE,
)

R("creative_writing", "Escribe un mensaje corto a ⟦name_m⟧ para recordarle la cena del sábado.", "es", notes=EXT_NOTE)
R(
    "rewriting",
    "Corrige: 'mi correo es ⟦email⟧ y mi telefono ⟦phone_es⟧, llamame cuando puedas'",
    "es",
    notes=EXT_NOTE,
)
R("translation", "Traduce al inglés: 'Mi NIE es ⟦es_nie⟧ y vivo en ⟦address_es⟧.'", "es", notes=EXT_NOTE)
R(
    "rewriting",
    "Pon esta fecha de nacimiento en formato AAAA-MM-DD: ⟦dobchild⟧ (es la de mi hija ⟦name_f⟧).",
    "es",
    notes=EXT_NOTE,
)

R("translation", "Traduci in inglese: 'Il tecnico mi ha chiesto l'indirizzo IP di casa: è ⟦ip⟧.'", "it", notes=EXT_NOTE)
R(
    "translation",
    "Traduci in inglese: 'Il mio numero di cellulare è ⟦phone_it⟧, chiamami dopo le sei.'",
    "it",
    notes=EXT_NOTE,
)
R(
    "rewriting",
    "Metti questi contatti in una tabella con colonne nome ed email: ⟦name#a⟧ ⟦email#a⟧; ⟦name#b⟧ ⟦email#b⟧.",
    "it",
    notes=EXT_NOTE,
)
R(
    "rewriting",
    "Correggi gli errori: 'Vorrei pagare con la carta ⟦card⟧, scadensa 04/29, grazzie.'",
    "it",
    notes=EXT_NOTE,
)

R("creative_writing", "Escreve uma mensagem curta para ⟦name⟧ a confirmar o jantar de sexta.", "pt", notes=EXT_NOTE)
R("translation", "Traduz para inglês: 'O meu NIF é ⟦pt_nif⟧ e a morada está no recibo.'", "pt", notes=EXT_NOTE)
R("rewriting", "Corrige: 'manda a fatura para ⟦email⟧ porfavor, obrigado'", "pt", notes=EXT_NOTE)

R(
    "translation",
    "Vertaal naar het Engels: 'Het wifi-wachtwoord van het vakantiehuis is ⟦password⟧.'",
    "nl",
    notes=EXT_NOTE,
)
R(
    "rewriting",
    "Zet dit in een nette lijst: naam ⟦name#a⟧, geboren ⟦dob#a⟧, BSN ⟦nl_bsn⟧",
    "nl",
    notes=EXT_NOTE,
)
R("translation", "Vertaal naar het Engels: 'Mijn telefoonnummer is ⟦phone_nl⟧, bel gerust.'", "nl", notes=EXT_NOTE)

R("creative_writing", "Napisz krótkiego SMS-a, że spóźnię się 15 minut. Adresatka: ⟦name_f⟧.", "pl", notes=EXT_NOTE)
R("translation", "Przetłumacz na angielski: 'Mój numer PESEL to ⟦pl_pesel⟧.'", "pl", notes=EXT_NOTE)
R("rewriting", "Popraw błędy: 'Prosze o zwrot pieniedzy na konto ⟦iban_pl⟧, dziekuje.'", "pl", notes=EXT_NOTE)
R("rewriting", "Zapisz ten numer telefonu bez spacji: ⟦phone_pl⟧", "pl", notes=EXT_NOTE)

R("creative_writing", "⟦name⟧さんへの短いお礼のメッセージを書いてください。", "ja", notes=EXT_NOTE)
R("translation", "次の文を英語に訳してください：「私のメールアドレスは⟦email⟧です。」", "ja", notes=EXT_NOTE)

# ---- obfuscated PII, routine ----
R("rewriting", "Write my email address normally, please: ⟦email_bracket#a⟧", notes="Email with [at]/[dot].", adv=OBF)
R(
    "rewriting",
    "Togli gli spazi da questo numero di cellulare: ⟦phone_spaced_it⟧",
    "it",
    notes="Italian mobile number with every character spaced.",
    adv=OBF,
)
R(
    "rewriting",
    "Regroup my card number in fours for the form: ⟦card_odd_dashes⟧",
    notes="Card number with irregular dash-separated groups.",
    adv=OBF,
)
R(
    "rewriting",
    "Remets mon numéro de sécu au format habituel avec des espaces : ⟦fr_nir_dotted⟧",
    "fr",
    notes="French NIR written with dots.",
    adv=OBF,
)
R(
    "rewriting",
    "Zet mijn IBAN netjes in groepen van vier: ⟦iban_nl_lower⟧",
    "nl",
    notes="Dutch IBAN lower-case without spaces.",
    adv=OBF,
)
R(
    "rewriting",
    "Write this as digits: ⟦phone_words_us_en⟧. It's my landlord's cell.",
    notes="US phone number spelled out digit by digit.",
    adv=OBF,
)

# ---- long context with one personal value near the end, routine ----
R(
    "rewriting",
    lambda f: (
        "Convert this order export to JSON lines, one object per row:\n\n"
        + csv_rows(f.r, "date,order,item,qty,status", _order_row, 1500, 2600)
        + f.fill('\n2026-11-29,ORD-31877,Desk lamp,1,"on hold - ship to ⟦name⟧, ⟦address_us⟧"')
    ),
    notes=LC_NOTE,
    adv=LONGPII,
)
R(
    "rewriting",
    lambda f: (
        "Posortuj tę listę zakupów alfabetycznie:\n\n"
        + lines_until(f.r, _zakupy_line, 1500, 2600)
        + f.fill("\n\nPS. Za zakupy oddaj mi na konto ⟦iban_pl⟧.")
    ),
    "pl",
    notes=LC_NOTE,
    adv=LONGPII,
)
R(
    "translation",
    lambda f: (
        "Vertaal deze nieuwsbrief naar het Engels:\n\n"
        + pick_until(f.r, NIEUWSBRIEF_NL, 1500, 2700)
        + f.fill("\n\nVragen over de opruimdag? Mail ⟦email_nl⟧ of bel ⟦phone_nl⟧.")
    ),
    "nl",
    notes=LC_NOTE,
    adv=LONGPII,
)


# --------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------
TIER_RULE = {"r": "edge", "hs": "speculative", "hc": "cloud"}


def default_notes(d: str, pii: bool, kinds: list[str]) -> str:
    if pii:
        base = f"Contains PII ({', '.join(kinds)}); PII never goes to the cloud."
        if d == "r":
            return base + " Routine task -> edge."
        extra = " (would be cloud without the PII)" if d == "hc" else ""
        return base + f" Hard task -> speculative{extra}."
    return {
        "r": "Routine single-step task -> edge.",
        "hs": "Multi-step but standard; a strong open model handles it -> speculative.",
        "hc": "Needs frontier-level reasoning or specialist knowledge -> cloud.",
    }[d]


def build() -> list[dict]:
    rows = []
    for n, it in enumerate(ITEMS, 1):
        rng = random.Random(f"{SEED}:{n}")
        f = Filler(rng, it["lang"])
        p = it["prompt"]
        text = p(f) if callable(p) else f.fill(p)
        assert "⟦" not in text, text
        for v in f.values:
            assert v["text"] in text, (n, v)
        pii = bool(f.values)
        kinds = sorted({v["kind"] for v in f.values})
        d = it["d"]
        difficulty = "routine" if d == "r" else "hard"
        tier = "edge" if d == "r" else ("speculative" if pii else TIER_RULE[d])
        notes = it["notes"]
        if it["adv"]:
            notes = f"[adversarial: {it['adv']}] " + notes
        notes = (notes + " " + default_notes(d, pii, kinds)).strip()
        row = {
            "id": f"tre-{n:04d}",
            "prompt": text,
            "difficulty": difficulty,
            "pii": pii,
            "expected_tier": tier,
            "category": it["cat"],
            "language": it["lang"],
            "notes": notes,
            "adversarial": it["adv"],
            "tier_if_no_pii": TIER_RULE[d],
            "pii_kinds": kinds,
            "pii_values": f.values,
            "chars": len(text),
        }
        if it["adv"] in (LONGPII, LONGROUTINE):
            assert 1500 <= len(text) <= 4000, (row["id"], len(text))
        if it["adv"] == LONGPII:
            # the (first) personal value sits in the last quarter of the text
            first = min(text.rfind(v["text"]) for v in f.values)
            assert first > 0.7 * len(text), (row["id"], first, len(text))
        rows.append(row)
    return rows


def md_table(counter: Counter, head: str, total: int | None = None) -> str:
    total = total or sum(counter.values())
    out = [f"| {head} | count | share |", "| --- | ---: | ---: |"]
    for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        out.append(f"| {k} | {v} | {100 * v / total:.1f}% |")
    return "\n".join(out)


def stats(rows: list[dict]) -> str:
    parts = [f"Total: {len(rows)}", ""]
    parts.append(md_table(Counter(r["expected_tier"] for r in rows), "expected_tier"))
    parts.append("")
    parts.append(md_table(Counter(r["difficulty"] for r in rows), "difficulty"))
    parts.append("")
    parts.append(md_table(Counter(str(r["pii"]).lower() for r in rows), "pii"))
    parts.append("")
    cross = Counter((r["difficulty"], "pii" if r["pii"] else "no pii", r["expected_tier"]) for r in rows)
    parts.append("| difficulty | pii | expected_tier | count |\n| --- | --- | --- | ---: |")
    for (a, b, c), v in sorted(cross.items()):
        parts.append(f"| {a} | {b} | {c} | {v} |")
    parts.append("")
    parts.append(
        md_table(
            Counter(r["tier_if_no_pii"] for r in rows if r["pii"] and r["difficulty"] == "hard"),
            "hard PII: tier_if_no_pii",
        )
    )
    parts.append("")
    parts.append(md_table(Counter(r["language"] for r in rows), "language"))
    parts.append("")
    parts.append(md_table(Counter(r["category"] for r in rows), "category"))
    parts.append("")
    parts.append(md_table(Counter(r["adversarial"] or "(none)" for r in rows), "adversarial"))
    parts.append("")
    kinds = Counter(k for r in rows for k in r["pii_kinds"])
    n_pii = sum(1 for r in rows if r["pii"])
    parts.append(md_table(kinds, "pii kind (prompts containing it; share of PII prompts)", total=n_pii))
    parts.append("")
    subs = Counter(v.get("subtype", "-") for r in rows for v in r["pii_values"] if v["kind"] == "national_id")
    parts.append(md_table(subs, "national_id subtype (values)"))
    return "\n".join(parts)


def main(argv: list[str]) -> None:
    rows = build()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    with OUT.open("w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts to {OUT}", file=sys.stderr)
    if "--stats" in argv:
        print(stats(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
