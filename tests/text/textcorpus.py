"""Small corpora for the word-count tests, and the serial reference they are held to.

Each case is a list of file contents (bytes), chosen to hit one edge: files of very
different sizes, empty files among full ones, a file smaller than the rank count,
invalid UTF-8 (a lone byte, a sequence cut by a newline or by the end of the file),
CJK runs of every length, and lines longer than a read block.
"""
import os
import random
from collections import Counter

from mpifc.text.tokenize import tokenize

WORDS = ["the", "The", "THE", "of", "and", "Straße", "naïve", "e\u0301te\u0301", "don't",
         "rock\u2019n\u2019roll", "x_y", "42", "3.14", "Ωμέγα", "ΣΟΦΟΣ", "хлеб", "हिन्दी",
         "한국어", "مرحبا", "café!", "(quoted)", "'tis", "𝐀bc", "𠀀𠀁字"]
CJK = ["中文", "分词", "数据", "并行", "计算", "の", "ひらがな", "カタカナ", "東京", "字"]


def _lines(rng, n, pool, max_words=14, sep=" "):
    return [sep.join(rng.choices(pool, k=rng.randint(0, max_words))) for _ in range(n)]


def case_files(case: str) -> list[bytes]:
    rng = random.Random(case)
    if case == "uneven":
        big = "\n".join(_lines(rng, 900, WORDS)).encode()
        long_line = " ".join(rng.choices(WORDS, k=3000)).encode()       # one line, ~30 KB
        return [big, b"a b c", long_line + b"\n", "\n".join(_lines(rng, 7, WORDS)).encode()]
    if case == "empty":
        return [b"", "\n".join(_lines(rng, 50, WORDS)).encode() + b"\n", b"", b"\n\n", b"",
                "\n".join(_lines(rng, 3, WORDS)).encode()]
    if case == "tiny":                       # fewer bytes than ranks
        return [b"a\nb"]
    if case == "invalid":
        good = "\n".join(_lines(rng, 200, WORDS)).encode()
        return [good[:500] + b"\xff" + good[500:1500] + b"caf\xe9 ol\xe9\n\xe4\xb8\nab\xc3"
                + good[1500:] + b"\xed\xa0\x80x\xc0\xafy\n\xe4", b"\xff\xfe\x00z\n", b"\xe4\xb8"]
    if case == "cjk":
        zh = "\n".join(_lines(rng, 300, CJK + ["，", "。", "A", "b2"], sep="")).encode()
        mixed = "\n".join(_lines(rng, 200, CJK + WORDS)).encode()
        return [zh, "字\n中\n文".encode(), mixed]
    raise KeyError(case)


CASES = ["uneven", "empty", "tiny", "invalid", "cjk"]


def write_case(directory, case: str) -> list[str]:
    paths = []
    for i, data in enumerate(case_files(case)):
        p = os.path.join(directory, f"{case}-{i}.txt")
        with open(p, "wb") as f:
            f.write(data)
        paths.append(p)
    return paths


def reference(paths, cjk: str = "chars") -> Counter:
    """collections.Counter over the same tokenizer, each file read whole."""
    c = Counter()
    for p in paths:
        with open(p, "rb") as f:
            c.update(tokenize(f.read().decode("utf-8", errors="replace"), cjk))
    return c
