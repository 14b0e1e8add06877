"""Generated prompts for the obfuscation categories (dev only: needs Faker): e-mail addresses with the "@" and
"." written as words in seven languages or in brackets, phone numbers spelled out digit by digit or in groups
("zéro six, cinquante et un, quatre-vingt-quinze, ...", "plus vier neun, eins sechs null, ..."), partly in
digits, national ids a clause away from their cue word, and defanged IPs and e-mails ("81[.]206[.]130[.]46",
"name[@]domain[.]com"); plus PII-free look-alikes (prices, quantities,
counting, dates written in words; "at", "point", "Punkt", "punto" in prose). ``evaluate`` reports recall per
category and variant and the look-alikes' clean rate.

The number speller here is written apart from ``number_words`` (and its tables were checked against the
``num2words`` package for 0-999 in every language), so the set does not just echo the normaliser's own tables.
"""

from __future__ import annotations

import ipaddress
import random
import string
from collections.abc import Callable

import phonenumbers
from faker import Faker
from stdnum.de import idnr as de_idnr
from stdnum.iso7064 import mod_11_10

from inference.pii.reserved import is_public_address
from inference.pii.synthetic import Example, Gold

LANGUAGES = ("en", "fr", "de", "es", "it", "nl", "pt")
_FAKER_LOCALES = {
    "en": "en_GB",
    "fr": "fr_FR",
    "de": "de_DE",
    "es": "es_ES",
    "it": "it_IT",
    "nl": "nl_NL",
    "pt": "pt_BR",
}
_REGIONS = {"en": ("GB", "US"), "fr": ("FR",), "de": ("DE",), "es": ("ES",), "it": ("IT",), "nl": ("NL",),
            "pt": ("BR", "PT")}  # fmt: skip

