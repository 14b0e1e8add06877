"""Recogniser for names the name model does not look at: lower-case and ALL-CAPS names after a strong cue ("my
name is john smith", "NAME: JOHN SMITH", a sign-off line), and names in Han, kana, Hangul or Cyrillic after a cue
of their language ("田中と申します", "我叫王伟", "제 이름은 김민준입니다", "меня зовут Иван Петров"); and names the
model misjudges where a cue vouches for them: capitalised words after a relative or workmate ("my colleague Aisha
Sutherland", "meine Tante Gisela"), a Japanese full name before its honorific ("伊藤 美咲さん").

The model scores capitalised Latin words only. These cues say outright that a name follows, so a rule is enough:
what follows is read word by word and kept while it can be a name: a word of the name gazetteers, or (after an
introduction such as "my name is", never after a bare "name:" label, which is as often a YAML key) a word that is
no frequent word of any language the gazetteer covers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TypeAlias

from inference.pii.context import lowered
from inference.pii.findings import PiiFinding, PiiKind
from inference.pii.lone_words import CALENDAR_WORDS
from inference.pii.names import Gazetteer, is_capitalised
from inference.pii.non_names import FUNCTION_WORDS

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

# Relatives, friends and workmates: after "my colleague", "meine Tante", "mon voisin", "o meu colega" the
# capitalised words that follow are that person's name, whether or not the gazetteers know them ("my colleague
# Aisha Sutherland": both are frequent words of wordfreq's lists and no Faker name). A possessive, then one of
# these nouns, in en/de/fr/es/it/nl/pt; searched in the lower-cased copy, the name read from the original.
_POSSESSIVES = (
    "my our his her your their mein meine meinem meinen meiner unser unsere unserem unseren unserer dein deine"
    " deinem deinen deiner sein seine seinem seinen seiner ihr ihre ihrem ihren ihrer mon ma notre son sa ton ta"
    " mi nuestro nuestra su tu mio mia nostro nostra suo sua tuo tua mijn onze zijn haar jouw meu minha nosso"
    " nossa seu teu"
)
_RELATIVES = (
    "colleague coworker co-worker friend boss manager neighbour neighbor wife husband partner son daughter brother"
    " sister mother father mum mom dad aunt uncle cousin nephew niece grandmother grandfather grandma grandpa"
    " girlfriend boyfriend fiancé fiancée flatmate roommate landlord landlady"
    " kollege kollegin freund freundin chef chefin nachbar nachbarin frau mann sohn tochter bruder schwester"
    " mutter vater tante onkel cousine oma opa vermieter vermieterin mitbewohner mitbewohnerin"
    " collègue ami amie patron patronne voisin voisine femme mari fils fille frère sœur soeur mère père oncle"
    " copain copine compañero compañera colega amigo amiga jefe jefa vecino vecina esposa esposo mujer marido"
    " hijo hija hermano hermana madre padre tía tío primo prima novio novia collega amico amica capo vicino"
    " vicina moglie marito figlio figlia fratello sorella zia zio cugino cugina vriend vriendin baas buurman"
    " buurvrouw vrouw man zoon dochter broer zus moeder vader oom neef nicht chefe vizinho vizinha filho filha"
    " irmão irmã mãe pai tia tio namorado namorada"
)

_Trie: TypeAlias = dict[str, "_Trie"]


def _word_trie(words: Iterable[str]) -> str:
    """An alternation of ``words`` as a trie ("m(?:y|ein(?:e)?)" for "my mein meine"): at each position the regex
    engine tries the few branches of the letter there, not every word (a flat alternation of these ~200 words
    took a tenth of a 4,000-character scan; the trie a quarter of that)."""
    trie: _Trie = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: _Trie) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


_RELATIVE = re.compile(rf"{_word_trie(set(_POSSESSIVES.split()))}[ \t]+{_word_trie(set(_RELATIVES.split()))}[ \t]+")

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
# A full name with its honorific: family name in kanji, a space, the given name, then さん/様/氏/先生/くん/ちゃん/殿
# ("伊藤 美咲さん", "山田 太郎様"). Words for roles take these honorifics too ("お客様", "店長さん", "皆さん"), but a
# role is one word: the space between family and given name is what makes it a name.
_JA_HONORIFIC_NAME = re.compile(
    r"[\u4e00-\u9fff\u3400-\u4dbf々]{1,3}[ 　](?:[\u4e00-\u9fff\u3400-\u4dbf々]|[\u3041-\u3096\u30a1-\u30fa]){1,4}"
    r"(?=さん|様|さま|氏|先生|くん|君|ちゃん|殿)"
)
# Korean endings glued to the name ("김민준입니다", "김춘자라고"), longest first.
_KO_ENDINGS = ("이라고", "입니다", "이에요", "라고", "예요", "이고", "님", "씨", "요")
_ZH_ENDINGS = ("今年", "来自", "是", "在", "的")


def find_cued_names(text: str, gazetteer: Gazetteer) -> Iterator[PiiFinding]:
    for start, trusted in _latin_cues(text):
        span = _latin_name(text, start, gazetteer, trusted)
        if span is not None:
            yield PiiFinding.at(PiiKind.PERSON, text, span[0], span[1], _SCORE)
    yield from _names_after_relatives(text, gazetteer)
    if text.isascii():
        return
    for match in _JA_HONORIFIC_NAME.finditer(text):
        yield PiiFinding.at(PiiKind.PERSON, text, match.start(), match.end(), _SCORE)
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


_LONE_NAME_KINDS = ("name", "common first name", "unknown")


def _names_after_relatives(text: str, gazetteer: Gazetteer) -> Iterator[PiiFinding]:
    """Capitalised words after "my colleague", "meine Tante", ...: two or more (a full name) whatever they are;
    one when a gazetteer knows it or it is no frequent word ("my friend Ruzafa"; not "my boss Monday")."""
    lower = lowered(text)
    for cue in _RELATIVE.finditer(lower):
        if cue.start() and lower[cue.start() - 1].isalpha():
            continue  # "gamma ..." is not "ma ..."
        span = _capitalised_run(text, cue.end())
        if span is None:
            continue
        if (
            " " not in text[span[0] : span[1]]
            and _word_kind(text[span[0] : span[1]], gazetteer) not in _LONE_NAME_KINDS
        ):
            continue
        yield PiiFinding.at(PiiKind.PERSON, text, span[0], span[1], _SCORE)


def _capitalised_run(text: str, position: int) -> tuple[int, int] | None:
    """The capitalised words from ``position``, one space apart, as (start, end): a name in full, with its
    initials ("John F. Kennedy") and particles ("Jan de Vries"), so that it is never shorter than what the name
    model finds there; None when no capitalised word stands there."""
    words: list[tuple[int, int]] = []
    while len(words) < _MAX_WORDS:
        match = _LATIN_WORD.match(text, position)
        if match is None:
            break
        word = match.group()
        if word in _PARTICLES and words:
            after = _LATIN_WORD.match(text, match.end() + 1) if text.startswith(" ", match.end()) else None
            if after is None or not is_capitalised(after.group()):
                break
        elif not is_capitalised(word) or word.lower() in CALENDAR_WORDS or word.lower() in FUNCTION_WORDS:
            break
        elif len(word) == 1 and not text.startswith(".", match.end()):
            break  # a lone capital is an initial only with its full stop
        end = match.end() + (1 if len(word) == 1 else 0)
        if word not in _PARTICLES:
            words.append((match.start(), end))
        if not text.startswith(" ", end) or text.startswith("  ", end):
            break  # one space between the words of a name
        position = end + 1
    while words and words[-1][1] - words[-1][0] == 2 and text[words[-1][1] - 1] == ".":
        words.pop()  # "my colleague J." holds no name yet
    if not words:
        return None
    return words[0][0], words[-1][1]


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
