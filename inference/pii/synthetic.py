"""Generated, labelled prompts for training the name model and for measuring the detector (dev only: needs Faker and wordfreq).

Two splits that share no sentence template: ``train`` (names only, for ``train_names``) and ``test`` (every
kind, for ``evaluate``). Test names come from the gazetteer's locales ("seen") and from locales the model
never saw ("unseen": Swedish, Polish, Czech, Portuguese, Turkish), so the report shows how far the model
generalises beyond its lists. A template is a string with ``{SLOT}`` markers; filling one records the
character span and kind of every PII value put in, which is the gold standard.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import os
import random
import re
import string
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import wordfreq
from faker import Faker
from stdnum.de import idnr as de_idnr
from stdnum.iso7064 import mod_11_10

from inference.pii.public_figures import PUBLIC_FIGURES
from inference.pii.reserved import is_public_address

GAZETTEER_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL")
UNSEEN_LOCALES = ("sv_SE", "pl_PL", "cs_CZ", "pt_BR", "tr_TR")
# Names the model trains on without them being in its gazetteers, so it learns to trust context for names it
# does not know. Disjoint from UNSEEN_LOCALES, which stay unseen for the evaluation.
ALL_FAKER_LOCALES = (
    "en_US", "en_GB", "en_IE", "en_IN", "de_DE", "de_AT", "fr_FR", "es_ES", "es_MX", "it_IT", "nl_NL", "pt_BR",
    "pt_PT", "sv_SE", "pl_PL", "cs_CZ", "tr_TR", "fi_FI", "da_DK", "no_NO", "hu_HU", "ro_RO", "hr_HR", "sk_SK",
    "sl_SI", "et_EE", "ga_IE", "ru_RU", "uk_UA", "el_GR", "bg_BG", "lt_LT", "lv_LV", "id_ID",
)  # fmt: skip
TRAIN_OOV_LOCALES = ("fi_FI", "da_DK", "no_NO", "hu_HU", "ro_RO", "hr_HR", "sk_SK", "sl_SI", "et_EE", "ga_IE")


@dataclass(frozen=True)
class Gold:
    kind: str  # a PiiKind value
    start: int
    end: int
    variant: str  # how the value was written: "plain", "spelled", "spaced", a country, "seen"/"unseen" ...


@dataclass(frozen=True)
class Example:
    text: str
    gold: tuple[Gold, ...]


# A slot filler returns (value, kind or None for a non-PII filler, variant).
Filler = Callable[[], tuple[str, str | None, str]]
_SLOT = re.compile(r"\{([A-Z_]+)\}")


def reexec_with_fixed_hash_seed(module: str) -> None:
    """Re-run ``python -m module`` with PYTHONHASHSEED=0 unless already so.

    Some of Faker's data (city and id parts in a few locales) is kept in sets, whose order, and so what a
    seeded generator picks, changes with Python's per-process string hashing. A fixed hash seed makes the
    training data, the shipped model and the evaluation figures reproducible byte for byte.
    """
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], {**os.environ, "PYTHONHASHSEED": "0"})


def join(examples: list[Example], separator: str = " ") -> Example:
    """Several examples as one text (prompts are paragraphs, not single sentences), gold spans shifted."""
    text = ""
    gold: list[Gold] = []
    for example in examples:
        if text:
            text += separator
        gold.extend(Gold(g.kind, g.start + len(text), g.end + len(text), g.variant) for g in example.gold)
        text += example.text
    return Example(text, tuple(gold))


def fill(template: str, fillers: dict[str, Filler]) -> Example:
    pieces: list[str] = []
    gold: list[Gold] = []
    position = 0
    length = 0
    for match in _SLOT.finditer(template):
        literal = template[position : match.start()]
        pieces.append(literal)
        length += len(literal)
        value, kind, variant = fillers[match.group(1)]()
        if kind is not None:
            gold.append(Gold(kind, length, length + len(value), variant))
        pieces.append(value)
        length += len(value)
        position = match.end()
    pieces.append(template[position:])
    return Example("".join(pieces), tuple(gold))


class Values:
    """Random PII values and non-PII look-alikes, reproducible under a seed."""

    def __init__(self, seed: int, name_locales: tuple[str, ...] = GAZETTEER_LOCALES) -> None:
        self.rng = random.Random(seed)
        self.fakers = {loc: Faker(loc) for loc in sorted({*GAZETTEER_LOCALES, *UNSEEN_LOCALES, *TRAIN_OOV_LOCALES})}
        for offset, faker in enumerate(self.fakers.values()):
            faker.seed_instance(seed * 1000 + offset)
        self.name_locales = name_locales
        self.en = self.fakers["en_US"]

    def _faker(self, locales: tuple[str, ...] = GAZETTEER_LOCALES) -> Faker:
        return self.fakers[self.rng.choice(locales)]

    # persons ---------------------------------------------------------------------------------------------
    def person(self, locales: tuple[str, ...] | None = None) -> tuple[str, str | None, str]:
        locales = locales or self.name_locales
        faker = self._faker(locales)
        variant = "unseen" if locales[0] in UNSEEN_LOCALES else "seen"
        roll = self.rng.random()
        first, last = faker.first_name(), faker.last_name()
        if roll < 0.65:
            return f"{first} {last}", "PERSON", variant
        if roll < 0.85:
            return first, "PERSON", variant
        return f"{first} {self.rng.choice(string.ascii_uppercase)}. {last}", "PERSON", variant

    def first_name(self, locales: tuple[str, ...]) -> tuple[str, str | None, str]:
        variant = "unseen" if locales[0] in UNSEEN_LOCALES else "seen"
        return self._faker(locales).first_name(), "PERSON", variant

    def last_name(self, locales: tuple[str, ...]) -> tuple[str, str | None, str]:
        variant = "unseen" if locales[0] in UNSEEN_LOCALES else "seen"
        return self._faker(locales).last_name(), "PERSON", variant

    def word(self, split: str) -> tuple[str, str | None, str]:
        """A frequent word that is no name in Faker's lists, capitalised (as at a sentence start or in a
        product name). Words are split between train and test by a hash, so test words are new to the model."""
        words = _capitalisable_words(split)
        return words[self.rng.randrange(len(words))], None, ""

    def rare_word(self, split: str) -> tuple[str, str | None, str]:
        """A rare word (wordfreq's English ranks 40k-120k, Faker names removed), capitalised: stands in for
        the product, project and place names that prompts are full of and no list has."""
        words = _rare_words(split)
        return words[self.rng.randrange(len(words))], None, ""

    def public_figure(self) -> tuple[str, str | None, str]:
        return self.rng.choice(PUBLIC_FIGURES), None, "public"

    # look-alikes and other capitalised words -------------------------------------------------------------
    def city(self) -> tuple[str, str | None, str]:
        return self._faker().city(), None, ""

    def company(self) -> tuple[str, str | None, str]:
        # Faker's companies are mostly surnames ("Harris, Jackson and Gill"); real prompts name far more
        # companies that are not, so half come from a list of ordinary organisation names.
        if self.rng.random() < 0.5:
            return self.rng.choice(_ORGANISATIONS), None, ""
        return self._faker().company(), None, ""

    def country(self) -> tuple[str, str | None, str]:
        return self.en.country(), None, ""

    def street(self) -> tuple[str, str | None, str]:
        return self.en.street_name(), None, ""

    def product(self) -> tuple[str, str | None, str]:
        return self.rng.choice(_PRODUCTS), None, ""

    def year(self) -> tuple[str, str | None, str]:
        return str(self.rng.randint(1950, 2030)), None, ""

    def version(self) -> tuple[str, str | None, str]:
        return ".".join(str(self.rng.randint(0, 20)) for _ in range(self.rng.choice((2, 3)))), None, ""

    def amount(self) -> tuple[str, str | None, str]:
        return f"{self.rng.randint(1, 99999):,}.{self.rng.randint(0, 99):02d}", None, ""

    def order_number(self) -> tuple[str, str | None, str]:
        return str(self.rng.randint(10**5, 10**9)), None, ""

    def plain_date(self) -> tuple[str, str | None, str]:
        return self.en.date_between(date(2000, 1, 1), date(2030, 1, 1)).isoformat(), None, ""

    def test_card(self) -> tuple[str, str | None, str]:
        return (
            self.rng.choice(("4242 4242 4242 4242", "4111111111111111", "5555555555554444", "378282246310005")),
            None,
            "",
        )

    # contact ----------------------------------------------------------------------------------------------
    def email(self) -> tuple[str, str | None, str]:
        # Not Faker's default "safe" example.com/org/net addresses: those reserved domains are documentation, not
        # someone's mailbox (see reserved.py); real-looking domains stand for the addresses people paste.
        address: str = self._faker().email(safe=False)
        roll = self.rng.random()
        if roll < 0.6:
            return address, "EMAIL", "plain"
        local, domain = address.split("@")
        if roll < 0.8:
            return f"{local.replace('.', ' dot ')} at {domain.replace('.', ' dot ')}", "EMAIL", "spelled"
        return f"{local} [at] {domain.replace('.', ' [dot] ')}", "EMAIL", "bracketed"

    def phone(self) -> tuple[str, str | None, str]:
        locale = self.rng.choice(GAZETTEER_LOCALES)
        if self.rng.random() < 0.15:
            digits = f"{self.rng.randint(201, 989)}{self.rng.randint(200, 999)}{self.rng.randint(0, 9999):04d}"
            words = [_DIGIT_NAMES[int(d)] for d in digits]
            spelled = " ".join(words[:3]) + ", " + " ".join(words[3:6]) + ", " + " ".join(words[6:])
            return spelled, "PHONE", "spelled"
        return self.fakers[locale].phone_number(), "PHONE", locale

    def ip_address(self) -> tuple[str, str | None, str]:
        # Public addresses only: private, loopback and documentation ranges locate no one (reserved.py); a
        # private address is one of the PII-free look-alikes ({PRIVATEIP}).
        if self.rng.random() < 0.7:
            return self.en.ipv4_public(), "IP_ADDRESS", "v4 public"
        while True:
            address: str = self.en.ipv6()  # random bits: about 1 in 90 falls in a unique-local or reserved range
            if is_public_address(ipaddress.ip_address(address)):
                return address, "IP_ADDRESS", "v6"

    def private_ip(self) -> tuple[str, str | None, str]:
        return self.en.ipv4_private(), None, ""

    # checksummed numbers ----------------------------------------------------------------------------------
    def credit_card(self) -> tuple[str, str | None, str]:
        number: str = self.en.credit_card_number(self.rng.choice(("visa16", "mastercard", "amex", "discover")))
        roll = self.rng.random()
        if roll < 0.35:
            return number, "CREDIT_CARD", "plain"
        if roll < 0.6:
            return " ".join(number[i : i + 4] for i in range(0, len(number), 4)), "CREDIT_CARD", "spaced"
        if roll < 0.75:
            return "-".join(number[i : i + 4] for i in range(0, len(number), 4)), "CREDIT_CARD", "dashed"
        if roll < 0.85:
            return " ".join(number), "CREDIT_CARD", "digit by digit"
        if roll < 0.93:
            half = len(number) // 2
            return f"{number[:half]}\n{number[half:]}", "CREDIT_CARD", "split over lines"
        return " ".join(_DIGIT_NAMES[int(d)] for d in number), "CREDIT_CARD", "spelled"

    def iban(self) -> tuple[str, str | None, str]:
        locale = self.rng.choice(GAZETTEER_LOCALES[1:])
        value: str = self.fakers[locale].iban()
        roll = self.rng.random()
        if roll < 0.4:
            return value, "IBAN", "compact"
        grouped = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
        if roll < 0.85:
            return grouped, "IBAN", "grouped"
        return grouped[:14] + "\n" + grouped[15:], "IBAN", "split over lines"

    def national_id(self) -> tuple[str, str | None, str]:
        country = self.rng.choice(("US", "UK", "DE", "FR", "ES", "IT", "NL"))
        if country == "US":
            return self.en.ssn(), "NATIONAL_ID", "US SSN"
        if country == "UK":
            first, second = "G", "B"
            while first + second in ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ"):  # prefixes never issued
                first = self.rng.choice("ABCEGHJKLMNOPRSTWXYZ")
                second = self.rng.choice("ABCEGHJKLMNPRSTWXYZ")
            body = " ".join(f"{self.rng.randint(0, 99):02d}" for _ in range(3))
            return f"{first}{second} {body} {self.rng.choice('ABCD')}", "NATIONAL_ID", "UK NINO"
        if country == "DE":
            return self._de_idnr(), "NATIONAL_ID", "DE IdNr"
        if country == "FR":
            return self.fakers["fr_FR"].ssn(), "NATIONAL_ID", "FR NIR"
        if country == "ES":
            faker = self.fakers["es_ES"]
            return (
                (faker.nif(), "NATIONAL_ID", "ES DNI")
                if self.rng.random() < 0.7
                else (faker.nie(), "NATIONAL_ID", "ES NIE")
            )
        if country == "IT":
            return self.fakers["it_IT"].ssn(), "NATIONAL_ID", "IT CF"
        return self.fakers["nl_NL"].ssn(), "NATIONAL_ID", "NL BSN"

    def _de_idnr(self) -> str:
        # Ten digits, first non-zero, exactly one digit repeated (two or three times), then the check digit.
        while True:
            body = str(self.rng.randint(10**9, 10**10 - 1))
            number = body + mod_11_10.calc_check_digit(body)
            if de_idnr.is_valid(number):
                return number

    def passport(self) -> tuple[str, str | None, str]:
        country = self.rng.choice(("US", "UK", "DE", "FR"))
        if country == "US":
            return str(self.rng.randint(10**8, 10**9 - 1)), "PASSPORT", "US"
        if country == "UK":
            return str(self.rng.randint(10**8, 10**9 - 1)), "PASSPORT", "UK"
        if country == "DE":
            alphabet = "CFGHJKLMNPRTVWXYZ"
            tail = "".join(self.rng.choice(alphabet + "0123456789") for _ in range(7))
            return self.rng.choice(alphabet) + str(self.rng.randint(0, 9)) + tail, "PASSPORT", "DE"
        letters = "".join(self.rng.choice(string.ascii_uppercase) for _ in range(2))
        return f"{self.rng.randint(10, 99)}{letters}{self.rng.randint(10000, 99999)}", "PASSPORT", "FR"

    def date_of_birth(self) -> tuple[str, str | None, str]:
        born: date = self.en.date_of_birth(minimum_age=18, maximum_age=90)
        fmt = self.rng.choice(
            ("%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%d.%m.%Y", "%-d %B %Y", "%B %-d, %Y", "%b %-d, %Y", "%-d %b %Y")
        )
        return born.strftime(fmt), "DATE_OF_BIRTH", fmt

    def credential(self) -> tuple[str, str | None, str]:
        kind = self.rng.choice(("openai", "aws", "github", "slack", "stripe", "jwt", "google"))
        alnum = string.ascii_letters + string.digits

        def rand(n: int, alphabet: str = alnum) -> str:
            return "".join(self.rng.choice(alphabet) for _ in range(n))

        values = {
            "openai": "sk-proj-" + rand(48),
            "aws": "AKIA" + rand(16, string.ascii_uppercase + string.digits),
            "github": "ghp_" + rand(36),
            "slack": f"xoxb-{self.rng.randint(10**10, 10**11)}-{self.rng.randint(10**10, 10**11)}-{rand(24)}",
            "stripe": "sk_live_" + rand(24),
            "jwt": f"eyJ{rand(20)}.eyJ{rand(40)}.{rand(43)}",
            "google": "AIza" + rand(35),
        }
        return values[kind], "CREDENTIAL", kind

    def password(self) -> tuple[str, str | None, str]:
        word = self.rng.choice(("hunter", "Sommer", "dragon", "Passw0rd", "letmein", "Winter", "qwerty", "S3cure"))
        return f"{word}{self.rng.randint(1, 9999)}{self.rng.choice('!?#$%')}", "CREDENTIAL", "password"


_ORGANISATIONS = (
    "Acme Corp", "Northwind Traders", "Globex", "Initech", "the City Council", "Deutsche Bahn", "Siemens",
    "the Red Cross", "Oxford University", "the Ministry of Health", "Contoso", "Blue Harbor Logistics",
    "Summit Health", "Green Valley Farms", "Apex Analytics", "the National Library", "Sunrise Bakery",
    "Pacific Freight", "Orion Software", "Metro Transit", "Banco Santander", "Crédit Agricole", "Fiat", "Philips",
)  # fmt: skip


@functools.cache
def _capitalisable_words(split: str) -> tuple[str, ...]:
    first, last = faker_names(GAZETTEER_LOCALES + UNSEEN_LOCALES + TRAIN_OOV_LOCALES)
    names = first | last
    wanted = 0 if split == "train" else 1
    words = (
        w
        for lang in ("en", "de", "fr", "es")
        for w in wordfreq.top_n_list(lang, 30_000)[300:]
        if w.isalpha() and len(w) > 2 and w not in names and zlib.crc32(w.encode()) % 2 == wanted
    )
    return tuple(sorted({w.capitalize() for w in words}))


@functools.cache
def _rare_words(split: str) -> tuple[str, ...]:
    first, last = faker_names(ALL_FAKER_LOCALES)
    names = first | last
    wanted = 0 if split == "train" else 1
    words = (
        w
        for w in wordfreq.top_n_list("en", 120_000)[40_000:]
        if w.isalpha() and len(w) > 3 and w not in names and zlib.crc32(w.encode()) % 2 == wanted
    )
    return tuple(sorted({w.capitalize() for w in words}))


def faker_names(locales: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
    """Lower-cased (first names, last names) of Faker's person providers for ``locales``."""
    first: set[str] = set()
    last: set[str] = set()
    for locale in locales:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        for attribute, bucket in (
            ("first_names", first),
            ("first_names_male", first),
            ("first_names_female", first),
            ("last_names", last),
        ):
            for name in getattr(provider, attribute, ()):
                for part in str(name).replace("-", " ").split():
                    if len(part) > 1:
                        bucket.add(part.lower())
    return frozenset(first), frozenset(last)


_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_PRODUCTS = (
    "Python", "Django", "Kubernetes", "Docker", "React", "PostgreSQL", "Linux", "Windows", "GitHub", "Excel",
    "Google Sheets", "AWS Lambda", "Visual Studio Code", "Jupyter", "TensorFlow", "PyTorch", "Redis", "Celery",
    "Salesforce", "Slack", "Microsoft Teams", "Zoom", "iPhone", "Android", "Chrome", "Firefox", "Rust", "Java",
    "Terraform", "Ansible", "Jira", "Confluence", "Notion", "Figma", "Photoshop", "Tableau", "Power BI",
)  # fmt: skip


# Templates. {PERSON}/{FIRST}/{LAST} are names; the others fill look-alikes and other capitalised words.
TRAIN_NAME_TEMPLATES = (
    "Dear {PERSON},\nThank you for your order from {COMPANY}.",
    "Hi {FIRST}, can you review the {PRODUCT} migration before Friday?",
    "My name is {PERSON} and I live in {CITY}.",
    "Please write a reference letter for {PERSON}, who worked with me at {COMPANY} for three years.",
    "Patient {PERSON} presented with chest pain on admission.",
    "Signed,\n{PERSON}",
    "Best regards,\n{PERSON}\n{COMPANY}",
    "{PERSON} asked whether the {PRODUCT} cluster in {CITY} is still running.",
    "Can you summarise the email from {PERSON} about the budget?",
    "I had a meeting with Mr. {LAST} yesterday about the contract.",
    "Ms. {LAST} will join the call at 3 pm.",
    "Dr. {LAST} prescribed a new medication.",
    "Forward this to {FIRST} and {PERSON} please.",
    "Translate into German: {PERSON} is my neighbour.",
    "The tenant, {PERSON}, has not paid rent since {MONTH}.",
    "Write a birthday poem for my daughter {FIRST}.",
    "Our new hire {PERSON} starts on Monday in the {CITY} office.",
    "Ask {FIRST} to update the {PRODUCT} dashboard.",
    "{FIRST} said the invoice from {COMPANY} was wrong.",
    "Meeting notes: {PERSON}, {PERSON} and {PERSON} attended.",
    "Hallo {FIRST}, kannst du mir bitte die Unterlagen schicken?",
    "Sehr geehrte Frau {LAST},\nvielen Dank für Ihre Nachricht.",
    "Bonjour {FIRST}, merci pour ton message.",
    "Hola {FIRST}, ¿puedes llamarme mañana?",
    "Herr {LAST} hat angerufen.",
    "I'm {PERSON}, a nurse at {COMPANY}.",
    "Who is {PERSON}? They emailed me twice.",
    "Reply to {FIRST}: the {PRODUCT} build is fixed.",
    "According to {PERSON}, the shipment to {COUNTRY} is delayed.",
    "Employee: {PERSON}\nDepartment: Finance\nLocation: {CITY}",
    "Interview feedback for {PERSON}: strong on {PRODUCT}, weak on testing.",
    "{PERSON} and I are planning a trip to {COUNTRY}.",
    "Can you help me write a message to my landlord {PERSON}?",
    "What did {PUBLIC} say about climate change?",
    "Summarise the biography of {PUBLIC}.",
    "Compare {PUBLIC} and {PUBLIC} as leaders.",
    "I believe {FIRST} will finish the slides tonight.",
    "Tell {FIRST} that the flight is cancelled.",
    "Did {PERSON} send the signed lease?",
    "We can't start because {FIRST} is still stuck in traffic.",
    "When {FIRST} arrives, give {FIRST} the keys.",
    "Ask {PERSON} whether the {PRODUCT} licence was renewed.",
    "My son {FIRST} has a fever and a rash.",
    "Congratulations to {PERSON} on the promotion!",
    "{FIRST} wants to move the party to Saturday.",
    "The report written by {PERSON} contains errors.",
    "Is {FIRST} allergic to penicillin?",
    "Thanks, {FIRST}! See you in {CITY}.",
    "Schreib bitte eine Nachricht an {PERSON} wegen der Rechnung.",
    "Mi hermana {FIRST} vive en {CITY}.",
    "Ma collègue {PERSON} est malade aujourd'hui.",
    "Il signor {LAST} ha chiamato stamattina.",
    "From: {PERSON}\nTo: {PERSON}\nSubject: Contract renewal",
    "Assigned to: {PERSON}",
    "Landlord: {PERSON}, tenant: {PERSON}.",
    "Can {FIRST} and {FIRST} share a room at the {COMPANY} offsite?",
    "The letter from {PERSON}'s lawyer arrived today.",
    "Happy birthday, {FIRST}!",
)
TRAIN_NEGATIVE_TEMPLATES = (
    "{WORD} is the main concern for the next release.",
    "We migrated the billing service to {RARE}, and it works.",
    "I use {RARE} and {PRODUCT} every day.",
    "Deploy it to {RARE} first, then to {RARE}.",
    "Is {RARE} compatible with {PRODUCT}?",
    "The {RARE} plugin crashed again.",
    "{RARE} support says the outage is over.",
    "Thanks to {RARE}, the build is faster.",
    "We visited {RARE} and {CITY} last summer.",
    "Our office is in {CITY}, {COUNTRY}.",
    "Find flights from {CITY} to {CITY} in {MONTH}.",
    "What is the weather like in {CITY} today?",
    "{CITY} is a small town in {COUNTRY}.",
    "Book a hotel near {CITY} station for two nights.",
    "The conference moves from {CITY} to {CITY}, {COUNTRY} next year.",
    "We moved the {WORD} service to the new cluster.",
    "{WORD} at the 95th percentile rose to 120 ms.",
    "Next steps: {WORD}, {WORD} and {WORD}.",
    "The {WORD} {WORD} team reviewed the proposal.",
    "{WORD} and {WORD} are both supported.",
    "Use the {WORD} API to export the data.",
    "{WORD}: see the attached spreadsheet.",
    "- {WORD} configuration\n- {WORD} monitoring",
    "## {WORD}\nThis section explains the setup.",
    "How do I configure {PRODUCT} on {PRODUCT}?",
    "What is the capital of {COUNTRY}?",
    "Write a product description for {COMPANY}.",
    "The office on {STREET} in {CITY} closes at 6 pm.",
    "Explain the difference between {PRODUCT} and {PRODUCT}.",
    "Please translate this paragraph into French.",
    "Monday's release of {PRODUCT} {VERSION} broke the build.",
    "Thanks for the quick reply! Can you also check the logs?",
    "Summarise the Q3 report for {COMPANY} in {CITY}.",
    "Why does Python raise a KeyError here?",
    "Best practices for deploying {PRODUCT} in {COUNTRY}.",
    "In {YEAR}, the company moved its headquarters to {CITY}.",
    "Invoice {ORDER} from {COMPANY} totals {AMOUNT} EUR.",
    "The European Union and the United Nations signed the agreement.",
    "Our Customer Success team in {CITY} uses {PRODUCT} and {PRODUCT}.",
    "Write a haiku about autumn in {CITY}.",
    "Quarterly Business Review: Sales, Marketing and Operations.",
    "Does {PRODUCT} support Unicode on Windows?",
    "Meeting moved to Thursday, {MONTH} {DAYNUM}.",
    "Can you recommend a good Italian restaurant near {STREET}?",
    "Wie konfiguriere ich {PRODUCT} unter Linux?",
    "Quelle est la différence entre {PRODUCT} et {PRODUCT} ?",
    "¿Cuál es la capital de {COUNTRY}?",
    "Draft a press release: {COMPANY} opens a new office in {CITY}.",
    "Title: Getting Started With {PRODUCT}\nAuthor: Documentation Team",
)

TEST_NAME_TEMPLATES = (
    "Could you draft a reply to {PERSON} confirming the appointment?",
    "Hello, I am {PERSON}, and I need help with my tax return.",
    "Remind {FIRST} about the dentist on Tuesday.",
    "Send the contract to {PERSON} at {COMPANY} in {CITY}.",
    "Yesterday {PERSON} called about the delivery.",
    "Kind regards,\n{PERSON}",
    "Mrs. {LAST} needs a wheelchair at the gate.",
    "The complaint was filed by {PERSON} last week.",
    "Write a toast for {FIRST}'s wedding.",
    "Ich heiße {PERSON} und wohne in {CITY}.",
    "Je m'appelle {PERSON}.",
    "Me llamo {PERSON} y trabajo en {COMPANY}.",
    "Prof. {LAST} moved the exam to next week.",
    "Candidate: {PERSON}\nRole: Data Engineer",
    "I think {FIRST} deserves a raise this year.",
    "Please check whether {PERSON} has returned the laptop.",
    "Notes from the call with {PERSON} ({COMPANY}).",
    "{PERSON} wants to know if the {PRODUCT} licence renews automatically.",
)
TEST_NEGATIVE_TEMPLATES = (
    "{WORD} dropped sharply after the last update.",
    "Should we switch from {PRODUCT} to {RARE}?",
    "Our team replaced {RARE} with {RARE} last year.",
    "Can you compare {WORD} with {WORD} for our use case?",
    "Summary: {WORD} improved, {WORD} stayed flat.",
    "The {WORD} module needs a refactor before {PRODUCT} 3.",
    "What did {PUBLIC} say in the speech?",
    "Write an essay on the legacy of {PUBLIC}.",
    "Use the Stripe test card {TESTCARD} with any future expiry date to test checkout.",
    "In the sandbox docs, card number {TESTCARD} always succeeds.",
    "How do I upgrade {PRODUCT} from {VERSION} to {VERSION}?",
    "The meeting on {DATE} is about the {PRODUCT} roadmap.",
    "Order {ORDER} was shipped from {CITY} on {DATE}.",
    "Our revenue grew by {AMOUNT} dollars in {YEAR}.",
    "Please explain how {COMPANY} became profitable.",
    "List three museums in {CITY}.",
    "Set the timeout to 30 seconds and retry 5 times.",
    "Why is my {PRODUCT} container using 2048 MB of memory?",
    "Plan a weekend itinerary for {CITY}, {COUNTRY}.",
    "The Treaty of Rome was signed in 1957.",
    "Convert 1,250,000 meters to miles.",
    "Fix this SQL: SELECT name FROM users WHERE id = 42;",
    "The password field must be at least 12 characters long.",
    "Set api_key=YOUR_API_KEY in the config file.",
    "Bind the server to 127.0.0.1 on port 8080.",
    "The NAS at {PRIVATEIP} is unreachable from the office Wi-Fi.",
    "How many people attended the {PRODUCT} conference in {YEAR}?",
)

# PII templates for the test split: one per kind at least, the value in {VALUE}.
TEST_KIND_TEMPLATES: dict[str, tuple[str, ...]] = {
    "EMAIL": ("{VALUE}", "Please reply to {VALUE} before noon.", "My email is {VALUE}", "Contact: {VALUE}\nThanks!"),
    "PHONE": (
        "{VALUE}",
        "Call me at {VALUE} tomorrow.",
        "My phone number is {VALUE}.",
        "Tel.: {VALUE}",
        "You can reach me on {VALUE}.",
    ),
    "CREDIT_CARD": (
        "My card number is {VALUE}, expiry 09/27.",
        "Charge {VALUE} for the hotel.",
        "Card:\n{VALUE}\nCVV on request",
    ),
    "IBAN": ("Please transfer the deposit to {VALUE}.", "IBAN: {VALUE}", "Meine Bankverbindung: {VALUE}"),
    "NATIONAL_ID": ("My ID number is {VALUE}.", "ID: {VALUE}", "Here is my identification: {VALUE}"),
    "PASSPORT": ("My passport number is {VALUE}.", "Passport no. {VALUE}, expires 2031.", "Reisepass: {VALUE}"),
    "DATE_OF_BIRTH": ("I was born on {VALUE}.", "DOB: {VALUE}", "Date of birth: {VALUE}\nGender: F"),
    "CREDENTIAL": ("Here is my key {VALUE}, why does it fail?", "export OPENAI_API_KEY={VALUE}", "token: {VALUE}"),
    "IP_ADDRESS": ("My home server is at {VALUE}.", "Failed login from {VALUE} at 03:12.", "ssh admin@{VALUE}"),
}
# Cue words the national-id templates need for numbers that only count with one (see checksummed.py).
_ID_CUES = {"US SSN": "SSN", "UK NINO": "NI number", "DE IdNr": "Steuer-ID", "NL BSN": "BSN"}


def _fillers(values: Values, name_locales: tuple[str, ...], split: str) -> dict[str, Filler]:
    return {
        "WORD": lambda: values.word(split),
        "RARE": lambda: values.rare_word(split),
        "PERSON": lambda: values.person(name_locales),
        "FIRST": lambda: values.first_name(name_locales),
        "LAST": lambda: values.last_name(name_locales),
        "PUBLIC": values.public_figure,
        "CITY": values.city,
        "COMPANY": values.company,
        "COUNTRY": values.country,
        "STREET": values.street,
        "PRODUCT": values.product,
        "VERSION": values.version,
        "YEAR": values.year,
        "AMOUNT": values.amount,
        "ORDER": values.order_number,
        "DATE": values.plain_date,
        "TESTCARD": values.test_card,
        "PRIVATEIP": values.private_ip,
        "MONTH": lambda: (values.rng.choice(("January", "March", "May", "June", "August", "October")), None, ""),
        "DAYNUM": lambda: (str(values.rng.randint(1, 28)), None, ""),
    }  # fmt: skip


def training_examples(seed: int, count: int) -> list[Example]:
    """Name-model training data: train templates; names 60% from the gazetteer locales, 40% from others."""
    values = Values(seed)
    known = _fillers(values, GAZETTEER_LOCALES, "train")
    unknown = _fillers(values, TRAIN_OOV_LOCALES, "train")
    examples = []
    for _ in range(count):
        sentences = []
        for _ in range(values.rng.choice((1, 1, 2, 3))):
            pool = TRAIN_NAME_TEMPLATES if values.rng.random() < 0.5 else TRAIN_NEGATIVE_TEMPLATES
            sentences.append(fill(values.rng.choice(pool), known if values.rng.random() < 0.6 else unknown))
        examples.append(join(sentences, values.rng.choice((" ", " ", "\n"))))
    return examples


def test_examples(seed: int, per_kind: int) -> tuple[list[Example], list[Example]]:
    """The evaluation set: (examples with PII, PII-free examples), from templates training never saw."""
    values = Values(seed)
    positives: list[Example] = []
    generators = {
        "EMAIL": values.email,
        "PHONE": values.phone,
        "CREDIT_CARD": values.credit_card,
        "IBAN": values.iban,
        "NATIONAL_ID": values.national_id,
        "PASSPORT": values.passport,
        "DATE_OF_BIRTH": values.date_of_birth,
        "IP_ADDRESS": values.ip_address,
    }
    for kind, generate in generators.items():
        for _ in range(per_kind):
            value = generate()
            template = values.rng.choice(TEST_KIND_TEMPLATES[kind])
            if kind == "NATIONAL_ID" and value[2] in _ID_CUES and values.rng.random() < 0.8:
                # One in five goes without its cue word: numbers that need one are then (rightly) missed,
                # and the figure shows what the cue rule costs.
                template = f"My {_ID_CUES[value[2]]} is {{VALUE}}."
            positives.append(fill(template, {"VALUE": lambda v=value: v}))  # type: ignore[misc]
    for _ in range(per_kind):
        generate_secret = values.password if values.rng.random() < 0.2 else values.credential
        secret = generate_secret()
        template = (
            "My password is {VALUE}"
            if secret[2] == "password"
            else values.rng.choice(TEST_KIND_TEMPLATES["CREDENTIAL"])
        )
        positives.append(fill(template, {"VALUE": lambda v=secret: v}))  # type: ignore[misc]
    for locales in (GAZETTEER_LOCALES, UNSEEN_LOCALES):
        fillers = _fillers(values, locales, "test")
        for _ in range(per_kind):
            positives.append(fill(values.rng.choice(TEST_NAME_TEMPLATES), fillers))
    fillers = _fillers(values, GAZETTEER_LOCALES, "test")
    # Half the texts (PII or not) get a PII-free sentence before or after, so that values and names also
    # appear mid-paragraph, as in real prompts.
    for i, example in enumerate(positives):
        if values.rng.random() < 0.5:
            other = fill(values.rng.choice(TEST_NEGATIVE_TEMPLATES), fillers)
            positives[i] = join([other, example] if values.rng.random() < 0.5 else [example, other])
    negatives = []
    for _ in range(2 * per_kind):
        count = values.rng.choice((1, 2, 3))
        negatives.append(join([fill(values.rng.choice(TEST_NEGATIVE_TEMPLATES), fillers) for _ in range(count)]))
    return positives, negatives