_DIGITS = {
    "en": "zero one two three four five six seven eight nine",
    "fr": "zéro un deux trois quatre cinq six sept huit neuf",
    "de": "null eins zwei drei vier fünf sechs sieben acht neun",
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve",
    "it": "zero uno due tre quattro cinque sei sette otto nove",
    "nl": "nul een twee drie vier vijf zes zeven acht negen",
    "pt": "zero um dois três quatro cinco seis sete oito nove",
}
_TEEN_WORDS = {
    "en": "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen",
    "fr": "dix onze douze treize quatorze quinze seize dix-sept dix-huit dix-neuf",
    "de": "zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn",
    "es": "diez once doce trece catorce quince dieciséis diecisiete dieciocho diecinueve",
    "it": "dieci undici dodici tredici quattordici quindici sedici diciassette diciotto diciannove",
    "nl": "tien elf twaalf dertien veertien vijftien zestien zeventien achttien negentien",
    "pt": "dez onze doze treze catorze quinze dezesseis dezessete dezoito dezenove",
}
_TENS_WORDS = {
    "en": "twenty thirty forty fifty sixty seventy eighty ninety",
    "fr": "vingt trente quarante cinquante soixante",
    "de": "zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig",
    "es": "veinte treinta cuarenta cincuenta sesenta setenta ochenta noventa",
    "it": "venti trenta quaranta cinquanta sessanta settanta ottanta novanta",
    "nl": "twintig dertig veertig vijftig zestig zeventig tachtig negentig",
    "pt": "vinte trinta quarenta cinquenta sessenta setenta oitenta noventa",
}
_PLUS = {"en": "plus", "fr": "plus", "de": "plus", "es": "más", "it": "più", "nl": "plus", "pt": "mais"}
_DOUBLE = {"en": "double", "fr": "double", "de": "doppel", "es": "doble", "it": "doppio", "nl": "dubbel"}
_PHONE_CUES = {
    "en": ("My number is {VALUE}, call after six.", "mobile: {VALUE}", "You can reach me on {VALUE} tonight."),
    "fr": ("Mon portable : {VALUE}, rappelle-moi.", "Mon numéro c'est le {VALUE}.", "tél. {VALUE}"),
    "de": ("Meine Handynummer ist {VALUE}.", "Ruf mich an unter {VALUE}, danke!", "Telefon: {VALUE}"),
    "es": ("Mi número es el {VALUE}.", "Llámame al {VALUE} por la tarde.", "móvil {VALUE}"),
    "it": ("Il mio numero è {VALUE}.", "Chiamami al {VALUE} domani.", "cellulare: {VALUE}"),
    "nl": ("Mijn nummer is {VALUE}.", "Bel me op {VALUE} vanavond.", "telefoon: {VALUE}"),
    "pt": ("Meu número é {VALUE}.", "Me liga no {VALUE} amanhã.", "telefone: {VALUE}"),
}
_AT_WORDS = {
    "en": (" at ", " (at) ", " [at] ", "{at}", " AT ", "<at>"),
    "fr": (" arobase ", " arobase ", " (at) "),
    "de": (" at ", " Klammeraffe ", " (at) ", " [at] "),
    "es": (" arroba ", " arroba ", " (arroba) "),
    "it": (" chiocciola ", " chiocciola ", " (at) "),
    "nl": (" apenstaartje ", " apenstaartje ", " [at] "),
    "pt": (" arroba ", " arroba ", " (arroba) "),
}
_DOT_WORDS = {
    "en": (" dot ", " (dot) ", " [dot] ", "{dot}", " DOT "),
    "fr": (" point ", " point ", "."),
    "de": (" Punkt ", " punkt ", "."),
    "es": (" punto ", " punto ", "."),
    "it": (" punto ", " punto ", "."),
    "nl": (" punt ", " punt ", "."),
    "pt": (" ponto ", " ponto ", "."),
}
_EMAIL_CUES = {
    "en": ("email me at {VALUE} please", "My address is {VALUE}."),
    "fr": ("Mon adresse mail : {VALUE}", "Écris-moi à {VALUE} stp."),
    "de": ("Meine E-Mail ist {VALUE}.", "Schreib an {VALUE}, danke."),
    "es": ("Mi correo es {VALUE}.", "Escríbeme a {VALUE} cuando puedas."),
    "it": ("La mia email è {VALUE}.", "Scrivimi a {VALUE} grazie."),
    "nl": ("Mijn e-mailadres is {VALUE}.", "Mail me op {VALUE} aub."),
    "pt": ("Meu e-mail é {VALUE}.", "Manda para {VALUE} por favor."),
}
# Defanged indicators, as security write-ups and threat feeds write them (nothing clickable).
_DEFANGED_DOTS = ("[.]", "(.)", "{.}", "[dot]", "(dot)")
_DEFANGED_TEMPLATES = (
    "IOC list from the incident: {VALUE} (first seen 03:12 UTC).",
    "Block {VALUE} on the firewall, it hammered our login page all night.",
    "The phishing mail came from {VALUE}; write a warning for staff.",
    "Indicators:\n- {VALUE}\n- a dropper named invoice.pdf.exe",
)
# (template, scheme, variant): the id a clause or more after its cue, beyond the ordinary 48-character window.
_GAPPED_IDS = (
    ("My SSN, the form split it into three boxes so I typed it like this: {VALUE}", "ssn", "SSN after a clause"),
    ("For the social security number field, which the portal kept rejecting yesterday, I entered {VALUE}",
     "ssn", "SSN after a clause"),
    ("Meine Steuer-ID steht oben rechts auf dem letzten Bescheid vom Finanzamt und lautet {VALUE}.",
     "idnr", "Steuer-ID after a clause"),
    ("Steuer-ID (habe ich vom Lohnzettel meines Arbeitgebers abgeschrieben, hoffentlich richtig): {VALUE}",
     "idnr", "Steuer-ID after a clause"),
    ("Mijn BSN, dat op de achterkant van mijn rijbewijs naast de pasfoto staat, is {VALUE}.", "bsn",
     "BSN after a clause"),
    ("my ssn, in case the insurer asks you again for it, is {VALUE}", "ssn-spelled", "SSN spelled, after a clause"),
)  # fmt: skip
_NEGATIVES = (
    "Das kostet neunundneunzig Euro und neunundneunzig Cent, also fast hundert Euro.",
    "Für den Kuchen: zweihundertfünfzig Gramm Mehl, drei Eier, hundert Gramm Zucker.",
    "Zähl mit: eins, zwei, drei, vier, fünf, sechs, sieben, acht, neun, zehn!",
    "Punkt eins der Tagesordnung: wir treffen uns um Punkt acht Uhr. Punkt zwei: das Budget.",
    "Il faut quatre-vingt-dix grammes de beurre, deux œufs et trois cent cinquante grammes de farine.",
    "Ça coûte quatre-vingt-dix-neuf euros et quatre-vingt-dix-neuf centimes.",
    "Le vingt-cinq décembre deux mille vingt-quatre, nous étions soixante-dix à table.",
    "Le point de rendez-vous est à la gare, point final.",
    "Son las seis y media; compré doce huevos, tres kilos de patatas y dos litros de leche.",
    "El punto de encuentro es la plaza mayor, a las ocho en punto.",
    "La chiocciola è lenta: percorre cinquanta centimetri in venti minuti.",
    "Costa trentanove euro e novantanove centesimi, più venti di spedizione.",
    "Het kost negenennegentig euro, plus vijf euro verzendkosten, punt.",
    "O jogo terminou dois a um; comprei doze ovos e meia dúzia de pães.",
    "The point at issue is the dot product at scale, not the cross product.",
    "Look at example code for the dot operator at the end of chapter two.",
    "The match ended two one, then three nil in the replay; forty thousand people watched.",
    "Add one cup of flour, two eggs, three hundred grams of sugar and four tablespoons of milk.",
    "nineteen eighty-four is a novel; twenty twenty-four was a leap year.",
    "values = [null, null, null, 0, 0, 12]  # null null null means missing",
    "Zimmer zwölf, dreizehn und vierzehn sind frei; Bett zwei, drei, vier auch.",
    "We need double five batteries, triple A, and one two-pack of cables.",
    "My SSN is not something I share; the form has 9 boxes and a reference code 2024 0117 88.",
    "Steuer-ID? Keine Ahnung. Die Rechnung 2024-118 über 345,67 Euro kam gestern.",
    "meet me at home dot, the cafe at noon, or at the station point B",
    "Die Bestellung umfasst sechs, sieben, acht Kartons zu je zwölf Flaschen, insgesamt zweiundsiebzig.",
    "We defang indicators by writing [.] for each dot; the template shows host[.]example and 192[.]0[.]2[.]1.",
    "Section 4(.)2 of the runbook: rotate the logs, then restart (.) the service.",
    "The lab network 10[.]0[.]0[.]0/8 and the gateway 192(.)168(.)1(.)1 are out of scope.",
    "Match versions with the regex \\d+[.]\\d+[.]\\d+, e.g. 3[.]11[.]4.",
)


