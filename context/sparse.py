"""Sparse (BM25-like) vectors of text, computed locally: no model, no vocabulary, no download.

A text's terms (lower-cased words, identifiers with their dots and underscores kept, and
their parts) are hashed to 32-bit indices; each term's value is BM25's saturated term
frequency, with a fixed average length (as fastembed's Bm25 does). Qdrant applies the
inverse document frequency itself (`modifier=IDF` on the collection), so a term that
every chunk holds weighs nothing and an identifier that one chunk holds weighs most;
the IDF follows the collection's content as it changes, which a client-side IDF cannot.

A query's vector is its distinct terms, each 1.0: BM25's score is then the sum over the
query's terms of IDF x saturated TF.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass

from django.conf import settings

# The named sparse vector beside the dense (unnamed) one in every collection.
SPARSE_VECTOR = "text"
SEARCH_MODES = ("dense", "sparse", "hybrid")
DEFAULT_SEARCH_MODE = "hybrid"

K1 = 1.2
B = 0.75
AVG_TERMS = 256.0
MAX_TERM_CHARS = 64

# Identifiers keep their inner dots, underscores and hyphens (`sys.setrecursionlimit`,
# `__init__`, `ERR-4021`, `3.12`); each is also split into its parts below.
_TOKEN = re.compile(r"[^\W_]+(?:[._\-][^\W_]+)*|_+[^\W_]+(?:_[^\W_]+)*_*", re.UNICODE)
_PARTS = re.compile(r"[^\W_]+", re.UNICODE)
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just me more most my myself no nor not now of off on once
    only or other our ours ourselves out over own same she should so some such than that
    the their theirs them themselves then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you
    your yours yourself yourselves""".split()
)


@dataclass(frozen=True)
class Sparse:
    indices: list[int]
    values: list[float]

    def __bool__(self) -> bool:
        return bool(self.indices)


def terms(text: str) -> list[str]:
    """The terms of a text, in order, repeated as often as they occur."""
    found: list[str] = []
    for match in _TOKEN.finditer(text.lower()):
        token = match.group(0)[:MAX_TERM_CHARS]
        parts = _PARTS.findall(token)
        if len(parts) > 1 or parts[0] != token:
            found.append(token)  # the identifier as written
        found.extend(p for p in parts if p not in STOPWORDS)
    return found


def term_index(term: str) -> int:
    return zlib.crc32(term.encode("utf-8"))


def _vector(weights: dict[int, float]) -> Sparse:
    indices = sorted(weights)
    return Sparse(indices=indices, values=[float(weights[i]) for i in indices])


def passage_sparse(text: str) -> Sparse:
    """A stored chunk's vector: BM25's saturated term frequency per hashed term."""
    counts = Counter(terms(text))
    length = sum(counts.values())
    norm = K1 * (1 - B + B * length / AVG_TERMS)
    weights: dict[int, float] = {}
    for term, tf in counts.items():
        index = term_index(term)
        weights[index] = weights.get(index, 0.0) + tf * (K1 + 1) / (tf + norm)
    return _vector(weights)


def query_sparse(text: str) -> Sparse:
    """A search text's vector: each distinct term once."""
    return _vector({term_index(term): 1.0 for term in set(terms(text))})


def agent_search_mode(params: dict | None) -> str:
    """An agent's search mode: its params' `search_mode`, else the deployment's
    CONTEXT_SEARCH_MODE."""
    mode = (params or {}).get("search_mode")
    return mode if mode in SEARCH_MODES else settings.CONTEXT_SEARCH_MODE
