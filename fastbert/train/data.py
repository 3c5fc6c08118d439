"""Labelled files for ``fastbert finetune``: reading, validation, label vocabularies, tokenization, padding.

Formats (the extension decides; anything else is read as JSON Lines when it starts with ``{`` or ``[``, else CSV):

- ``.csv`` / ``.tsv``: a header row, then one example per row.
- ``.jsonl`` / ``.json``: one JSON object per line (a ``.json`` file may also hold one JSON array of objects).

Sequence classification: ``text`` (and optionally ``text_pair``) plus ``label``, where the labels of both files are
all integers (class ids) or all strings (class names). Token classification: ``tokens`` plus ``tags`` (or
``ner_tags``), equally long lists of strings in IOB form (``O``, ``B-PER``, ``I-PER``, ...); in CSV both are
whitespace-separated strings.

Every problem is a :class:`DataError` naming the file, the line and the fix, raised before any model is built.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass

import torch

_INTEGER = re.compile(r"[+-]?\d+")
# seqeval reads these prefixes (IOB1/IOB2/IOE/IOBES/BILOU); a bare "PER" would be scored as garbage.
_TAG_PREFIXES = ("B-", "I-", "E-", "S-", "L-", "U-")


class DataError(ValueError):
    """A training or evaluation file that cannot be used; the message says which file, where, and how to fix it."""


def read_text(path: str) -> str:
    """The whole file as text (UTF-8, an optional byte-order mark is dropped)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path} is a directory; pass a CSV or JSONL file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line} cannot be decoded); "
            "re-save the file as UTF-8"
        ) from None


