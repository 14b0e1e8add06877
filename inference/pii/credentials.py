"""Recogniser for secrets: vendor API keys with known prefixes, private key blocks, JWTs, bearer tokens,
passwords and key-like values assigned to secret-sounding names, and passwords inside connection URLs.

A leaked secret is the costliest finding, so prefix-shaped keys are reported without any context, even when
truncated or wrapped. Generic "name = value" assignments need a value that looks generated (it has a digit,
or is long) so that documentation placeholders such as ``password: <your password>`` or ``api_key=YOUR_KEY``
are not reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from inference.pii.context import glued_before, lowered
from inference.pii.findings import PiiFinding, PiiKind

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
)
# A private key block, up to its END line or, when the paste was cut off, to the end of the text.
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)"
)
_BEARER = re.compile(r"bearer[ \t]+(?P<value>[A-Za-z0-9_\-.=~+/]{16,})")  # on the lower-cased text
_SECRET_NAME = (
    r"(?:password|passwd|pwd|pass(?:phrase|code)?|passwort|kennwort|mot de passe|contrase[ñn]a|clave"
    r"|wachtwoord|api[_\-. ]?key|apikey|secret(?:[_\-. ]?key)?|client[_\-. ]?secret|access[_\-. ]?(?:key|token)"
    r"|auth[_\-. ]?token|refresh[_\-. ]?token|token|private[_\-. ]?key|aws_secret_access_key)"
)
# Matched on the lower-cased text (see context.lowered); the value is then read from the original.
_ASSIGNED = re.compile(
    rf"{_SECRET_NAME}[\"']?[ \t]*(?P<op>:|=|=>|:=|\bis\b|\bist\b|\best\b|\bes\b)[ \t]*"
    r"(?P<value>\"[^\"\n]{3,200}\"|'[^'\n]{3,200}'|[^\s\"',;]{3,200})"
)
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
    value = value.strip("\"'")
    if _PLACEHOLDER.match(value) or value.lower() in _PROSE_WORDS or "(" in value:
        return False  # a placeholder, a word of prose, or code ("token = get_token()")
    if re.fullmatch(r"[A-Z][A-Z_]*", value):
        return False  # an environment variable's name or a placeholder: api_key=YOUR_API_KEY
    if assigned:
        return True  # "password: hunter" is a password whatever it looks like
    if any(c.isdigit() for c in value) or len(value) >= 16:
        return not value.isupper() or any(c.isdigit() for c in value)  # YOUR_API_KEY_HERE is a placeholder
    # A short all-letter value is a secret only when it mixes case or symbols ("hunter", "Tr0ub4dor").
    return any(not c.isalnum() for c in value) or (value != value.lower() and value != value.upper())


def find_credentials(text: str) -> Iterator[PiiFinding]:
    for match in _PREFIXED.finditer(text):
        if not glued_before(text, match.start()):
            yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start(), match.end(), 0.95)
    if "PRIVATE KEY" in text:
        for match in _PRIVATE_KEY.finditer(text):
            yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start(), match.end(), 0.99)
    lower = lowered(text)
    for match in _BEARER.finditer(lower):
        yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start("value"), match.end("value"), 0.9)
    for match in _ASSIGNED.finditer(lower):
        if match.start() and text[match.start() - 1].isalnum():
            continue  # "bypass: x" is not "pass: x"
        value = text[match.start("value") : match.end("value")]
        if _looks_secret(value, assigned=match.group("op") in (":", "=", "=>", ":=")):
            yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start("value"), match.end("value"), 0.85)
    if "://" not in text:
        return
    for match in _URL_PASSWORD.finditer(text):
        if _looks_secret(match.group("value")):
            # Scored above an e-mail: "user:pa55word@db.internal" also reads as an address.
            yield PiiFinding.at(PiiKind.CREDENTIAL, text, match.start("value"), match.end("value"), 0.97)
