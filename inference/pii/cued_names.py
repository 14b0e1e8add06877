"""Recogniser for names the name model does not look at: lower-case and ALL-CAPS names after a strong cue ("my
name is john smith", "NAME: JOHN SMITH", a sign-off line), and names in Han, kana, Hangul or Cyrillic after a cue
of their language ("田中と申します", "我叫王伟", "제 이름은 김민준입니다", "меня зовут Иван Петров").

The model scores capitalised Latin words only. These cues say outright that a name follows, so a rule is enough:
what follows is read word by word and kept while it can be a name: a word of the name gazetteers, or (after an
introduction such as "my name is", never after a bare "name:" label, which is as often a YAML key) a word that is
no frequent word of any language the gazetteer covers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from inference.pii.context import lowered
from inference.pii.findings import PiiFinding, PiiKind
from inference.pii.names import Gazetteer

_SCORE = 0.8
_MAX_WORDS = 4
# Introductions: what follows is someone's name ("my name is", "his name is", "je m'appelle"), known to the
# gazetteer or not. Labels ("Name:", "APPLICANT NAME") and sign-off lines ("Regards,"): what follows must hold a
# gazetteer name, or be written in capitals. Both are found from an anchor word that a plain search finds fast
# ("name", "appelle", ...); scanning the text once with an alternation of every cue phrase cost ten times more.
_ANCHORS = ("name", "nom", "naam", "appelle", "heiße", "heisse", "llamo", "chiamo", "heet", "chamo")
_INTRODUCTION = re.compile(
    r"name is|name's|nom est|nombre es|nome è|nome é|naam is|appelle|heiße|heisse|llamo|chiamo|heet|chamo"
)
_LABEL = re.compile(r"(?:name|nom|nombre|nome|naam)[ \t]*[:：=\n]|name[ \t]+")
_SIGN_OFFS = frozenset(
    "thanks|thank you|many thanks|regards|kind regards|best regards|warm regards|best|cheers|sincerely|yours"
    "|yours sincerely|signed|mit freundlichen grüßen|viele grüße|liebe grüße|gruß|grüße|cordialement|bien à vous"
    "|saludos|un saludo|atentamente|un saluto|cordiali saluti|saluti|groeten|met vriendelijke groet".split("|")
)
_LATIN_WORD = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*")
_PARTICLES = frozenset("van von de der den del della di da dos du la le ten ter zu y".split())

_HAN_KANA = r"[\u4e00-\u9fff\u3400-\u4dbf\u30a0-\u30ff々ヶ]"
# A family name in kanji or katakana, then maybe a given name after a space, which may be in hiragana.
_JA_NAME = rf"{_HAN_KANA}{{1,5}}(?:[ 　](?:{_HAN_KANA}|[\u3041-\u3096]){{1,5}})?"
_HANGUL_RUN = r"[\uac00-\ud7af]{2,8}"
_CYRILLIC_NAME = r"[А-ЯЁ][а-яё]+(?:-[А-ЯЁ][а-яё]+)?|[А-ЯЁ]{2,}"
# Scripts without capitals: a cue, then the run of that script, trimmed of the grammar that follows it.
_OTHER_SCRIPT_CUES = re.compile(
    rf"(?:私の名前は|僕の名前は|名前[は:：]|氏名[:：]|お名前[:：])[ \t　]*(?P<ja>{_JA_NAME})"
    rf"|(?P<ja_before>{_JA_NAME})(?:と申します|と申す者|といいます|と言います)"
    r"|(?:我叫|我的名字是|我的名字叫|我名叫|本人姓名[:：]?|姓名[:：]|名字[:：])[ \t　]*(?P<zh>[\u4e00-\u9fff·]{2,4})"
    rf"|(?:제 이름은|내 이름은|저의 이름은|이름은|이름[:：]|성함은|성함[:：]|성명[:：])[ \t]*(?P<ko>{_HANGUL_RUN})"
    rf"|저는[ \t]*(?P<ko_said>{_HANGUL_RUN})(?=[ \t]*합니다)"
    rf"|(?i:меня зовут|моё имя|мое имя|моя фамилия|имя[:：]|фио[:：]|фамилия[:：])[ \t]*"
    rf"(?P<ru>(?:{_CYRILLIC_NAME})(?:[ \t]+(?:{_CYRILLIC_NAME})){{0,2}})"
)
# Korean endings glued to the name ("김민준입니다", "김춘자라고"), longest first.
_KO_ENDINGS = ("이라고", "입니다", "이에요", "라고", "예요", "이고", "님", "씨", "요")
_ZH_ENDINGS = ("今年", "来自", "是", "在", "的")


def find_cued_names(text: str, gazetteer: Gazetteer) -> Iterator[PiiFinding]:
    for start, trusted in _latin_cues(text):
        span = _latin_name(text, start, gazetteer, trusted)
        if span is not None:
            yield PiiFinding.at(PiiKind.PERSON, text, span[0], span[1], _SCORE)
    if text.isascii():
        return
    for match in _OTHER_SCRIPT_CUES.finditer(text):
        group = match.lastgroup
        if group is None:
            continue
        start, end = match.span(group)
        value = match.group(group)
        if group.startswith("ko"):
            trimmed = next(
                (value[: -len(e)] for e in _KO_ENDINGS if value.endswith(e) and len(value) - len(e) >= 2), value
            )
            if len(trimmed) > 4:
                continue  # a Korean name has two to four syllables: this is a phrase
            end = start + len(trimmed)
        elif group == "zh":
            cut = min((value.find(e) for e in _ZH_ENDINGS if value.find(e) >= 2), default=len(value))
            end = start + cut
        yield PiiFinding.at(PiiKind.PERSON, text, start, end, _SCORE)


def _latin_cues(text: str) -> Iterator[tuple[int, bool]]:
    """(where a name may start, whether the cue is an introduction) for each Latin-script cue."""
    lower = lowered(text)
    for anchor in _ANCHORS:
        at = lower.find(anchor)
        while at >= 0:
            if not (at and lower[at - 1].isalpha()):  # "surname:" and "rename:" are not name cues
                intro = _INTRODUCTION.match(lower, at)
                label = None if intro else _LABEL.match(lower, at)
                if intro is not None:
                    yield intro.end(), True
                elif label is not None and (label.group()[-1] not in " \t" or text[at : at + 4] == "NAME"):
                    yield label.end(), False  # "name:" or a form's "APPLICANT NAME JOHN SMITH"
            at = lower.find(anchor, at + 1)
    newline = text.find("\n")
    while newline >= 0:
        line_start = text.rfind("\n", 0, newline) + 1
        if lower[line_start:newline].strip(" \t\r,!.-").lower() in _SIGN_OFFS:
            yield newline + 1, False
        newline = text.find("\n", newline + 1)


def _latin_name(text: str, position: int, gazetteer: Gazetteer, trusted: bool) -> tuple[int, int] | None:
    """The name that starts at ``position`` (after blanks), as (start, end), or None."""
    words: list[tuple[int, int, str]] = []
    while len(words) < _MAX_WORDS:
        gap = position
        while gap < len(text) and text[gap] in " \t":
            gap += 1
        if words and gap == position:
            break  # words of a name are separated by blanks; punctuation or a line break ends it
        if not words and gap < len(text) and text[gap] == "\n":
            break
        match = _LATIN_WORD.match(text, gap)
        if match is None or match.start() != gap:
            break
        word = match.group()
        kind = _word_kind(word, gazetteer)
        if kind == "common" and words and word.lower() in _PARTICLES:
            kind = "particle"
        elif kind == "common" or (not trusted and kind == "unknown" and not _capitals(word)):
            break
        words.append((match.start(), match.end(), kind))
        position = match.end()
    while words and words[-1][2] == "particle":
        words.pop()
    kinds = [kind for _, _, kind in words]
    if not kinds:
        return None
    # Evidence enough: a gazetteer name that is no frequent word; after an introduction also a word that is
    # no frequent word, or a first name that is one ("my name is rose"). After a label or a sign-off, a first
    # name that is also a frequent word ("marco", "rose") counts when the words fill the rest of the line
    # ("Cheers,\nmarco"), and so do two words in capitals ("NAME: LEE CHAN").
    end = words[-1][1]
    if "name" in kinds or (trusted and ("unknown" in kinds or "common first name" in kinds)):
        return words[0][0], end
    if not trusted and _line_ends(text, end):
        if "common first name" in kinds or sum(k != "particle" for k in kinds) >= 2:
            return words[0][0], end
    return None


def _line_ends(text: str, position: int) -> bool:
    newline = text.find("\n", position)
    rest = text[position : newline if newline >= 0 else len(text)]
    return not any(c.isalnum() for c in rest)


def _word_kind(word: str, gazetteer: Gazetteer) -> str:
    lower = word.lower()
    first = lower in gazetteer.first_names
    common = lower in gazetteer.common_words or len(word) < 2
    if first or lower in gazetteer.last_names:
        if not common:
            return "name"
        return "common first name" if first else "common name"
    return "common" if common else "unknown"


def _capitals(word: str) -> bool:
    return word.isupper() and len(word) > 1
