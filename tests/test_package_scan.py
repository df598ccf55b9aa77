"""Nothing in mpifc unpickles, evals or executes content from a file (issue 17 item 3).

The package's code -- comments and string literals stripped by the tokenizer, so
docs may name what they avoid -- is searched for the calls that turn bytes into
code or objects. Every hit must be on the allow-list below, with the reason it is
safe; a stale allow-list entry fails too, so the list stays honest.
"""
import io
import os
import re
import tokenize

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "mpifc")

PATTERNS = {
    "pickle.load": r"\b(c?pickle|dill|cloudpickle|joblib)\s*\.\s*(load|loads|Unpickler)\b",
    "import pickle": r"\b(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b",
    "marshal.load": r"\bmarshal\s*\.\s*loads?\b",
    "yaml.load": r"\byaml\s*\.\s*(unsafe_)?load\b",
    "eval(": r"(?<![\w.])(?<!def )eval\s*\(",
    "exec(": r"(?<![\w.])(?<!def )exec\s*\(",
    "compile(": r"(?<![\w.])(?<!def )compile\s*\(",
    "__import__(": r"\b__import__\s*\(",
    "allow_pickle=True": r"\ballow_pickle\s*=\s*True\b",
    "shell=True": r"\bshell\s*=\s*True\b",
    "os.system(": r"\bos\s*\.\s*(system|popen)\s*\(",
    # mpi4py's lower-case (object) calls pickle what they send and unpickle what arrives
    "mpi4py object call": r"\.mpi\s*\.\s*(bcast|gather|allgather|allreduce|scatter|alltoall|"
                          r"send|recv|sendrecv|isend|irecv|reduce)\s*\(",
}

# (file relative to mpifc/, pattern name): why it is safe
ALLOW = {
    ("data/prepare.py", "import pickle"):
        "CIFAR-10's python batches are pickles; read only by the explicit `mpifc data "
        "prepare cifar10 SOURCE`, through _ArrayOnlyUnpickler",
    ("data/prepare.py", "pickle.load"):
        "_ArrayOnlyUnpickler subclasses pickle.Unpickler and refuses every global except "
        "the NumPy array reconstructors (find_class), so a batch file cannot run code",
    ("comm/communicator.py", "mpi4py object call"):
        "bcast_obj/gather_obj/allgather_obj/allreduce_obj: messages from peer ranks of the "
        "same job (small metadata), never bytes read from a file",
}


def code_only(text: str) -> str:
    """The source with comments and string literals blanked out (line numbers kept)."""
    lines = [list(ln) for ln in text.split("\n")]
    drop = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in drop:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0 - 1, r1):
            lo = c0 if r == r0 - 1 else 0
            hi = c1 if r == r1 - 1 else len(lines[r])
            lines[r][lo:hi] = " " * (hi - lo)
    return "\n".join("".join(ln) for ln in lines)


def scan(root: str = PACKAGE) -> dict:
    """{(relative file, pattern name): [line numbers]} of every hit in the package."""
    hits: dict = {}
    for d, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            full = os.path.join(d, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            with open(full, encoding="utf-8") as f:
                text = f.read()
            if not any(re.search(rx, text) for rx in PATTERNS.values()):
                continue                    # no hit even in comments and strings
            code = code_only(text)
            for lineno, line in enumerate(code.splitlines(), 1):
                for pname, rx in PATTERNS.items():
                    if re.search(rx, line):
                        hits.setdefault((rel, pname), []).append(lineno)
    return hits


def test_no_unpickle_eval_exec_outside_the_allow_list():
    hits = scan()
    bad = {k: v for k, v in hits.items() if k not in ALLOW}
    assert not bad, "\n".join(f"mpifc/{f}:{lines} uses {p} (add a reason to ALLOW only if it "
                              f"never reads file content)" for (f, p), lines in bad.items())


def test_allow_list_is_not_stale():
    hits = scan()
    stale = [k for k in ALLOW if k not in hits]
    assert not stale, f"allow-list entries no longer needed: {stale}"
    assert all(len(reason) > 40 for reason in ALLOW.values())


@pytest.mark.parametrize("snippet,pattern", [
    ("import pickle\nx = pickle.load(f)\n", "pickle.load"),
    ("cfg = eval(text)\n", "eval("),
    ("exec(code, {})\n", "exec("),
    ("a = np.load(p, allow_pickle=True)\n", "allow_pickle=True"),
    ("subprocess.run(cmd, shell=True)\n", "shell=True"),
    ("r = self.mpi.bcast(obj, root=0)\n", "mpi4py object call"),
])
def test_scanner_finds_each_pattern(tmp_path, snippet, pattern):
    (tmp_path / "m.py").write_text(snippet)
    assert (("m.py", pattern) in scan(str(tmp_path)))


def test_scanner_ignores_methods_docs_and_comments(tmp_path):
    (tmp_path / "m.py").write_text('"""never eval( or pickle.load here"""\n'
                                   "model.eval()\n"
                                   "def eval(self):  # eval( in a comment\n"
                                   "    return 'exec(x)'\n")
    assert scan(str(tmp_path)) == {}
