"""The tokenizer's rules (mpifc/text/tokenize.py docstring), one example each."""
import pytest

from mpifc.text.tokenize import _patterns, tokenize
from textcorpus import CASES, case_files


@pytest.mark.parametrize("text,want", [
    ("Hello, WORLD! hello", ["hello", "world", "hello"]),
    ("Don't stop 'quoted' rock\u2019n\u2019roll", ["don't", "stop", "quoted", "rock\u2019n\u2019roll"]),
    ("x_y 3.14 42", ["x", "y", "3", "14", "42"]),                  # _ and . separate
    ("Straße É e\u0301", ["straße", "é", "é"]),                    # NFC: one é, not two
    ("हिन्दी 한국어 Ωμέγα ΣΟΦΟΣ", ["हिन्दी", "한국어", "ωμέγα", "σοφος"]),   # marks inside words; final sigma
    ("ab\ufffdcd\ufeffef", ["ab", "cd", "ef"]),                     # U+FFFD and a BOM separate
    ("𝐀bc 𐌰𐌱", ["𝐀bc", "𐌰𐌱"]),                                   # astral letters
    ("", []),
])
def test_words(text, want):
    assert tokenize(text) == want


def test_cjk_chars_and_bigrams():
    s = "中文分词, 東京 の ひらがなカタカナ 字 A中b"
    assert tokenize(s, "chars") == ["中", "文", "分", "词", "東", "京", "の", "ひ", "ら", "が",
                                    "な", "カ", "タ", "カ", "ナ", "字", "a", "中", "b"]
    assert tokenize(s, "bigrams") == ["中文", "文分", "分词", "東京", "の", "ひら", "らが", "がな",
                                      "なカ", "カタ", "タカ", "カナ", "字", "a", "中", "b"]
    assert tokenize("𠀀𠀁字 x", "bigrams") == ["𠀀𠀁", "𠀁字", "x"]        # astral Han


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cjk", ["chars", "bigrams"])
def test_no_token_spans_a_newline(case, cjk):
    # what lets the split cut at newlines: line by line gives the whole text's tokens
    for data in case_files(case):
        text = data.decode("utf-8", errors="replace")
        by_line = [t for line in text.split("\n") for t in tokenize(line, cjk)]
        assert by_line == tokenize(text, cjk)


def test_bmp_and_full_patterns_agree():
    # the fast pattern (no astral ranges) is used only where it gives the same tokens
    text = "\n".join(d.decode("utf-8", "replace") for c in CASES for d in case_files(c))
    text = "".join(ch for ch in text if ord(ch) < 0x10000).lower()
    for i in range(3):
        assert _patterns()["bmp"][i].findall(text) == _patterns()["full"][i].findall(text)


def test_unknown_cjk_mode():
    with pytest.raises(ValueError, match="cjk must be one of"):
        tokenize("x", "words")