def spell(n: int, language: str) -> str:
    """0 <= n <= 99 in words, written as a speaker of ``language`` writes it in a phone number."""
    digits = _DIGITS[language].split()
    if n < 10:
        return digits[n]
    if n < 20:
        return _TEEN_WORDS[language].split()[n - 10]
    ten, unit = divmod(n, 10)
    if language == "fr":
        return _french(n, ten, unit)
    tens = _TENS_WORDS[language].split()[ten - 2]
    if not unit:
        return tens
    if language == "en":
        return f"{tens}-{digits[unit]}"
    if language == "de":
        return ("ein" if unit == 1 else digits[unit]) + "und" + tens
    if language == "nl":
        return digits[unit] + ("ën" if digits[unit].endswith("e") else "en") + tens
    if language == "it":
        return (tens[:-1] if unit in (1, 8) else tens) + ("tré" if unit == 3 else digits[unit])
    if language == "es":
        if ten == 2:
            return "veinti" + {2: "dós", 3: "trés", 6: "séis"}.get(unit, digits[unit])
        return f"{tens} y {digits[unit]}"
    return f"{tens} e {digits[unit]}"  # pt


def _french(n: int, ten: int, unit: int) -> str:
    digits = _DIGITS["fr"].split()
    if ten in (7, 9):
        base = "soixante" if ten == 7 else "quatre-vingt"
        teen = _TEEN_WORDS["fr"].split()[unit]
        return f"{base} et {teen}" if n == 71 else f"{base}-{teen}"
    if ten == 8:
        return "quatre-vingts" if not unit else f"quatre-vingt-{digits[unit]}"
    tens = _TENS_WORDS["fr"].split()[ten - 2]
    if not unit:
        return tens
    return f"{tens} et un" if unit == 1 else f"{tens}-{digits[unit]}"


