"""Training from scratch: BitNet b1.58 (two-stage LR/WD recipe) or its fp twin (cosine).

``train(run_config, resume=False)`` is the library entry point; ``onebit train`` only parses a
TOML file plus ``--section.key=value`` overrides into a ``RunConfig`` and calls it. The same
command runs under ``torchrun --nproc_per_node=N`` (gloo on CPU / nccl on GPU) with DDP or FSDP2
(``train.parallel``, see ``onebit.parallel``): every step draws one global batch from ``(seed, step)``
and rank r takes its slice, so N processes and one process see the same data, and resuming needs
only the step number (on any number of processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import PRESETS, ConfigError, ModelConfig, from_dict, to_dict
from .data import DataConfig, eval_windows, prepare_data, sample_batch
from .atomic import write_error
from .destination import check_destination
from .finetune import FinetuneConfig, distill_loss, lambda_at
from .model import CausalLM

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. ``lr=None`` picks the BitNet FAQ default for the model kind
    (1.5e-3 ternary, 3e-4 fp: full precision wants ~5x lower); ``schedule="auto"`` is the b1.58
    two-stage schedule for BitNet models and cosine for fp ones."""

    steps: int = 1000
    batch_size: int = 16              # global sequences per optimizer step (all ranks, all micro-steps)
    micro_batch_size: int | None = None  # sequences per forward on one rank; None = batch_size/world
    lr: float | None = None
    lr_stage2: float | None = None    # two-stage: peak of stage 2; None = 2/3 of lr (1.5e-3 -> 1e-3)
    min_lr_ratio: float = 0.1         # cosine floor, as a fraction of lr
    schedule: str = "auto"            # auto | two_stage | cosine | constant
    stage_split: float = 0.5          # two-stage: fraction of steps after which stage 2 starts
    warmup_steps: int | None = None   # None = min(375, steps // 10)
    weight_decay: float = 0.1         # stage 1 (and the whole run for cosine/constant)
    weight_decay_stage2: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # 0 disables clipping
    dtype: str = "fp32"               # fp32 | bf16 (autocast)
    eval_every: int = 200
    eval_tokens: int = 131072
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    seed: int = 1337
    tensorboard: bool = True
    progress: bool = True
    threads: int | None = None        # torch intra-op threads per process; None = torch default
    a48_switch: float | None = None   # a4.8 two-stage: fraction of steps run with A8 activations
                                      # before switching to model.activation_scheme="a4.8" (paper: 0.95)
    parallel: str = "auto"            # under torchrun: ddp (replicas) | fsdp (FSDP2 shards) | auto
                                      # (the checkpoint's; else ddp where 16 B/param fit, else fsdp)
    activation_checkpointing: bool = False  # recompute each decoder block in the backward pass
    CHOICES: ClassVar[dict[str, tuple]] = {"schedule": ("auto", "two_stage", "cosine", "constant"),
                                           "dtype": ("fp32", "bf16"), "parallel": ("auto", "ddp", "fsdp")}

    def __post_init__(self) -> None:
        c = "TrainConfig"
        for name in ("steps", "batch_size", "eval_every", "log_every", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{c}.{name}={getattr(self, name)} must be > 0")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ConfigError(f"{c}.micro_batch_size={self.micro_batch_size} must be > 0 (or unset)")
        if self.schedule not in self.CHOICES["schedule"]:
            raise ConfigError(f"{c}.schedule={self.schedule!r}: use auto, two_stage, cosine or constant")
        if self.dtype not in self.CHOICES["dtype"]:
            raise ConfigError(f"{c}.dtype={self.dtype!r}: use fp32 or bf16")
        if self.parallel not in self.CHOICES["parallel"]:
            raise ConfigError(f"{c}.parallel={self.parallel!r}: use auto, ddp or fsdp")
        for name in ("lr", "lr_stage2"):
            v = getattr(self, name)
            if v is not None and not (0 < v < 1):
                raise ConfigError(f"{c}.{name}={v} must be in (0, 1)")
        if not 0 < self.stage_split < 1:
            raise ConfigError(f"{c}.stage_split={self.stage_split} must be in (0, 1)")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"{c}.warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}]")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.weight_decay_stage2 < 0:
            raise ConfigError(f"{c}: grad_clip and weight decays must be >= 0")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"{c}.threads={self.threads} must be > 0 (or unset)")
        if self.a48_switch is not None:
            if not 0 < self.a48_switch < 1:
                raise ConfigError(f"{c}.a48_switch={self.a48_switch} must be in (0, 1), the fraction of "
                                  f"steps trained with A8 before the switch (0.95 in the a4.8 paper)")
            if int(self.a48_switch * self.steps) < 1:
                raise ConfigError(f"{c}.a48_switch={self.a48_switch} leaves no A8 step out of steps="
                                  f"{self.steps}: raise a48_switch or steps")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # source=None: from scratch

    def __post_init__(self) -> None:
        if self.train.a48_switch is not None and (self.model.linear != "bitnet"
                                                  or self.model.activation_scheme != "a4.8"):
            raise ConfigError(f"train.a48_switch={self.train.a48_switch} is the a4.8 two-stage recipe: it "
                              f"needs model.linear='bitnet' and model.activation_scheme='a4.8' (got "
                              f"linear={self.model.linear!r}, activation_scheme="
                              f"{self.model.activation_scheme!r}); unset train.a48_switch or fix [model]")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------
