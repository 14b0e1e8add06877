"""Recogniser for secrets: vendor API keys with known prefixes, private key blocks, JWTs, bearer tokens,
passwords and key-like values assigned to secret-sounding names, and passwords inside connection URLs.

A leaked secret is the costliest finding, so prefix-shaped keys are reported without any context, even when
truncated or wrapped. Generic "name = value" assignments need a value that looks generated (it has a digit,
or is long) so that documentation placeholders such as ``password: <your password>`` or ``api_key=YOUR_KEY``
are not reported.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from collections.abc import Iterator

from inference.pii.context import glued_before, lowered
from inference.pii.findings import PiiFinding, PiiKind
from inference.pii.reserved import is_example_key

# Keys whose prefix alone says what they are; the whole match is the secret.
# (Literal-first, no leading \b, so that the regex engine skips ahead; the boundary is checked in Python.)
_PREFIXED = re.compile(
    r"sk-(?:proj-|ant-(?:api\d\d-)?|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic
    r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe secret and restricted keys
    r"|(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{30,}\b|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|glpat-[A-Za-z0-9_\-]{20,}"  # GitLab
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API keys
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|SG\.[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}"  # SendGrid
    r"|eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"  # JWT (header.payload.signature)
    r"|xapp-\d-[A-Za-z0-9\-]{20,}"  # Slack app-level tokens
    r"|hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9_/]{20,}"  # Slack webhook URLs
    r"|discord(?:app)?\.com/api/webhooks/\d+/[A-Za-z0-9_\-]{20,}"  # Discord webhook URLs
    r"|npm_[A-Za-z0-9]{36}|pypi-[A-Za-z0-9_\-]{50,}"  # npm and PyPI tokens
    r"|whsec_[A-Za-z0-9]{24,}|shp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}"  # Stripe webhook secrets, Shopify
    r"|GOCSPX-[A-Za-z0-9_\-]{20,}|ya29\.[A-Za-z0-9_\-]{20,}"  # Google OAuth client secrets, access tokens
    r"|dop_v1_[a-f0-9]{64}|glsa_[A-Za-z0-9_]{32,}"  # DigitalOcean, Grafana
)
# A private key block, up to its END line or, when the paste was cut off, to the end of the text.
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)"
)
_BEARER = re.compile(r"bearer[ \t]+(?P<value>[A-Za-z0-9_\-.=~+/]{16,})")  # on the lower-cased text
# HTTP Basic credentials: base64 of "user:password". Matched on the lower-cased text; the value is decoded
# from the original, and must decode to printable "user:password" (so "basic authentication" is prose).
_BASIC = re.compile(r"basic[ \t]+(?P<value>[a-z0-9+/]{6,}={0,2})")
# Any other scheme or a bare value in an Authorization header ("Authorization: Token abc...", "Digest ...").
_AUTHORIZATION = re.compile(
    r"authorization[\"']?[ \t]*[:=][ \t]*[\"']?(?:[a-z\-]{2,12}[ \t]+)?(?P<value>[^\s\"',;]{12,})"
)
# Credentials on a command line: curl -u user:password, --user user:password.
_CLI_USER = re.compile(r"(?:^|[ \t])(?:-u|--user)[ \t]+[\"']?[^\s:\"']+:(?P<value>[^\s\"']{3,})")
_SECRET_NAME = (
    r"(?:password|passwd|pwd|pass(?:phrase|code)?|passwort|kennwort|mot de passe|contrase[ñn]a|clave"
    r"|wachtwoord|senha|haslo|l[öo]senord|salasana|sifre|parola"
    r"|wlan[_\-. ]?schlüssel|wi-?fi[_\-. ]?key|wpa2?[_\-. ]?key|clé wi-?fi|clé wpa|chiave wi-?fi"
    r"|api[_\-. ]?key|apikey|secret(?:[_\-. ]?key)?|client[_\-. ]?secret|access[_\-. ]?(?:key|token)"
    r"|auth[_\-. ]?token|refresh[_\-. ]?token|token|private[_\-. ]?key|aws_secret_access_key"
    r"|subscription[_\-. ]?key|account[_\-. ]?key|shared[_\-. ]?access[_\-. ]?key|signing[_\-. ]?key"
    r"|session[_\-. ]?(?:id|token|key)|sessionid|webhook[_\-. ]?secret|sas[_\-. ]?token)"
)
# Names in scripts beyond Latin-1, in a pattern of their own that runs only on such text: a character above
# U+00FF among the first characters of an alternation stops the regex engine from skipping ahead, which made
# the one combined pattern five times slower on plain English.
_SECRET_NAME_OTHER_SCRIPTS = r"(?:hasło|şifre|пароль|パスワード|密码|密碼|비밀번호|암호)"
# Matched on the lower-cased text (see context.lowered); the value is then read from the original.
# Besides the ASCII operators: the full-width colon and the topic particles of "パスワードは", "비밀번호는".
_ASSIGNMENT = (
    r"[\"']?[ \t]*(?P<op>:|=|=>|:=|：|は|는|은|是|\bis\b|\bist\b|\blautet\b|\best\b|\bes\b|\bé\b|\bè\b)[ \t]*"
    r"(?P<value>\"[^\"\n]{3,200}\"|'[^'\n]{3,200}'|[^\s\"',;]{3,200})"
)
# Prose names whose secret it is between the name and the verb: "the password for the guest network is ...",
# "het wifi-wachtwoord van het vakantiehuis is ...", "das Passwort vom Router lautet ...", "le mot de passe du
# wifi est ...". A preposition, then at most four short words on the same line; only a verb may follow them
# (see _COPULAS), never ":" or "=" ("password for your account: must be ..." is a form's instruction).
_QUALIFIER = (
    r"(?P<qual>[ \t]+(?:for|of|on|at|für|fürs|von|vom|zum|zur|des|der|du|de|pour|del|para|per|della|dello|di"
    r"|van|voor|do|da|dos|das)[ \t]+[^\s.,;:!?=\"'<>]{1,30}(?:[ \t]+[^\s.,;:!?=\"'<>]{1,30}){0,3}?)?"
)
_COPULAS = frozenset("is ist lautet est es é è".split())
_ASSIGNED = re.compile(_SECRET_NAME + _QUALIFIER + _ASSIGNMENT)
_ASSIGNED_OTHER_SCRIPTS = re.compile(_SECRET_NAME_OTHER_SCRIPTS + _ASSIGNMENT)
# A generated-looking string near a secret word, with no operator between ("the signing key for prod
# vtNG_PW3N...", "webhook secret -> ..."): at least 20 characters mixing upper case, lower case and digits,
# or 32 and more hexadecimal digits. On the lower-cased text for the word; the value is read from the original.
_KEY_WORD = re.compile(r"key|secret|token|passw|pwd|credential|passphrase|signature")
_KEY_WORD_WINDOW = 40
_ENTROPIC = re.compile(r"[A-Za-z0-9+/=_\-.~]{20,400}")
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.\-]*://[^\s:/@]+:(?P<value>[^\s@/]{3,})@")
# Masked values, template slots and variables: "****", "<your password>" (cut at the space: "<your"),
# "${DB_PASSWORD}", "{{ secret }}", "%PASSWORD%", "[redacted]".
_PLACEHOLDER = re.compile(r"^(?:[*x.•#_\-]+|[<\[{]\S*|\$\{?[^}]*\}?|%[^%]*%)$", re.IGNORECASE)
# Words that follow "password is" / "token:" in prose and API docs rather than being the secret, and the
# stock values of documentation examples (POSTGRES_PASSWORD=example).
_PROSE_WORDS = frozenset(
    "incorrect wrong required invalid expired missing empty correct set optional none null true false"
    " string str int bytes undefined example changeme placeholder redacted dummy sample".split()
)


def _looks_secret(value: str, assigned: bool = False) -> bool:
    # A sentence's full stop is no part of a word of prose: "the password is required." ends with "required".
    value = value.strip("\"'")
    if value.rstrip(".!?") and value.rstrip(".!?").isalpha():
        value = value.rstrip(".!?")
    if _PLACEHOLDER.match(value) or value.lower() in _PROSE_WORDS or "(" in value:
        return False  # a placeholder, a word of prose, or code ("token = get_token()")
    if re.fullmatch(r"[A-Z][A-Z_]*", value):
        return False  # an environment variable's name or a placeholder: api_key=YOUR_API_KEY
    if is_example_key(value) or _names_a_variable(value):
        return False
    if assigned:
        return True  # "password: hunter" is a password whatever it looks like
    if any(c.isdigit() for c in value) or len(value) >= 16:
        return not value.isupper() or any(c.isdigit() for c in value)  # YOUR_API_KEY_HERE is a placeholder
    # A short all-letter value is a secret only when it mixes case or symbols ("hunter", "Tr0ub4dor").
    return any(not c.isalnum() for c in value) or (value != value.lower() and value != value.upper())


# Code passes secrets around by name: "'client_secret': secret,", "token=self.token", "password=args.password".
# Such a value is a variable: an identifier without digits that is an attribute path or is built from secret
# words ("secret", "api_key", "authToken"). "hunter", "mypassword" or "Passw0rd" stay values.
_IDENTIFIER = re.compile(r"[A-Za-z_]+(?:\.[A-Za-z_]+)*(?:\[[\"']?[A-Za-z_]+[\"']?\])?")
_SECRET_PARTS = frozenset(
    "secret secrets token tokens password passwd pwd pass passphrase key keys apikey credential credentials auth"
    " bearer".split()
)


def _names_a_variable(value: str) -> bool:
    core = value.rstrip(")]},")
    if not _IDENTIFIER.fullmatch(core):
        return False
    if "." in core or "[" in core:
        return True  # an attribute or an item: self.token, settings.secret, os.environ["KEY"]
    parts = re.split(r"_+|(?<=[a-z])(?=[A-Z])", core)
    return any(part.lower() in _SECRET_PARTS for part in parts)


def _looks_generated(value: str) -> bool:
    """Whether ``value`` reads as a generated key rather than a word, path, identifier or number."""
    if "://" in value or value.startswith(("/", ".")) or value.count("/") > 3 or value.count(".") > 2:
        return False
    core = value.rstrip("=")
    if len(core) >= 32 and all(c in "0123456789abcdefABCDEF" for c in core):
        return any(c.isalpha() for c in core)
    has_upper = any(c.isupper() for c in core)
    has_lower = any(c.islower() for c in core)
    digits = sum(c.isdigit() for c in core)
    if not (has_upper and has_lower and digits):
        return False
    # CamelCase identifiers ("getUserAccessToken2") have few case switches for their length.
    switches = sum(
        1 for a, b in zip(core, core[1:], strict=False) if a.isupper() != b.isupper() and a.isalpha() and b.isalpha()
    )
    return switches >= len(core) // 6 or digits >= 3


def _basic_credentials(value: str) -> bool:
    try:
        decoded = base64.b64decode(value + "=" * (-len(value) % 4), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, colon, password = decoded.partition(":")
    return bool(colon and user and password and decoded.isprintable())


def find_credentials(text: str) -> Iterator[PiiFinding]:
    for match in _PREFIXED.finditer(text):
        if not glued_before(text, match.start()) and not is_example_key(match.group()):
            yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start(), match.end(), 0.95)
    if "PRIVATE KEY" in text:
        for match in _PRIVATE_KEY.finditer(text):
            yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start(), match.end(), 0.99)
    lower = lowered(text)
    for match in _BEARER.finditer(lower):
        yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start("value"), match.end("value"), 0.9)
    yield from _header_credentials(text, lower)
    assignments = _ASSIGNED.finditer(lower)
    if not text.isascii():
        assignments = itertools.chain(assignments, _ASSIGNED_OTHER_SCRIPTS.finditer(lower))
    for match in assignments:
        if match.start() and text[match.start() - 1].isalnum():
            continue  # "bypass: x" is not "pass: x"
        qualified = match.groupdict().get("qual") is not None
        if qualified and match.group("op") not in _COPULAS:
            continue
        value = text[match.start("value") : match.end("value")]
        operator = not qualified and match.group("op") in (":", "=", "=>", ":=")
        if _looks_secret(value, assigned=operator):
            yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start("value"), match.end("value"), 0.85)
    yield from _secrets_near_key_words(text, lower)
    if "://" not in text:
        return
    for match in _URL_PASSWORD.finditer(text):
        if _looks_secret(match.group("value")):
            # Scored above an e-mail: "user:pa55word@db.internal" also reads as an address.
            yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start("value"), match.end("value"), 0.97)


def _header_credentials(text: str, lower: str) -> Iterator[PiiFinding]:
    for match in _BASIC.finditer(lower):
        if _basic_credentials(text[match.start("value") : match.end("value")]):
            yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start("value"), match.end("value"), 0.95)
    if "authorization" in lower:
        for match in _AUTHORIZATION.finditer(lower):
            value = text[match.start("value") : match.end("value")]
            if _looks_secret(value):
                yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start("value"), match.end("value"), 0.9)
    if "-u" in lower:
        for match in _CLI_USER.finditer(lower):
            if _looks_secret(text[match.start("value") : match.end("value")], assigned=True):
                yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start("value"), match.end("value"), 0.9)


def _secrets_near_key_words(text: str, lower: str) -> Iterator[PiiFinding]:
    searched_to = 0  # one look per stretch of text: "api key token secret" looks at its window once
    for word in _KEY_WORD.finditer(lower):
        start = max(word.end(), searched_to)
        stop = min(len(text), word.end() + _KEY_WORD_WINDOW)
        for match in _ENTROPIC.finditer(text, start, stop):
            if glued_before(text, match.start()):
                continue
            end = match.end()
            while end < len(text) and (text[end].isalnum() or text[end] in "+/=_-.~"):
                end += 1  # the window cut the value short: take all of it
            value = text[match.start() : end].rstrip(".")
            if _looks_generated(value) and not is_example_key(value):
                yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start(), match.start() + len(value), 0.85)
                break
        searched_to = stop
