"""One masked-LM training step, fastbert vs transformers, in the same run: what `fastbert pretrain` does per step.

``fastbert bench --train`` times the encoder (BertModel) with a synthetic loss; this script times the whole
BertForMaskedLM step the training loop runs: ``model(**batch, labels=labels).loss`` in train mode (dropout on) with
15% of the tokens labelled, backward, gradient clipping, AdamW step (fastbert.train.loop's optimizer).
Providers alternate A B C A B C; medians are reported with the torch thread count.

Before timing, each provider's loss and gradients (eval mode, same weights, same batch) are compared with
transformers-eager's.

    python benchmarks/train_step.py --model bert-base --batch-size 8 --seq-len 128 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os

import torch
import transformers

import fastbert
from fastbert.bench.models import load_model
from fastbert.bench.report import device_info
from fastbert.bench.timing import time_alternating
from fastbert.train.loop import build_optimizer

# fastbert-sparse: config.sparse_mlm_logits = True, the opt-in that fastbert pretrain uses (only the labelled
# positions are projected onto the vocabulary); fastbert: transformers' full (batch, seq, vocab) logits.
PROVIDERS = ("fastbert", "fastbert-sparse", "transformers-eager", "transformers-sdpa")


def mlm_model(spec):
    """transformers BertForMaskedLM holding the benchmark model's encoder and a random MLM head (seed 0)."""
    torch.manual_seed(0)
    config = copy.deepcopy(spec.config)
    model = transformers.BertForMaskedLM(config)
    encoder = {k: v for k, v in spec.hf_model.state_dict().items() if not k.startswith("pooler.")}
    model.bert.load_state_dict(encoder, strict=True)
    return model


def make_batch(config, batch_size, seq_len, varlen, seed=0):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, config.vocab_size, (batch_size, seq_len), generator=gen)
    lengths = torch.full((batch_size,), seq_len)
    if varlen:
        lengths = torch.randint(seq_len // 4, seq_len + 1, (batch_size,), generator=gen)
        lengths[0] = seq_len
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    chosen = (torch.rand(batch_size, seq_len, generator=gen) < 0.15) & attention_mask.bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    input_ids = input_ids.masked_fill(chosen, 103).masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids)}, labels


def mlm_loss(model, inputs, labels):
    """Each library's own MLM training call. With labels in training mode fastbert-sparse projects only the
    labelled positions onto the vocabulary; the others project every position."""
    return model(**inputs, labels=labels).loss


def build(name, hf_mlm):
    if name.startswith("fastbert"):
        model = fastbert.from_hf(copy.deepcopy(hf_mlm))
        model.config.sparse_mlm_logits = name == "fastbert-sparse"
        return model
    model = copy.deepcopy(hf_mlm)
    model.set_attn_implementation("eager" if name == "transformers-eager" else "sdpa")
    return model


def check(models, inputs, labels) -> dict:
    """Loss and the largest gradient difference (relative to the largest gradient) vs transformers-eager."""
    grads, losses = {}, {}
    for name, model in models.items():
        model.eval().zero_grad(set_to_none=True)
        loss = mlm_loss(model, inputs, labels)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    base = grads["transformers-eager"]
    scale = max(g.abs().max().item() for g in base.values())
    return {name: {"loss": losses[name], "loss_diff": abs(losses[name] - losses["transformers-eager"]),
                   "max_grad_diff_rel": max((grads[name][n] - g).abs().max().item() for n, g in base.items()) / scale}
            for name in models}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-base", help="minilm, bert-base, bert-large or a local directory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--varlen", action="store_true", help="random lengths in [seq_len / 4, seq_len], padded")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="directory for a train-step-<time>.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    spec = load_model(args.model)
    hf_mlm = mlm_model(spec)
    inputs, labels = make_batch(spec.config, args.batch_size, args.seq_len, args.varlen)
    models = {name: build(name, hf_mlm) for name in PROVIDERS}
    checks = check(models, inputs, labels)

    def step_fn(model):
        optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.01)

        def step():
            loss = mlm_loss(model, inputs, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    for model in models.values():
        model.train()
    timings = time_alternating({name: step_fn(m) for name, m in models.items()}, device, args.warmup, args.repeats)
    tokens = int(inputs["attention_mask"].sum())
    baseline = timings["transformers-sdpa"]["median_ms"]
    rows = {name: {**t, **checks[name], "tokens_per_s": tokens / (t["median_ms"] * 1e-3),
                   "speedup_vs_transformers_sdpa": baseline / t["median_ms"]} for name, t in timings.items()}
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "system": device_info(device), "backends": {k: str(v) for k, v in fastbert.backends("cpu").items()},
           "benchmark": "BertForMaskedLM train step (fwd + MLM loss + bwd + clip + AdamW), train mode, fp32",
           "model": spec.name, "batch_size": args.batch_size, "seq_len": args.seq_len, "varlen": args.varlen,
           "real_tokens": tokens, "results": rows}
    print(f"{spec.name} BertForMaskedLM train step, batch {args.batch_size} x {args.seq_len}"
          f"{' varlen' if args.varlen else ''}, fp32, {torch.get_num_threads()} threads, {doc['system']['cpu_model']}")
    for name, row in rows.items():
        print(f"  {name:20s} median {row['median_ms']:9.1f} ms  p10 {row['p10_ms']:9.1f}  p90 {row['p90_ms']:9.1f}  "
              f"{row['tokens_per_s']:8.0f} tok/s  {row['speedup_vs_transformers_sdpa']:.3f}x vs sdpa  "
              f"grad diff {row['max_grad_diff_rel']:.1e}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join(args.out, f"train-step-{stamp}.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {path}")
    return doc


if __name__ == "__main__":
    main()
