"""Online sentiment of reviews: what a rating teaches, learned from the stream, predicted for the rest.

A ``review`` event carries a text (Chinese or English) and perhaps a rating. :func:`label_of` turns a rating into
a label (4 and up positive, 2 and below negative, else none); :class:`SentimentModel` learns the texts of labelled
reviews one at a time (``learn_one``) and gives P(positive) for any text (``predict_one``).

**The model** is two River models stacked:

1. a multinomial naive Bayes (:class:`river.naive_bayes.MultinomialNB`, Lidstone ``alpha`` 0.5) over the *set* of
   the review's tokens (presence, not counts: better on short reviews), whose log-odds is read over the tokens it
   knows (an unknown token would otherwise favour the class with fewer tokens);
2. a tiny online logistic regression (:class:`river.linear_model.LogisticRegression`, SGD) over two features: that
   log-odds (divided by ``nb_scale`` and clipped to [-5, 5]) and the :class:`Lexicon` score of the text. It learns
   each review *before* the naive Bayes does, so it sees the log-odds of a text not yet learned, as at prediction
   time: it calibrates the naive Bayes' overconfident odds and learns how much to trust the lexicon. Its lexicon
   weight starts at ``lexicon_weight`` (3), so that before any learning the prediction is the lexicon prior alone,
   ``sigmoid(3 * score)``, 0.5 for a text with no lexicon word.

Measured prequentially on 35,123 labelled Chinese shopping reviews (``infogap evaluate-reviews``,
docs/sentiment.md), the lexicon adds 2.8 points of accuracy and 2.5 of AUC on texts the model has not seen before
over the naive Bayes alone; logistic regression on the tokens alone and River's ``ComplementNB`` (which sums over
the whole vocabulary for every prediction) did worse or were too slow.

**Tokens.** :func:`plain_tokens`, the default, needs no dictionary: CJK runs become characters and character
bigrams, Latin words are lowercased with ``n't`` split off. A word tokenizer (jieba, in
:mod:`infogap.stream.text`) can be passed instead; on the reviews both score within half a point, plain being
twice as fast.

**Bounded memory.** The naive Bayes keeps counts for at most ``max_vocab * (1 + prune_slack)`` tokens: past that it
drops all but the ``max_vocab`` most frequent (newest first among ties) and their counts from the class totals.

**State.** :meth:`SentimentModel.to_state` is plain JSON-safe data (about 1 MB at 50,000 tokens),
:meth:`SentimentModel.from_state` validates it and restores a model that predicts identically.

Pure: no I/O, no clock, no randomness. Reads never change what the model predicts.

>>> m = SentimentModel()
>>> m.predict_one("今天到的"), round(m.predict_one("很满意"), 2)
(0.5, 0.87)
>>> for text, positive in [("质量很好，很喜欢", True), ("太差了，退货", False)] * 20:
...     m.learn_one(text, positive)
>>> m.predict_one("质量很好") > 0.5 > m.predict_one("质量太差")
True
"""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping

import numpy as np


Tokenizer = Callable[[str], list[str]]

