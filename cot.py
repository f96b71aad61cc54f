"""Chain-of-thought text (docs/design.md §5): the four-part format every reasoner writes, and BM25 over it.

    Texture: ...  Boundary: ...  Context: ...  Summary: ...

parse_cot reads the four fields out of an LLM reply (markdown, numbering, preambles tolerated) and
format_cot writes the canonical text that is cached (pool.py) and indexed. tokenize turns radiology
prose into stems; CotIndex scores texts with BM25 (rank-bm25), and reference selection (retrieve.py)
uses those scores to drop candidates that look alike but reason differently.
"""
import re
from collections import Counter
from functools import lru_cache

import numpy as np
import scipy.sparse
from rank_bm25 import BM25Okapi

# ----------------------------------------------------------------------------- the four-part format

FIELDS = ("texture", "boundary", "context", "summary")
# a field heading at the start of a line; markdown (#, >, -, *, **bold**) and numbering ("1." "2)") allowed
HEADING = re.compile(r"^[ \t>#*\-]*(?:\d+[.)][ \t]*)?[*_]*[ \t]*(texture|boundary|context|summary)[ \t]*[*_]*"
                     r"[ \t]*[:：][*_]*", re.IGNORECASE | re.MULTILINE)


def parse_cot(text):
    """The four fields {texture, boundary, context, summary} of a CoT reply; ValueError when one is missing or
    empty.

    Tolerates a preamble, markdown, numbering, any order and extra whitespace; after the last
    field, text beyond a blank line (closing chatter) is dropped."""
    text = re.sub(r"<think>.*?</think>", "", str(text), flags=re.DOTALL)  # reasoning models' scratchpad
    heads, found = list(HEADING.finditer(text)), {}
    for head, following in zip(heads, heads[1:] + [None]):
        body = text[head.end():following.start() if following else len(text)]
        if following is None:
            body = re.split(r"\n[ \t]*\n", body.strip(), maxsplit=1)[0]
        found.setdefault(head.group(1).lower(), " ".join(body.replace("**", "").split()))
    missing = [f.capitalize() for f in FIELDS if not re.search(r"\w", found.get(f, ""))]
    if missing:
        raise ValueError(f"CoT reply lacks {', '.join(missing)}: {' '.join(str(text).split())[:120]!r}")
    return {f: found[f] for f in FIELDS}


def format_cot(fields):
    """The canonical four-line text that is cached and indexed by BM25."""
    return "\n".join(f"{f.capitalize()}: {fields[f]}" for f in FIELDS)


# ----------------------------------------------------------------------------- a tokenizer for radiology CoT

