"""Reconstruction metrics, entropy correlations and analytic FLOPs (ccmega.evaluation) against hand-computed
values and against the reference implementations: the official SQuAD v2.0 F1 (copied below), sacrebleu,
rouge-score, scipy.stats, and torch's FlopCounterMode on a small transformer written here."""
import collections
import math
import random
import re
import string
import warnings

import pytest

from ccmega.evaluation import correlation, flops, metrics
from ccmega.presets import MODEL_PRESETS, ModelPreset

TRICKY = [
    ("", ""),
    ("", "something"),
    ("something", ""),
    ("!!! ... ???", "!!! ... ???"),
    ("!!!", "?"),
    ("The", ""),
    ("The quick brown fox jumps over the lazy dog.", "The quick brown fox jumps over the lazy dog."),
    ("The quick brown fox jumps over the lazy dog.", "the quick brown fox jumped over a lazy dog and the cat and more"),
    ("Don't stop -- it's 3.14, (really)!", "dont stop its 314 really"),
    ("Café – naïve’s “quoted” text, 東京 and Ünïcödé.", "café naïve’s quoted text 東京 and unicode"),
    ("x x y", "x y y"),
    ("short", "short short short short short short short short short short"),
    ("def f(x):\n    return x ** 2  # square", "def f(x): return x**2 # square"),
    ("   spaced \t\n out   ", "spaced out"),
]


