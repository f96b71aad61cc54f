"""cot.py: parsing the four-part CoT of real LLM replies, the radiology tokenizer, BM25 against rank-bm25,
and retrieval quality on real LLM CoTs."""
import csv
import re

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from cot import FIELDS, cot_scores, format_cot, parse_cot, tokenize
from llm_server import GOOD

# hand-written CoTs: A looks like the query but reasons differently; B and C reason like the query
COT = {
    "A": "Texture: Homogeneous cystic fluid signal. Boundary: Sharp, well-circumscribed smooth capsule with "
         "crisp high contrast. Context: Isolated, away from other structures. Summary: Smooth well-defined "
         "cyst.",
    "B": "Texture: Heterogeneous necrotic core with irregular enhancement. Boundary: Ill-defined "
         "infiltrative margins blurred into edema. Context: Adjacent vessels mimic the enhancing rim. "
         "Summary: Irregular infiltrative mass.",
    "C": "Texture: Heterogeneously enhancing, partly necrotic. Boundary: Indistinct, infiltrating borders "
         "with blurring into surrounding edema. Context: Vessels nearby. Summary: Infiltrative necrotic "
         "lesion.",
    "D": "Texture: Mildly heterogeneous. Boundary: Partly indistinct margins. Context: Near the ventricle. "
         "Summary: Lesion with partly indistinct margins.",
}
QUERY = ("Texture: Heterogeneous, necrotic centre with irregular rim enhancement. Boundary: Infiltrative, "
         "ill-defined and blurred margins fading into edema. Context: Nearby vessels mimic enhancement. "
         "Summary: Infiltrating irregular lesion with indistinct borders.")


# ----------------------------------------------------------------------------- the four-part format

def test_parse_real_llm_replies(brisc_csv):
    with open(brisc_csv, newline="", encoding="utf-8") as f:
        texts = [row[k] for row in csv.DictReader(f) for k in ("cot_mask", "cot_no_mask")]
    assert len(texts) >= 100
    for text in texts:
        fields = parse_cot(text)
        assert all(len(fields[k]) > 10 for k in FIELDS)
        assert parse_cot(format_cot(fields)) == fields
    first = parse_cot(texts[0])
    assert first["texture"].startswith("Heterogeneous") and first["summary"].endswith("challenging.")


def test_parse_tolerates_markdown_and_chatter():
    text = ("Sure! Here is the analysis.\n\n"
            "1. **Texture:** Bright,  uniform\n   blood pool.\n"
            "2. **Boundary**: Sharp rim.\n"
            "### context: Veins nearby.\n"
            "- SUMMARY： Easy case.\n\nLet me know if you need more.")
    assert parse_cot(text) == {"texture": "Bright, uniform blood pool.", "boundary": "Sharp rim.",
                                    "context": "Veins nearby.", "summary": "Easy case."}
    think = "<think>Texture: draft</think>" + GOOD
    assert parse_cot(think) == parse_cot(GOOD)


@pytest.mark.parametrize("text", [
    "", "Texture: a\nBoundary: b\nContext: c",                         # missing a field
    "Texture: a\nBoundary: **  **\nContext: c\nSummary: d",           # an empty field
    "The texture: is bright and the boundary: is sharp.",              # prose, not headings
    None,
])
def test_parse_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_cot(text)


# ----------------------------------------------------------------------------- tokenizer and BM25

def test_tokenizer_handles_radiology_text():
    toks = tokenize("Texture: Heterogeneous, ILL-DEFINED masses; enhancing/enhanced enhancement. "
                    "Summary: The margins are blurred and blurring.")
    assert "textur" not in toks and "summar" not in toks  # field labels are structure, not evidence
    assert not {"the", "are", "and"} & set(toks)  # stopwords
    assert toks.count(tokenize("enhance")[0]) == 3  # inflections share one stem
    assert tokenize("blurred") == tokenize("blurring") == tokenize("blur")
    assert tokenize("heterogeneous") == tokenize("heterogeneity") == tokenize("heterogeneously")
    assert tokenize("margins") == tokenize("margin") and tokenize("masses") == tokenize("mass")
    ill = tokenize("ill-defined")  # split and joined, so 'illdefined' and 'ill defined' both meet it
    assert ill == tokenize("ill") + tokenize("defined") + tokenize("illdefined")
    assert tokenize("iso-intense")[-1] == tokenize("isointense")[0]
    # the word, not the label
    assert tokenize("boundary is sharp") == tokenize("Boundary") + tokenize("sharp")
    assert tokenize("") == [] and tokenize(None) == []


def test_cot_scores_match_rank_bm25():
    corpus = list(COT.values())
    oracle = BM25Okapi([tokenize(t) for t in corpus])
    n = {t: sum(t in doc for doc in oracle.doc_freqs) for t in oracle.idf}  # the smoothed IDF, by hand
    oracle.idf = {t: np.log((4 - n[t] + 0.5) / (n[t] + 0.5) + 1) for t in oracle.idf}
    expected = oracle.get_scores(tokenize(QUERY))
    np.testing.assert_allclose(cot_scores(QUERY, corpus, corpus), expected)
    # a candidate outside the corpus is scored from its own words with the corpus IDF
    np.testing.assert_allclose(cot_scores(QUERY, [COT["B"] + " !"], corpus), expected[1:2])


def test_small_pool_scores_stay_positive():
    # two words in every document, one in exactly half: rank-bm25's Okapi IDF scores these 0 or below
    corpus = ["wall thin bright", "wall thin dark", "wall thin bright", "wall thin dark"]
    assert (BM25Okapi([tokenize(t) for t in corpus]).get_scores(tokenize("wall thin bright")) <= 0).all()
    scores = cot_scores("wall thin bright", corpus, corpus)
    assert (scores > 0).all() and scores[0] > scores[1]


# ----------------------------------------------------------------------------- real LLM CoTs

def precision_at_5(rows, tokenizer):
    """Each image's no-mask CoT queries the other images' mask CoTs (IDF over all mask CoTs, every candidate
    past stage 1); the share of the 5 best with the query's diagnosis, averaged over queries."""
    bank = [r["cot_mask"] for r in rows]
    diagnosis = np.array([r["diagnosis"] for r in rows])
    shares = []
    for i, row in enumerate(rows):
        others = np.array([j for j in range(len(rows)) if j != i])
        scores = cot_scores(row["cot_no_mask"], [bank[j] for j in others], bank, tokenizer=tokenizer)
        top = others[np.argsort(-scores, kind="stable")[:5]]
        shares.append(np.mean(diagnosis[top] == diagnosis[i]))
    return float(np.mean(shares))


def test_same_diagnosis_precision_on_real_cots(brisc_csv):
    with open(brisc_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["diagnosis"] for r in rows}) == 3  # chance is 1/3
    ours = precision_at_5(rows, tokenize)
    plain = precision_at_5(rows, lambda t: re.findall(r"[a-z0-9]+", t.lower()))
    print(f"same-diagnosis precision@5: radiology tokenizer {ours:.3f}, plain tokens {plain:.3f}")
    assert ours > 0.55, (ours, plain)  # the measured figures: docs/results.md §2.4
