"""Reconstruction metrics (paper §3.4): token F1, BLEU-4 and ROUGE-L, all as percentages (0-100).

Every metric compares a detokenised reconstruction (hypothesis) with the detokenised original
(reference). Definitions, chosen so that each value can be checked against its reference implementation:

* **F1** -- SQuAD token F1 (Rajpurkar et al., 2016), normalisation exactly as the official scripts:
  lowercase, delete ASCII punctuation (`string.punctuation`, no space inserted: "don't" -> "dont"),
  replace the articles a/an/the by a space, split on whitespace; F1 of the bag-of-tokens overlap.
  Empty token lists follow the official SQuAD **v2.0** script: both empty -> 100, exactly one empty -> 0.
  (The v1.1 script returns 0 for both-empty; v2.0 is the one that defines the case on purpose.)
  Non-ASCII characters are kept as they are (curly quotes and dashes are not `string.punctuation`).
* **BLEU-4** -- sacrebleu with its defaults, so the signature is the standard one:
  tokenizer `13a`, case-sensitive, smoothing `exp`, one reference. Two values, both reported:
  `bleu_corpus` = `sacrebleu.corpus_bleu` over all pairs (n-gram counts pooled, no effective order:
  a corpus with no 4-gram at all scores 0), and `bleu_sentence_mean` = mean of
  `sacrebleu.sentence_bleu` (effective order on, so a 1-3 token sentence can still score 100).
  sacrebleu scores an empty hypothesis or reference as 0, including both-empty.
* **ROUGE-L** -- F-measure of `rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)`.
  No stemming: reconstruction fidelity should not credit "run" for "running". rouge-score's default
  tokenizer keeps only `[a-z0-9]` after lowercasing, so non-ASCII letters vanish ("日本語" has no
  tokens, "naïve" becomes "na" + "ve"). We pass a tokenizer that keeps letters and digits of every
  script (runs of Python `\\w` minus `_`, after lowercasing). On ASCII text it yields exactly the
  default tokens, so scores equal the package's defaults there; on other text it keeps the words the
  default would drop. rouge-score scores an empty token list on either side as 0, including both-empty.
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Sequence

METRIC_KEYS = ("f1", "bleu_sentence", "rougeL")  # keys of score_pair()
ROUGE_USE_STEMMER = False

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_WORD_RE = re.compile(r"[^\W_]+")  # letters and digits of any script


# ---------------------------------------------------------------- F1 (SQuAD)
def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower, drop punctuation, drop articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def f1_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def token_f1(reference: str, hypothesis: str) -> float:
    """SQuAD v2.0 token F1, in percent."""
    ref, hyp = f1_tokens(reference), f1_tokens(hypothesis)
    if not ref or not hyp:
        return 100.0 if ref == hyp else 0.0
    same = sum((collections.Counter(ref) & collections.Counter(hyp)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(hyp), same / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- BLEU (sacrebleu)
def sentence_bleu(reference: str, hypothesis: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[float, str]:
    """(score, sacrebleu signature)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    score = bleu.corpus_score(list(hypotheses), [list(references)]).score
    return float(score), str(bleu.get_signature())


# ---------------------------------------------------------------- ROUGE-L (rouge-score)
def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation (no stemmer), extended from [a-z0-9] to every script."""
    return _WORD_RE.findall(text.lower())


_scorer = None


def _rouge_scorer():
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer, tokenizers

        class UnicodeTokenizer(tokenizers.Tokenizer):
            def tokenize(self, text):
                return rouge_tokens(text)

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=ROUGE_USE_STEMMER,
                                           tokenizer=UnicodeTokenizer())
    return _scorer


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F-measure, in percent."""
    return 100.0 * float(_rouge_scorer().score(reference, hypothesis)["rougeL"].fmeasure)


# ---------------------------------------------------------------- API
def score_pair(reference: str, hypothesis: str) -> dict[str, float]:
    """{"f1", "bleu_sentence", "rougeL"} in percent for one (original, reconstruction) pair."""
    return {
        "f1": token_f1(reference, hypothesis),
        "bleu_sentence": sentence_bleu(reference, hypothesis),
        "rougeL": rouge_l(reference, hypothesis),
    }


def score_corpus(references: Sequence[str], hypotheses: Sequence[str],
                 per_sample: Sequence[dict] | None = None) -> dict:
    """Summary metrics of a test set, in percent:
    {"n", "f1", "bleu_corpus", "bleu_sentence_mean", "rougeL", "bleu_signature"}.

    f1 / bleu_sentence_mean / rougeL are means of score_pair over the samples; bleu_corpus is one
    corpus-level sacrebleu score. Pass `per_sample` (the score_pair dicts you already computed for the
    per-sample file) to skip scoring every pair twice.
    """
    references, hypotheses = list(references), list(hypotheses)
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if per_sample is None:
        per_sample = [score_pair(r, h) for r, h in zip(references, hypotheses)]
    elif len(per_sample) != len(references):
        raise ValueError(f"{len(per_sample)} per-sample scores for {len(references)} pairs")
    n = len(references)

    def mean(key):
        return math.fsum(s[key] for s in per_sample) / n if n else math.nan

    bleu, signature = corpus_bleu(references, hypotheses) if n else (math.nan, "")
    return {"n": n, "f1": mean("f1"), "bleu_corpus": bleu, "bleu_sentence_mean": mean("bleu_sentence"),
            "rougeL": mean("rougeL"), "bleu_signature": signature}
