"""Raw text to BERT pretraining examples: sentence pairs for next-sentence prediction and masked tokens.

Corpus format (as in BERT's create_pretraining_data.py): UTF-8 text, one sentence (or paragraph) per line, documents
separated by blank lines; every file also ends a document.

Pairs: sentences of a document are gathered until they fill ``max_length - 3`` tokens; the chunk is split at a random
sentence boundary into A and B. With probability 1/2 B is replaced by text from a random other document (label 1)
and the sentences it displaced are used for the next pair; otherwise B is the true continuation (label 0). A
one-sentence chunk that keeps its continuation is split at a random token instead, so single-line paragraphs
still give continuation pairs and the random-B rate stays 1/2. A pair that is too long loses tokens at the start
of A and the end of B, so the two stay adjacent where they meet.

Masking (BERT's recipe): 15% of the non-special tokens of each sequence are chosen for prediction; 80% of them
become [MASK], 10% a random token, 10% stay. Drawn per (seed, epoch, example), so every epoch sees new masks and a
run gives the same masks on any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastbert.train.data import DataError, read_text


def read_documents(paths: list[str]) -> list[list[str]]:
    """[[sentence, ...] per document] from the corpus files."""
    documents = []
    for path in paths:
        current = []
        for line in read_text(path).splitlines():
            if line.strip():
                current.append(line.strip())
            elif current:
                documents.append(current)
                current = []
        if current:
            documents.append(current)
    if not documents:
        raise DataError(f"corpus {', '.join(paths)}: no text; pretraining needs one sentence per line and documents "
                        "separated by blank lines")
    if len(documents) < 2:
        raise DataError(f"corpus {', '.join(paths)}: only one document; next-sentence prediction draws random "
                        "sentences from other documents, so separate at least two documents with a blank line")
    return documents


def tokenize_documents(documents: list[list[str]], tokenizer) -> list[list[list[int]]]:
    """Token ids per sentence per document, without special tokens (sentences with no token are dropped)."""
    flat = [sentence for doc in documents for sentence in doc]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    out, start = [], 0
    for doc in documents:
        sentences = [s for s in ids[start:start + len(doc)] if s]
        start += len(doc)
        if sentences:
            out.append(sentences)
    if len(out) < 2:
        raise DataError("the corpus has fewer than two documents with any token in them")
    return out


@dataclass
class SentencePair:
    a: list[int]
    b: list[int]
    is_random_next: bool  # the next_sentence_label: 0 = B continues A, 1 = B is from another document


def _truncate_pair(pair: SentencePair, max_tokens: int) -> SentencePair:
    """Shorten the longer segment until the pair fits: A loses tokens at its start and B at its end, so the two
    stay adjacent where they meet (the boundary next-sentence prediction looks at)."""
    keep_a, keep_b = len(pair.a), len(pair.b)
    while keep_a + keep_b > max_tokens:
        if keep_a > keep_b:
            keep_a -= 1
        else:
            keep_b -= 1
    return SentencePair(pair.a[len(pair.a) - keep_a:], pair.b[:keep_b], pair.is_random_next)


def build_sentence_pairs(documents: list[list[list[int]]], max_length: int, seed: int) -> list[SentencePair]:
    """NSP pairs from tokenized documents; each fits in max_length tokens with [CLS] A [SEP] B [SEP]."""
    if max_length < 8:
        raise ValueError(f"--max-length must be >= 8 for pretraining pairs, got {max_length}")
    max_tokens = max_length - 3
    rng = np.random.default_rng([seed, 1])
    pairs = []
    for d, doc in enumerate(documents):
        chunk, length, i = [], 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= max_tokens:
                a_end = int(rng.integers(1, len(chunk))) if len(chunk) > 1 else 1
                a = [t for s in chunk[:a_end] for t in s]
                if rng.random() < 0.5:
                    other = documents[(d + int(rng.integers(1, len(documents)))) % len(documents)]  # never doc d
                    b = []
                    for sentence in other[int(rng.integers(len(other))):]:
                        b += sentence
                        if len(a) + len(b) >= max_tokens:
                            break
                    i -= len(chunk) - a_end  # the sentences B displaced start the next chunk
                    pair = SentencePair(a, b, True)
                elif len(chunk) > 1:
                    pair = SentencePair(a, [t for s in chunk[a_end:] for t in s], False)
                else:
                    a = a[:2 * max_tokens]
                    cut = int(rng.integers(1, len(a))) if len(a) > 1 else 1
                    pair = SentencePair(a[:cut], a[cut:], False)
                pair = _truncate_pair(pair, max_tokens)
                if pair.a and pair.b:
                    pairs.append(pair)
                chunk, length = [], 0
            i += 1
    return pairs


def pair_features(pair: SentencePair, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, token_type_ids and special-token mask of [CLS] A [SEP] B [SEP]."""
    input_ids = np.array([cls_id, *pair.a, sep_id, *pair.b, sep_id], dtype=np.int64)
    token_type_ids = np.zeros(len(input_ids), dtype=np.int64)
    token_type_ids[len(pair.a) + 2:] = 1
    special = np.zeros(len(input_ids), dtype=bool)
    special[[0, len(pair.a) + 1, len(input_ids) - 1]] = True
    return input_ids, token_type_ids, special


def mask_tokens(input_ids: np.ndarray, special: np.ndarray, rng: np.random.Generator, vocab_size: int,
                mask_token_id: int, probability: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """(masked input_ids, labels): labels hold the original id at the chosen positions and -100 elsewhere."""
    candidates = np.flatnonzero(~special)
    count = min(len(candidates), max(1, int(round(probability * len(candidates)))))
    chosen = rng.choice(candidates, size=count, replace=False)
    labels = np.full(len(input_ids), -100, dtype=np.int64)
    labels[chosen] = input_ids[chosen]
    masked = input_ids.copy()
    action = rng.random(count)
    masked[chosen[action < 0.8]] = mask_token_id
    randomized = chosen[(action >= 0.8) & (action < 0.9)]
    masked[randomized] = rng.integers(0, vocab_size, size=len(randomized))
    return masked, labels
