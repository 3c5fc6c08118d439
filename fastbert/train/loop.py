"""The training loop ``fastbert finetune`` and ``fastbert pretrain`` share.

AdamW (no weight decay on biases and LayerNorm weights) with linear warmup and linear decay, bf16/fp16 autocast on
GPU, gradient clipping, a progress bar with loss and throughput, evaluation and a checkpoint after every epoch, and
DistributedDataParallel when started by ``torchrun`` (NCCL on GPU, gloo on CPU).

A task is any object with:

- ``num_examples``: the number of training examples;
- ``make_batch(indices, epoch) -> dict`` of CPU tensors, keyed like the model's forward arguments plus labels;
- ``compute(model, batch) -> {name: LossTerm}``: summed losses; the step minimizes the sum over terms of
  loss_sum / count, with counts summed over all processes, so N processes give the same loss and gradients as one
  process on the same global batch (a per-process mean would weigh processes with fewer masked tokens higher);
- ``evaluate(model, batch_size, autocast) -> dict`` of metrics.

``--batch-size`` is the global batch: each process takes its share of every batch, and the data order is a pure
function of (seed, epoch), so a run gives the same batches on any number of processes and a resumed run skips
exactly the batches it had consumed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.utils import logging as hf_logging

from fastbert.train import checkpoint as ckpt
from fastbert.train.errors import DiskFullError, TrainingDivergedError, is_disk_full, warn


@dataclass
class TrainSettings:
    out_dir: str
    epochs: int = 3
    batch_size: int = 32  # global, over all processes
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    save_steps: int = 0  # also checkpoint every N steps (checkpoints are always written after each epoch)
    keep_checkpoints: int = 2  # 0 keeps all
    progress: bool = True


def check_settings(s) -> None:
    """Hyper-parameters in range and finite, before anything runs (``s``: TrainSettings or the parsed command line);
    errors name the command-line option. An infinite --lr or a NaN --weight-decay would train a model of NaNs, and a
    NaN --max-grad-norm would silently turn clipping off."""
    def option(name):
        return "--" + name.replace("_", "-")

    for name, least in (("epochs", 1), ("batch_size", 1), ("save_steps", 0), ("keep_checkpoints", 0)):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{option(name)} must be an integer >= {least}, got {value!r}")
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed < 2**63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {s.seed!r}")
    for name, low, high, low_open in (("lr", 0.0, math.inf, True), ("weight_decay", 0.0, math.inf, False),
                                      ("max_grad_norm", 0.0, math.inf, False), ("warmup_ratio", 0.0, 1.0, False)):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{option(name)} must be a finite number, got {value!r}")
        if value < low or (low_open and value == low) or value > high:
            allowed = f"> {low:g}" if low_open else (f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]")
            raise ValueError(f"{option(name)} must be {allowed}, got {value!r}")


@dataclass
class LossTerm:
    """One loss of a step, as sums over this process's share of the batch."""

    loss_sum: torch.Tensor  # () summed loss, carries the autograd graph
    count: torch.Tensor  # () number of items summed (examples, or masked / labelled tokens)
    correct: torch.Tensor  # () items whose argmax prediction equals the label


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this code called init_process_group (and so tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda; got {name!r}")
    return torch.device(name)


def setup_distributed(device_name: str = "auto") -> Distributed:
    """One process per device under ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    a plain single process otherwise."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device, started)


def teardown_distributed(state: Distributed) -> None:
    if state.started_here and dist.is_initialized():
        dist.destroy_process_group()


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights are not decayed (BERT's recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or "LayerNorm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int, world_size: int) -> list[np.ndarray]:
    """The global batches of one epoch: a permutation drawn from (seed, epoch), cut into batch_size pieces. A last
    batch with fewer examples than processes is dropped (a process with no example cannot join the step)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    batches = [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    return [b for b in batches if len(b) >= world_size]


def rank_share(global_batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    return np.array_split(global_batch, world_size)[rank]


def combine_terms(terms: dict[str, LossTerm], counts: torch.Tensor | None = None) -> torch.Tensor:
    """sum over terms of loss_sum / count; ``counts`` (one per term) are the counts summed over all processes."""
    if counts is None:
        counts = torch.stack([t.count for t in terms.values()]).float()
    return sum(t.loss_sum.float() / counts[i].clamp(min=1) for i, t in enumerate(terms.values()))


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout's random stream for one step of one process: reproducible after a resume, distinct per process."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16; got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float16


class TrainingLoop:
    """Runs ``settings.epochs`` epochs of ``task`` on ``model`` and writes everything under settings.out_dir."""

    def __init__(self, model, task, tokenizer, settings: TrainSettings, state: Distributed,
                 resume_from: str | None = None, run_settings: dict | None = None):
        check_settings(settings)
        self.task, self.tokenizer, self.settings, self.dist = task, tokenizer, settings, state
        self.resume_from, self.run_settings = resume_from, dict(run_settings or {})
        self.device = state.device
        self.model = model.to(self.device)
        self.amp_dtype = resolve_precision(settings.precision, self.device)
        self.steps_per_epoch = len(epoch_batches(task.num_examples, settings.batch_size, settings.seed, 0,
                                                 state.world_size))
        if self.steps_per_epoch == 0:
            raise ValueError(f"{task.num_examples} training examples cannot feed {state.world_size} processes")
        self.total_steps = settings.epochs * self.steps_per_epoch
        self.log_path = os.path.join(settings.out_dir, "train_log.jsonl")
        self.eval_path = os.path.join(settings.out_dir, "eval_results.json")
        self.last_checkpoint = resume_from  # the newest complete checkpoint, named in errors

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def run(self) -> dict:
        """Train, evaluate after each epoch, save; returns the last evaluation's metrics.

        Stops with TrainingDivergedError when the loss, the gradient norm, the evaluation loss or a weight is NaN or
        infinite (nothing of that step is saved), and with DiskFullError when a write runs out of space."""
        try:
            return self._run()
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, DiskFullError) or not is_disk_full(exc):
                raise
            newest = (f"the newest complete checkpoint, {self.last_checkpoint}, is intact: free some space, then rerun "
                      "the same command with --resume") if self.last_checkpoint else \
                "no checkpoint was completed yet: free some space, then rerun the same command with --resume"
            raise DiskFullError(f"the disk is full (no space left on device) while writing under "
                                f"{self.settings.out_dir}: {str(exc).splitlines()[0]}; {newest}") from exc

    def _run(self) -> dict:
        s = self.settings
        optimizer = build_optimizer(self.model, s.lr, s.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, round(s.warmup_ratio * self.total_steps),
                                                    self.total_steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        step, history = 0, []
        if self.resume_from is not None:
            info = ckpt.read_info(self.resume_from)
            if info["steps_per_epoch"] != self.steps_per_epoch:  # a short last batch kept or dropped
                raise ValueError(f"--resume from {self.resume_from}: {info['steps_per_epoch']} steps per epoch there, "
                                 f"{self.steps_per_epoch} with {self.dist.world_size} processes now (a last batch "
                                 "smaller than the number of processes is skipped); resume with another process count")
            state = ckpt.load_state(self.resume_from, self.device)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            step = int(info["step"])
            history = [h for h in self._read_eval_history() if h["step"] <= step]
            if self.dist.is_main:
                print(f"resuming from {os.path.basename(os.path.normpath(self.resume_from))} (step {step}, epoch "
                      f"{step / self.steps_per_epoch:.4g} of {s.epochs})", flush=True)
        if self.dist.is_main:
            os.makedirs(s.out_dir, exist_ok=True)
            ckpt.remove_leftovers(s.out_dir)
            self._truncate_log(step)
        self.dist.barrier()
        train_model = self.model
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.model.train()
        objects = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
        bar = tqdm(total=self.total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not (s.progress and self.dist.is_main))
        recent = deque(maxlen=20)  # (seconds, samples, tokens) of the last steps, for the throughput figures
        log = open(self.log_path, "a") if self.dist.is_main else None  # closed in the finally below
        hf_progress = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # save_pretrained's shard bars would interleave with the training bar
        try:
            for epoch in range(step // self.steps_per_epoch, s.epochs):
                batches = epoch_batches(self.task.num_examples, s.batch_size, s.seed, epoch, self.dist.world_size)
                for index in range(step - epoch * self.steps_per_epoch, self.steps_per_epoch):
                    started = time.perf_counter()  # throughput includes building the batch
                    share = rank_share(batches[index], self.dist.rank, self.dist.world_size)
                    batch = {k: v.to(self.device) for k, v in self.task.make_batch(share, epoch).items()}
                    torch.manual_seed(step_seed(s.seed, step, self.dist.rank))
                    record = self._train_step(train_model, batch, optimizer, scheduler, scaler, step + 1)
                    step += 1
                    recent.append((time.perf_counter() - started, record.pop("samples"), record.pop("tokens")))
                    seconds = sum(r[0] for r in recent)
                    record = {"step": step, "epoch": epoch + (index + 1) / self.steps_per_epoch, **record,
                              "samples_per_s": sum(r[1] for r in recent) / seconds,
                              "tokens_per_s": sum(r[2] for r in recent) / seconds}
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                    bar.update(1)
                    self._after_step(step)
                    if s.save_steps and step % s.save_steps == 0 and step % self.steps_per_epoch:
                        self._save(step, epoch, objects)
                history.append({"epoch": epoch + 1, "step": step, **self._evaluate()})
                loss = history[-1].get("loss")
                if isinstance(loss, float) and not math.isfinite(loss):
                    raise TrainingDivergedError(self._diverged(f"after epoch {epoch + 1} (step {step}) the evaluation "
                                                               f"loss is {loss}"))
                if self.dist.is_main:
                    ckpt.write_json(self.eval_path, {**history[-1], "history": history})
                    bar.write(f"epoch {epoch + 1}/{s.epochs} (step {step}): " + ", ".join(
                        f"{k} {v:.4f}" for k, v in history[-1].items() if isinstance(v, float)))
                self._save(step, epoch + 1, objects)
            self._check_weights_finite(step)
            if self.dist.is_main:
                self.model.save_pretrained(s.out_dir, safe_serialization=True)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(s.out_dir)
            self.dist.barrier()
        finally:
            bar.close()
            if log is not None:
                log.close()
            if hf_progress:
                hf_logging.enable_progress_bar()
        return dict(history[-1]) if history else {}

    def _train_step(self, train_model, batch, optimizer, scheduler, scaler, step: int) -> dict:
        """Forward, backward, clip, AdamW step; returns the step's global loss, accuracy, samples and tokens.
        ``step`` (1-based) only names the step in errors."""
        with self.autocast():
            terms = self.task.compute(train_model, batch)
        counts = torch.stack([t.count for t in terms.values()]).float()
        if self.dist.world_size > 1:
            dist.all_reduce(counts)
        loss = combine_terms(terms, counts)
        # DDP averages gradients over processes; each process's loss is its share of the global mean, so scale
        # it back up by the number of processes.
        scaler.scale(loss * self.dist.world_size).backward()
        scaler.unscale_(optimizer)
        if self.settings.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        lr = scheduler.get_last_lr()[0]
        self._check_step_finite(step, loss, norm, lr)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mask = batch["attention_mask"]
        sums = [t.loss_sum.detach().float() for t in terms.values()] + [t.correct.float() for t in terms.values()]
        sums += [torch.tensor(float(mask.shape[0]), device=self.device), mask.sum().float()]
        sums = torch.stack(sums)
        if self.dist.world_size > 1:
            dist.all_reduce(sums)
        sums, counts = sums.tolist(), counts.clamp(min=1).tolist()
        names, n = list(terms), len(terms)
        record = {"loss": sum(sums[i] / counts[i] for i in range(n)), "lr": lr}
        for i, name in enumerate(names):
            prefix = "" if n == 1 else f"{name}_"
            if n > 1:
                record[f"{prefix}loss"] = sums[i] / counts[i]
            record[f"{prefix}accuracy"] = sums[n + i] / counts[i]
        record["samples"], record["tokens"] = sums[-2], sums[-1]
        return record

    def _check_step_finite(self, step: int, loss: torch.Tensor, norm: torch.Tensor, lr: float) -> None:
        """Stop before the optimizer applies a non-finite loss or gradient (one host sync per step). Under fp16 the
        loss scaler owns infinite gradients (it skips the step and lowers the scale), so only the loss counts there."""
        values = torch.stack([loss.detach().float().reshape(()), norm.detach().float().reshape(()).to(loss.device)])
        if self.dist.world_size > 1:
            dist.all_reduce(values)  # a NaN on any process reaches all: every process stops at the same step
        loss_value, norm_value = values.tolist()
        norm_value /= self.dist.world_size  # every process holds the same (averaged) gradients
        fp16 = self.amp_dtype == torch.float16
        if math.isfinite(loss_value) and (fp16 or math.isfinite(norm_value)):
            return
        raise TrainingDivergedError(self._diverged(f"at step {step} the loss is {loss_value:.6g} and the gradient "
                                                   f"norm {norm_value:.6g} (learning rate {lr:.3g})"))

    def _diverged(self, what: str) -> str:
        s = self.settings
        causes = [f"a learning rate too high for this model (--lr {s.lr:g})"]
        if s.max_grad_norm == 0:
            causes.append("no gradient clipping (--max-grad-norm 0)")
        if self.amp_dtype == torch.float16:
            causes.append("fp16 overflow (try --precision bf16 or fp32)")
        causes.append("non-finite weights in the starting model")
        saved = (f"the newest good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint had been written")
        return (f"training diverged: {what}. Likely cause: {', or '.join(causes)}. Nothing from this point was saved; "
                f"{saved}. Start again in a new --out with a lower --lr (or clipping on).")

    def _check_weights_finite(self, step: int) -> None:
        """Nothing non-finite is ever saved (one host sync per save)."""
        params = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).tolist()
        bad = [name for (name, _), ok in zip(params, finite, strict=True) if not ok]
        if bad:
            raise TrainingDivergedError(self._diverged(
                f"at step {step} {len(bad)} weight tensors hold NaN or infinite values ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''})"))

    def _after_step(self, step: int) -> None:
        """Called after every optimizer step (tests interrupt a run here)."""

    def _evaluate(self) -> dict:
        """On the main process only, on the unwrapped model (the others wait: no collective runs meanwhile)."""
        metrics = {}
        if self.dist.is_main:
            self.model.eval()
            with torch.no_grad():
                metrics = self.task.evaluate(self.model, self.settings.batch_size, self.autocast)
            self.model.train()
        self.dist.barrier()
        return metrics

    def _save(self, step: int, epoch: int, objects: dict) -> None:
        self._check_weights_finite(step)
        if self.dist.is_main:
            state = {name: obj.state_dict() for name, obj in objects.items()}
            info = {"step": step, "epoch": epoch, "total_steps": self.total_steps,
                    "steps_per_epoch": self.steps_per_epoch, "settings": self.run_settings}
            self.last_checkpoint = ckpt.save_checkpoint(self.settings.out_dir, step, self.model, self.tokenizer, state,
                                                        info, self.settings.keep_checkpoints)
        self.dist.barrier()

    def _read_eval_history(self) -> list[dict]:
        if not os.path.isfile(self.eval_path):
            return []
        try:
            with open(self.eval_path) as f:
                history = json.load(f).get("history", [])
            if isinstance(history, list) and all(isinstance(h, dict) and isinstance(h.get("step"), int)
                                                 for h in history):
                return history
            problem = "no list of evaluations under 'history'"
        except (OSError, ValueError, AttributeError) as exc:
            problem = str(exc)
        warn(f"{self.eval_path} is unreadable ({problem}); its history of earlier evaluations is dropped",
             self.dist.is_main)
        return []

    def _truncate_log(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint a run resumes from: those steps run again. A line that does
        not parse (a torn last line, what a full disk or a power loss leaves) is dropped with a warning."""
        if not os.path.isfile(self.log_path):
            return
        kept, torn = [], []
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    record_step = record["step"]
                except (ValueError, KeyError, TypeError):
                    torn.append(number)
                    continue
                if isinstance(record_step, int) and record_step <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if torn:
            warn(f"{self.log_path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}"
                 f"{', ...' if len(torn) > 5 else ''}), as a crash or a full disk leaves them")
        with open(self.log_path, "w") as f:
            f.writelines(kept)