# ----------------------------------------------------------------------------------------------- tokens
#: Han ideographs (with extension A and the compatibility block), kana and hangul: tokenised by character.
CJK_CHARS = _CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN_RE = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<word>[^\W_{_CJK}]+(?:'[^\W_{_CJK}]+)*)|(?P<stop>[.,;:!?\u3002\u3001])")
#: English negators after which the next word is also emitted as ``not_<word>``.
_LATIN_NEGATORS = frozenset({"not", "no", "never", "nor", "cannot", "without"})
_NT_BASES = {"can": "can", "ca": "can", "wo": "will", "sha": "shall", "ai": "is"}


def _normal(text: str) -> str:
    """NFKC (full-width letters, digits and punctuation to ASCII), curly apostrophes straight, lowercased."""
    return unicodedata.normalize("NFKC", text).replace("\u2019", "'").lower()


def _latin(word: str, out: list[str]) -> None:
    """Append the tokens of one Latin/digit word: ``don't`` -> ``do``, ``not``; ``can't`` -> ``can``, ``not``."""
    if word.endswith("n't"):
        base = word[:-3]
        base = _NT_BASES.get(base, base)
        if base:
            out.append(base)
        out.append("not")
    elif word == "cannot":
        out += ("can", "not")
    else:
        out.append(word)


def plain_tokens(text: str) -> list[str]:
    """The default tokenizer, with no dictionary: Latin/digit words lowercased, CJK runs as characters and bigrams.

    ``n't`` becomes a separate ``not``; the word after an English negator (``not``, ``no``, ``never``, ``nor``,
    ``without``) is also emitted as ``not_<word>``, so that "not good" and "good" are different features. A CJK
    run gives each character followed by the bigram it starts (``不好吃`` -> ``不 不好 好 好吃 吃``). Punctuation
    and spaces only separate tokens. Pure; full-width forms are folded (NFKC).

    >>> plain_tokens("质量不错，Don't hesitate! 5星")
    ['质', '质量', '量', '量不', '不', '不错', '错', 'do', 'not', 'hesitate', 'not_hesitate', '5', '星']
    """
    out: list[str] = []
    negated = False
    for m in _TOKEN_RE.finditer(_normal(text)):
        if m.group("stop") is not None:
            negated = False
            continue
        run = m.group("cjk")
        if run is not None:
            negated = False
            last = len(run) - 1
            for i, ch in enumerate(run):
                out.append(ch)
                if i < last:
                    out.append(run[i:i + 2])
            continue
        start = len(out)
        _latin(m.group("word"), out)
        last = out[-1]
        if negated:
            out.append("not_" + out[start])
        negated = last in _LATIN_NEGATORS
    return out


def label_of(rating: float | None, *, positive_min: float = 4.0, negative_max: float = 2.0) -> bool | None:
    """What a rating teaches: ``True`` (positive) at or above ``positive_min``, ``False`` (negative) at or below
    ``negative_max``, ``None`` for no rating, a rating in between, or a rating that is not a finite number.

    >>> [label_of(r) for r in (5, 4.0, 3, 2, 1, None)]
    [True, True, None, False, False, None]
    """
    if positive_min <= negative_max:
        raise ValueError(f"positive_min ({positive_min}) must be above negative_max ({negative_max})")
    if rating is None or isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        return None
    if rating >= positive_min:
        return True
    if rating <= negative_max:
        return False
    return None


# ---------------------------------------------------------------------------------------------- lexicon
#: The hand-written Chinese seed lexicon, by valence: common words and phrases of shopping, book and service
#: reviews, written from general knowledge of the language (not read off any labelled data). Valence 0 entries
#: are neutral words that contain a sentiment character, listed so that longest-match segmentation does not
#: misread them (好像 "seems", 差不多 "about", 不过 "but", 无线 "wireless").
_ZH_SEED = {
    1.0: "五星 完美 超赞 极好 太棒了 好极了 非常满意 物超所值 强烈推荐 爱不释手 无可挑剔 十全十美 五星好评 "
         "超级好 超值 一流 满分 好评如潮 赞不绝口 完美无缺",
    0.8: "好评 很好 真好 非常好 棒 很棒 赞 点赞 精彩 优秀 出色 卓越 惊喜 惊艳 满意 很满意 喜欢 很喜欢 推荐 "
         "值得推荐 值得购买 值得一读 值得一看 值得拥有 性价比高 物美价廉 价廉物美 经济实惠 给力 完好 正品 放心 "
         "靠谱 信赖 好用 好看 好吃 好听 好玩 漂亮 美观 精美 精致 舒服 舒适 划算 实惠 开心 高兴 愉快 满足 感动 "
         "感人 经典 受益匪浅 神速 周到 贴心 热情 专业 良心 诚信 回购 还会再来 会再来 还会再买 会再买 支持 厉害 "
         "神器 好书 佳作 好货 好东西 美味 可口 正宗 清晰 流畅 耐用 结实 牢固 细腻 柔软 合身 大气 上档次 有品位 "
         "喜爱 热爱 享受 幸福 称心 如意 中意 钟爱 优质 优良 质量好 质量不错 服务好 速度快 发货快 到货快 物流快 顶",
    0.6: "不错 挺好 挺不错 蛮好 很不错 还不错 相当不错 好 爱 值 值得 实用 方便 便捷 快 迅速 及时 准时 快捷 耐心 "
         "细心 认真 负责 谢谢 感谢 感激 稳定 扎实 干净 整洁 新鲜 香 有趣 有意思 生动 轻便 轻巧 小巧 时尚 大方 "
         "质感 合适 适合 完整 无损 齐全 清楚 启发 受益 学到 收获 难得 不愧 好感 期待 亮点 省心 省事 安心 "
         "够用 超快 很快 够快 顺利 成功 美 帅 可爱 温馨 温暖 亲切 友好 礼貌 正版 原装 全新 轻松 持久 耐久 "
         "划得来 便宜 优惠 降价 值了 没问题 没有问题 无压力 完胜 高效 灵敏 精准 准确 真实 诚实 透彻 深刻 "
         "细致 全面 丰富 厚道 用心 尽心 舒心 爽 下次还会 突破",
    0.3: "还行 还可以 可以 还好 尚可 凑合 过得去 ok 简单 正常 一致 符合 相符 包装好 按时 正好 刚好 合理 "
         "挺快 安静 静音 有用 帮助 帮到 讲究 保障 放松 再买",
    -0.3: "一般 一般般 马马虎虎 差强人意 偏贵 偏小 偏大 勉强 不如 稍贵 略贵 有点贵 贵了 麻烦 复杂 啰嗦 拖沓 "
          "少了 旧 二手 吵 发热 发烫 延迟 等了 很久 太久 迟 晚了 换货 退换 可惜 遗憾 无奈 吐槽 担心 "
          "怀疑 将就 凑数 平淡 平庸 普通 误差 色差 缺点 不足 疑问 搞不懂 看不懂 费劲 费事 费力 乱 慢了 掉 松 "
          "歪 皱",
    -0.6: "差 慢 贵 太贵 很贵 问题 毛病 故障 瑕疵 划痕 破 破了 坏 坏了 断 断了 裂 裂了 变形 掉色 褪色 起球 开线 "
          "脱线 漏 漏水 异味 刺鼻 臭 脏 粗糙 难用 难看 难吃 难听 难受 郁闷 无语 生气 烦 烦人 失败 错误 错 没用 "
          "无用 鸡肋 浪费 白买 缩水 磨脚 死机 蓝屏 黑屏 花屏 闪退 坏点 卡顿 很卡 太卡 噪音 慢吞吞 拖拉 迟迟 敷衍 "
          "推脱 推诿 退款 退钱 少发 漏发 发错 错发 丢件 丢失 投诉 悲剧 杯具 吐血 无聊 枯燥 乏味 肤浅 空洞 误导 "
          "错字 模糊 翻新 压坏 破损 损坏 磨损 残缺 过期 变质 发霉 不值 不靠谱 不给力 太慢 很慢 真慢 不好用 "
          "不怎么样 不满 不爽 讨厌 后悔 可恶 痛苦 心痛 担忧 糟 别买 不要买 慎买 忽悠 夸大 牵强 矛盾 失误 "
          "拒绝 不理 不回 缺货 断货 涨价 乱收费 多收 坑 态度差",
    -0.9: "很差 太差 真差 差劲 极差 超差 特差 差评 一星 失望 很失望 太失望 非常失望 大失所望 退货 垃圾 太垃圾 "
          "垃圾货 破烂 假货 假 冒牌 山寨 盗版 劣质 次品 残次品 伪劣 上当 受骗 骗 骗子 骗人 欺骗 虚假 坑爹 坑人 "
          "糟糕 太糟糕 恶劣 恶心 愤怒 气愤 愤慨 名不副实 货不对板 以次充好 不负责任 最差 极烂 烂 太烂 烂透 "
          "再也不 再也不会 永远不 不会再买 再也不买 后悔死了 气死 骗钱 黑心 奸商 无良 欺诈 坑钱 差到极点",
    0.0: "好像 好几 好多 好些 好久 只好 最好 好不好 好处 好奇 爱好 不过 不管 不管怎样 不同 不少 不断 不仅 不但 "
         "不光 不只 不得不 差不多 差点 差价 相差 差异 差别 出差 不用 不知道 不知 不清楚 无论 不论 无线 无限 "
         "无关 没想到 不好意思 不一定 不久 不然 不如说 不禁 不停 不已 不免 不在乎 快递 快乐 价格 价钱 价值 "
         "质量 服务 客服 物流 包装 东西 感觉 觉得 请问 无所谓 爱情 恋爱 一般来说 假期 放假 暑假 寒假 请假 "
         "真假 美国 美元 香港 香蕉 晚上 积累 累计 短信 硬盘 慢慢 开心果 退出 可以说",
}
#: Words that flip the valence of a sentiment word that follows within the negation window.
NEGATORS = frozenset("不 没 没有 别 无 未 毫无 并不 并没有 并非 绝不 从不 从没 从来没有 不是 不太 不够 不怎么 一点也不 "
                     "一点都不 毫不 算不上 谈不上 称不上 不再 不会 不能 无法 没法 不可能 甭 勿 不要 不必 不至于 "
                     "not no never nor without none nobody nothing neither nowhere hardly barely rarely seldom".split())
#: Words that strengthen (> 1) or soften (< 1) the next sentiment word within the window.
BOOSTERS = {**dict.fromkeys("很 非常 特别 太 超 超级 十分 极 极其 极度 最 相当 真 真的 实在 确实 巨 贼 "
                            "特 蛮 挺 更 更加 越来越 格外 分外 尤其 绝对 完全 简直".split(), 1.3),
            **dict.fromkeys("比较 有点 有点儿 有些 稍 稍微 略 略微 还 还算 算是 基本 基本上 一点 些许".split(), 0.7),
            **dict.fromkeys("very really extremely so too totally absolutely completely highly incredibly quite "
                            "most more especially particularly truly utterly".split(), 1.3),
            **dict.fromkeys("slightly somewhat kinda barely marginally partly little bit".split(), 0.7)}
#: Contrast words: what comes after one weighs ``1.5``, what came before it ``0.5`` (as in VADER's "but").
CONTRASTS = frozenset("但 但是 可是 不过 然而 只是 but however though yet".split())


def chinese_seed_lexicon() -> dict[str, float]:
    """The hand-written Chinese seed lexicon: ~600 words and phrases of shopping, book and service reviews -> valence
    in [-1, 1] (0 for neutral words listed only so that segmentation does not misread them). Its negators, boosters
    and contrast words are :data:`NEGATORS`, :data:`BOOSTERS` and :data:`CONTRASTS`, the defaults of :class:`Lexicon`.

    >>> zh = chinese_seed_lexicon()
    >>> zh["满意"] > 0 > zh["失望"], zh["差不多"], len(zh) > 500
    (True, 0.0, True)
    """
    return {word: valence for valence, words in _ZH_SEED.items() for word in words.split()}


_STOP = "."


@functools.lru_cache(maxsize=1)
def default_seed_lexicon() -> "Lexicon":
    """The Chinese seed lexicon with the default negators, boosters and contrasts (built once and shared: a
    :class:`Lexicon` is never changed after construction)."""
    return Lexicon(chinese_seed_lexicon())


class Lexicon:
    """A lexicon prior: token -> valence in [-1, 1], with negation, boosters and contrast words.

    :meth:`score` reads a token list left to right: a negator (``不``, ``没有``, ``not``...) flips the valence of the
    next sentiment word within ``window`` tokens (times ``negation``; two negators cancel), a booster multiplies it
    (``很`` 1.3, ``有点`` 0.7), a contrast word (``但是``, ``but``) halves what came before and weighs what follows
    1.5 times, punctuation ends the reach of negators and boosters. The sum ``s`` is squashed to
    ``s / sqrt(s² + alpha)`` (VADER's normalisation, with its alpha 15 on valences four times larger), 0 when no
    sentiment word was read.

    :meth:`tokens` segments a text for :meth:`score` with no dictionary but the lexicon's own words: CJK runs by
    forward longest match over them (other characters one by one), Latin words as :func:`plain_tokens` does
    (``n't`` -> ``not``), punctuation as a stop token. So the prior does not depend on the model's tokenizer.

    >>> lex = Lexicon(chinese_seed_lexicon())
    >>> lex.tokens("很不错，但是不好用")
    ['很不错', '.', '但是', '不好用']
    >>> [round(lex.score_text(t), 2) for t in ("不错", "不好", "不是很好", "没有问题", "还行吧", "今天到的")]
    [0.53, -0.42, -0.53, 0.53, 0.3, 0.0]
    >>> en = Lexicon({"good": 0.475, "bad": -0.625})
    >>> en.score_text("not good") < 0 < en.score_text("isn't bad")
    True
    """

    def __init__(self, valences: Mapping[str, float], *, negators: Iterable[str] = NEGATORS,
                 boosters: Mapping[str, float] = BOOSTERS, contrasts: Iterable[str] = CONTRASTS,
                 window: int = 3, negation: float = -0.75, alpha: float = 15 / 16):
        self.window = int(window)
        self.negation = float(negation)
        self.alpha = float(alpha)
        if self.window < 1 or not 0.0 < self.alpha or not -1.0 <= self.negation <= 0.0:
            raise ValueError(f"Lexicon needs window >= 1, alpha > 0 and negation in [-1, 0] "
                             f"(got {window}, {alpha}, {negation})")
        self._valences: dict[str, float] = {}
        for word, v in valences.items():
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"lexicon word {word!r} is not a non-empty string")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= v <= 1.0:
                raise ValueError(f"lexicon valence of {word!r} must be a number in [-1, 1], got {v!r}")
            self._valences[_normal(word)] = float(v)
        self._negators = frozenset(_normal(w) for w in negators)
        self._boosters = {_normal(w): float(b) for w, b in boosters.items()}
        self._contrasts = frozenset(_normal(w) for w in contrasts)
        known = set(self._valences) | self._negators | set(self._boosters) | self._contrasts
        # CJK words of two characters or more, by first character: the lengths to try, longest first
        by_first: dict[str, set[int]] = {}
        self._cjk_words = frozenset(w for w in known if len(w) > 1 and re.fullmatch(f"[{_CJK}]+", w))
        for w in self._cjk_words:
            by_first.setdefault(w[0], set()).add(len(w))
        self._lengths = {c: tuple(sorted(sizes, reverse=True)) for c, sizes in by_first.items()}

    def __len__(self) -> int:
        return len(self._valences)

    def __contains__(self, word: str) -> bool:
        return word in self._valences

    def valence(self, word: str) -> float:
        """The valence of one word (0 when unknown)."""
        return self._valences.get(word, 0.0)

    def tokens(self, text: str) -> list[str]:
        """The text segmented for :meth:`score` (see the class docstring)."""
        out: list[str] = []
        words, lengths = self._cjk_words, self._lengths
        for m in _TOKEN_RE.finditer(_normal(text)):
            run = m.group("cjk")
            if run is None:
                word = m.group("word")
                if word is None:
                    out.append(_STOP)
                else:
                    _latin(word, out)
                continue
            i, n = 0, len(run)
            while i < n:
                size = 1
                for k in lengths.get(run[i], ()):
                    if i + k <= n and run[i:i + k] in words:
                        size = k
                        break
                out.append(run[i:i + size])
                i += size
        return out

    def score(self, tokens: Iterable[str]) -> float:
        """The valence of a token list in [-1, 1] (see the class docstring); 0 when it holds no sentiment word."""
        valences, negators, boosters, contrasts = self._valences, self._negators, self._boosters, self._contrasts
        total, after, found = 0.0, 1.0, False
        negated, boost, age = False, 1.0, 0
        for t in tokens:
            if t == _STOP:
                negated, boost = False, 1.0
                continue
            if t in negators:
                negated, age = not negated, 0
                continue
            b = boosters.get(t)
            if b is not None:
                boost, age = boost * b, 0
                continue
            if t in contrasts:
                total, after = total * 0.5, 1.5
                negated, boost = False, 1.0
                continue
            v = valences.get(t)
            if v:
                v *= boost
                total += (v * self.negation if negated else v) * after
                found, negated, boost = True, False, 1.0
                continue
            age += 1
            if age >= self.window:
                negated, boost = False, 1.0
        if not found:
            return 0.0
        return max(-1.0, min(1.0, total / math.sqrt(total * total + self.alpha)))

    def score_text(self, text: str) -> float:
        """``score(tokens(text))``."""
        return self.score(self.tokens(text))