# Config files and overrides
# --------------------------------------------------------------------------------------------

BUILTIN_CONFIGS = Path(__file__).parent / "configs"
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "finetune": FinetuneConfig}


def parse_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """``["--model.hidden_size=128", "--train.lr=1e-3"]`` -> ``{"model": {"hidden_size": "128"}, ...}``."""
    out: dict[str, dict[str, str]] = {}
    for a in args:
        if not a.startswith("--") or "=" not in a or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"override {a!r} is not of the form --section.key=value "
                              f"(sections: {', '.join(SECTIONS)})")
        key, value = a[2:].split("=", 1)
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"override {a!r}: unknown section {section!r}; use one of {list(SECTIONS)}")
        out.setdefault(section, {})[name] = value
    return out


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    defaults: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """Read a TOML run config (tables [model], [data], [train], [finetune]; [model] may name a
    ``preset``) over ``defaults`` and apply ``--section.key=value`` overrides; everything validated
    against the dataclasses."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        builtin = BUILTIN_CONFIGS / f"{path}.toml"
        if not p.is_file() and builtin.is_file():
            p = builtin
        if not p.is_file():
            names = sorted(f.stem for f in BUILTIN_CONFIGS.glob("*.toml"))
            raise ConfigError(f"config file '{p}' does not exist (built-in configs: {names})")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file '{p}' is not valid TOML: {e}") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    for section, kv in (defaults or {}).items():
        raw[section] = {**kv, **raw.get(section, {})}
    if unknown:
        raise ConfigError(f"unknown config table(s) {unknown}; valid tables are {list(SECTIONS)}")
    for section, kv in parse_overrides(overrides or []).items():
        raw.setdefault(section, {}).update(kv)
    model_raw = dict(raw.get("model", {}))
    preset = model_raw.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
        model_raw = {**PRESETS[preset], **model_raw}
    return RunConfig(model=from_dict(ModelConfig, model_raw),
                     data=from_dict(DataConfig, raw.get("data", {})),
                     train=from_dict(TrainConfig, raw.get("train", {})),
                     finetune=from_dict(FinetuneConfig, raw.get("finetune", {})))


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

def resolved_lr(tc: TrainConfig, mc: ModelConfig) -> float:
    return tc.lr if tc.lr is not None else (1.5e-3 if mc.linear == "bitnet" else 3e-4)


def schedule_kind(tc: TrainConfig, mc: ModelConfig) -> str:
    if tc.schedule != "auto":
        return tc.schedule
    return "two_stage" if mc.linear == "bitnet" else "cosine"


def lr_wd_at(step: int, tc: TrainConfig, mc: ModelConfig) -> tuple[float, float]:
    """Learning rate and weight decay for optimizer step ``step`` (0-based).

    two_stage (BitNet b1.58 FAQ): linear warm-up to ``lr``; both stages follow one linear-decay
    envelope ``1 - progress``, scaled by ``lr`` in stage 1 and by ``lr_stage2`` (2/3 lr) in stage 2,
    so the LR drops by a third at ``stage_split`` and reaches 0 at the end; weight decay
    ``weight_decay`` in stage 1 and ``weight_decay_stage2`` (0) in stage 2.
    cosine: warm-up, then cosine from lr to ``min_lr_ratio * lr``. constant: warm-up, then lr.
    """
    peak = resolved_lr(tc, mc)
    warm = tc.warmup_steps if tc.warmup_steps is not None else min(375, tc.steps // 10)
    kind = schedule_kind(tc, mc)
    if step < warm:
        lr = peak * (step + 1) / warm
        return lr, tc.weight_decay
    progress = (step - warm) / max(1, tc.steps - warm)  # in [0, 1)
    if kind == "constant":
        return peak, tc.weight_decay
    if kind == "cosine":
        floor = tc.min_lr_ratio * peak
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress)), tc.weight_decay
    stage2 = step >= int(tc.stage_split * tc.steps)
    top = (tc.lr_stage2 if tc.lr_stage2 is not None else peak * 2 / 3) if stage2 else peak
    return top * (1.0 - progress), (tc.weight_decay_stage2 if stage2 else tc.weight_decay)


def activation_scheme_at(step: int, tc: TrainConfig, mc: ModelConfig) -> str:
    """The activation scheme optimizer step ``step`` (0-based) runs: A8 before ``int(a48_switch *
    steps)`` when the two-stage a4.8 recipe is on, else the model's own scheme."""
    if tc.a48_switch is not None and step < int(tc.a48_switch * tc.steps):
        return "a8"
    return mc.activation_scheme


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t


