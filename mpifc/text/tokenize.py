"""The tokenizer of ``mpifc text count``: Unicode-aware lower-cased words, CJK by character.

Rules, applied to text already decoded from UTF-8:

1. The text is NFC-normalised and lower-cased (``str.lower``), so "Straße", "STRASSE"
   stay distinct but "É" (one code point) and "E" + combining acute (two) are one word.
2. A **word** is a maximal run of letters, combining marks and digits (Unicode
   categories L*, M*, N*), other than CJK characters; an apostrophe (' or ’) between two
   such runs joins them ("don't" is one word, "'quoted'" gives "quoted"). Everything
   else separates words: spaces, punctuation, symbols, underscores, U+FFFD (what an
   invalid UTF-8 byte decodes to), a BOM.
3. **CJK characters** -- Han ideographs (CJK Unified Ideographs and their extensions,
   compatibility ideographs, 々 and 〇), Hiragana and Katakana -- are written without
   spaces between words, so they are never part of a word. ``cjk="chars"`` counts each
   one; ``cjk="bigrams"`` counts each pair of neighbours in a run of them (a run of n >= 2
   gives its n - 1 bigrams; a run of one character counts as that character). Hangul is
   written with spaces and is tokenized as words.

No token spans a newline, which is what lets :mod:`mpifc.text.split` cut the input at
newlines and still give exactly the tokens of the whole text.
"""
from __future__ import annotations

import re
import sys
import unicodedata
from collections import Counter
from functools import lru_cache

CJK_MODES = ("chars", "bigrams")

# Han (with its extensions and compatibility blocks), Hiragana, Katakana
_CJK_RANGES = [(0x3005, 0x3005), (0x3007, 0x3007), (0x3040, 0x309F), (0x30A0, 0x30FF),
               (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
               (0xFF66, 0xFF9F), (0x20000, 0x2FA1F), (0x30000, 0x323AF)]


def _cls(ranges) -> str:
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                   for a, b in ranges)


def _in_cjk(cp: int) -> bool:
    return any(a <= cp <= b for a, b in _CJK_RANGES)


def _word_ranges(lo: int, hi: int) -> list[tuple[int, int]]:
    """Code point ranges in [lo, hi) of letters, marks and digits that are not CJK."""
    ranges, start, prev = [], None, None
    for cp in range(lo, hi):
        ok = unicodedata.category(chr(cp))[0] in "LMN" and not _in_cjk(cp)
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            ranges.append((start, prev))
            start = None
        prev = cp
    if start is not None:
        ranges.append((start, prev))
    return ranges


_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")


@lru_cache(maxsize=1)
def _patterns() -> dict:
    """Compiled patterns, built once per process (about 0.5 s).

    The standard ``re`` has no name for "letter, mark or digit", so the class is listed
    from this Python's Unicode tables. A class of code points below U+10000 only is
    matched by table look-up; one with astral ranges is scanned range by range, 7x
    slower. So each pattern comes twice: "bmp" for text without astral characters (the
    usual case, checked per block) and "full" for text with them; they agree on text
    of BMP characters only."""
    bmp_w, ast_w = _word_ranges(0, 0x10000), _word_ranges(0x10000, sys.maxunicode + 1)
    bmp_c = [r for r in _CJK_RANGES if r[1] < 0x10000]
    out = {}
    for kind, w, c in [("bmp", f"[{_cls(bmp_w)}]", f"[{_cls(bmp_c)}]"),
                       ("full", f"(?:[{_cls(bmp_w)}]|[{_cls(ast_w)}])",
                        f"[{_cls(_CJK_RANGES)}]")]:
        word = f"{w}+(?:['\u2019]{w}+)*"
        out[kind] = (re.compile(f"{word}|{c}"), re.compile(f"{word}|{c}+"), re.compile(c))
    return out


def normalize(text: str) -> str:
    """NFC, then lower case (rule 1)."""
    return unicodedata.normalize("NFC", text).lower()


def tokenize(text: str, cjk: str = "chars") -> list[str]:
    """The tokens of ``text`` in order (rules in the module docstring).

    >>> tokenize("Don't PANIC: 中文分词 42!", cjk="bigrams")
    ["don't", 'panic', '中文', '文分', '分词', '42']
    """
    if cjk not in CJK_MODES:
        raise ValueError(f"cjk must be one of {CJK_MODES}, got {cjk!r}")
    text = normalize(text)
    chars, runs, cjk_char = _patterns()["full" if _ASTRAL.search(text) else "bmp"]
    if cjk == "chars" or cjk_char.search(text) is None:
        return chars.findall(text)
    out = []
    for tok in runs.findall(text):
        if len(tok) > 1 and cjk_char.match(tok):         # a run of CJK characters
            out.extend(tok[i:i + 2] for i in range(len(tok) - 1))
        else:                                            # a word, or one CJK character
            out.append(tok)
    return out


def count_tokens(text: str, cjk: str = "chars", into: Counter | None = None) -> Counter:
    """Add the tokens of ``text`` to ``into`` (a new Counter when None) and return it."""
    into = Counter() if into is None else into
    into.update(tokenize(text, cjk))
    return into