# ------------------------------------------------------------------------------------------------ model
STATE_FORMAT = "infogap.sentiment/1"
_POS, _NEG = True, False
#: each setting's kind and range (what a state read from outside may hold); the defaults sit well inside
SETTINGS = {"seed": (int, 0, (1 << 64) - 1), "alpha": (float, 1e-6, 1e3), "max_vocab": (int, 1, 10_000_000),
            "prune_slack": (float, 0.0, 10.0), "lr": (float, 1e-9, 10.0), "nb_scale": (float, 1e-6, 1e3),
            "lexicon_weight": (float, -1e3, 1e3)}
#: the stacker's weights and intercept at the most, in absolute value, in a state read from outside
MAX_STACK_WEIGHT = 1e6


def _sigmoid(z: float) -> float:
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@functools.cache
def _river() -> tuple[type, type, type]:
    """River's naive Bayes (as :class:`_MultinomialNB`), ``LogisticRegression`` and ``SGD``, imported at the first
    model that learns or reads a state: ``river.naive_bayes`` brings ``scipy.stats`` (~60 MB and half a second a
    process), which a worker that never sees a review does not need."""
    from river import linear_model, naive_bayes, optim

    class _MultinomialNB(naive_bayes.MultinomialNB):
        """River's multinomial naive Bayes with a faster ``learn_one``: the same updates of the same attributes
        (``class_counts``, ``feature_counts``, ``class_totals``; a test checks it against River's), as plain dict
        increments instead of two ``Counter.update`` calls per token, which were half the cost of learning a
        review."""

        def learn_one(self, x, y):
            self.class_counts[y] += 1
            counts = self.feature_counts
            total = 0
            for f, n in x.items():
                counts[f][y] += n
                total += n
            self.class_totals[y] += total

    _MultinomialNB.__qualname__ = "_MultinomialNB"  # pickled by reference: found by the module's __getattr__
    return _MultinomialNB, linear_model.LogisticRegression, optim.SGD


