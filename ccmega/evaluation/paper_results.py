"""The paper's reported numbers, transcribed from paper.txt, for `ccmega report` to print beside ours.

All metrics are percentages. Sizes use the paper's labels (200M, 500M, 800M, 1B); recipes are D1..D6 and
"random". Table 3 prints no sizes: they are 500M/500M (its rows reappear with those sizes in Table 4, and
the captions of Figs. 3 and 4 fix both sizes at 500M). Table 4's blank cells repeat the cell above; they
are filled in here. The paper does not print Fig. 4's values: only D1, D2 and D6 are known (from
Table 3), plus the stated trend.
"""
from __future__ import annotations

from typing import NamedTuple


# Our Qwen3 presets (ccmega.presets) that are the paper's Table 2 sizes.
PAPER_SIZE_OF_PRESET = {"qwen3-200m": "200M", "qwen3-500m": "500M", "qwen3-800m": "800M", "qwen3-1b": "1B"}


class PaperRow(NamedTuple):
    table: str
    encoder_recipe: str
    encoder_size: str
    decoder_recipe: str
    decoder_size: str
    data: str
    f1: float
    bleu: float
    rougeL: float

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.encoder_recipe, self.encoder_size, self.decoder_recipe, self.decoder_size, self.data)


# Table 3, in the paper's order (its first row is printed twice: once for each reference distribution).
TABLE3: list[PaperRow] = [
    PaperRow("3", "D1", "500M", "D1", "500M", "D1", 81.57, 42.12, 79.29),
    PaperRow("3", "D1", "500M", "D6", "500M", "D1", 69.44, 27.02, 67.82),
    PaperRow("3", "D6", "500M", "D1", "500M", "D1", 75.86, 34.65, 73.36),
    PaperRow("3", "D1", "500M", "D1", "500M", "D1", 81.57, 42.12, 79.29),
    PaperRow("3", "D1", "500M", "D2", "500M", "D1", 77.59, 35.95, 75.92),
    PaperRow("3", "D2", "500M", "D1", "500M", "D1", 80.02, 39.82, 77.71),
]

# Table 4, in the paper's order; the two aligned rows are the ones it underlines (second best).
TABLE4: list[PaperRow] = [
    PaperRow("4", "D1", "200M", "D6", "500M", "D1", 65.40, 22.30, 63.31),
    PaperRow("4", "D1", "500M", "D6", "500M", "D1", 69.44, 27.02, 67.82),
    PaperRow("4", "D1", "800M", "D6", "500M", "D1", 72.43, 30.34, 70.94),
    PaperRow("4", "D1", "1B", "D6", "500M", "D1", 72.62, 30.80, 70.48),
    PaperRow("4", "D6", "500M", "D1", "200M", "D1", 68.09, 26.73, 65.45),
    PaperRow("4", "D6", "500M", "D1", "500M", "D1", 75.86, 34.65, 73.36),
    PaperRow("4", "D6", "500M", "D1", "800M", "D1", 79.01, 37.08, 77.83),
    PaperRow("4", "D6", "500M", "D1", "1B", "D1", 82.87, 45.08, 81.21),
    PaperRow("4", "D1", "500M", "D1", "500M", "D1", 81.57, 42.12, 79.29),
    PaperRow("4", "D1", "200M", "D6", "500M", "D6", 40.59, 8.09, 37.46),
    PaperRow("4", "D1", "500M", "D6", "500M", "D6", 46.28, 9.66, 45.48),
    PaperRow("4", "D1", "800M", "D6", "500M", "D6", 50.35, 11.50, 49.03),
    PaperRow("4", "D1", "1B", "D6", "500M", "D6", 58.50, 16.16, 56.93),
    PaperRow("4", "D6", "500M", "D1", "200M", "D6", 38.01, 6.89, 37.66),
    PaperRow("4", "D6", "500M", "D1", "500M", "D6", 47.74, 13.37, 46.47),
    PaperRow("4", "D6", "500M", "D1", "800M", "D6", 45.04, 8.80, 45.13),
    PaperRow("4", "D6", "500M", "D1", "1B", "D6", 42.96, 7.85, 43.07),
    PaperRow("4", "D6", "500M", "D6", "500M", "D6", 56.24, 14.18, 55.97),
]

# Fig. 4: encoder LLM_D1(500M), decoder LLM_Di(500M), data D1. Known points only (from Table 3).
FIG4_KNOWN: dict[str, PaperRow] = {r.decoder_recipe: r for r in sorted(TABLE3) if r.encoder_recipe == "D1"}
FIG4_TREND = ("all metrics (F1, BLEU, ROUGE-L) decrease as the decoder's pretraining data moves from D1 to D6; "
              "a decoder pretrained on random text drops all metrics to near zero (Secs. 4.2, 4.6)")
FIG3_CLAIM = ("encoder-measured entropy is negatively correlated with compression quality; "
              "decoder-measured entropy shows no clear association (500M/500M)")
FIG5_6_CLAIM = ("the optimal compute allocation favors a larger decoder over a complex encoder; "
                "latency measured at context 4096 on one NVIDIA H20")

# Table 5: encoder LLM_D1, decoder pretrained on random text.
TABLE5_ORIGIN = (
    'FAQs How long does it take to hear about my grant application? This year, we are open to '
    'applications from 30 May – 30 June 2017, giving you a month to apply. During this time we will '
    'be processing your applications and not making any awards. We may contact you during this time '
    'if we need any additional information. We will contact you by letter with our decision on your '
    'application by 28 July. I’ve applied to Take a Break before and got a grant, can I apply again? '
    'Yes, you can make one application per year. I have two disabled children at home – can I make '
    'two Take a Break applications? We can make only one award per household in each funding round. '
    'While we can sometimes make a larger award, this is not based on the number of disabled '
    'children or children in a household but on exceptional circumstances. I have forgotten my Take '
    'a Break number. Don’t worry, as long as the rest of your application form is completed we will '
    'do the rest.'
)
TABLE5_RECONSTRUCTION = (
    'RggggggggggggggkkgkgkRg0g5g5g5g3g3g3g5g1g3g0g0g1g0g1g1g2g3g1g3g0g1g3g0g3g3g3g3g3g1g3g3g0g5g2g3g3'
    'g3g3g3g1g1g1g3sg1g2ig0g2iRbsg1g0g0g0g1g0g3rg0Z4F1Rbqrg3rsg3rsg0sg3rsg0rj5rj2rj2rj2rj2rj2rj20rj2r'
)


def paper_rows() -> list[PaperRow]:
    return TABLE3 + TABLE4


def lookup(encoder_recipe: str, encoder_size: str, decoder_recipe: str, decoder_size: str,
           data: str) -> PaperRow | None:
    """The paper's row for this (encoder, decoder, data) triple, or None (Tables 3 and 4 agree where both
    report the same triple)."""
    key = (encoder_recipe, encoder_size, decoder_recipe, decoder_size, data)
    return next((r for r in paper_rows() if r.key == key), None)
