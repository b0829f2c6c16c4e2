"""Text at the I/O edge: the jieba tokenizer and VADER's English lexicon for :mod:`infogap.models.sentiment`.

:mod:`infogap.models` reads no files, so what needs a dictionary on disk lives here:

- :func:`tokenizer`: Chinese words by ``jieba`` (one ``jieba.Tokenizer`` instance, loaded on first use; jieba keeps
  a cache file of its dictionary in the temp directory) for CJK runs, and :func:`~infogap.models.sentiment.plain_tokens`'
  rules for everything else (Latin words lowercased, ``n't`` -> ``not``, ``not_<word>`` after a negator);
- :func:`english_lexicon`: VADER's lexicon (``vaderSentiment``), valences scaled from [-4, 4] to [-1, 1];
- :func:`default_lexicon`: the Chinese seed lexicon with VADER's English words, negators and boosters;
- :func:`sentiment_model`: the model the workers read and learn reviews with (both of the above).

>>> tok = tokenizer()
>>> tok("质量很好，but shipping wasn't fast")
['质量', '很', '好', 'but', 'shipping', 'was', 'not', 'fast', 'not_fast']
>>> lex = default_lexicon()
>>> lex.score_text("not good") < 0 < lex.score_text("很满意")
True
"""
from __future__ import annotations

import logging
import re
import threading
import warnings

from infogap.models.sentiment import (BOOSTERS, CJK_CHARS, NEGATORS, Lexicon, SentimentModel, Tokenizer,
                                      chinese_seed_lexicon, plain_tokens)

_CJK_RUN = re.compile(f"[{CJK_CHARS}]+")
_lock = threading.Lock()
_jieba: list = []  # the one jieba.Tokenizer, once loaded
_english: list = []  # VADER's lexicon, once read


def _jieba_tokenizer():
    """The shared ``jieba.Tokenizer``, loaded (dictionary parsed or read from its cache) on first use."""
    if not _jieba:
        with _lock:
            if not _jieba:
                with warnings.catch_warnings():  # jieba 0.42 imports the deprecated pkg_resources
                    warnings.simplefilter("ignore")
                    import jieba

                jieba.setLogLevel(logging.WARNING)  # "Building prefix dict..." is DEBUG on stderr otherwise
                t = jieba.Tokenizer()
                t.initialize()
                _jieba.append(t)
    return _jieba[0]


def tokenizer() -> Tokenizer:
    """A tokenizer for :class:`~infogap.models.sentiment.SentimentModel`: jieba words for CJK runs, the rules of
    :func:`~infogap.models.sentiment.plain_tokens` for the rest (:func:`jieba_tokens`, a module-level function, so
    that an engine holding it pickles). jieba is loaded at the first Chinese text, once per process (about a
    second the first time, then from its cache, and ~70 MB: a worker that never reads a Chinese review never
    pays them). One instance may be shared by the threads of one worker: jieba's ``lcut`` holds no per-call
    state on the tokenizer once it is initialised."""
    return jieba_tokens


def jieba_tokens(text: str) -> list[str]:
    """The tokens of :func:`tokenizer` (loads jieba at the first CJK run)."""
    cut = None
    out: list[str] = []
    pos = 0
    for m in _CJK_RUN.finditer(text):
        if m.start() > pos:
            out += plain_tokens(text[pos:m.start()])
        if cut is None:
            cut = _jieba_tokenizer().lcut
        out += cut(m.group(), HMM=True)
        pos = m.end()
    if pos < len(text):
        out += plain_tokens(text[pos:])
    return out


def english_lexicon() -> dict[str, float]:
    """VADER's lexicon (``vaderSentiment`` 3.3.2 reads it from its package directory): each single-word entry that
    :func:`plain_tokens` keeps whole (no emoticons, no phrases), its mean valence divided by 4 into [-1, 1].

    >>> en = english_lexicon()
    >>> en["good"], en["horrible"], ":)" in en
    (0.475, -0.625, False)
    """
    if not _english:
        with _lock:
            if not _english:
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

                raw = SentimentIntensityAnalyzer().lexicon
                _english.append({w: max(-1.0, min(1.0, v / 4.0)) for w, v in raw.items()
                                 if plain_tokens(w) == [w]})
    return dict(_english[0])


def english_negators_and_boosters() -> tuple[frozenset[str], dict[str, float]]:
    """VADER's negations (the forms :func:`plain_tokens` can produce) and its boosters as multipliers: an increment
    of its ``B_INCR`` becomes 1.3, a decrement 0.7."""
    from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE

    negators = frozenset(w for w in NEGATE if plain_tokens(w) == [w])
    boosters = {w: (1.3 if b > 0 else 0.7) for w, b in BOOSTER_DICT.items() if plain_tokens(w) == [w]}
    return negators, boosters


def default_lexicon() -> Lexicon:
    """The Chinese seed lexicon and VADER's English one in one :class:`Lexicon`, with both languages' negators
    and boosters (the seed lexicon's win where they overlap)."""
    negators, boosters = english_negators_and_boosters()
    return Lexicon({**english_lexicon(), **chinese_seed_lexicon()}, negators=NEGATORS | negators,
                   boosters={**boosters, **BOOSTERS})


def sentiment_model() -> SentimentModel:
    """The sentiment model the workers read reviews with (user stages) and learn (the population learner): jieba
    words (the topic model reads them too, and Chinese topics read better as words than as characters) and
    :func:`default_lexicon`."""
    return SentimentModel(tokenizer(), lexicon=default_lexicon())
