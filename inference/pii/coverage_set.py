"""Generated prompts for the coverage categories (dev only: needs Faker): values written the ways the main test
split does not write them, each labelled ``<category>/<variant>``, plus PII-free look-alikes for the same rules.

Categories: phones of any region (with a cue word in several languages, and E.164), national ids with unusual
separators or split over lines, credentials in HTTP headers and configuration, names in lower case, upper case
and non-Latin scripts after a cue, dates of birth in more formats and languages. ``evaluate`` reports recall per
category and variant and the clean rate of the look-alikes. The templates here are not the unit tests' strings.
"""

from __future__ import annotations

import base64
import random
import string
from collections.abc import Callable
from datetime import date

import phonenumbers
from faker import Faker
from stdnum.de import idnr as de_idnr
from stdnum.iso7064 import mod_11_10

from inference.pii.synthetic import Example, Gold, join

_LOCALES = ("en_US", "ja_JP", "ko_KR", "zh_CN", "ru_RU", "fr_FR", "de_DE", "es_ES", "it_IT", "nl_NL", "pt_BR", "pl_PL")
# Regions whose example numbers seed the "any region" phones: every region phonenumbers knows, minus the
# non-geographic entities.
_REGIONS = tuple(sorted(r for r in phonenumbers.SUPPORTED_REGIONS if r != "001"))
_PHONE_TEMPLATES = (
    "Please call me on {VALUE} after six.",
    "phone: {VALUE}",
    "My mobile number is {VALUE} if anything changes.",
    "Cell {VALUE} (WhatsApp too)",
    "Tel {VALUE}",
    "電話番号は{VALUE}です。",
    "携帯：{VALUE}",
    "我的手机号码是{VALUE}，请联系我。",
    "연락처: {VALUE}",
    "Мой телефон {VALUE}, звоните.",
    "Meine Telefonnummer: {VALUE}",
    "Mon téléphone : {VALUE}",
    "Mi teléfono es el {VALUE}.",
    "Il mio numero di telefono è {VALUE}.",
    "Mijn telefoonnummer is {VALUE}.",
    "Meu telefone: {VALUE}",
)
_E164_TEMPLATES = ("{VALUE}", "Forward the parcel notice to {VALUE}.", "reach the driver at {VALUE} tonight")
# (sentence with the date in {VALUE}, how the date is written, variant)
_DOB_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("Ich bin am {VALUE} geboren.", "{D}. {M_DE} {Y}", "de, date before the cue"),
    ("geboren am {VALUE} in Graz", "{D}. {M_DE} {Y}", "de text"),
    ("Geburtsdatum: {VALUE}", "{DD}.{MM}.{Y}", "de numeric"),
    ("Je suis né le {VALUE} à Lyon.", "{D} {M_FR} {Y}", "fr"),
    ("Date de naissance : {VALUE}", "{DD}/{MM}/{Y}", "fr numeric"),
    ("Nací el {VALUE} en Sevilla.", "{D} de {M_ES} de {Y}", "es, nací"),
    ("fecha de nacimiento {VALUE}", "{D} de {M_ES} del {Y}", "es"),
    ("nata il {VALUE} a Torino", "{D} {M_IT} {Y}", "it"),
    ("geboortedatum: {VALUE}", "{D} {M_NL} {Y}", "nl"),
    ("生年月日：{VALUE}", "{Y}年{M}月{D}日", "ja"),
    ("{VALUE}生まれです。", "{Y}年{M}月{D}日", "ja, suffix cue"),
    ("出生日期：{VALUE}", "{Y}年{M}月{D}日", "zh"),
    ("생년월일: {VALUE}", "{Y}년 {M}월 {D}일", "ko"),
    ("Дата рождения: {VALUE} г.", "{D} {M_RU} {Y}", "ru"),
    ("DOB: {VALUE}", "{D}-{M_EN3}-{Y}", "dd-Mon-yyyy"),
    ("D.O.B. {VALUE}", "{M_EN} {D}th {Y}", "Month Dth yyyy"),
    ("date of birth\n{VALUE}", "{DD} / {MM} / {Y}", "next line, spaced"),
    ("DOB {VALUE}", "{Y}{MM}{DD}", "compact ISO"),
    ("birthday: {VALUE}", "{M_EN3}. {D}, {Y}", "Mon. D, yyyy"),
)
_MONTHS = {
    "M_DE": "Januar Februar März April Mai Juni Juli August September Oktober November Dezember",
    "M_FR": "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "M_ES": "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
    "M_IT": "gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre novembre dicembre",
    "M_NL": "januari februari maart april mei juni juli augustus september oktober november december",
    "M_RU": "января февраля марта апреля мая июня июля августа сентября октября ноября декабря",
    "M_EN": "January February March April May June July August September October November December",
    "M_EN3": "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec",
}
_NEGATIVES = (
    "The phone case costs 1,299 yen and ships in 2024.",
    "Call the API 3 times with batch 48213377 before the cron job at 0400.",
    "Our telephone survey reached 12,500 households between 2019 and 2023.",
    "電話で話しましょう。会議は2024年5月です。",
    "Set the header Authorization: Basic <base64 credentials> as the docs say.",
    "Send Authorization: Bearer <token> with every request.",
    "export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY}",
    "The password must contain at least 12 characters and one digit.",
    "my name is not important, just answer the question",
    "Name: (required)\nEmail: (optional)",
    "I was born in 1985 and moved to Berlin in 2010.",
    "The birth rate fell to 1.4 in 2023.",
    "Order number 2024-0117-88 shipped on 2024-01-17.",
    "ISBN 978-3-16-148410-0 is the second edition.",
    "Kind regards,\nthe support team",
    "Version 10.4.2.1 fixed the bug; build 20240117 is next.",
    "The SSN field must have nine digits in the form AAA-GG-SSSS.",
    "私の名前はまだありません。",
    "меня зовут к телефону, перезвоню позже.",
    "Invoice total: 4 512 889 EUR, due 30.06.2025.",
    "Use the token endpoint /oauth/token to refresh access.",
    "The api key header is X-API-Key and the value comes from the dashboard.",
    "Matrix 3x3: 120 340 560 / 780 910 230 / 450 670 890",
    "Postcode 75008 Paris, building 12, floor 3.",
)