# the field labels are structure, not evidence
FIELD_LABEL = re.compile(r"\b(?:texture|boundary|context|summary)\s*:", re.IGNORECASE)
WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # hyphenated compounds stay one match; '/' separates
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having here how
if in into is it its itself may might more most much must near of off on once only or other over own same
shall should so some such than that the their them then there these they this those through to too under
until up upon very via was were what when where which while who whom why will with would
""".split())
# inflection suffixes, longest first: stripped repeatedly so that enhancing / enhanced / enhancement
# and heterogeneous / heterogeneity / heterogeneously meet at one stem
SUFFIXES = ("ations", "ation", "ments", "ment", "ness", "ities", "ity", "ously", "ous", "ative", "ating",
            "ated", "ate", "ively", "ive", "ingly", "ing", "edly", "ed", "ies", "ly", "al", "ic", "es", "s",
            "e", "y")


@lru_cache(maxsize=1 << 16)
def stem(word):
    """A small suffix stripper: crude, but it maps the inflected forms of one root to one token."""
    stripped = False
    while True:
        suffix = next((s for s in SUFFIXES if word.endswith(s) and len(word) - len(s) >= 3
                       and not (s == "s" and word[-2] in "isu")), None)  # keep mass, status, ... whole
        if suffix is None:
            break
        word, stripped = word[:-len(suffix)], True
    if stripped and len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouylsz":
        word = word[:-1]  # blurred -> blurr -> blur
    return word


@lru_cache(maxsize=1 << 16)
def _tokens(text):
    out = []
    for match in WORD.finditer(FIELD_LABEL.sub(" ", text).lower()):
        parts = [p for p in match.group().split("-") if len(p) > 1 and p not in STOPWORDS]
        out += [stem(p) for p in parts]
        if len(parts) > 1:
            out.append(stem("".join(parts)))  # ill-defined also as illdefined, so both spellings meet
    return tuple(out)


def tokenize(text):
    """Radiology CoT text -> stems: case folded, punctuation and stopwords and field labels dropped,
    inflected forms stemmed, hyphenated forms split and also kept joined."""
    return list(_tokens(text or ""))


# ----------------------------------------------------------------------------- BM25 over distinct CoT texts

class CotIndex:
    """BM25 over distinct texts. Many bank entries share their case's CoT, so each text is one document:
    IDF comes from the whole pool and scoring costs per distinct text, not per patch.

    rank-bm25's BM25Okapi holds the corpus statistics (term counts, lengths, k1, b). Its IDF is replaced by
    the smoothed, always positive log(1 + (N - n + 0.5) / (n + 0.5)) (Lucene's): a pool has few cases (8 in
    LA_8), so most words sit in over half the documents, where Okapi's IDF is negative and rank-bm25's
    floor (epsilon x mean IDF) turns negative too, and every score of a templated pool would be < 0."""

    def __init__(self, texts, tokenizer=tokenize, k1=1.5, b=0.75):
        self.texts = list(dict.fromkeys(texts))
        self.doc_of = {t: i for i, t in enumerate(self.texts)}
        self.tokenizer = tokenizer
        tokens = [tokenizer(t) for t in self.texts]
        if not any(tokens):
            raise ValueError(f"the {len(self.texts)} CoT texts of the pool contain no words to index")
        self.bm25 = BM25Okapi(tokens, k1=k1, b=b)
        n = Counter(t for doc in self.bm25.doc_freqs for t in doc)  # documents holding each term
        self.vocab = {t: j for j, t in enumerate(n)}
        n = np.fromiter(n.values(), float, len(n))
        self.idf = np.log1p((len(self.texts) - n + 0.5) / (n + 0.5))
        self.weights = self.term_weights(self.bm25.doc_freqs, self.bm25.doc_len)  # (docs, vocab)

    def term_weights(self, freqs, lengths):
        """BM25 weight of every (document, term) pair from rank-bm25's precomputed statistics, as a sparse
        matrix: a query's scores are then one product, BM25Okapi.get_scores' numbers (with this IDF)."""
        rows, cols, tf, dl = [], [], [], []
        for r, (doc, n) in enumerate(zip(freqs, lengths)):
            for term, count in doc.items():
                if term in self.vocab:
                    rows.append(r), cols.append(self.vocab[term]), tf.append(count), dl.append(n)
        bm = self.bm25
        tf, dl = np.array(tf, float), np.array(dl, float)
        data = self.idf[cols] * tf * (bm.k1 + 1) / (tf + bm.k1 * (1 - bm.b + bm.b * dl / bm.avgdl))
        return scipy.sparse.csr_matrix((data, (rows, cols)), shape=(len(freqs), len(self.vocab)))

    def query_matrix(self, texts):
        """(vocab, B) counts of each query's indexed terms; repeated query words count repeatedly, as in
        BM25."""
        q = np.zeros((len(self.vocab), len(texts)))
        for i, text in enumerate(texts):
            for term in self.tokenizer(text or ""):
                if term in self.vocab:
                    q[self.vocab[term], i] += 1
        return q

    def scores(self, texts, docs):
        """Raw BM25 scores (len(docs), B) of the given documents for each query text."""
        return np.asarray(self.weights[docs] @ self.query_matrix(texts))


@lru_cache(maxsize=4)
def _cached_index(corpus, tokenizer):
    return CotIndex(corpus, tokenizer)


def cot_scores(query, candidates, corpus, tokenizer=tokenize):
    """Raw BM25 score (CotIndex: smoothed IDF) of each candidate text for the query text, IDF and average
    length from `corpus`
    (candidates need not belong to it). Selection normalises these per query; see select()."""
    index = _cached_index(tuple(corpus), tokenizer)
    rows = [index.doc_of.get(c) for c in candidates]
    if None in rows:
        token_lists = [tokenizer(c) for c in candidates]
        weights = index.term_weights([Counter(t) for t in token_lists], [len(t) for t in token_lists])
    else:
        weights = index.weights[rows]
    return np.asarray(weights @ index.query_matrix([query]))[:, 0]