class ObfuscationValues:
    """Random values for the obfuscation categories, reproducible under a seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fakers = {lang: Faker(locale) for lang, locale in _FAKER_LOCALES.items()}
        for offset, faker in enumerate(self.fakers.values()):
            faker.seed_instance(seed * 1000 + 700 + offset)

    def _phone_groups(self, language: str) -> tuple[list[str], str]:
        """A valid mobile number of the language's region as digit groups (a "+CC" group first or not)."""
        while True:
            region = self.rng.choice(_REGIONS[language])
            example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
            assert example is not None
            national = str(example.national_number)
            tail = "".join(self.rng.choice(string.digits) for _ in range(4))
            number = phonenumbers.PhoneNumber(
                country_code=example.country_code, national_number=int(national[:-4] + tail)
            )
            if not phonenumbers.is_valid_number(number):
                continue
            style = self.rng.choice(("national", "international"))
            fmt = (
                phonenumbers.PhoneNumberFormat.NATIONAL
                if style == "national"
                else phonenumbers.PhoneNumberFormat.INTERNATIONAL
            )
            written = phonenumbers.format_number(number, fmt)
            groups = [g for g in written.replace("-", " ").replace("(", " ").replace(")", " ").split() if g]
            if all(g.isdigit() or g.startswith("+") for g in groups):
                return groups, style

    def _say_group(self, group: str, language: str, way: str) -> str:
        if group.startswith("+"):
            return f"{_PLUS[language]} " + " ".join(_DIGITS[language].split()[int(d)] for d in group[1:])
        digits = _DIGITS[language].split()
        if way == "pairs" and len(group) % 2 == 0:
            pairs = [group[i : i + 2] for i in range(0, len(group), 2)]
            return " ".join(
                f"{digits[0]} {digits[int(p[1])]}" if p[0] == "0" else spell(int(p), language) for p in pairs
            )
        words: list[str] = []
        index = 0
        while index < len(group):
            if way == "double" and language in _DOUBLE and group[index : index + 2] == group[index] * 2:
                words.append(f"{_DOUBLE[language]} {digits[int(group[index])]}")
                index += 2
                continue
            words.append(digits[int(group[index])])
            index += 1
        return " ".join(words)

    def phone(self, language: str) -> tuple[str, str, str]:
        groups, style = self._phone_groups(language)
        way = self.rng.choice(("digits", "pairs", "double", "mixed"))
        said = []
        for index, group in enumerate(groups):
            if way == "mixed" and index % 2 and not group.startswith("+"):
                said.append(group)  # some groups left in digits
            else:
                said.append(self._say_group(group, language, "pairs" if way == "mixed" else way))
        value = self.rng.choice((", ", " ", ", ")).join(said)
        return self.rng.choice(_PHONE_CUES[language]), value, f"{language}, {way}, {style}"

    def email(self, language: str) -> tuple[str, str, str]:
        faker = self.fakers[language]
        local = f"{faker.first_name()}.{faker.last_name()}".lower().replace(" ", "")
        local = "".join(c for c in local if c.isascii() and (c.isalnum() or c == "."))
        domain = faker.free_email_domain()
        dot = self.rng.choice(_DOT_WORDS[language])
        at = self.rng.choice(_AT_WORDS[language])
        value = local.replace(".", dot) + at + domain.replace(".", dot)
        bracketed = at.strip()[0] in "([{<"
        return self.rng.choice(_EMAIL_CUES[language]), value, f"{language}, {'bracketed' if bracketed else 'words'}"

    def gapped_id(self) -> tuple[str, str, str]:
        template, scheme, variant = self.rng.choice(_GAPPED_IDS)
        if scheme == "idnr":
            idnr = self._de_idnr()
            value = self.rng.choice((" ", "/", "")).join((idnr[:2], idnr[2:5], idnr[5:8], idnr[8:]))
        elif scheme == "bsn":
            bsn = self.fakers["nl"].ssn()
            value = self.rng.choice((f"{bsn[:4]}.{bsn[4:6]}.{bsn[6:]}", f"{bsn[:3]} {bsn[3:6]} {bsn[6:]}", bsn))
        else:
            ssn = self._ssn()
            if scheme == "ssn-spelled":
                words = _DIGITS["en"].split()
                value = ", ".join(" ".join(words[int(d)] for d in part) for part in (ssn[:3], ssn[3:5], ssn[5:]))
            else:
                value = self.rng.choice((" ", "-", "  ")).join((ssn[:3], ssn[3:5], ssn[5:]))
        return template, value, variant

    def defanged_ip(self) -> tuple[str, str, str]:
        while True:
            octets = [self.rng.randint(1, 223), *(self.rng.randint(0, 255) for _ in range(3))]
            if is_public_address(ipaddress.IPv4Address(".".join(map(str, octets)))):
                break
        dot = self.rng.choice(_DEFANGED_DOTS)
        template = self.rng.choice(_DEFANGED_TEMPLATES)
        return template, dot.join(map(str, octets)), f"IPv4 {dot}"

    def defanged_email(self) -> tuple[str, str, str]:
        faker = self.fakers[self.rng.choice(LANGUAGES)]
        local = "".join(c for c in faker.user_name().lower() if c.isascii() and (c.isalnum() or c in "._"))
        dot = self.rng.choice(("[.]", "(.)", "[dot]"))
        at = self.rng.choice(("@", "[@]", "(@)", "[at]"))
        value = local + at + faker.free_email_domain().replace(".", dot)
        return self.rng.choice(_DEFANGED_TEMPLATES), value, f"e-mail {at} {dot}"

    def _ssn(self) -> str:
        area = self.rng.choice([a for a in range(1, 900) if a != 666])
        return f"{area:03d}{self.rng.randint(1, 99):02d}{self.rng.randint(1, 9999):04d}"

    def _de_idnr(self) -> str:
        while True:
            body = str(self.rng.randint(10**9, 10**10 - 1))
            number = body + mod_11_10.calc_check_digit(body)
            if de_idnr.is_valid(number):
                return number


def _place(template: str, value: str, kind: str, variant: str) -> Example:
    start = template.index("{VALUE}")
    return Example(template.replace("{VALUE}", value, 1), (Gold(kind, start, start + len(value), variant),))


def obfuscation_examples(seed: int, per_category: int) -> tuple[list[Example], list[Example]]:
    """(examples with PII, PII-free look-alikes); gold variants are prefixed with the category."""
    values = ObfuscationValues(seed)
    makers: dict[str, tuple[str, Callable[[], tuple[str, str, str]]]] = {
        "spelled phone": ("PHONE", lambda: values.phone(values.rng.choice(LANGUAGES))),
        "worded email": ("EMAIL", lambda: values.email(values.rng.choice(LANGUAGES))),
        "gapped id": ("NATIONAL_ID", values.gapped_id),
        "defanged": ("IP_ADDRESS", values.defanged_ip),
        "defanged email": ("EMAIL", values.defanged_email),
    }
    positives = []
    for category, (kind, make) in makers.items():
        for _ in range(per_category):
            template, value, variant = make()
            positives.append(_place(template, value, kind, f"{category}/{variant}"))
    return positives, [Example(text, ()) for text in _NEGATIVES]
