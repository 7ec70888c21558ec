"""Text for calibration and evaluation: the Wikipedia excerpt that the gensim wheel ships.

The excerpt (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``) is cleaned with
gensim's ``extract_pages`` + ``filter_wiki``, redirects dropped, and the articles joined by blank lines.
Evaluation text is the LAST ``eval_chars`` characters (200,000 by default, as vLLM's reference figures
in ``shared/gpu/README.md`` use: 40 windows of 1024 tokens); calibration text is taken from the
beginning and never reaches into the evaluation text.

For code models (Qwen2.5-Coder) there is a second text, ``text="stdlib"``: Python standard-library source
files of the running interpreter (a fixed list per part, disjoint; see ``STDLIB_FILES``). Each file is
tokenized on its own and cut into windows, and the windows are taken from the files in turn (first window
of every file, then the second ...), so that even a few windows cover several files.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import re
import sysconfig
from pathlib import Path

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_CHARS = 200_000
WINDOW = 1024
TEXTS = ("wiki", "stdlib")
# Modules that are single files from Python 3.9 to 3.13; the parts never share a file.
STDLIB_FILES = {
    "calibration": ("argparse.py", "configparser.py", "dataclasses.py", "enum.py", "functools.py", "inspect.py",
                    "pathlib.py", "pickle.py", "subprocess.py", "typing.py"),
    "evaluation": ("difflib.py", "heapq.py", "ipaddress.py", "shutil.py", "statistics.py", "tarfile.py",
                   "textwrap.py", "threading.py"),
}


def wiki_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("gensim is not installed (pip install gensim==4.4.0): it ships the Wikipedia text")
    p = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / WIKI_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing from the gensim package")
    return p


@functools.lru_cache(maxsize=1)
def wiki_text() -> str:
    """The whole cleaned excerpt, articles joined by blank lines."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    parts = []
    with bz2.open(wiki_path(), "rb") as f:
        for title, text, _pageid in extract_pages(f):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            clean = filter_wiki(text)
            clean = re.sub(r"\n{3,}", "\n\n", clean).strip()
            if clean:
                parts.append(f"{title}\n\n{clean}")
    return "\n\n".join(parts)


def split_text(eval_chars: int = EVAL_CHARS) -> tuple[str, str]:
    """(calibration text, evaluation text): evaluation = the last ``eval_chars`` characters."""
    text = wiki_text()
    if eval_chars >= len(text):
        raise ValueError(f"eval_chars={eval_chars} leaves no calibration text (the excerpt has {len(text)} chars)")
    return text[:-eval_chars], text[-eval_chars:]


def token_windows(tokenizer, text: str, window: int = WINDOW, limit: int | None = None,
                  from_end: bool = False) -> list[list[int]]:
    """Consecutive non-overlapping windows of ``window`` token ids (no special tokens).

    ``limit`` keeps that many windows: the first ones, or the last ones with ``from_end``.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    wins = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    if limit is not None:
        wins = wins[-limit:] if from_end else wins[:limit]
    return wins


def stdlib_texts(part: str, root: str | Path | None = None) -> list[tuple[str, str]]:
    """(file name, source) of the standard-library files of ``part`` ("calibration" or "evaluation"), sorted.

    ``root`` defaults to the running interpreter's standard library (so the text depends on its version).
    """
    if part not in STDLIB_FILES:
        raise ValueError(f"part must be one of {sorted(STDLIB_FILES)}, not {part!r}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for name in sorted(STDLIB_FILES[part]):
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the stdlib text needs {', '.join(STDLIB_FILES[part])}")
        out.append((name, path.read_text(encoding="utf-8")))
    return out


def interleave(per_file: list[list[list[int]]], limit: int | None = None) -> list[list[int]]:
    """Windows of several files taken in turn: every file's first window, then every file's second, ..."""
    out: list[list[int]] = []
    for i in range(max((len(w) for w in per_file), default=0)):
        out.extend(w[i] for w in per_file if i < len(w))
    return out if limit is None else out[:limit]


def stdlib_windows(tokenizer, part: str, n: int | None = None, window: int = WINDOW,
                   root: str | Path | None = None) -> list[list[int]]:
    """Windows of ``window`` tokens of the stdlib ``part``, files in turn (see ``interleave``); the first ``n``."""
    return interleave([token_windows(tokenizer, src, window) for _name, src in stdlib_texts(part, root)], n)


def eval_windows(tokenizer, n: int | None = None, window: int = WINDOW,
                 eval_chars: int = EVAL_CHARS, text: str = "wiki") -> list[list[int]]:
    """The evaluation windows (all of them by default: 40 for SmolLM2), the first ``n`` if given."""
    if text == "stdlib":
        return stdlib_windows(tokenizer, "evaluation", n, window)
    return token_windows(tokenizer, split_text(eval_chars)[1], window, n)


def calibration_windows(tokenizer, n: int, window: int = WINDOW, eval_chars: int = EVAL_CHARS,
                        text: str = "wiki") -> list[list[int]]:
    """``n`` windows from the beginning of the calibration text (disjoint from the evaluation text)."""
    if text == "stdlib":
        wins = stdlib_windows(tokenizer, "calibration", n, window)
    else:
        wins = token_windows(tokenizer, split_text(eval_chars)[0], window, n)
    if len(wins) < n:
        raise ValueError(f"only {len(wins)} calibration windows of {window} tokens are available")
    return wins
