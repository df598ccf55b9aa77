"""mpifc.text: tokenizer and distributed word count (``mpifc text count``).

    from mpifc.comm import world
    from mpifc.text import count_corpus, tokenize
    res = count_corpus(world(), ["corpus/"], top=10)     # collective
    if world().rank == 0:
        print(res.top, res.tokens, res.distinct)
"""
from mpifc.text.tokenize import CJK_MODES, tokenize
from mpifc.text.wordcount import CountResult, TextError, count_corpus, owner
from mpifc.text.vocab import build_vocab, encode

__all__ = ["tokenize", "CJK_MODES", "count_corpus", "CountResult", "TextError", "owner",
           "build_vocab", "encode"]