def init_distributed(group: bool = False) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if WORLD_SIZE > 1, or ``group`` (fsdp, even on one process:
    it shards over a device mesh); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not group:
        return Dist(), torch.device("cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local), device


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linears, embeddings), none on norm gains."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Interrupt:
    """SIGINT → finish the current step, checkpoint, exit. A second Ctrl-C aborts at once.
    (Under torchrun a terminal's Ctrl-C reaches torchrun alone, its workers running in sessions of
    their own; it passes the SIGINT on to every worker.)"""

    def __init__(self) -> None:
        self.flag = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class JsonlLog:
    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        if keep_until_step is not None and path.exists():
            # On resume, drop entries past the checkpoint so the curve has no duplicates.
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            ckpt.atomic_write_text(path, "".join(k + "\n" for k in kept))
        elif keep_until_step is None and path.exists():
            path.unlink()
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def evaluate(model: torch.nn.Module, windows: tuple[torch.Tensor, torch.Tensor], d: Dist,
             device: torch.device, micro: int, autocast, collective: bool = False) -> float:
    """Mean validation loss over fixed windows, sharded over ranks (window i on rank i % world).
    ``collective`` (an fsdp model, whose forward all-gathers): every rank runs the same number of
    forwards, a rank out of windows repeating its first one without counting it."""
    x_all, y_all = windows
    mine = torch.arange(d.rank, x_all.shape[0], d.world)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    n = -(-x_all.shape[0] // d.world) if collective else len(mine)
    with torch.no_grad():
        for i in range(0, n, micro):
            idx = mine[i:i + micro]
            counted = len(idx) > 0
            if not counted:
                idx = torch.arange(1)
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            with autocast():
                _, loss = model(x, y)
            if counted:
                total[0] += loss.double() * y.numel()
                total[1] += y.numel()
    model.train(was_training)
    d.all_reduce(total)
    return (total[0] / total[1]).item()


def train(rc: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train ``rc.model`` on ``rc.data`` per ``rc.train``; returns a summary dict (final val
    loss/ppl, tokens/s, paths). Writes checkpoints to ``out_dir/checkpoints`` and the final model to
    ``out_dir/model``; logs to ``out_dir/log.jsonl`` (+ TensorBoard in ``out_dir/tb``)."""
    from . import parallel as par

    tc = rc.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    out = Path(tc.out_dir)
    ckpt_root = out / "checkpoints"
    # new, empty or an onebit run (never a folder with other files); stale temps of a killed run go
    check_destination(out, "run", clean=int(os.environ.get("RANK", "0")) == 0, label="train.out_dir")
    existing = ckpt.latest_checkpoint(ckpt_root) if ckpt_root.is_dir() else None
    if existing is not None and not resume:
        raise ConfigError(f"out_dir '{out}' already holds checkpoints; pass --resume to continue that "
                          f"run, or choose another --train.out_dir (nothing was overwritten)")
    if resume and existing is None:
        raise ConfigError(f"--resume given but '{ckpt_root}' has no checkpoint to resume from")
    saved_layout, saved_world = ckpt.checkpoint_layout(existing) if existing is not None else (None, None)
    if existing is not None and tc.parallel != "auto":  # (auto takes the checkpoint's layout)
        par.check_resume_layout(tc.parallel, saved_layout, existing, saved_world)
    if tc.parallel == "fsdp":
        par.require_torchrun("train.parallel=fsdp")
    elif tc.parallel == "auto" and saved_layout == "sharded":
        par.require_torchrun(f"resuming the sharded checkpoint '{existing}' (train.parallel=fsdp)")
    d, device = init_distributed(group=tc.parallel == "fsdp" or (tc.parallel == "auto"
                                                                 and saved_layout == "sharded"))
    if tc.batch_size % d.world:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the {d.world} processes: "
                          f"use a batch_size that is a multiple of {d.world}, or a --nproc_per_node that "
                          f"divides {tc.batch_size}")

    # Data (rank 0 builds the token cache first; the others then reuse it).
    if d.main:  # the first run on a corpus trains the tokenizer (a minute on Gutenberg): say so
        data = prepare_data(rc.data, log=lambda msg: print(f"onebit train: {msg}", file=sys.stderr,
                                                               flush=True))
    if d.world > 1:
        dist.barrier()
    if not d.main:
        data = prepare_data(rc.data)
    vocab = data.vocab_size
    if rc.finetune.source is not None:  # a pretrained embedding may have spare rows (Qwen2, Phi-3 pad theirs)
        if data.vocab_size > rc.model.vocab_size:
            raise ConfigError(f"the tokenizer has {data.vocab_size} tokens but the fine-tuning source "
                              f"'{rc.finetune.source}' has {rc.model.vocab_size} embedding rows; use the "
                              f"source's own tokenizer (--tokenizer)")
        vocab = rc.model.vocab_size
    mc = rc.model.replace(vocab_size=vocab,
                          # no BOS in the data (a GPT-2 style tokenizer): the config names EOS
                          bos_token_id=next((t for t in (data.bos_id, data.eos_id) if t is not None), 0),
                          eos_token_id=data.eos_id if data.eos_id is not None else 0)
    if rc.data.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"data.seq_len={rc.data.seq_len} exceeds model.max_position_embeddings="
                          f"{mc.max_position_embeddings}; lower seq_len or raise the context")
    rc = dataclasses.replace(rc, model=mc)
    if existing is not None:
        saved = ckpt.read_config(existing)
        saved_model = ModelConfig.from_dict(saved["model"]).to_dict()  # fields added since: defaults
        if saved_model != mc.to_dict():
            diff = sorted(k for k in mc.to_dict() if saved_model.get(k) != mc.to_dict()[k])
            raise ConfigError(f"cannot resume: checkpoint '{existing}' was trained with a different "
                              f"model config (fields {diff}); resume with the same [model] settings")

    # Batch geometry: global batch -> per rank -> micro-batches.
    per_rank = tc.batch_size // d.world
    micro = tc.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={micro} must divide the per-process batch {per_rank}")
    accum = per_rank // micro
    seq = rc.data.seq_len

    # Model and optimizer (same seed on every rank -> same init; DDP also broadcasts rank 0's).
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = CausalLM(mc)  # (fsdp: built on the CPU, then sharded onto the device)
    parallel = par.choose_parallel(tc.parallel, d.world, saved_layout, model.num_params(), device,
                                   int(os.environ.get("LOCAL_WORLD_SIZE", d.world)))
    fsdp = parallel == "fsdp"
    if not fsdp:
        model = model.to(device)
    model.activation_checkpointing = tc.activation_checkpointing
    fc = rc.finetune
    teacher = None
    if fc.source is not None:  # warm-up fine-tuning (onebit.finetune): start from the converted source
        from .finetune import init_student, teacher_for_resume
        home = torch.device("cpu") if fsdp else device
        if existing is not None:
            teacher = teacher_for_resume(fc, home)
        else:  # calibrate the added norms on one training batch (never validation text)
            calib = sample_batch(data.train, seq, min(tc.batch_size, 16), tc.seed + 1, 0)[0]
            teacher = init_student(model, fc, home, calib)
    if fsdp:  # FSDP2 per decoder block and the root; the frozen teacher is sharded the same way
        mesh = par.device_mesh(device, d.world)
        bf16_params = device.type == "cuda" and tc.dtype == "bf16"
        par.shard_model(model, mesh, bf16_params=bf16_params)
        if teacher is not None:
            par.shard_model(teacher, mesh, bf16_params=bf16_params)
    lr0, wd0 = lr_wd_at(0, tc, mc)
    opt = torch.optim.AdamW(param_groups(model, wd0), lr=lr0, betas=(tc.beta1, tc.beta2), eps=1e-8,
                            fused=False, foreach=True)
    start, tokens_seen, best_val = 0, 0, None
    if existing is not None:
        if fsdp:  # resharded from however many ranks wrote it
            state = ckpt.load_sharded_checkpoint(existing, model, opt)
        else:
            state = ckpt.load_training_checkpoint(existing, model, opt)
        start, tokens_seen, best_val = state["step"], state["tokens_seen"], state.get("best_val")
        random.setstate(_tuple_state(state["python_rng"]))
        np.random.set_state(_np_state(state["numpy_rng"]))
        if mc.linear == "bitnet":
            # a checkpoint taken before the a4.8 switch resumes in A8 (older checkpoints: the config's)
            active = state.get("activation_scheme", mc.activation_scheme)
            if active != activation_scheme_at(start, tc, mc) and active == mc.activation_scheme:
                raise ConfigError(f"cannot resume: checkpoint '{existing}' already runs "
                                  f"activation_scheme={active!r}, but train.a48_switch={tc.a48_switch} "
                                  f"puts step {start} before the switch; resume with the a48_switch "
                                  f"the run was started with")
            model.set_activation_scheme(active)
    elif mc.linear == "bitnet":
        model.set_activation_scheme(activation_scheme_at(0, tc, mc))
    ddp = model
    if parallel == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    use_bf16 = tc.dtype == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    val_windows = eval_windows(data.val, seq, tc.eval_tokens)
    # the saved tokenizer states how the model was trained: BOS before every document (data.py),
    # as its post-processor, so transformers' tok(text) and onebit's prompts start the same way
    # (and tokenizer_config.json add_bos_token, which onebit reads first: folders without it are
    # from before, all trained with BOS)
    from tokenizers import Tokenizer

    from .tokenizer_convention import BosConvention, declare_files
    conv = BosConvention(() if data.bos_id is None else (data.bos_id,), "onebit train")
    tok_json = {k: v.decode("utf-8") for k, v in declare_files(
        {"tokenizer.json": data.tokenizer.to_str().encode("utf-8")}, conv,
        Tokenizer.from_str(data.tokenizer.to_str())).items()}
    full_config = {**rc.to_dict(), "onebit_version": _version()}

    writer = log = None
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(out, e) from None
        ckpt.atomic_write_text(out / "run_config.json", json.dumps(full_config, indent=2))
        log = JsonlLog(out / "log.jsonl", keep_until_step=start if existing is not None else None)
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"), purge_step=start if existing is not None else None)
        print(f"onebit train: {mc.linear} model, {model.num_params():,} parameters "
              f"({model.num_params(False):,} non-embedding), {d.world} process(es)"
              f"{'' if parallel == 'single' else f' ({parallel})'}, "
              f"{tc.batch_size}x{seq} tokens/step, {schedule_kind(tc, mc)} schedule, "
              f"lr {resolved_lr(tc, mc):g}, steps {start}->{tc.steps}", flush=True)

    def save(step: int) -> None:
        trainer_state = {"step": step, "tokens_seen": tokens_seen, "best_val": best_val,
                         "python_rng": random.getstate(), "numpy_rng": _np_state_json(np.random.get_state()),
                         "world_size": d.world, "parallel": parallel,
                         "activation_scheme": model.activation_scheme}
        if fsdp:  # every rank writes its shards
            ckpt.save_sharded_checkpoint(ckpt_root, step, model, full_config, tok_json, opt, trainer_state,
                                         d.rank, device, keep=tc.keep_checkpoints)
        elif d.main:
            ckpt.save_training_checkpoint(ckpt_root, step, model, full_config, tok_json, opt, trainer_state,
                                          keep=tc.keep_checkpoints)
        if d.world > 1 or fsdp:
            dist.barrier()

    bar = None
    if d.main and tc.progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
    last_val = None
    t_last, tok_last = time.perf_counter(), 0
    t_start, tok_start = t_last, tokens_seen
    interrupted = False
    step = start
    model.train()
    try:
        with _Interrupt() as stop:
            while step < tc.steps:
                if mc.linear == "bitnet" and activation_scheme_at(step, tc, mc) != model.activation_scheme:
                    # a4.8 two-stage switch: same weights, same optimizer state, new input quantizers
                    model.set_activation_scheme(activation_scheme_at(step, tc, mc))
                    if d.main:
                        print(f"\nstep {step}: switching activations to {model.activation_scheme}",
                              file=sys.stderr, flush=True)
                lr, wd = lr_wd_at(step, tc, mc)
                opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"] = lr, wd
                opt.param_groups[1]["lr"] = lr
                lam = lambda_at(step, fc)
                model.set_quant_lambda(lam)
                xg, yg = sample_batch(data.train, seq, tc.batch_size, tc.seed, step)
                xr, yr = xg[d.rank * per_rank:(d.rank + 1) * per_rank], yg[d.rank * per_rank:(d.rank + 1) * per_rank]
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                kl_sum = torch.zeros((), dtype=torch.float64, device=device)
                for i in range(accum):
                    x, y = xr[i * micro:(i + 1) * micro].to(device), yr[i * micro:(i + 1) * micro].to(device)
                    sync = contextlib.nullcontext() if (i == accum - 1 or parallel != "ddp") else ddp.no_sync()
                    with sync:
                        with autocast():
                            logits, loss = ddp(x, y)
                            total = loss
                            if teacher is not None:
                                with torch.no_grad():
                                    t_logits, _ = teacher(x)
                                kl = distill_loss(logits, t_logits, fc.distill_temperature)
                                total = loss + fc.distill_weight * kl
                                kl_sum += kl.detach().double() / accum
                        (total / accum).backward()
                    loss_sum += loss.detach().double() / accum
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 \
                    else torch.zeros(())
                if hasattr(gnorm, "full_tensor"):  # fsdp: a DTensor
                    gnorm = gnorm.full_tensor()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tc.batch_size * seq
                flags = torch.tensor([loss_sum.item(), float(stop.flag), kl_sum.item()], dtype=torch.float64,
                                     device=device)
                d.all_reduce(flags)
                train_loss, stop_now = flags[0].item() / d.world, flags[1].item() > 0
                model.set_quant_lambda(lambda_at(step, fc))  # λ of the weights now (for the evaluation)

                if step % tc.eval_every == 0 or step == tc.steps:
                    last_val = evaluate(model, val_windows, d, device, micro, autocast, collective=fsdp)
                    best_val = last_val if best_val is None else min(best_val, last_val)
                if d.main:
                    now = time.perf_counter()
                    rec = {"step": step, "loss": train_loss, "lr": lr, "wd": wd,
                           "grad_norm": float(gnorm), "tokens": tokens_seen}
                    if fc.source is not None:
                        rec["lam"] = lam
                        if teacher is not None:
                            rec["distill_kl"] = flags[2].item() / d.world
                    if tc.a48_switch is not None:
                        rec["act"] = model.activation_scheme
                    if step % tc.log_every == 0 or step == tc.steps or step == start + 1:
                        rec["tok_s"] = (tokens_seen - tok_start) / max(now - t_start, 1e-9)
                    if last_val is not None and (step % tc.eval_every == 0 or step == tc.steps):
                        rec["val_loss"], rec["val_ppl"] = last_val, math.exp(min(last_val, 50.0))
                    log.write(rec)
                    if writer is not None:
                        writer.add_scalar("train/loss", train_loss, step)
                        writer.add_scalar("train/lr", lr, step)
                        if "lam" in rec:
                            writer.add_scalar("train/lambda", lam, step)
                        if "val_loss" in rec:
                            writer.add_scalar("val/loss", rec["val_loss"], step)
                            writer.add_scalar("val/ppl", rec["val_ppl"], step)
                    if bar is not None:
                        bar.update(1)
                        if step % tc.log_every == 0 or "val_loss" in rec:
                            tok_s = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
                            t_last, tok_last = now, tokens_seen
                            post = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
                            if "lam" in rec:
                                post["λ"] = f"{lam:.3f}"
                            if last_val is not None:
                                post["val"] = f"{last_val:.3f}"
                            bar.set_postfix(post, refresh=False)
                    elif step % tc.log_every == 0 or step == tc.steps:
                        msg = f"step {step}/{tc.steps} loss {train_loss:.4f} lr {lr:.2e}"
                        if "lam" in rec:
                            msg += f" λ {lam:.3f}"
                        if "val_loss" in rec:
                            msg += f" val {rec['val_loss']:.4f} ppl {rec['val_ppl']:.2f}"
                        print(msg, flush=True)
                if stop_now:
                    interrupted = True
                    save(step)
                    if d.main:
                        print(f"\ninterrupted: checkpoint saved at step {step} in {ckpt_root}; "
                              f"continue with --resume", file=sys.stderr, flush=True)
                    break
                if step % tc.ckpt_every == 0 and step < tc.steps:
                    save(step)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if log is not None:
            log.close()

    elapsed = time.perf_counter() - t_start
    summary = {"step": step, "tokens_seen": tokens_seen, "interrupted": interrupted,
               "tok_s": (tokens_seen - tok_start) / max(elapsed, 1e-9), "val_loss": last_val,
               "val_ppl": math.exp(min(last_val, 50.0)) if last_val is not None else None,
               "params": model.num_params(), "parallel": parallel, "out_dir": str(out)}
    if not interrupted:
        save(step)
        full = ckpt.full_model_state(model) if fsdp else None  # gathered to rank 0 (collective)
        if d.main:
            ckpt.save_model(out / "model", None if fsdp else model, mc, tok_json, state=full,
                            extra={"data": to_dict(rc.data), "train": to_dict(tc), "summary": summary})
            ckpt.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _version() -> str:
    from . import __version__
    return __version__


def _np_state_json(state) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _np_state(s: list):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _tuple_state(s: list):
    return (s[0], tuple(s[1]), s[2])