def _file_format(path: str, text: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json", ".ndjson"):
        return "json"
    if ext in (".csv", ".tsv"):
        return ext[1:]
    return "json" if text.lstrip()[:1] in ("{", "[") else "csv"


def read_records(path: str) -> tuple[list[tuple[int, dict]], str]:
    """[(line number, record)], and the format ('csv', 'tsv' or 'json'). CSV values are strings, or None where a
    row is shorter than the header."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header row (CSV) or one JSON object per line (JSONL)")
    fmt = _file_format(path, text)
    if fmt != "json":
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        records = []
        for row in reader:
            if None in row:
                raise DataError(f"{path}, line {reader.line_num}: more fields than the header has columns "
                                f"({', '.join(reader.fieldnames)}); quote values that contain the delimiter")
            records.append((reader.line_num, row))
        if not records:
            raise DataError(f"{path} has a header but no rows")
        return records, fmt
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
        records = [(i + 1, item) for i, item in enumerate(items)]  # "line" = position in the array here
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}); JSON Lines files hold one "
                                'object per line, such as {"text": "...", "label": "..."}') from None
    if not records:
        raise DataError(f"{path} holds no records")
    for number, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
    return records, fmt


def _require_columns(path, records, fmt, required, task):
    seen = set(records[0][1]) if fmt != "json" else set().union(*(r.keys() for _, r in records))
    missing = [c for c in required if not _has_alias(c, seen)]
    if missing:
        kind = "columns" if fmt != "json" else "keys"
        raise DataError(f"{path}: missing {kind} {', '.join(repr(c) for c in missing)} (found: "
                        f"{', '.join(sorted(map(str, seen))) or 'none'}); {task} needs {_NEEDS[task]}")


_NEEDS = {
    "classification": "'text' and 'label' (optionally 'text_pair')",
    "token-classification": "'tokens' and 'tags' (or 'ner_tags')",
}
_ALIASES = {"tags": ("tags", "ner_tags")}


def _has_alias(column, seen):
    return any(name in seen for name in _ALIASES.get(column, (column,)))


def _value(path, number, record, column):
    for name in _ALIASES.get(column, (column,)):
        if record.get(name) is not None:
            return record[name]
    raise DataError(f"{path}, line {number}: no value for {column!r}")


def _label(path, number, raw, from_csv):
    """(value, kind) of one classification label; kind is 'integer' or 'string'."""
    if from_csv:
        text = raw.strip()
        if not text:
            raise DataError(f"{path}, line {number}: empty label")
        return (int(text), "integer") if _INTEGER.fullmatch(text) else (text, "string")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        hint = " (regression is not supported)" if isinstance(raw, float) else ""
        raise DataError(f"{path}, line {number}: label {raw!r} is a {type(raw).__name__}{hint}; labels must be "
                        "integer class ids or class-name strings")
    if isinstance(raw, str) and not raw.strip():
        raise DataError(f"{path}, line {number}: empty label")
    return raw, ("integer" if isinstance(raw, int) else "string")


def _one_kind(path, kinds, what):
    """kinds: {kind: (line, value)}; a file must not mix integer and string labels."""
    if len(kinds) > 1:
        (line_i, value_i), (line_s, value_s) = kinds["integer"], kinds["string"]
        raise DataError(f"{path}: the {what}s mix integers ({value_i!r} on line {line_i}) and strings ({value_s!r} "
                        f"on line {line_s}); use class ids everywhere or class names everywhere")
    return next(iter(kinds))


@dataclass
class ClassificationExamples:
    path: str
    texts: list[str]
    text_pairs: list[str] | None
    labels: list  # int class ids or str class names, one kind per file
    label_kind: str  # "integer" or "string"
    lines: list[int]


def load_classification(path: str) -> ClassificationExamples:
    records, fmt = read_records(path)
    _require_columns(path, records, fmt, ("text", "label"), "classification")
    has_pair = any("text_pair" in r for _, r in records)
    texts, pairs, labels, lines, kinds = [], [] if has_pair else None, [], [], {}
    for number, record in records:
        text = _value(path, number, record, "text")
        if not isinstance(text, str):
            raise DataError(f"{path}, line {number}: 'text' must be a string, got {type(text).__name__}")
        if has_pair:
            pair = _value(path, number, record, "text_pair")
            if not isinstance(pair, str):
                raise DataError(f"{path}, line {number}: 'text_pair' must be a string, got {type(pair).__name__}")
            pairs.append(pair)
        label, kind = _label(path, number, _value(path, number, record, "label"), fmt != "json")
        kinds.setdefault(kind, (number, label))
        texts.append(text)
        labels.append(label)
        lines.append(number)
    return ClassificationExamples(path, texts, pairs, labels, _one_kind(path, kinds, "label"), lines)


@dataclass
class TokenClassificationExamples:
    path: str
    tokens: list[list[str]]
    tags: list[list[str]]
    lines: list[int]


def _string_list(path, number, value, column, from_csv):
    if from_csv:
        value = value.split()
    if not isinstance(value, list) or not value:
        raise DataError(f"{path}, line {number}: {column!r} must be a non-empty list of strings"
                        + (" (whitespace-separated in CSV)" if from_csv else ""))
    for item in value:
        if not isinstance(item, str) or not item:
            hint = (" (tags must be names such as 'B-PER', 'I-PER', 'O': entity-level F1 reads the IOB scheme)"
                    if column == "tags" else "")
            raise DataError(f"{path}, line {number}: {column!r} holds {item!r}, not a non-empty string{hint}")
    return value


def load_token_classification(path: str) -> TokenClassificationExamples:
    records, fmt = read_records(path)
    _require_columns(path, records, fmt, ("tokens", "tags"), "token-classification")
    tokens, tags, lines = [], [], []
    for number, record in records:
        words = _string_list(path, number, _value(path, number, record, "tokens"), "tokens", fmt != "json")
        word_tags = _string_list(path, number, _value(path, number, record, "tags"), "tags", fmt != "json")
        if len(words) != len(word_tags):
            raise DataError(f"{path}, line {number}: {len(words)} tokens but {len(word_tags)} tags; every token "
                            "needs exactly one tag")
        for tag in word_tags:
            if tag != "O" and not (tag.startswith(_TAG_PREFIXES) and len(tag) > 2):
                raise DataError(f"{path}, line {number}: tag {tag!r} is not in IOB form ('O', 'B-TYPE', "
                                "'I-TYPE', ...); entity-level F1 needs the prefixes")
        tokens.append(words)
        tags.append(word_tags)
        lines.append(number)
    return TokenClassificationExamples(path, tokens, tags, lines)


def label_list(train_labels, train_path, eval_labels, eval_path, eval_lines, what="label") -> list:
    """Sorted distinct training labels (class id i <-> label_list[i]); every evaluation label must be among them."""
    labels = sorted(set(train_labels))
    if len(labels) < 2:
        raise DataError(f"{train_path}: every {what} is {labels[0]!r}; a classifier needs at least two classes")
    known = set(labels)
    unknown = {}
    for label, line in zip(eval_labels, eval_lines, strict=True):
        if label not in known:
            unknown.setdefault(label, line)
    if unknown:
        shown = ", ".join(f"{label!r} (line {line})" for label, line in list(unknown.items())[:5])
        raise DataError(f"{eval_path}: {what}(s) {shown} do not occur in the training file {train_path}; the model "
                        f"can only predict {what}s it was trained on (known: {', '.join(map(repr, labels[:20]))})")
    return labels


def encode_classification(examples: ClassificationExamples, tokenizer, label_to_id: dict, max_length: int):
    """[{input_ids, token_type_ids, label}], truncated to max_length tokens (longest segment first for pairs)."""
    enc = tokenizer(examples.texts, examples.text_pairs, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "token_type_ids": types, "label": label_to_id[label]}
            for ids, types, label in zip(enc["input_ids"], enc["token_type_ids"], examples.labels, strict=True)]


def encode_token_classification(examples: TokenClassificationExamples, tokenizer, tag_to_id: dict, max_length: int):
    """[{input_ids, token_type_ids, labels, word_positions}]: each word's tag sits on its first sub-word token
    (the others get -100, ignored by the loss); word_positions[j] is that token's index, or -1 for a word that was
    truncated away or produced no token (evaluation scores those words as predicted 'O')."""
    enc = tokenizer(examples.tokens, is_split_into_words=True, truncation=True, max_length=max_length)
    features = []
    for i, tags in enumerate(examples.tags):
        labels, positions = [], [-1] * len(tags)
        previous = None
        for position, word in enumerate(enc.word_ids(i)):
            first = word is not None and word != previous
            labels.append(tag_to_id[tags[word]] if first else -100)
            if first:
                positions[word] = position
            previous = word
        features.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                         "labels": labels, "word_positions": positions})
    return features


def pad_batch(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids (B, T), attention_mask (B, T), token_type_ids (B, T), and
    labels (B, T) padded with -100 when per-token, else (B,); next_sentence_label (B,) when present."""
    lengths = [len(f["input_ids"]) for f in features]
    batch, seqlen = len(features), max(lengths)
    input_ids = torch.full((batch, seqlen), pad_token_id, dtype=torch.long)
    token_type_ids = torch.zeros(batch, seqlen, dtype=torch.long)
    attention_mask = torch.zeros(batch, seqlen, dtype=torch.long)
    token_labels = torch.full((batch, seqlen), -100, dtype=torch.long) if "labels" in features[0] else None
    for i, (f, n) in enumerate(zip(features, lengths, strict=True)):
        input_ids[i, :n] = torch.as_tensor(f["input_ids"])
        token_type_ids[i, :n] = torch.as_tensor(f["token_type_ids"])
        attention_mask[i, :n] = 1
        if token_labels is not None:
            token_labels[i, :n] = torch.as_tensor(f["labels"])
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if token_labels is not None:
        out["labels"] = token_labels
    for key in ("label", "next_sentence_label"):
        if key in features[0]:
            out[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
    return out
