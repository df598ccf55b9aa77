"""Text converters (behind ``mpifc data prepare text``) and the generated text set.

Sources:

* ``folders``: SOURCE/train/<class>/* and SOURCE/test/<class>/* (aclImdb, 20 Newsgroups
  by-date); or SOURCE/<class>/* alone, carved into train/test (see :func:`carve`). Every
  regular, non-hidden file of a class folder is one document.
* ``csv``: SOURCE/train.csv + SOURCE/test.csv (or .tsv; AG News), or one file, carved.
  Columns are 0-based indices (no header row) or names (the first row is the header);
  several text columns (``"1,2"``: title, description) are joined by a space.

Bytes are decoded as UTF-8 with invalid bytes replaced by U+FFFD (as ``mpifc text
count`` does). The vocabulary is counted over the train documents with the distributed
count of :mod:`mpifc.text` (collective over ``comm``); rank 0 parses, encodes and writes.
Every failure (missing file, missing column, a test label not in train, an empty corpus)
raises the same DatasetError on every rank.

Shape letters: N documents, T tokens, V vocabulary, K classes.
"""
from __future__ import annotations

import csv
import io
import os

import numpy as np

from mpifc.data.format import DatasetError
from mpifc.data.textformat import write_text_dataset

FORMATS = ("folders", "csv")
TEST_FRACTION = 0.2


# ---------------------------------------------------------------------------- parsing
def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read: {e.strerror or e}") from None


def _visible(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if not n.startswith("."))


def read_folder_split(d: str, classes=None) -> tuple[list[str], list[str], list[str]]:
    """(texts, labels, where) of SPLIT/<class>/* files, classes and files sorted."""
    names = [c for c in _visible(d) if os.path.isdir(os.path.join(d, c))]
    if classes is not None:
        names = [c for c in names if c in classes]
    texts, labels, where = [], [], []
    for c in names:
        cd = os.path.join(d, c)
        for fn in _visible(cd):
            p = os.path.join(cd, fn)
            if os.path.isfile(p):
                texts.append(_read_text(p))
                labels.append(c)
                where.append(p)
    if not texts:
        raise DatasetError(f"{d}: no documents (expected {d}/<class>/<file> text files)")
    return texts, labels, where


def _columns(spec) -> list:
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise DatasetError(f"empty column specification {spec!r}")
    return [int(p) if p.lstrip("-").isdigit() else p for p in parts]


def read_csv_split(path: str, label_column="0", text_column="1"):
    """(texts, labels, where) of a CSV/TSV file (.tsv: tab separated)."""
    raw = _read_text(path)
    delim = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
    rows = csv.reader(io.StringIO(raw, newline=""), delimiter=delim)
    lab, txt = _columns(label_column), _columns(text_column)
    if len(lab) != 1:
        raise DatasetError(f"--label-column names one column, got {label_column!r}")
    wanted = lab + txt
    named = any(isinstance(c, str) for c in wanted)
    if named and not all(isinstance(c, str) for c in wanted):
        raise DatasetError("give --label-column and --text-column both as names or both as "
                           "0-based indices")
    first = 1
    if named:
        header = next(rows, None)
        if header is None:
            raise DatasetError(f"{path}: empty file (no header row)")
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DatasetError(f"{path}: no column {', '.join(map(repr, missing))} (header has "
                               f"{', '.join(map(repr, header))})")
        wanted = [header.index(c) for c in wanted]
        first = 2
    texts, labels, where = [], [], []
    for line, row in enumerate(rows, start=first):
        if not row:
            continue
        if max(wanted) >= len(row):
            raise DatasetError(f"{path}: line {line} has {len(row)} column(s); column "
                               f"{max(wanted)} was asked for (--label-column/--text-column)")
        labels.append(row[wanted[0]].strip())
        texts.append(" ".join(row[i] for i in wanted[1:]))
        where.append(f"{path}: line {line}")
    if not texts:
        raise DatasetError(f"{path}: no documents")
    return texts, labels, where