class CoverageValues:
    """Random values for the coverage categories, reproducible under a seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fakers = {loc: Faker(loc) for loc in _LOCALES}
        for offset, faker in enumerate(self.fakers.values()):
            faker.seed_instance(seed * 1000 + 500 + offset)

    def _digits(self, n: int) -> str:
        return "".join(self.rng.choice(string.digits) for _ in range(n))

    # phones ------------------------------------------------------------------------------------------------
    def world_phone(self) -> phonenumbers.PhoneNumber:
        """A valid number of a random region: the region's example mobile or landline, last digits changed."""
        while True:
            region = self.rng.choice(_REGIONS)
            kind = self.rng.choice((phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE))
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            national = str(example.national_number)
            keep = max(2, len(national) - 4)
            number = phonenumbers.PhoneNumber(
                country_code=example.country_code,
                national_number=int(national[:keep] + self._digits(len(national) - keep)),
                italian_leading_zero=example.italian_leading_zero,
            )
            if phonenumbers.is_valid_number(number):
                return number

    def cued_phone(self) -> tuple[str, str]:
        number = self.world_phone()
        style = self.rng.choice(("national", "national", "international"))
        fmt = (
            phonenumbers.PhoneNumberFormat.NATIONAL
            if style == "national"
            else phonenumbers.PhoneNumberFormat.INTERNATIONAL
        )
        return phonenumbers.format_number(number, fmt), f"cued, {style}"

    def e164_phone(self) -> tuple[str, str]:
        number = self.world_phone()
        if self.rng.random() < 0.5:
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), "E.164"
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL), "+CC spaced"

    def local_phone(self) -> tuple[str, str]:
        """A number as Faker writes it for an Asian or Eastern European locale, kept when valid there."""
        regions = {"ja_JP": "JP", "ko_KR": "KR", "zh_CN": "CN", "ru_RU": "RU", "pl_PL": "PL", "pt_BR": "BR"}
        while True:
            locale = self.rng.choice(tuple(regions))
            value = self.fakers[locale].phone_number()
            try:
                if phonenumbers.is_valid_number(phonenumbers.parse(value, regions[locale])):
                    return value, f"cued, {locale}"
            except phonenumbers.NumberParseException:
                continue

    def phone(self) -> tuple[str, str, str]:
        roll = self.rng.random()
        if roll < 0.5:
            value, variant = self.cued_phone()
        elif roll < 0.7:
            value, variant = self.local_phone()
        else:
            value, variant = self.e164_phone()
            return self.rng.choice(_E164_TEMPLATES), value, variant
        return self.rng.choice(_PHONE_TEMPLATES), value, variant

    # national ids --------------------------------------------------------------------------------------------
    def national_id(self) -> tuple[str, str, str]:
        """(text with the id in {VALUE}, the id as written, variant)."""
        choice = self.rng.randrange(12)
        sep = self.rng.choice((" ", ".", "-", "/", "\n", " / ", "  "))
        if choice == 0:
            ssn = self.fakers["en_US"].ssn().replace("-", "")
            value = "\n".join((ssn[:3], ssn[3:5], ssn[5:]))
            return self.rng.choice(("SSN:\n{VALUE}", "social security no.\n{VALUE}")), value, "US SSN over lines"
        if choice == 1:
            ssn = self.fakers["en_US"].ssn().replace("-", "")
            value = sep.strip("\n").join((ssn[:3], ssn[3:5], ssn[5:]))
            return "my ssn is {VALUE}, please fill the form", value, "US SSN separators"
        if choice == 2:
            nir = self.fakers["fr_FR"].ssn()
            groups = (nir[0], nir[1:3], nir[3:5], nir[5:7], nir[7:10], nir[10:13], nir[13:])
            value = self.rng.choice((".", " ", "-")).join(groups)
            template = self.rng.choice(("N° de sécurité sociale : {VALUE}", "{VALUE}", "NIR {VALUE}"))
            return template, value, "FR NIR dotted/spaced"
        if choice == 3:
            idnr = self._de_idnr()
            value = self.rng.choice((" ", "/", ".", "\n")).join((idnr[:2], idnr[2:5], idnr[5:8], idnr[8:]))
            return (
                self.rng.choice(("Steuer-ID: {VALUE}", "Meine Steueridentifikationsnummer lautet {VALUE}.")),
                value,
                "DE IdNr separators",
            )
        if choice == 4:
            bsn = self.fakers["nl_NL"].ssn()
            value = self.rng.choice(
                (
                    f"{bsn[:4]}.{bsn[4:6]}.{bsn[6:]}",
                    f"{bsn[:3]} {bsn[3:6]} {bsn[6:]}",
                    f"{bsn[:3]}-{bsn[3:6]}-{bsn[6:]}",
                )
            )
            return self.rng.choice(("BSN: {VALUE}", "mijn burgerservicenummer is {VALUE}")), value, "NL BSN separators"
        if choice == 5:
            dni = self.fakers["es_ES"].nif()
            value = self.rng.choice(
                (f"{dni[:2]}.{dni[2:5]}.{dni[5:8]}-{dni[8]}", f"{dni[:8]} {dni[8]}", f"{dni[:8]}-{dni[8]}")
            )
            return self.rng.choice(("DNI: {VALUE}", "Mi DNI es {VALUE}.")), value, "ES DNI separators"
        if choice == 6:
            nie = self.fakers["es_ES"].nie()
            value = f"{nie[0]}-{nie[1:8]}-{nie[8]}" if self.rng.random() < 0.5 else f"{nie[0]} {nie[1:8]} {nie[8]}"
            return "NIE {VALUE}", value, "ES NIE separators"
        if choice == 7:
            cf = self.fakers["it_IT"].ssn()
            value = self.rng.choice(
                (f"{cf[:3]} {cf[3:6]} {cf[6:11]} {cf[11:]}", f"{cf[:6]} {cf[6:11]} {cf[11:]}", cf.lower())
            )
            return self.rng.choice(("Codice fiscale: {VALUE}", "il mio CF è {VALUE}")), value, "IT CF spaced/lower"
        if choice == 8:
            letters = "ABCEGHJKLMNPRSTWXYZ"
            prefix = self.rng.choice("ABCEHJKLMPRSTWXYZ") + self.rng.choice(letters)
            body = [self._digits(2) for _ in range(3)]
            value = self.rng.choice(("-", ".", "  ")).join([prefix, *body, self.rng.choice("ABCD")])
            return "National Insurance number {VALUE}", value, "UK NINO separators"
        if choice == 9:
            ric = self.fakers["zh_CN"].ssn()
            value = f"{ric[:6]} {ric[6:14]} {ric[14:]}" if self.rng.random() < 0.5 else ric
            return self.rng.choice(("身份证号：{VALUE}", "ID card number {VALUE}")), value, "CN RIC"
        if choice == 10:
            cpf = self.fakers["pt_BR"].cpf()
            return self.rng.choice(("CPF: {VALUE}", "meu CPF é {VALUE}")), cpf, "BR CPF"
        pesel = self.fakers["pl_PL"].pesel()
        return "PESEL {VALUE}", pesel, "PL PESEL"

    def _de_idnr(self) -> str:
        while True:
            body = str(self.rng.randint(10**9, 10**10 - 1))
            number = body + mod_11_10.calc_check_digit(body)
            if de_idnr.is_valid(number):
                return number

    # credentials ---------------------------------------------------------------------------------------------
    def credential(self) -> tuple[str, str, str]:
        alnum = string.ascii_letters + string.digits

        def rand(n: int, alphabet: str = alnum) -> str:
            return "".join(self.rng.choice(alphabet) for _ in range(n))

        user = self.fakers["en_US"].user_name()
        secret = rand(self.rng.randint(8, 14)) + self.rng.choice("!#%*")
        choice = self.rng.randrange(11)
        if choice == 0:
            value = base64.b64encode(f"{user}:{secret}".encode()).decode()
            return "curl -H 'Authorization: Basic {VALUE}' https://api.internal/v1", value, "Basic auth header"
        if choice == 1:
            return "Authorization: Bearer {VALUE}\nAccept: application/json", rand(32, alnum + "-_."), "Bearer header"
        if choice == 2:
            header = self.rng.choice(("X-API-Key", "x-api-key", "Api-Key", "X-Auth-Token", "Ocp-Apim-Subscription-Key"))
            return f"GET /v2/items HTTP/1.1\n{header}: {{VALUE}}", rand(self.rng.choice((24, 32, 40))), "API key header"
        if choice == 3:
            field = self.rng.choice(("password", "passwd", "pwd", "pass"))
            return (
                f"https://shop.example.net/login?user={user}&{field}={{VALUE}}&next=/",
                secret,
                "password in URL query",
            )
        if choice == 4:
            scheme = self.rng.choice(("postgres", "mysql", "mongodb+srv", "redis", "amqp"))
            return f"DATABASE_URL={scheme}://{user}:{{VALUE}}@db-1.internal:5432/app", secret, "connection URL"
        if choice == 5:
            field = self.rng.choice(("Password", "Pwd", "PWD"))
            return (
                f"Server=sql01;Database=crm;User Id={user};{field}={{VALUE}};Encrypt=true",
                secret,
                "connection string",
            )
        if choice == 6:
            value = rand(40, alnum + "+/")
            template = self.rng.choice(
                ("aws_secret_access_key = {VALUE}", "AWS secret key: {VALUE}", "the aws secret is {VALUE}")
            )
            return template, value, "AWS secret key"
        if choice == 7:
            key = "\n".join(rand(64, alnum + "+/") for _ in range(3))
            kind = self.rng.choice(("RSA ", "EC ", "OPENSSH ", ""))
            value = f"-----BEGIN {kind}PRIVATE KEY-----\n{key}\n-----END {kind}PRIVATE KEY-----"
            return "here is the key:\n{VALUE}", value, "private key"
        if choice == 8:
            value = self.rng.choice(
                (
                    "xoxp-" + self._digits(11) + "-" + self._digits(12) + "-" + rand(32, "abcdef0123456789"),
                    "github_pat_" + rand(22) + "_" + rand(59),
                    "rk_live_" + rand(24),
                    "sk-" + rand(48),
                    "ghs_" + rand(36),
                )
            )
            return "config:\n  token_value: {VALUE}", value, "prefixed token"
        if choice == 9:
            value = f"eyJ{rand(18)}.eyJ{rand(60, alnum + '-_')}.{rand(43, alnum + '-_')}"
            return "Cookie: session={VALUE}", value, "JWT cookie"
        value = rand(self.rng.choice((24, 32, 40)), alnum + "+/_-")
        return (
            self.rng.choice(("client secret {VALUE}", "the signing key for prod {VALUE}", "webhook secret → {VALUE}")),
            value,
            "key word, high entropy",
        )

    # names -----------------------------------------------------------------------------------------------------
    def person(self) -> tuple[str, str, str]:
        choice = self.rng.randrange(8)
        western = self.fakers[self.rng.choice(("en_US", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL"))]
        name = f"{western.first_name()} {western.last_name()}"
        if choice == 0:
            return (
                self.rng.choice(("hi, my name is {VALUE} and i need help", "hello, my name's {VALUE}")),
                name.lower(),
                "lower case",
            )
        if choice == 1:
            return self.rng.choice(("NAME: {VALUE}\nDEPT: SALES", "APPLICANT NAME {VALUE}")), name.upper(), "upper case"
        if choice == 2:
            closing = self.rng.choice(("thanks,", "regards,", "best,", "cheers,"))
            return (
                f"ok see you then\n{closing}\n{{VALUE}}",
                self.rng.choice((name.lower(), name.upper())),
                "signature cased",
            )
        if choice == 3:
            ja = self.fakers["ja_JP"]
            value = ja.last_name() + self.rng.choice(("", " ")) + ja.first_name()
            template = self.rng.choice(
                ("{VALUE}と申します。よろしくお願いします。", "私の名前は{VALUE}です。", "氏名：{VALUE}")
            )
            return template, value, "ja"
        if choice == 4:
            zh = self.fakers["zh_CN"]
            template = self.rng.choice(("我叫{VALUE}，今年三十岁。", "我的名字是{VALUE}。", "姓名：{VALUE}"))
            return template, zh.last_name() + zh.first_name(), "zh"
        if choice == 5:
            ko = self.fakers["ko_KR"]
            template = self.rng.choice(
                ("제 이름은 {VALUE}입니다.", "이름: {VALUE}", "안녕하세요, 저는 {VALUE}라고 합니다.")
            )
            return template, ko.last_name() + ko.first_name(), "ko"
        if choice == 6:
            ru = self.fakers["ru_RU"]
            template = self.rng.choice(
                ("Здравствуйте, меня зовут {VALUE}.", "ФИО: {VALUE}", "Меня зовут {VALUE}, я из Казани.")
            )
            return template, f"{ru.first_name()} {ru.last_name()}", "ru"
        mixed = self.rng.choice(("je m'appelle {VALUE}", "ich heiße {VALUE}", "me llamo {VALUE}", "mi chiamo {VALUE}"))
        return mixed, name.lower(), "lower case, other languages"

    # dates of birth ------------------------------------------------------------------------------------------
    def date_of_birth(self) -> tuple[str, str, str]:
        born: date = self.fakers["en_US"].date_of_birth(minimum_age=18, maximum_age=90)
        template, written, variant = self.rng.choice(_DOB_TEMPLATES)
        slots = {
            "D": str(born.day),
            "DD": f"{born.day:02d}",
            "M": str(born.month),
            "MM": f"{born.month:02d}",
            "Y": str(born.year),
            **{key: names.split()[born.month - 1] for key, names in _MONTHS.items()},
        }
        return template, written.format(**slots), variant


def _place(template: str, value: str, kind: str, variant: str) -> Example:
    start = template.index("{VALUE}")
    text = template.replace("{VALUE}", value, 1)
    return Example(text, (Gold(kind, start, start + len(value), variant),))


def coverage_examples(seed: int, per_category: int) -> tuple[list[Example], list[Example]]:
    """(examples with PII, PII-free look-alikes) for the coverage categories; gold variants are prefixed
    with the category ("phone/cued, national")."""
    values = CoverageValues(seed)
    makers: dict[str, Callable[[], tuple[str, str, str]]] = {
        "phone": values.phone,
        "national id": values.national_id,
        "credential": values.credential,
        "person": values.person,
        "date of birth": values.date_of_birth,
    }
    kinds = {"phone": "PHONE", "national id": "NATIONAL_ID", "credential": "CREDENTIAL", "person": "PERSON"}
    positives: list[Example] = []
    for category, make in makers.items():
        for _ in range(per_category):
            template, value, variant = make()
            example = _place(template, value, kinds.get(category, "DATE_OF_BIRTH"), f"{category}/{variant}")
            if values.rng.random() < 0.3:  # sometimes mid-paragraph, after an ordinary line
                example = join([Example(values.rng.choice(_LEAD_INS), ()), example], "\n")
            positives.append(example)
    return positives, [Example(text, ()) for text in _NEGATIVES]


_LEAD_INS = (
    "Quick question about my account.",
    "Can you fill in this form for me?",
    "Here are the details you asked for.",
    "Bitte das Formular ausfüllen.",
)
