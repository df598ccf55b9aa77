"""Text datasets: converters on small files in each real layout, the format, the generated set.

Each converter test writes its input the way the real corpus is laid out (aclImdb /
20 Newsgroups folders, AG News CSV, a TSV with a header), converts it at one rank and
checks the file against a Counter over the same tokenizer.
"""
import csv
from collections import Counter

import h5py
import numpy as np
import pytest

from mpifc.data.format import DatasetError, read_info
from mpifc.data.textformat import read_text_split, read_vocab
from mpifc.data.textprep import prepare_synthetic_text, prepare_text, synthetic_text_docs
from mpifc.text.tokenize import tokenize

IMDB = {
    "train": {"neg": ["A dull, dull film.", "Worst plot ever; dull acting."],
              "pos": ["A great film!", "Great acting, great plot.", "Loved it."]},
    "test": {"neg": ["Dull and boring."], "pos": ["Great fun, a lovely film.", "Zyzzyva!"]},
}


def write_folders(root, layout=IMDB, ext=".txt"):
    for split, classes in layout.items():
        for c, docs in classes.items():
            d = root / split / c if split else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i, t in enumerate(docs):
                (d / f"{i}_7{ext}").write_text(t, encoding="utf-8")
    return root


def decode(path, split):
    vocab = read_vocab(path)
    tok, off, y = read_text_split(path, split)
    return [[vocab[t] for t in tok[a:b]] for a, b in zip(off[:-1], off[1:])], y


def reference_vocab(train_texts, min_freq=1, max_vocab=None):
    c = Counter(t for d in train_texts for t in tokenize(d))
    kept = sorted(((t, n) for t, n in c.items() if n >= min_freq), key=lambda kv: (-kv[1], kv[0]))
    if max_vocab:
        kept = kept[:max_vocab - 2]
    return ["<pad>", "<unk>"] + [t for t, _ in kept]


def test_folders_train_test(tmp_path):
    src = write_folders(tmp_path / "aclImdb")
    out = prepare_text(src, tmp_path / "imdb.h5")
    train = [t for c in ("neg", "pos") for t in IMDB["train"][c]]
    assert read_vocab(out) == reference_vocab(train)
    info = read_info(out)
    assert info.layout == "text" and info.class_names == ("neg", "pos")
    assert info.vocab_size == len(reference_vocab(train))
    docs, y = decode(out, "train")
    assert docs == [tokenize(t) for t in train] and y.tolist() == [0, 0, 1, 1, 1]
    docs, y = decode(out, "test")      # words never seen in train are <unk>
    assert docs[2] == ["<unk>"] and docs[0] == ["dull", "<unk>", "<unk>"]
    assert y.tolist() == [0, 1, 1]
    with h5py.File(out, "r") as f:     # the documented layout, readable by plain h5py
        assert f["train/tokens"].dtype == np.int32 and f["train/offsets"].dtype == np.int64
        assert f["train/offsets"].shape == (6,) and f["train/y"].dtype == np.int64
        assert f.attrs["pad_id"] == 0 and f.attrs["unk_id"] == 1
        assert f["vocab"][0].decode() == "<pad>"


def test_min_freq_and_max_vocab(tmp_path):
    src = write_folders(tmp_path / "aclImdb")
    train = [t for c in ("neg", "pos") for t in IMDB["train"][c]]
    out = prepare_text(src, tmp_path / "a.h5", min_freq=2)
    assert read_vocab(out) == reference_vocab(train, min_freq=2)
    out = prepare_text(src, tmp_path / "b.h5", max_vocab=4)
    assert read_vocab(out) == reference_vocab(train, max_vocab=4) == ["<pad>", "<unk>", "dull",
                                                                      "great"]


def test_newsgroups_single_folder_carved(tmp_path):
    """20 Newsgroups files have no extension; one split folder is carved deterministically."""
    layout = {"": {f"comp.{k}": [f"message {i} about {k} number {i}" for i in range(10)]
                   for k in ("graphics", "windows")}}
    src = write_folders(tmp_path / "news", layout, ext="")
    a = prepare_text(src, tmp_path / "a.h5", test_fraction=0.25, seed=3)
    b = prepare_text(src, tmp_path / "b.h5", test_fraction=0.25, seed=3)
    ia = read_info(a)
    assert ia.splits["train"].n == 15 and ia.splits["test"].n == 5
    for s in ("train", "test"):
        for x, z in zip(read_text_split(a, s), read_text_split(b, s)):
            assert np.array_equal(x, z)
    assert ia.class_names == ("comp.graphics", "comp.windows")


