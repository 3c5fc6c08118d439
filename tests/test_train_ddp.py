"""Data-parallel training: `torchrun --nproc_per_node 2` on CPU (gloo) gives the same per-step losses and the same
final weights as one process with the same global batch.

Dropout is off in these models, since each process draws its own dropout masks. Pretraining is the demanding case:
the two processes hold different numbers of masked tokens, and the loss must still be the global mean over all of
them, not the mean of the two processes' means.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file

from fastbert.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.slow,  # two processes per test
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
]


def write_classification(path, n, seed):
    rng = random.Random(seed)
    lines = ["text,label"] + [f"the {rng.choice(['film', 'meal', 'trip'])} was {word},{label}" for word, label in
                              (rng.choice([("great", "pos"), ("lovely", "pos"), ("awful", "neg"), ("dull", "neg")])
                               for _ in range(n))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_corpus(path, documents, seed):
    rng = random.Random(seed)
    words = ["cat", "dog", "bird", "sees", "likes", "park", "river", "the", "in", "a"]
    path.write_text("\n\n".join("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
                                         for _ in range(rng.randint(2, 5))) for _ in range(documents)) + "\n")
    return str(path)


def torchrun(argv, nproc=2):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastbert", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def read_log(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def no_dropout_model_dir(tmp_path_factory, minilm_path):
    path = tmp_path_factory.mktemp("no-dropout")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(path))
    transformers.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_two_processes_match_one(command, tmp_path, no_dropout_model_dir):
    if command == "pretrain":
        argv = ["pretrain", "--corpus", write_corpus(tmp_path / "corpus.txt", 24, seed=4), "--config",
                no_dropout_model_dir, "--max-length", "32"]
    else:
        argv = ["finetune", "--task", "classification", "--train", write_classification(tmp_path / "t.csv", 36, 0),
                "--eval", write_classification(tmp_path / "e.csv", 16, 1), "--model", no_dropout_model_dir,
                "--max-length", "32"]
    argv += ["--epochs", "2", "--batch-size", "8", "--lr", "2e-3", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*argv, "--out", str(one)]) == 0
    torchrun([*argv, "--out", str(two)])

    log_one, log_two = read_log(one), read_log(two)
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one]  # one writer, same number of batches
    assert len(log_one) >= 8
    keys = ["loss", "mlm_loss", "nsp_loss", "mlm_accuracy"] if command == "pretrain" else ["loss", "accuracy"]
    for a, b in zip(log_one, log_two, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
        assert a["lr"] == b["lr"]
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    after_epoch_one = load_file(one / f"checkpoint-{len(log_one) // 2}" / "model.safetensors")
    # The second epoch moved the weights, so its steps really test updates synchronized across processes.
    assert max((after_epoch_one[n] - t).abs().max().item() for n, t in weights_one.items()) > 1e-3
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    with open(one / "eval_results.json") as f, open(two / "eval_results.json") as g:
        results_one, results_two = json.load(f), json.load(g)
    assert results_two["loss"] == pytest.approx(results_one["loss"], rel=1e-5)