def carve(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of one split: ``default_rng(seed).permutation(n)``, the first
    ``round(test_fraction * n)`` are test, both kept in their original order."""
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(test_fraction * n))
    if k < 1 or k >= n:
        raise DatasetError(f"{n} document(s) cannot be carved into train and test "
                           f"(test fraction {test_fraction})")
    return np.sort(perm[k:]), np.sort(perm[:k])


def _take(split, idx):
    return tuple([s[i] for i in idx] for s in split)


def read_source(source, fmt=None, *, label_column="0", text_column="1", classes=None,
                test_fraction=TEST_FRACTION, seed=0) -> tuple[dict, str]:
    """Parse SOURCE into {"train": (texts, labels, where), "test": ...} and a description."""
    source = os.fspath(source)
    if not os.path.exists(source):
        raise DatasetError(f"{source}: no such file or directory")
    if fmt is None:
        fmt = "folders" if os.path.isdir(source) and not _csv_pair(source) else "csv"
    if fmt not in FORMATS:
        raise DatasetError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "folders":
        if not os.path.isdir(source):
            raise DatasetError(f"{source}: --format folders needs a directory")
        tr, te = os.path.join(source, "train"), os.path.join(source, "test")
        if os.path.isdir(tr) and os.path.isdir(te):
            return ({"train": read_folder_split(tr, classes),
                     "test": read_folder_split(te, classes)}, f"folders {source}/{{train,test}}")
        whole = read_folder_split(source, classes)
    else:
        pair = _csv_pair(source) if os.path.isdir(source) else None
        if os.path.isdir(source) and pair is None:
            raise DatasetError(f"{source}: no train.csv/test.csv (or .tsv) in this directory")
        if pair:
            return ({s: read_csv_split(p, label_column, text_column) for s, p in pair.items()},
                    f"csv {pair['train']}, {pair['test']} (label {label_column}, text "
                    f"{text_column})")
        whole = read_csv_split(source, label_column, text_column)
    tr_idx, te_idx = carve(len(whole[0]), test_fraction, seed)
    return ({"train": _take(whole, tr_idx), "test": _take(whole, te_idx)},
            f"{fmt} {source}; split: default_rng({seed}).permutation, first "
            f"{te_idx.size} = test")


def _csv_pair(d: str) -> dict | None:
    for ext in (".csv", ".tsv"):
        p = {s: os.path.join(d, s + ext) for s in ("train", "test")}
        if all(os.path.isfile(v) for v in p.values()):
            return p
    return None


def class_names_of(labels) -> list[str]:
    """Sorted distinct labels: numerically when every label is an integer (AG News 1..4)."""
    uniq = set(labels)
    try:
        return [str(v) for v in sorted(uniq, key=int)]
    except ValueError:
        return sorted(uniq)


def label_ids(labels, where, names, split: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(names)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, (lab, w) in enumerate(zip(labels, where)):
        if lab not in index:
            raise DatasetError(f"{w}: label {lab!r} of the {split} split is not a class of the "
                               f"train split ({', '.join(names[:20])})")
        out[i] = index[lab]
    return out


# ---------------------------------------------------------------------------- converter
def prepare_text(source, out, *, fmt=None, label_column="0", text_column="1", classes=None,
                 min_freq: int = 1, max_vocab: int | None = None, cjk: str = "chars",
                 test_fraction: float = TEST_FRACTION, seed: int = 0, comm=None,
                 compression=None) -> str:
    """Convert a text corpus to an mpifc text dataset; returns ``out``. Collective on ``comm``.

    Rank 0 parses SOURCE and writes the train documents, one a line, to a temporary
    corpus beside ``out``; every rank then counts its share of it (the vocabulary);
    rank 0 encodes and writes the file. ``comm`` None: the world communicator.
    """
    from mpifc.comm import world
    from mpifc.text.vocab import build_vocab, encode

    comm = world() if comm is None else comm
    out = os.fspath(out)
    corpus = f"{out}.corpus.tmp{os.getpid()}"
    parsed = msg = None
    if comm.rank == 0:
        try:
            parsed, desc = read_source(source, fmt, label_column=label_column,
                                       text_column=text_column, classes=classes,
                                       test_fraction=test_fraction, seed=seed)
            names = class_names_of(parsed["train"][1])      # labels first: fail before counting
            ys = {s: label_ids(labels, where, names, s)
                  for s, (_, labels, where) in parsed.items()}
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(corpus, "w", encoding="utf-8") as fh:
                for t in parsed["train"][0]:
                    fh.write(" ".join(t.split()) + "\n")    # one document a line
        except (DatasetError, OSError) as e:
            msg = str(e)
            if os.path.exists(corpus):
                os.unlink(corpus)
    got = comm.bcast_obj(("error", msg) if msg else ("ok", corpus))
    if got[0] == "error":
        raise DatasetError(got[1])
    try:
        vocab, counts = build_vocab(comm, [got[1]], min_freq=min_freq, max_vocab=max_vocab,
                                    cjk=cjk)
    finally:
        if comm.rank == 0 and os.path.exists(corpus):
            os.unlink(corpus)
    msg = None
    if comm.rank == 0:
        try:
            splits = {s: (*encode(texts, vocab, cjk), ys[s])
                      for s, (texts, _, _) in parsed.items()}
            write_text_dataset(out, splits, vocab=vocab, vocab_counts=counts,
                               class_names=names, source=desc, compression=compression,
                               attrs={"tokenizer": cjk, "min_freq": int(min_freq),
                                      "max_vocab": int(max_vocab or 0)})
        except (DatasetError, OSError) as e:
            msg = str(e)
    msg = comm.bcast_obj(msg)
    if msg:
        raise DatasetError(msg)
    return out


# ---------------------------------------------------------------------------- generated set
TOPICS = {
    "world": "government minister election president parliament border treaty embassy "
             "refugees diplomat summit sanctions province capital protest military ceasefire "
             "rebels coalition referendum",
    "sports": "match season coach league goal tournament championship striker playoff "
              "stadium team victory defeat injury medal olympic score referee transfer final",
    "business": "market shares profit investors revenue quarterly stocks merger bank "
                "economy inflation earnings company dividend trade acquisition bonds "
                "currency retail forecast",
    "science": "researchers study species climate telescope genome laboratory experiment "
               "physics planet vaccine molecule satellite fossil quantum neurons ocean "
               "evolution particle spacecraft",
    "health": "patients hospital doctors disease treatment clinical symptoms nurse therapy "
              "diagnosis infection surgery diet obesity cancer mental insurance pharmacy "
              "pandemic wellness",
    "arts": "film album novel museum painting concert director actress gallery theatre "
            "poetry festival orchestra sculpture author premiere exhibition soundtrack "
            "ballet critics",
}
FUNCTION_WORDS = ("the of and to a in that is was he for it with as his on be at by i this "
                  "had not are but from or have an they which one you were her all she there "
                  "would their we him been has when who will more no if out so said what up "
                  "its about into than them can only other new some could time these two may "
                  "then do first any my now such like our over man me even most made after "
                  "also did many before must through back years where much your way well down "
                  "should because each just those people how too little state good very make "
                  "world still own see men work long get here between both life being under "
                  "never day same another know while last might us great old year off come "
                  "since against go came right used take three").split()
_ONSETS = "b c d f g h j k l m n p r s t v w br cr dr fl gr pl st tr ch sh th".split()
_VOWELS = "a e i o u ai ea ou io".split()
_CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "rt"]


def _pseudo_words(rng, n: int, taken: set) -> list[str]:
    """``n`` distinct pronounceable words of 2-3 syllables, none in ``taken``."""
    out, seen = [], set(taken)
    while len(out) < n:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS)
                    for _ in range(int(rng.integers(2, 4)))) + rng.choice(_CODAS)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def synthetic_text_docs(n: int, num_classes: int = 4, seed: int = 0, *, topic_rate=0.08,
                        confusion=0.3, min_len: int = 20, max_len: int = 200,
                        background: int = 3000):
    """``n`` generated documents: (list of token lists, labels (n,) int64, class names).

    A document of class c has a length uniform in [min_len, max_len]; each word is a topic
    word with probability ``topic_rate`` -- class c's own topic words with probability
    ``1 - confusion``, else the next class's -- and otherwise a background word drawn from
    a Zipf(1.1) law over function words then pseudo-words. Deterministic from ``seed``.
    """
    names = list(TOPICS)[:num_classes]
    if not 2 <= num_classes <= len(TOPICS):
        raise DatasetError(f"synthetic-text has 2..{len(TOPICS)} classes, got {num_classes}")
    rng = np.random.default_rng([seed, 1013])
    topic = [np.array(TOPICS[c].split()) for c in names]
    taken = set(FUNCTION_WORDS).union(*map(set, topic))
    bg = np.array(FUNCTION_WORDS + _pseudo_words(rng, background, taken))
    zipf = 1.0 / np.arange(1, bg.size + 1) ** 1.1
    zipf /= zipf.sum()
    y = rng.integers(0, num_classes, size=n).astype(np.int64)
    lens = rng.integers(min_len, max_len + 1, size=n)
    docs = []
    for c, L in zip(y, lens):
        words = bg[rng.choice(bg.size, size=L, p=zipf)]
        is_topic = rng.random(L) < topic_rate
        k = int(is_topic.sum())
        if k:
            own = rng.random(k) >= confusion
            src = np.where(own, c, (c + 1) % num_classes)
            words[is_topic] = [topic[s][rng.integers(topic[s].size)] for s in src]
        docs.append(words.tolist())
    return docs, y, names


def prepare_synthetic_text(out, *, n_train: int = 8000, n_test: int = 2000,
                           num_classes: int = 4, seed: int = 0, compression=None) -> str:
    """The bundled text set: :func:`synthetic_text_docs`, vocabulary of the train split."""
    from mpifc.text.vocab import encode, vocab_from_counter
    from collections import Counter

    docs, y, names = synthetic_text_docs(n_train + n_test, num_classes, seed)
    counter = Counter()
    for d in docs[:n_train]:
        counter.update(d)
    vocab, counts = vocab_from_counter(counter)
    splits = {"train": (*encode(docs[:n_train], vocab), y[:n_train]),
              "test": (*encode(docs[n_train:], vocab), y[n_train:])}
    src = (f"generated: {num_classes} topics, topic words at rate 0.08 (30% from the next "
           f"topic), Zipf background, 20-200 words a document, seed {seed}")
    return write_text_dataset(out, splits, vocab=vocab, vocab_counts=counts, class_names=names,
                              source=src, compression=compression,
                              attrs={"tokenizer": "chars", "min_freq": 1, "max_vocab": 0})


# ---------------------------------------------------------------------------- command
def cmd_prepare_text(args, describe) -> None:
    """``mpifc data prepare text SOURCE`` / ``synthetic-text`` (collective under mpiexec).

    A failure prints one line from rank 0 and exits 1 on every rank."""
    import sys

    from mpifc.comm import world

    comm = world()
    out = args.out or os.path.join("runs", "data", f"{args.name}.h5")
    try:
        if args.name == "synthetic-text":
            err = None
            if comm.rank == 0:
                try:
                    prepare_synthetic_text(
                        out, n_train=_given(args.n_train, 8000), n_test=_given(args.n_test, 2000),
                        num_classes=_given(args.classes, 4), seed=args.seed,
                        compression=args.compression)
                except DatasetError as e:
                    err = str(e)
            err = comm.bcast_obj(err)
            if err:
                raise DatasetError(err)
        else:
            if not args.source:
                raise DatasetError("give SOURCE: a folder per class of text files, or CSV/TSV")
            prepare_text(args.source, out, fmt=args.format, label_column=args.label_column,
                         text_column=args.text_column, min_freq=args.min_freq,
                         max_vocab=args.max_vocab, cjk=args.cjk,
                         test_fraction=args.test_fraction, seed=args.seed, comm=comm,
                         compression=args.compression,
                         classes=args.only_classes.split(",") if args.only_classes else None)
    except DatasetError as e:           # raised on every rank at the same point
        if comm.rank == 0:
            print(f"mpifc data prepare {args.name}: {e}", file=sys.stderr, flush=True)
        comm.barrier()                  # rank 0 has printed before any rank exits non-zero
        raise SystemExit(1)
    if comm.rank == 0:
        print(f"wrote {out}")
        describe(out)


def _given(value, default):
    """A command-line value, or the dataset's default when it was not given (None)."""
    return default if value is None else value
