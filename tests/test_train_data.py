"""Training files: CSV / JSONL reading, and every kind of bad file rejected with a clear error before training.

The command-line checks pass a --model that does not exist: a run that got past file validation would fail on it
with another message, so the expected message proves the file was rejected first.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from fastbert.cli import main
from fastbert.train import corpus, data
from fastbert.train.finetune import load_files

CLASSIFICATION_CSV = "text,text_pair,label\nhello world,a pair,pos\n\"comma, inside\",second,neg\nthird,x,pos\n"
TOKENS_JSONL = (json.dumps({"tokens": ["Ada", "lives", "in", "New", "York"], "tags": ["B-PER", "O", "O", "B-LOC",
                                                                                     "I-LOC"]}) + "\n"
                + json.dumps({"tokens": ["Bob"], "ner_tags": ["B-PER"]}) + "\n")


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_classification_csv_with_text_pair(tmp_path):
    examples = data.load_classification(write(tmp_path, "train.csv", CLASSIFICATION_CSV))
    assert examples.texts == ["hello world", "comma, inside", "third"]
    assert examples.text_pairs == ["a pair", "second", "x"]
    assert examples.labels == ["pos", "neg", "pos"] and examples.label_kind == "string"
    assert examples.lines == [2, 3, 4]


def test_classification_jsonl_and_csv_integer_labels_agree(tmp_path):
    jsonl = write(tmp_path, "a.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n"
                                               for t, y in [("a", 1), ("b", 0), ("c", 2)]))
    csv_path = write(tmp_path, "b.csv", "label,text\n2,x\n0,y\n")
    train, evaluation, labels = load_files("classification", jsonl, csv_path)
    assert train.labels == [1, 0, 2] and evaluation.labels == [2, 0] and labels == [0, 1, 2]
    assert train.text_pairs is None


def test_token_classification_jsonl_and_csv(tmp_path):
    examples = data.load_token_classification(write(tmp_path, "t.jsonl", TOKENS_JSONL))
    assert examples.tokens[1] == ["Bob"] and examples.tags[1] == ["B-PER"]
    csv_examples = data.load_token_classification(write(tmp_path, "t.csv", "tokens,tags\nAda  runs,B-PER O\n"))
    assert csv_examples.tokens == [["Ada", "runs"]] and csv_examples.tags == [["B-PER", "O"]]


def test_token_labels_sit_on_first_subword(tmp_path, tokenizer):
    examples = data.load_token_classification(write(tmp_path, "t.jsonl", TOKENS_JSONL))
    tags = ["B-LOC", "B-PER", "I-LOC", "O"]
    features = data.encode_token_classification(examples, tokenizer, {t: i for i, t in enumerate(tags)}, 32)
    first = features[0]
    assert len(first["word_positions"]) == 5
    for word, position in enumerate(first["word_positions"]):
        assert first["labels"][position] == tags.index(examples.tags[0][word])
    assert sum(label != -100 for label in first["labels"]) == 5  # one labelled token per word, specials ignored
    truncated = data.encode_token_classification(examples, tokenizer, {t: i for i, t in enumerate(tags)}, 4)
    assert truncated[0]["word_positions"][-1] == -1  # truncated away: evaluation scores it as 'O'


BAD_CLASSIFICATION = [
    ("missing column", "text,target\nhi,1\nho,0\n", None, "missing columns 'label'"),
    ("missing key", '{"text": "a", "label": "x"}\n{"text": "b"}\n', None, "line 2: no value for 'label'"),
    ("mixed label types", "text,label\na,1\nb,neg\nc,0\n", None, "mix integers (1 on line 2) and strings ('neg'"),
    ("float label", '{"text": "a", "label": 0.5}\n{"text": "b", "label": 1}\n', None, "is a float"),
    ("bool label", '{"text": "a", "label": true}\n', None, "label True is a bool"),
    ("list label", '{"text": "a", "label": [1]}\n', None, "label [1] is a list"),
    ("text not a string", '{"text": 3, "label": "a"}\n', None, "'text' must be a string"),
    ("unknown eval label", "text,label\na,pos\nb,neg\n", "text,label\nc,neutral\n",
     "'neutral' (line 2) do not occur in the training file"),
    ("label kinds differ between files", "text,label\na,1\nb,0\n", "text,label\nc,pos\n",
     "has integer labels but"),
    ("one class", "text,label\na,pos\nb,pos\n", None, "at least two classes"),
    ("empty file", "", None, "is empty"),
    ("whitespace only", "\n  \n", None, "is empty"),
    ("header only", "text,label\n", None, "has a header but no rows"),
    ("not utf-8", "text,label\ncaf\xe9,pos\nb,neg\n".encode("latin-1"), None,
     "not UTF-8 text (byte 0xe9 on line 2 cannot be decoded)"),
    ("invalid json", '{"text": "a", "label": "x"}\n{"text": "b", label: "y"}\n', None, "line 2: not valid JSON"),
    ("json not an object", '["a", "x"]\n', None, "expected a JSON object"),
    ("extra csv field", "text,label\na,pos,extra\n", None, "more fields than the header"),
]


@pytest.mark.parametrize("case, train, evaluation, message", BAD_CLASSIFICATION, ids=[c[0] for c in BAD_CLASSIFICATION])
def test_bad_classification_files(tmp_path, case, train, evaluation, message):
    ext = ".jsonl" if isinstance(train, str) and train.lstrip().startswith(("{", "[")) else ".csv"
    train_path = write(tmp_path, "train" + ext, train)
    eval_path = write(tmp_path, "eval.csv", evaluation if evaluation is not None else "text,label\nz,pos\nw,neg\n")
    with pytest.raises(data.DataError) as exc:
        load_files("classification", train_path, eval_path)
    assert message in str(exc.value)
    assert train_path in str(exc.value) or eval_path in str(exc.value)


BAD_TOKENS = [
    ("length mismatch", '{"tokens": ["a", "b", "c"], "tags": ["O", "O"]}\n', "3 tokens but 2 tags"),
    ("integer tags", '{"tokens": ["a"], "tags": [3]}\n', "holds 3, not a non-empty string (tags must be names"),
    ("not IOB", '{"tokens": ["a", "b"], "tags": ["PER", "O"]}\n', "tag 'PER' is not in IOB form"),
    ("empty tokens", '{"tokens": [], "tags": []}\n', "'tokens' must be a non-empty list"),
    ("missing tags", '{"tokens": ["a"]}\n', "missing keys 'tags'"),
]


@pytest.mark.parametrize("case, train, message", BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS])
def test_bad_token_classification_files(tmp_path, case, train, message):
    good = '{"tokens": ["a", "b"], "tags": ["B-PER", "O"]}\n'
    with pytest.raises(data.DataError) as exc:
        load_files("token-classification", write(tmp_path, "train.jsonl", train), write(tmp_path, "e.jsonl", good))
    assert message in str(exc.value)


@pytest.mark.parametrize("content, message", [
    ("", "no text"),
    ("one document only\nstill the same document\n", "only one document"),
    (b"caf\xe9\n\nother\n", "not UTF-8 text"),
])
def test_bad_corpus(tmp_path, content, message):
    with pytest.raises(data.DataError) as exc:
        corpus.read_documents([write(tmp_path, "corpus.txt", content)])
    assert message in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.load_classification(str(tmp_path / "nope.csv"))


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_cli_rejects_bad_file_before_training(tmp_path, capsys, command):
    bad = write(tmp_path, "bad.csv", "text,label\na,1\nb,neg\n" if command == "finetune" else "")
    out = tmp_path / "out"
    if command == "finetune":
        argv = ["finetune", "--task", "classification", "--train", bad, "--eval", bad]
        argv += ["--model", str(tmp_path / "no-such-model")]
    else:
        argv = ["pretrain", "--corpus", bad, "--config", "tiny"]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(out)])
    assert exc.value.code == 2
    assert ("mix integers" if command == "finetune" else "no text") in capsys.readouterr().err
    assert not os.path.exists(out)


def test_cli_names_the_missing_metrics_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "seqeval.metrics", None)  # import of it now raises ImportError
    path = write(tmp_path, "t.csv", "text,label\na,x\nb,y\n")
    rc = main(["finetune", "--task", "classification", "--train", path, "--eval", path, "--model", str(tmp_path),
               "--out", str(tmp_path / "out")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "pip install scikit-learn seqeval" in err and "fastbert[" not in err  # the index's fastbert is not ours
    assert not os.path.exists(tmp_path / "out")
