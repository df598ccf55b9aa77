"""`mpifc text count` at 1, 2, 4 ranks beside one process's collections.Counter.

    python bench/wordcount.py [--mb 200] [--ranks 1,2,4] [--seed 0] [--repeats 1]

Generates a corpus of --mb MB into a temporary directory (deterministic from --seed,
deleted at the end): 8 files of uneven sizes, words drawn from a Zipf law (s = 1.05)
over a vocabulary of 300 000 made-up words -- about 1 in 10 of them 2-3 Han characters --,
with capitals, commas and line breaks. Then, interleaved repeat by repeat:

  Counter        this process: each file read whole, decoded, Counter(tokenize(text))
  text count P   ``mpiexec -n P python -m mpifc text count CORPUS --quiet`` (no output file)

seconds: the count's own time (the summary line of ``text count``: survey to top K,
without interpreter start-up); the job's wall time beside it. MB/s and Mtok/s from
those seconds; "x Counter" is this row's rate over the Counter's. A row with more ranks
than cores is marked * (oversubscribed). Every run's token total, distinct count and
top 10 are checked against the Counter's; a mismatch fails the bench.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from operator import itemgetter

import numpy as np

from mpifc.text.tokenize import tokenize

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--mb", type=float, default=200.0, help="corpus size in MB (default %(default)s)")
p.add_argument("--ranks", default="1,2,4")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--repeats", type=int, default=1, help="figure = best repeat")
p.add_argument("--vocab", type=int, default=300_000)
args = p.parse_args()
ranks = [int(r) for r in args.ranks.split(",")]
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
if not os.path.exists(MPIEXEC):
    MPIEXEC = shutil.which("mpiexec") or "mpiexec"


def vocabulary(rng, n):
    """n distinct made-up words (syllables; 1 in 10 is 2-3 Han characters), most common first."""
    onset = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
             "w", "st", "th", "ch", "sh", "br", "tr", "pl"]
    nucleus = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "é"]
    coda = ["", "", "n", "s", "r", "t", "l", "m", "nd", "st", "ng"]
    words, seen = [], set()
    while len(words) < n:
        if rng.random() < 0.1:
            w = "".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 3000, rng.integers(2, 4)))
        else:
            k = 1 + min(int(rng.exponential(1.0)), 4)
            w = "".join(onset[rng.integers(len(onset))] + nucleus[rng.integers(len(nucleus))]
                        + coda[rng.integers(len(coda))] for _ in range(k))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def generate(directory, mb, seed, n_vocab):
    """Write the corpus; returns the file paths."""
    rng = np.random.default_rng(seed)
    words = vocabulary(rng, n_vocab)
    # four spellings per word: "w ", "w\n", "w, ", "W " (chosen 0.83 / 0.08 / 0.05 / 0.04)
    forms = [f.encode() for w in words for f in (w + " ", w + "\n", w + ", ", w.title() + " ")]
    zipf = 1.0 / np.arange(1, n_vocab + 1) ** 1.05
    zipf /= zipf.sum()
    weights = np.array([5, 9, 3, 1, 7, 2, 8, 4], dtype=float)      # uneven file sizes
    target = (weights / weights.sum() * mb * 1e6).astype(np.int64)
    paths = []
    for i, want in enumerate(target):
        path = os.path.join(directory, f"part-{i}.txt")
        with open(path, "wb") as f:
            done = 0
            while done < want:
                size = int(min(200_000, max(1000, (want - done) / 9)))      # ~8 bytes a word
                w = rng.choice(n_vocab, size=size, p=zipf)
                v = rng.choice(4, size=w.size, p=[0.83, 0.08, 0.05, 0.04])
                chunk = b"".join(itemgetter(*(4 * w + v).tolist())(forms))
                f.write(chunk)
                done += len(chunk)
        paths.append(path)
    return paths


def counter_baseline(paths):
    t0 = time.perf_counter()
    c = Counter()
    for path in paths:
        with open(path, "rb") as f:
            c.update(tokenize(f.read().decode("utf-8", errors="replace")))
    return c, time.perf_counter() - t0


SUMMARY = re.compile(r"(\d+) tokens, (\d+) distinct, ([\d.]+) s")


def text_count(paths_dir, n):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "mpifc", "text", "count",
                        paths_dir, "--quiet", "--top", "10"],
                       capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"text count at {n} ranks failed:\n{r.stderr}")
    m = SUMMARY.search(r.stdout)
    top = [tuple(l.split()) for l in r.stdout.splitlines()[1:11]]
    return int(m.group(1)), int(m.group(2)), float(m.group(3)), wall, top


tmp = tempfile.mkdtemp(prefix="mpifc-wordcount-")
try:
    t0 = time.perf_counter()
    paths = generate(tmp, args.mb, args.seed, args.vocab)
    nbytes = sum(os.path.getsize(p) for p in paths)
    print(f"corpus: {len(paths)} files, {nbytes / 1e6:.1f} MB, Zipf over {args.vocab} words, "
          f"seed {args.seed}, generated in {time.perf_counter() - t0:.1f} s; "
          f"{os.cpu_count()} cores", flush=True)
    best = {}
    ref = None
    for rep in range(args.repeats):
        ref, dt = counter_baseline(paths)
        best["Counter"] = min(best.get("Counter", (1e30,)), (dt, dt))
        want_top = [(t, str(c)) for t, c in sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
        for n in ranks:
            tok, dist, sec, wall, top = text_count(tmp, n)
            if (tok, dist, top) != (sum(ref.values()), len(ref), want_top):
                raise SystemExit(f"text count at {n} ranks disagrees with Counter: {tok} tokens, "
                                 f"{dist} distinct (want {sum(ref.values())}, {len(ref)})")
            best[n] = min(best.get(n, (1e30,)), (sec, wall))
    ntok = sum(ref.values())
    print(f"{ntok} tokens, {len(ref)} distinct; figures: best of {args.repeats}")
    print(f"{'run':<16}{'seconds':>9}{'wall s':>9}{'MB/s':>9}{'Mtok/s':>9}{'x Counter':>11}")
    base = best["Counter"][0]
    for key, (sec, wall) in best.items():
        name = "Counter" if key == "Counter" else f"text count {key}" + (
            "*" if key > (os.cpu_count() or 1) else "")
        print(f"{name:<16}{sec:>9.2f}{wall:>9.2f}{nbytes / 1e6 / sec:>9.1f}{ntok / 1e6 / sec:>9.2f}"
              f"{base / sec:>11.2f}")
finally:
    shutil.rmtree(tmp)