def __getattr__(name: str):
    """``_MultinomialNB``, made on first use (:func:`_river`): what a pickled model refers to."""
    if name == "_MultinomialNB":
        return _river()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SentimentModel:
    """An online, pure review sentiment model: naive Bayes over tokens stacked with a lexicon prior (see the module).

    Parameters
    ----------
    tokenize
        Text -> tokens; default :func:`plain_tokens`. Not part of the state.
    lexicon
        The prior; default the Chinese seed lexicon (:func:`chinese_seed_lexicon`); ``Lexicon({})`` for none. The
        stream passes :func:`infogap.stream.text.default_lexicon` (with VADER's English words). Not part of the state.
    seed
        Kept in the state for a uniform constructor; nothing in the model is random.
    alpha
        Lidstone smoothing of the naive Bayes.
    max_vocab, prune_slack
        The vocabulary bound: at ``max_vocab * (1 + prune_slack)`` tokens, prune to the ``max_vocab`` most frequent.
    lr
        SGD step of the stacking logistic regression (weights and intercept).
    nb_scale
        The naive Bayes log-odds is divided by it (then clipped to [-5, 5]) as a feature of the stacker.
    lexicon_weight
        The stacker's initial weight on the lexicon score (0 with an empty lexicon).

    Examples
    --------
    >>> m = SentimentModel(lexicon=Lexicon({}))
    >>> for i in range(30):
    ...     m.learn_one("great phone, fast delivery", True)
    ...     m.learn_one("broken screen, slow delivery", False)
    >>> m.predict_one("a great phone") > 0.5 > m.predict_one("a broken screen")
    True
    >>> again = SentimentModel.from_state(m.to_state(), lexicon=Lexicon({}))
    >>> again.predict_one("a great phone") == m.predict_one("a great phone"), again.n_learned
    (True, 60)
    """

    def __init__(self, tokenize: Tokenizer | None = None, *, lexicon: Lexicon | None = None, seed: int = 0,
                 alpha: float = 0.5, max_vocab: int = 50_000, prune_slack: float = 0.25, lr: float = 0.05,
                 nb_scale: float = 10.0, lexicon_weight: float = 3.0):
        for name, v in (("seed", seed), ("alpha", alpha), ("max_vocab", max_vocab), ("prune_slack", prune_slack),
                        ("lr", lr), ("nb_scale", nb_scale), ("lexicon_weight", lexicon_weight)):
            kind, lo, hi = SETTINGS[name]
            if not ((_is_int(v) if kind is int else _is_number(v)) and lo <= v <= hi):
                what = f"an integer in [{lo:,}, {hi:,}]" if kind is int else f"a number in [{lo:g}, {hi:g}]"
                raise ValueError(f"SentimentModel setting {name} is {v!r}; it must be {what}")
        self.tokenize = tokenize if tokenize is not None else plain_tokens
        self.lexicon = lexicon if lexicon is not None else default_seed_lexicon()
        self.seed = int(seed)
        self.alpha = float(alpha)
        self.max_vocab = int(max_vocab)
        self.prune_slack = float(prune_slack)
        self.lr = float(lr)
        self.nb_scale = float(nb_scale)
        self.lexicon_weight = float(lexicon_weight)
        self.n_learned = 0
        self._nb = self._stack = None  # River's parts, made when first needed (:meth:`_parts`)
        self._prune_at = self.max_vocab + int(self.max_vocab * self.prune_slack)

    def _parts(self):
        """The naive Bayes and the stacker, made (and River imported) on first use."""
        if self._nb is None:
            nb_class, log_reg, sgd = _river()
            self._nb = nb_class(alpha=self.alpha)
            self._stack = log_reg(optimizer=sgd(self.lr), intercept_lr=self.lr, l2=0.0)
            self._stack._weights["lex"] = self.lexicon_weight
            self._stack._weights["nb"] = 0.0
        return self._nb, self._stack

    # -- features
    def _tokens(self, text: str, tokens: Iterable[str] | None = None) -> dict[str, int]:
        """Binary bag of tokens (presence, not counts: better on short reviews), in first-seen order; ``tokens``:
        the text's, when the caller has them already (``tokenize(text)``)."""
        return dict.fromkeys(self.tokenize(text) if tokens is None else tokens, 1)

    def _log_odds(self, x: Mapping[str, int]) -> float:
        """``log P(pos | x) - log P(neg | x)`` of the naive Bayes over the tokens it knows: exactly
        ``MultinomialNB.joint_log_likelihood(known)[True] - [...][False]`` (a test checks), read from its counts
        directly (River's method recomputes the vocabulary size and the class total for every token)."""
        nb = self._nb
        if nb is None:
            return 0.0
        n_pos, n_neg = nb.class_counts.get(_POS, 0), nb.class_counts.get(_NEG, 0)
        if not n_pos or not n_neg:
            return 0.0
        counts, a, log = nb.feature_counts, self.alpha, math.log
        z, m = math.log(n_pos / n_neg), 0
        for f, c in x.items():
            fc = counts.get(f)
            if fc is None:
                continue
            z += c * (log(fc.get(_POS, 0) + a) - log(fc.get(_NEG, 0) + a))
            m += c
        if m:
            v = a * len(counts)
            z -= m * (log(nb.class_totals[_POS] + v) - log(nb.class_totals[_NEG] + v))
        return z

    def _features(self, text: str, tokens: Iterable[str] | None = None) -> tuple[dict[str, int], dict[str, float]]:
        x = self._tokens(text, tokens)
        z = self._log_odds(x) / self.nb_scale
        return x, {"nb": max(-5.0, min(5.0, z)), "lex": self.lexicon.score_text(text)}

    # -- the protocol
    def predict_one(self, text: str, tokens: Iterable[str] | None = None) -> float:
        """P(positive) in [0, 1]; before any learning, the lexicon prior alone (0.5 when no lexicon word).
        ``tokens``: ``tokenize(text)``, when the caller has them already."""
        _, f = self._features(text, tokens)
        return self._stack.predict_proba_one(f)[True] if self.n_learned else _sigmoid(self.lexicon_weight * f["lex"])

    def learn_one(self, text: str, positive: bool, tokens: Iterable[str] | None = None) -> None:
        """Learn one labelled review: the stacker first, on the features before the naive Bayes has seen it.
        ``tokens``: ``tokenize(text)``, when the caller has them already."""
        if not isinstance(positive, bool):
            raise ValueError(f"positive must be True or False, got {positive!r}")
        x, f = self._features(text, tokens)
        nb, stack = self._parts()
        stack.learn_one(f, positive)
        nb.learn_one(x, positive)
        self.n_learned += 1
        if len(nb.feature_counts) > self._prune_at:
            self._prune()

    def _prune(self) -> None:
        """Keep the ``max_vocab`` most frequent tokens, and among those tied at the cut the newest (the counts'
        insertion order, which the state keeps: deterministic, and no sort of strings); what is dropped leaves the
        class totals too. One pass to count, one sort of integers, one pass to drop."""
        nb = self._nb
        counts = nb.feature_counts
        totals = [sum(fc.values()) for fc in counts.values()]
        cut = sorted(totals, reverse=True)[self.max_vocab - 1]
        drop_ties = sum(1 for t in totals if t >= cut) - self.max_vocab  # the oldest tokens counted ``cut`` times
        dropped = []
        for f, t in zip(counts, totals):
            if t < cut:
                dropped.append(f)
            elif t == cut and drop_ties > 0:
                dropped.append(f)
                drop_ties -= 1
        class_totals = nb.class_totals
        for f in dropped:
            for c, n in counts.pop(f).items():
                class_totals[c] -= n

    @property
    def vocabulary_size(self) -> int:
        """Tokens the naive Bayes holds counts for (at most ``max_vocab * (1 + prune_slack)``)."""
        return len(self._nb.feature_counts) if self._nb is not None else 0

    # -- state
    def to_state(self) -> dict:
        """The learned state as JSON-safe data (dicts, lists, str, int, float), bounded by ``max_vocab``.

        The River internals it reads: ``MultinomialNB.class_counts`` and ``.feature_counts`` (``class_totals`` is
        their per-class sum and is recomputed on load), ``LogisticRegression._weights``, ``.intercept`` and
        ``.optimizer.n_iterations``. The tokenizer and the lexicon are configuration, not state: pass them again to
        :meth:`from_state`.
        """
        nb, st = self._parts()
        return {
            "format": STATE_FORMAT,
            "config": {"seed": self.seed, "alpha": self.alpha, "max_vocab": self.max_vocab,
                       "prune_slack": self.prune_slack, "lr": self.lr, "nb_scale": self.nb_scale,
                       "lexicon_weight": self.lexicon_weight},
            "n_learned": self.n_learned,
            "class_counts": [nb.class_counts.get(_NEG, 0), nb.class_counts.get(_POS, 0)],
            "tokens": [[f, fc.get(_NEG, 0), fc.get(_POS, 0)] for f, fc in nb.feature_counts.items()],
            "stack": {"intercept": st.intercept, "weights": {k: st._weights[k] for k in ("nb", "lex")},
                      "n_iterations": st.optimizer.n_iterations},
        }

    @classmethod
    def from_state(cls, state: dict, tokenize: Tokenizer | None = None, *,
                   lexicon: Lexicon | None = None) -> "SentimentModel":
        """A model from :meth:`to_state`'s output, predicting exactly as the one saved; ``ValueError`` saying what is
        wrong when ``state`` is malformed (it may come from a snapshot file)."""
        _check(isinstance(state, dict), "the state is not a dict")
        _check(state.get("format") == STATE_FORMAT,
               f"format is {state.get('format')!r}, expected {STATE_FORMAT!r}")
        config = state.get("config")
        _check(isinstance(config, dict), "config is not a dict")
        expected = {"seed": int, "alpha": float, "max_vocab": int, "prune_slack": float, "lr": float,
                    "nb_scale": float, "lexicon_weight": float}
        _check(set(config) == set(expected), f"config keys are {sorted(config)}, expected {sorted(expected)}")
        for key, kind in expected.items():
            _check(_is_int(config[key]) if kind is int else _is_number(config[key]),
                   f"config.{key} is {config[key]!r}, expected {'an integer' if kind is int else 'a finite number'}")
        model = cls(tokenize, lexicon=lexicon, **config)  # the constructor checks the values' ranges
        n_learned = state.get("n_learned")
        _check(_is_int(n_learned) and n_learned >= 0, f"n_learned is {n_learned!r}, expected an integer >= 0")
        class_counts = state.get("class_counts")
        _check(isinstance(class_counts, list) and len(class_counts) == 2
               and all(_is_int(c) and c >= 0 for c in class_counts),
               f"class_counts is {_short(class_counts)}, expected [negatives, positives], integers >= 0")
        _check(sum(class_counts) == n_learned, f"class_counts {class_counts} do not add up to n_learned {n_learned}")
        tokens = state.get("tokens")
        _check(isinstance(tokens, list), f"tokens is {_short(tokens)}, expected a list of [token, neg, pos]")
        _check(len(tokens) <= model._prune_at, f"tokens holds {len(tokens)} entries, more than this configuration "
                                                f"keeps ({model._prune_at}: max_vocab with its slack)")
        nb, stack_model = model._parts()
        for i, row in enumerate(tokens):
            _check(isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                   and all(_is_int(c) and 0 <= c <= n_learned for c in row[1:]) and row[1] + row[2] > 0,
                   f"tokens[{i}] is {_short(row)}, expected [token, neg, pos] with counts 0..n_learned, not both 0")
            _check(row[0] not in nb.feature_counts, f"tokens[{i}]: token {row[0]!r} appears twice")
            fc = nb.feature_counts[row[0]]
            for label, n in ((_NEG, row[1]), (_POS, row[2])):
                if n:
                    fc[label] = n
                    nb.class_totals[label] += n
        for label, n in ((_NEG, class_counts[0]), (_POS, class_counts[1])):
            if n:
                nb.class_counts[label] = n
        stack = state.get("stack")
        _check(isinstance(stack, dict) and set(stack) == {"intercept", "weights", "n_iterations"},
               f"stack is {_short(stack)}, expected a dict of intercept, weights, n_iterations")
        weights = stack["weights"]
        _check(isinstance(weights, dict) and set(weights) == {"nb", "lex"}
               and all(_is_number(w) for w in weights.values()),
               f"stack.weights is {_short(weights)}, expected finite numbers for 'nb' and 'lex'")
        _check(all(abs(w) <= MAX_STACK_WEIGHT for w in weights.values()),
               f"stack.weights is {_short(weights)}, expected each within +-{MAX_STACK_WEIGHT:g}")
        _check(_is_number(stack["intercept"]) and abs(stack["intercept"]) <= MAX_STACK_WEIGHT,
               f"stack.intercept is {stack['intercept']!r}, expected a number within +-{MAX_STACK_WEIGHT:g}")
        _check(_is_int(stack["n_iterations"]) and stack["n_iterations"] >= 0,
               f"stack.n_iterations is {stack['n_iterations']!r}, expected an integer >= 0")
        stack_model.intercept = float(stack["intercept"])
        for k in ("nb", "lex"):
            stack_model._weights[k] = float(weights[k])
        stack_model.optimizer.n_iterations = stack["n_iterations"]
        model.n_learned = n_learned
        return model


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"malformed sentiment state: {message}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
