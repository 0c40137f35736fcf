"""Small deterministic corpora and vocabularies for tests (no network, ~0.5 s to build)."""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile

import numpy as np
from etils import epath

from t5x_lite import vocab as vocab_lib

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can out some other into time only new these two may first then do any like my now "
    "over such our man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go "
    "came right used take three function returns value object string list number argument "
    "module class method default optional instance python error raised called given file data"
).split()


def sentences(num: int, seed: int = 0, min_words: int = 4, max_words: int = 30) -> list[str]:
    """Pseudo-English sentences from a fixed word list (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        words = rng.choice(_WORDS, size=int(rng.integers(min_words, max_words + 1)))
        out.append(" ".join(words).capitalize() + ".")
    return out


def documents(num: int, seed: int = 0, max_sentences: int = 12) -> list[str]:
    """Documents of 1..max_sentences sentences each."""
    rng = np.random.default_rng(seed + 1)
    pool = sentences(num * max_sentences, seed)
    out, pos = [], 0
    for _ in range(num):
        n = int(rng.integers(1, max_sentences + 1))
        out.append(" ".join(pool[pos:pos + n]))
        pos += n
    return out


@functools.lru_cache(maxsize=4)
def tiny_vocab(vocab_size: int = 400, extra_ids: int = 100) -> vocab_lib.Vocabulary:
    """A sentencepiece vocabulary trained on `sentences(3000)`, cached in the temp dir."""
    texts = sentences(3000)
    key = hashlib.sha1(("\n".join(texts) + f"|{vocab_size}").encode()).hexdigest()[:12]
    path = epath.Path(tempfile.gettempdir()) / "t5x_lite_tiny_vocab" / f"{key}.model"
    if not path.exists():
        tmp = vocab_lib.train_vocab(texts, f"{path}.{os.getpid()}", vocab_size)
        tmp.replace(path)  # atomic: parallel test workers never read half a file
    return vocab_lib.Vocabulary(path, extra_ids=extra_ids)
