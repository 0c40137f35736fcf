"""A default corpus that exists offline on every machine: the Python standard library's prose.

Documents are the English-looking docstrings (modules, classes, functions) and full-line
comment blocks of the installed stdlib's .py files (test packages and site-packages excluded,
doctest lines dropped, exact duplicates removed), plus the reference texts of
`pydoc_data/topics.py` -- about 2.2 MB of text, ~5k documents, in a deterministic order.
(Test packages would add 0.4 MB for 4x the parse time, so they are left out.) It goes
through the same tfds builder machinery as local files, with a 5% content-hash validation
holdout:

    {data_dir}/t5x_lite_default_corpus/py3.11-{hash}/1.0.0/

The config name hashes the Python version and the stdlib file listing (sizes, mtimes), so a
different interpreter gets its own copy. `default_vocab()` trains (once, cached next to it) the
sentencepiece model the quickstart uses.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import sys
import sysconfig
import warnings

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from t5x_lite import files
from t5x_lite import vocab as vocab_lib
from t5x_lite.data import builders

MIN_CHARS = 120
MIN_WORDS = 15
VALIDATION_FRACTION = 0.05
DEFAULT_VOCAB_SIZE = 8000
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_STOPWORDS = re.compile(r"\b(the|a|an|is|are|of|to|and|in|for|this|that|be|if|it)\b", re.I)
_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)( |$)")


def stdlib_files(stdlib_dir: str | None = None) -> list[str]:
    """Sorted .py files of the standard library, without tests and third-party packages."""
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS)
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return files


def looks_english(text: str) -> bool:
    """Long enough, mostly letters and spaces, and with common English function words."""
    if len(text) < MIN_CHARS or len(text.split()) < MIN_WORDS:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters >= 0.8 * len(text) and len(_STOPWORDS.findall(text)) >= 5


def _clean(doc: str) -> str:
    lines = [line for line in doc.splitlines() if not _DOCTEST.match(line)]
    return "\n".join(lines).strip()


def _file_documents(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except (SyntaxError, ValueError, OSError):
        return []  # e.g. lib2to3 test data written in Python 2
    docs = []
    for node in ast.walk(tree):  # ast.walk order is deterministic
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(_clean(doc))
        elif (path.endswith(os.path.join("pydoc_data", "topics.py"))
              and isinstance(node, ast.Constant) and isinstance(node.value, str)):
            docs.append(node.value.strip())  # the language reference, one text per topic
    return docs + _comment_blocks(source.decode("utf-8", errors="replace"))


def _comment_blocks(source: str) -> list[str]:
    """Runs of consecutive full-line `#` comments, joined into one paragraph each."""
    blocks, block = [], []
    for line in source.splitlines() + [""]:
        s = line.strip()
        if s.startswith("#") and not s.startswith(("#!", "# -*-")):
            block.append(s.lstrip("#").strip())
        elif block:
            blocks.append(" ".join(b for b in block if b))
            block = []
    return blocks


def extract_documents(stdlib_dir: str | None = None) -> list[str]:
    """The corpus documents, deterministic for a given Python installation."""
    seen, out = set(), []
    for path in stdlib_files(stdlib_dir):
        for doc in _file_documents(path):
            if doc not in seen and looks_english(doc):
                seen.add(doc)
                out.append(doc)
    return out


@dataclasses.dataclass
class DefaultCorpusConfig(tfds.core.BuilderConfig):
    kind: str = "text"
    stdlib_dir: str = ""


class DefaultCorpus(builders.DocumentsBuilder):
    """Python stdlib docstrings as a text dataset with train / validation splits."""

    name = "t5x_lite_default_corpus"

    def _plan(self):
        docs = extract_documents(self.builder_config.stdlib_dir or None)
        if not docs:
            raise builders.EmptyCorpusError(
                f"empty corpus: no English docstrings under {self.builder_config.stdlib_dir}")
        hashes = [builders.record_hash({"text": d}) for d in docs]
        overrides = builders.holdout_overrides(hashes, VALIDATION_FRACTION)
        val = [builders.in_validation(h, VALIDATION_FRACTION, overrides) for h in hashes]

        def split(want_val):
            return lambda: ((i, {"text": d}) for i, (d, v) in enumerate(zip(docs, val))
                            if v == want_val)

        sizes = {builders.TRAIN: val.count(False), builders.VALIDATION: val.count(True)}
        metadata = {"kind": "text", "split_sizes": sizes, "characters": sum(map(len, docs)),
                    "python": sys.version.split()[0]}
        return {builders.TRAIN: split(False), builders.VALIDATION: split(True)}, metadata


def default_corpus_config(stdlib_dir: str | None = None) -> DefaultCorpusConfig:
    root = stdlib_dir or sysconfig.get_paths()["stdlib"]
    listing = []
    for path in stdlib_files(root):
        st = os.stat(path)
        listing.append([os.path.relpath(path, root), st.st_size, st.st_mtime_ns])
    if not listing:
        raise builders.EmptyCorpusError(f"empty corpus: no .py files under {root}")
    params = [MIN_CHARS, MIN_WORDS, VALIDATION_FRACTION, builders.BUILDER_VERSION, root]
    py = "py{}.{}".format(*sys.version_info[:2])
    name = f"{py}-{builders._fingerprint([listing, params])}"  # pylint: disable=protected-access
    return DefaultCorpusConfig(name=name, stdlib_dir=root,
                               description=f"docstrings of {len(listing)} stdlib files in {root}")


def prepare_default_corpus(data_dir=None, stdlib_dir: str | None = None) -> DefaultCorpus:
    """Builds (first call, ~5-10 s) or reuses the default corpus under `data_dir`."""
    builder = DefaultCorpus(config=default_corpus_config(stdlib_dir),
                            data_dir=str(builders.resolve_data_dir(data_dir)),
                            file_format="array_record")
    return builders.prepare(builder)


def default_vocab(data_dir=None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                  extra_ids: int = vocab_lib.DEFAULT_EXTRA_IDS) -> vocab_lib.Vocabulary:
    """The quickstart vocabulary: sentencepiece trained on the default corpus' train split.

    Trained once (about 1-2 s for 8000 pieces) and cached as
    `{data_dir}/t5x_lite_vocab/{corpus config}-sp{vocab_size}.model`.
    """
    corpus = prepare_default_corpus(data_dir)
    path = (builders.resolve_data_dir(data_dir) / "t5x_lite_vocab" /
            f"{corpus.builder_config.name}-sp{vocab_size}.model")
    if not path.exists():
        with files.host_lock(path):  # trained once per host, not by each of several runs
            if not path.exists():
                source = corpus.as_data_source(builders.TRAIN)
                texts = (source[i]["text"].decode("utf-8") for i in range(len(source)))
                tmp_prefix = str(path)[:-len(".model")] + f".tmp{os.getpid()}"
                written = vocab_lib.train_vocab(texts, tmp_prefix, vocab_size)
                # Atomic, and over a copy another host wrote to a shared data_dir meanwhile.
                epath.Path(written).replace(path)
                logging.info("trained default vocabulary %s", path)
    return vocab_lib.Vocabulary(path, extra_ids=extra_ids)