# ------------------------------------------------------------------ official SQuAD v2.0 evaluation script
# (functions verbatim from https://worksheets.codalab.org/rest/bundles/0x6b567e1cf2e041ec80d7098f031c5c9e/contents/blob/)
def _squad_normalize_answer(s):
    def remove_articles(text):
        regex = re.compile(r'\b(a|an|the)\b', re.UNICODE)
        return re.sub(regex, ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()
    return white_space_fix(remove_articles(remove_punc(lower(s))))


def _squad_get_tokens(s):
    if not s:
        return []
    return _squad_normalize_answer(s).split()


def _squad_compute_f1(a_gold, a_pred):
    gold_toks = _squad_get_tokens(a_gold)
    pred_toks = _squad_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


# ------------------------------------------------------------------ F1
@pytest.mark.parametrize("reference,hypothesis,expected", [
    ("The cat sat on the mat.", "the cat sat on mat", 100.0),          # articles and punctuation dropped
    ("red green blue", "red green blue yellow purple", 75.0),          # longer: P = 3/5, R = 1
    ("red green blue yellow", "red green", 2 * 0.5 / 1.5 * 100),        # shorter: P = 1, R = 1/2
    ("x x y", "x y y", 200 / 3),                                        # bag overlap: x once, y once
    ("", "", 100.0), ("!!!", "?", 100.0), ("The", "", 100.0),          # both empty after normalising (v2.0)
    ("word", "", 0.0), ("", "word", 0.0), ("alpha", "beta", 0.0),
    ("Don't", "dont", 100.0),                                           # punctuation deleted, no space
    ("Café – naïve’s", "café naïve’s", 80.0),                           # "–" is not ASCII punctuation: a token
])
def test_f1_hand_computed(reference, hypothesis, expected):
    assert metrics.token_f1(reference, hypothesis) == pytest.approx(expected)


@pytest.mark.parametrize("reference,hypothesis", TRICKY)
def test_f1_equals_official_squad_v2(reference, hypothesis):
    assert metrics.token_f1(reference, hypothesis) == pytest.approx(100 * _squad_compute_f1(reference, hypothesis))
    assert metrics.normalize_answer(reference) == _squad_normalize_answer(reference)


# ------------------------------------------------------------------ BLEU
def test_bleu_hand_computed():
    # hyp 5 tokens vs ref 4 (longer reconstruction): p1..p4 = 4/5, 3/4, 2/3, 1/2; BP = 1
    assert metrics.sentence_bleu("a b c d", "a b c d e") == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # hyp a prefix of half the reference: all precisions 1, BP = exp(1 - 8/4)
    assert metrics.sentence_bleu("a b c d e f g h", "a b c d") == pytest.approx(100 * math.exp(-1))
    assert metrics.sentence_bleu("one two three four five", "one two three four five") == pytest.approx(100)
    assert metrics.sentence_bleu("", "") == 0.0
    assert metrics.sentence_bleu("a b c d", "") == 0.0
    # corpus BLEU pools n-gram counts: ("a b c d", "a b c d e") + identical 4-token pair
    # matches/totals: 1-gram 8/9, 2-gram 6/7, 3-gram 4/5, 4-gram 2/3; hyp 9 tokens >= ref 8: BP = 1
    score, signature = metrics.corpus_bleu(["a b c d", "w x y z"], ["a b c d e", "w x y z"])
    assert score == pytest.approx(100 * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25)
    assert "tok:13a" in signature and "smooth:exp" in signature and "eff:no" in signature


@pytest.mark.parametrize("reference,hypothesis", TRICKY)
def test_bleu_equals_sacrebleu(reference, hypothesis):
    import sacrebleu

    assert metrics.sentence_bleu(reference, hypothesis) == sacrebleu.sentence_bleu(hypothesis, [reference]).score


def test_corpus_bleu_equals_sacrebleu():
    import sacrebleu

    refs, hyps = [r for r, _ in TRICKY], [h for _, h in TRICKY]
    assert metrics.corpus_bleu(refs, hyps)[0] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


# ------------------------------------------------------------------ ROUGE-L
@pytest.mark.parametrize("reference,hypothesis,expected", [
    ("the cat sat on the mat", "the cat on the mat sat", 100 * 5 / 6),     # LCS 5 of 6 both ways
    ("a b c", "a x b y c z", 100 * 2 * 0.5 * 1 / 1.5),                      # longer: P = 3/6, R = 1
    ("Same text.", "same TEXT", 100.0),                                     # case and punctuation ignored
    ("", "", 0.0), ("!!!", "!!!", 0.0), ("word", "", 0.0),                  # no tokens: 0 (as rouge-score)
    ("日本語 テキスト", "日本語 テキスト", 100.0),                                # non-ASCII kept (default: 0)
    ("Ünïcödé wörds stay", "Ünïcödé words stay", 100 * 2 / 3),              # LCS 2 of 3
])
def test_rouge_l_hand_computed(reference, hypothesis, expected):
    assert metrics.rouge_l(reference, hypothesis) == pytest.approx(expected)


def test_rouge_l_equals_rouge_score_on_ascii():
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    \n\t"
    pairs = [(r, h) for r, h in TRICKY if r.isascii() and h.isascii()]
    for _ in range(200):
        ref = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        hyp = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        pairs.append((ref, hyp))
        pairs.append((ref, ref[: len(ref) // 2] + hyp))
    for ref, hyp in pairs:
        assert metrics.rouge_l(ref, hyp) == pytest.approx(100 * default.score(ref, hyp)["rougeL"].fmeasure)


def test_rouge_tokens_extend_the_default_tokenizer_to_unicode():
    from rouge_score import tokenize

    for text in ["Hello, World! 42 times_two", "x-y_z", "MiXeD ... case"]:
        assert metrics.rouge_tokens(text) == tokenize.tokenize(text, None)
    assert tokenize.tokenize("naïve 東京", None) == ["na", "ve"]  # what the default does
    assert metrics.rouge_tokens("naïve 東京") == ["naïve", "東京"]


# ------------------------------------------------------------------ score_pair / score_corpus
def test_identical_strings_score_100():
    text = "Yes, you can make one application per year. I’ve applied before – can I apply again?"
    assert metrics.score_pair(text, text) == pytest.approx({"f1": 100.0, "bleu_sentence": 100.0, "rougeL": 100.0})
    corpus = metrics.score_corpus([text, text], [text, text])
    assert corpus["bleu_corpus"] == pytest.approx(100.0)
    assert corpus["f1"] == corpus["rougeL"] == pytest.approx(100.0)


def test_score_corpus_means_and_corpus_bleu():
    import sacrebleu

    refs, hyps = [r for r, _ in TRICKY], [h for _, h in TRICKY]
    per_sample = [metrics.score_pair(r, h) for r, h in zip(refs, hyps)]
    corpus = metrics.score_corpus(refs, hyps)
    assert corpus["n"] == len(refs)
    for key, mean_key in [("f1", "f1"), ("bleu_sentence", "bleu_sentence_mean"), ("rougeL", "rougeL")]:
        assert corpus[mean_key] == pytest.approx(sum(s[key] for s in per_sample) / len(refs))
    assert corpus["bleu_corpus"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert corpus["bleu_corpus"] != pytest.approx(corpus["bleu_sentence_mean"])
    assert metrics.score_corpus(refs, hyps, per_sample=per_sample) == corpus
    with pytest.raises(ValueError):
        metrics.score_corpus(refs, hyps[:-1])
    with pytest.raises(ValueError):
        metrics.score_corpus(refs, hyps, per_sample=per_sample[:-1])


# ------------------------------------------------------------------ correlation
def test_correlation_equals_scipy():
    from scipy import stats

    rng = random.Random(1)
    x = [rng.uniform(1, 5) for _ in range(50)]
    y = [100 - 12 * v + rng.gauss(0, 8) for v in x]
    c = correlation.correlate(x, y)
    pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    assert (c["n"], c["dropped"], c["note"]) == (50, 0, "")
    assert c["pearson_r"] == pytest.approx(pearson[0]) and c["pearson_p"] == pytest.approx(pearson[1])
    assert c["spearman_rho"] == pytest.approx(spearman[0]) and c["spearman_p"] == pytest.approx(spearman[1])
    assert c["pearson_r"] < -0.5


def test_correlation_known_values():
    x = [1, 2, 3, 4, 5]
    assert correlation.correlate(x, [3, 5, 7, 9, 11])["pearson_r"] == pytest.approx(1.0)
    cubic = correlation.correlate(x, [v ** 3 for v in x])
    assert cubic["spearman_rho"] == pytest.approx(1.0) and cubic["pearson_r"] < 0.99
    # hand: x = 1..4, y = 1, 3, 2, 4: deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5)
    # -> sum of products 4 / sqrt(5 * 5) = 0.8 (values are their own ranks, so Spearman agrees)
    c = correlation.correlate([1, 2, 3, 4], [1, 3, 2, 4])
    assert c["pearson_r"] == pytest.approx(0.8) and c["spearman_rho"] == pytest.approx(0.8)


def test_correlation_undefined_cases_are_nan_with_a_note():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant = correlation.correlate([1, 2, 3, 4], [100.0] * 4)
        both = correlation.correlate([2.0] * 4, [7.0] * 4)
        short = correlation.correlate([1, 2], [3, 4])
        holes = correlation.correlate([1, 2, math.nan, 4, 5], [2, 4, 6, math.inf, 10])
    assert math.isnan(constant["pearson_r"]) and math.isnan(constant["spearman_p"])
    assert constant["note"] == "undefined: constant y" and both["note"] == "undefined: constant x and y"
    assert math.isnan(short["spearman_rho"]) and "2 finite pairs" in short["note"]
    assert (holes["n"], holes["dropped"]) == (3, 2) and holes["pearson_r"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        correlation.correlate([1, 2, 3], [1, 2])
    by_metric = correlation.correlate_metrics([1, 2, 3, 4], {"f1": [4, 3, 2, 1], "rougeL": [5, 5, 5, 5]})
    assert by_metric["f1"]["pearson_r"] == pytest.approx(-1.0) and by_metric["rougeL"]["note"]


# ------------------------------------------------------------------ FLOPs
TOY = ModelPreset("toy", hidden_size=4, ffn_hidden_size=8, num_layers=2, num_attention_heads=2,
                  num_query_groups=1, head_dim=2, vocab_size=10)


def test_flops_hand_computed_on_a_toy_config():
    # W = 2*h*d*(2*n_q + 2*n_kv) + 6*h*f = 2*4*2*(4 + 2) + 6*4*8 = 96 + 192 = 288; A = 4*n_q*d = 16; H = 2*h*V = 80
    assert (flops.dense_flops_per_token(TOY), flops.attention_flops_per_pair(TOY),
            flops.lm_head_flops_per_token(TOY)) == (288, 16, 80)
    f = flops.icae_flops(TOY, TOY, context_tokens=3, memory_tokens=2, generated_tokens=3)
    assert f.encoder == 2 * (5 * 288 + 16 * (1 + 2 + 3 + 4 + 5))          # 5 tokens, causal: 3360
    assert f.projector == 2 * 2 * 4 * 4                                   # 64
    assert f.decoder_prefill == 2 * (3 * 288 + 16 * (1 + 2 + 3)) + 80     # [m1, m2, AE] + 1 logit row: 2000
    assert f.decoder_generation == 2 * (2 * 288 + 16 * (4 + 5)) + 2 * 80  # 2 cached steps: 1600
    assert f.total == 7024 and f.compression == 3424
    b = flops.baseline_flops(TOY, context_tokens=3, generated_tokens=3)
    assert (b.prefill, b.generation, b.total) == (2000, 1600, 3600)


def test_flops_dense_term_is_twice_the_layer_weights():
    for preset in MODEL_PRESETS.values():
        weights = preset.params_per_layer() - (2 * preset.hidden_size + 2 * preset.head_dim)  # minus norms
        assert flops.dense_flops_per_token(preset) == 2 * weights


def test_flops_accepts_preset_names_and_scales_sensibly():
    f = flops.icae_flops("qwen3-500m", "qwen3-500m", context_tokens=512)
    b = flops.baseline_flops("qwen3-500m", context_tokens=512)
    assert f.total > 0 and f.as_dict()["total"] == f.total
    assert b.total > f.decoder_prefill + f.decoder_generation  # reading 512 tokens costs more than 129
    bigger = flops.icae_flops("qwen3-500m", "qwen3-1b", context_tokens=512)
    assert bigger.encoder == f.encoder and bigger.decoder_generation > f.decoder_generation
    with pytest.raises(ValueError):
        flops.icae_flops(TOY, TOY, context_tokens=0)


def _brute_force_flops(enc: ModelPreset, dec: ModelPreset, L: int, k: int, G: int) -> dict[str, int]:
    """Run ICAE compression + KV-cached greedy generation on a plain torch transformer with the presets'
    shapes, one token at a time, and let FlopCounterMode count every matmul."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)

    def weights(p):
        h, d, f = p.hidden_size, p.head_dim, p.ffn_hidden_size
        r = lambda *s: torch.randn(*s, generator=gen) * 0.1  # noqa: E731
        layers = [dict(q=r(h, p.num_attention_heads * d), k=r(h, p.num_query_groups * d),
                       v=r(h, p.num_query_groups * d), o=r(p.num_attention_heads * d, h),
                       gate=r(h, f), up=r(h, f), down=r(f, h)) for _ in range(p.num_layers)]
        return layers, r(p.vocab_size, h)

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def step(p, layers, x, cache):
        """One token x (1 x h) through the stack, appending its K/V to the cache."""
        nq, nkv, d = p.num_attention_heads, p.num_query_groups, p.head_dim
        for w, c in zip(layers, cache):
            a = rms(x)
            q = (a @ w["q"]).view(nq, 1, d)
            c["k"].append((a @ w["k"]).view(nkv, d))
            c["v"].append((a @ w["v"]).view(nkv, d))
            keys = torch.stack(c["k"], 1).repeat_interleave(nq // nkv, 0)     # nq x t x d
            values = torch.stack(c["v"], 1).repeat_interleave(nq // nkv, 0)
            probs = torch.softmax(q @ keys.transpose(1, 2) / d ** 0.5, -1)    # nq x 1 x t
            x = x + (probs @ values).reshape(1, nq * d) @ w["o"]
            m = rms(x)
            x = x + (torch.nn.functional.silu(m @ w["gate"]) * (m @ w["up"])) @ w["down"]
        return rms(x)

    (enc_layers, enc_emb), (dec_layers, dec_emb) = weights(enc), weights(dec)
    memory_emb = torch.randn(k, enc.hidden_size, generator=gen)
    ae_emb = torch.randn(1, dec.hidden_size, generator=gen)
    projector = torch.randn(enc.hidden_size, dec.hidden_size, generator=gen)
    context = torch.randint(0, enc.vocab_size, (L,), generator=gen)
    counted = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            cache = [dict(k=[], v=[]) for _ in enc_layers]
            inputs = torch.cat([enc_emb[context], memory_emb])
            hidden = [step(enc, enc_layers, inputs[i:i + 1], cache) for i in range(L + k)]
        counted["encoder"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            slots = torch.cat(hidden[L:]) @ projector
        counted["projector"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            cache = [dict(k=[], v=[]) for _ in dec_layers]
            inputs = torch.cat([slots, ae_emb])
            for i in range(k + 1):
                last = step(dec, dec_layers, inputs[i:i + 1], cache)
            token = int((last @ dec_emb.T).argmax())  # tied LM head
        counted["decoder_prefill"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            for _ in range(G - 1):
                last = step(dec, dec_layers, dec_emb[token:token + 1], cache)
                token = int((last @ dec_emb.T).argmax())
        counted["decoder_generation"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:  # baseline: the decoder reads the context itself
            cache = [dict(k=[], v=[]) for _ in dec_layers]
            for i in range(L):
                last = step(dec, dec_layers, dec_emb[context[i]:context[i] + 1], cache)
            token = int((last @ dec_emb.T).argmax())
        counted["baseline_prefill"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            for _ in range(G - 1):
                last = step(dec, dec_layers, dec_emb[token:token + 1], cache)
                token = int((last @ dec_emb.T).argmax())
        counted["baseline_generation"] = counter.get_total_flops()
    return counted


def test_flops_equal_a_brute_force_count():
    enc = ModelPreset("enc", hidden_size=8, ffn_hidden_size=12, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, head_dim=3, vocab_size=17)
    dec = ModelPreset("dec", hidden_size=6, ffn_hidden_size=10, num_layers=2, num_attention_heads=2,
                      num_query_groups=1, head_dim=4, vocab_size=17)
    L, k, G = 6, 2, 4
    counted = _brute_force_flops(enc, dec, L, k, G)
    f = flops.icae_flops(enc, dec, context_tokens=L, memory_tokens=k, generated_tokens=G)
    b = flops.baseline_flops(dec, context_tokens=L, generated_tokens=G)
    assert {key: getattr(f, key) for key in ("encoder", "projector", "decoder_prefill", "decoder_generation")} == {
        key: counted[key] for key in ("encoder", "projector", "decoder_prefill", "decoder_generation")}
    assert (b.prefill, b.generation) == (counted["baseline_prefill"], counted["baseline_generation"])