def test_agnews_csv(tmp_path):
    """AG News: no header, class index 1..4, title, description (quoted, with commas)."""
    rows = {"train": [("3", "Wall St. Bears", "Short-sellers, Wall Street's dwindling band"),
                      ("1", "Peace talks", "Leaders met, again"),
                      ("2", "Cup final", "The team won the cup"),
                      ("4", "New chip", "A faster chip, again"),
                      ("10", "Odd", "class ten sorts after four")],
            "test": [("2", "Final", "The team lost"), ("1", "Talks", "Leaders, again")]}
    d = tmp_path / "ag_news_csv"
    d.mkdir()
    for s, rr in rows.items():
        with open(d / f"{s}.csv", "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(rr)
    out = prepare_text(d, tmp_path / "ag.h5", text_column="1,2")
    info = read_info(out)
    assert info.class_names == ("1", "2", "3", "4", "10")      # numeric order
    docs, y = decode(out, "train")
    assert docs[0] == tokenize("Wall St. Bears Short-sellers, Wall Street's dwindling band")
    assert y.tolist() == [2, 0, 1, 3, 4]
    assert decode(out, "test")[1].tolist() == [1, 0]


def test_tsv_with_header_named_columns(tmp_path):
    p = tmp_path / "reviews.tsv"
    lines = ["id\ttext\tsentiment"] + [f"{i}\t{'good fine' if i % 2 else 'bad awful'} {i}\t"
                                       f"{'pos' if i % 2 else 'neg'}" for i in range(20)]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = prepare_text(p, tmp_path / "r.h5", label_column="sentiment", text_column="text")
    info = read_info(out)
    assert info.class_names == ("neg", "pos") and info.splits["test"].n == 4
    docs, y = decode(out, "train")
    for d, lab in zip(docs, y):
        assert (d[0] in ("good", "<unk>")) == bool(lab) or d[0] == "bad"


def test_non_utf8_bytes_are_replaced(tmp_path):
    src = write_folders(tmp_path / "s", {"train": {"a": ["x"], "b": ["y"]},
                                         "test": {"a": ["x"]}})
    (src / "train" / "a" / "0_7.txt").write_bytes(b"caf\xe9 ok")
    out = prepare_text(src, tmp_path / "o.h5")
    # decoded as U+FFFD (as `mpifc text count` does), which is no word character
    assert read_vocab(out) == ["<pad>", "<unk>", "caf", "ok", "y"]
    assert decode(out, "train")[0][0] == ["caf", "ok"]


@pytest.mark.parametrize("case", ["missing", "column", "unknown_label", "empty", "no_docs",
                                  "short_row"])
def test_bad_input_one_clear_error(tmp_path, case):
    if case == "missing":
        src, kw, want = tmp_path / "nope", {}, "no such file or directory"
    elif case == "column":
        src = tmp_path / "h.csv"
        src.write_text("label,body\n1,hello\n2,world\n1,x\n2,y\n1,z\n")
        kw, want = {"label_column": "label", "text_column": "text"}, "no column 'text'"
    elif case == "unknown_label":
        src = write_folders(tmp_path / "u", {"train": {"a": ["x"], "b": ["y"]},
                                             "test": {"c": ["z"]}})
        kw, want = {}, "label 'c' of the test split is not a class of the train split"
    elif case == "empty":
        src = write_folders(tmp_path / "e", {"train": {"a": ["", "?!"], "b": ["..."]},
                                             "test": {"a": [""]}})
        kw, want = {}, "the corpus is empty"
    elif case == "no_docs":
        (tmp_path / "n" / "train" / "a").mkdir(parents=True)
        (tmp_path / "n" / "test" / "a").mkdir(parents=True)
        src, kw, want = tmp_path / "n", {}, "no documents"
    else:
        src = tmp_path / "s.csv"
        src.write_text("1,hello\n2\n1,x\n2,y\n1,z\n")
        kw, want = {}, "line 2 has 1 column(s)"
    with pytest.raises(DatasetError) as e:
        prepare_text(src, tmp_path / "o.h5", **kw)
    assert want in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("o.h5*"))       # no file, no temporary corpus left


def test_synthetic_text_deterministic_and_learnable(tmp_path):
    a = prepare_synthetic_text(tmp_path / "a.h5", n_train=3000, n_test=1000, seed=5)
    b = prepare_synthetic_text(tmp_path / "b.h5", n_train=3000, n_test=1000, seed=5)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for k in ("train/tokens", "train/offsets", "train/y", "test/tokens", "vocab"):
            assert np.array_equal(fa[k][...], fb[k][...]), k
    info = read_info(a)
    assert info.num_classes == 4 and info.vocab_size > 1000
    tok, off, y = read_text_split(a, "train")
    lens = np.diff(off)
    assert lens.min() >= 20 and lens.max() <= 200
    # multinomial naive Bayes on the bag of words: accuracy means something
    V, K = info.vocab_size, 4
    counts = np.ones((K, V))
    doc_of = np.repeat(np.arange(y.size), lens)
    np.add.at(counts, (y[doc_of], tok), 1)
    logp = np.log(counts / counts.sum(1, keepdims=True))
    tt, to, ty = read_text_split(a, "test")
    scores = np.add.reduceat(logp[:, tt].T, to[:-1], axis=0)
    acc = float((scores.argmax(1) == ty).mean())
    print(f"naive Bayes test accuracy {acc:.4f}")
    assert 0.9 <= acc < 0.995


def test_synthetic_docs_seed_changes_data():
    d0, y0, _ = synthetic_text_docs(50, 4, 0)
    d1, y1, _ = synthetic_text_docs(50, 4, 1)
    assert d0 != d1
    assert synthetic_text_docs(50, 4, 0)[0] == d0


def test_inspect_describes_text(tmp_path):
    from mpifc.checkpoint.describe import describe

    out = prepare_synthetic_text(tmp_path / "s.h5", n_train=200, n_test=50)
    text = describe(out)
    assert "vocabulary" in text and "train: 200 documents" in text and "<pad> <unk>" in text
