"""Fine-tuning a full-precision model to 1.58 bits with warm-up quantization (BITNET.md §3).

Library API:

- ``quantize_model(model, lam=...)`` converts a causal LM in place: a transformers Llama / Mistral /
  Qwen2 / Phi-3 model (its attention and MLP ``nn.Linear``s become ``BitLinear`` with an RMSNorm
  before the activation quantizer, as in the Hugging Face blog; embeddings and LM head stay) or an
  onebit ``CausalLM`` (its fp twin becomes the BitNet model; a plain pre-norm Llama becomes the 2B4T
  SubLN layout, which normalises every BitLinear input once and which the engine runs).
- ``lambda_at(step, cfg)``: the λ warm-up schedules (linear, exponential, sigmoid, none).
- ``load_source(path)``: an fp model to start from (HF Llama / Mistral / Qwen2 / Phi-3 folder, onebit
  run/checkpoint, llama2.c ``.bin``) as an onebit ``CausalLM`` plus its tokenizer. Phi-3's fused
  qkv_proj / gate_up_proj are split into q/k/v and gate/up, so the fine-tuned model has one ternary
  scale per projection (the layout the engine runs; ``quantize_model`` on the transformers model
  keeps one scale per fused matrix). Qwen2's q/k/v biases stay full precision (``qkv_bias``), in
  the packed folder too (float32 ``*.bias`` tensors the engine adds after the projection).
- ``finetune(run_config)``: the foundation trainer (``train.train``) run from that source with the
  λ schedule and optional distillation from the frozen fp teacher (``FinetuneConfig``).

What λ = 0 means: the quantizers are off (``x + 0·(q(x) - x)``), but the architecture change is
not undone: the added RMSNorms still normalise the projection inputs. So a model converted at λ = 0
equals the original exactly only where no norm is added (onebit's SubLN / inner fp twins, or
``norm=False``); elsewhere it equals the original with RMS-normalised projection inputs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .config import ConfigError, ModelConfig, _choice
from .nn import BitLinear

__all__ = ["SUPPORTED_ARCHITECTURES", "LAMBDA_SCHEDULES", "FinetuneConfig", "quantize_model",
           "lambda_at", "load_source", "load_quantized_pretrained", "finetune", "distill_loss"]

# transformers model_type -> (class name, projection names replaced)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": ("LlamaForCausalLM", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "mistral": ("MistralForCausalLM", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "qwen2": ("Qwen2ForCausalLM", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "phi3": ("Phi3ForCausalLM", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}
LAMBDA_SCHEDULES = ("linear", "exponential", "sigmoid", "none")
_DEFAULT_K = {"exponential": 4.0, "sigmoid": 10.0}


@dataclass(frozen=True)
class FinetuneConfig:
    """The ``[finetune]`` table. ``source=None``: plain training from scratch (λ = 1 throughout).

    λ(step) with t = step / lambda_steps: linear ``t``; exponential ``1 - (1 - t)^k``; sigmoid
    ``1 / (1 + e^(-k (t - 0.5)))``; none ``1`` (plain QAT); λ = 1 from ``lambda_steps`` on.
    ``lambda_k=None`` picks k = 4 (exponential) or 10 (sigmoid). ``distill_weight`` > 0 adds
    ``w · T² · KL(teacher || student)`` on temperature-T logits, the teacher being the frozen source.
    """

    source: str | None = None       # HF folder, onebit run/checkpoint folder or llama2.c .bin
    tokenizer: str | None = None    # tokenizer.json / llama2.c tok*.bin; None = found beside source
    lambda_schedule: str = "linear"
    lambda_steps: int = 1000
    lambda_k: float | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    CHOICES: ClassVar[dict[str, tuple]] = {"lambda_schedule": LAMBDA_SCHEDULES}

    def __post_init__(self) -> None:
        from .config import check_types

        c = "FinetuneConfig"
        check_types(self)
        _choice(c, "lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES)
        if self.lambda_steps <= 0:
            raise ConfigError(f"{c}.lambda_steps={self.lambda_steps} must be > 0 (the step at which λ "
                              f"reaches 1, e.g. 1000)")
        if self.lambda_k is not None and not (self.lambda_k > 0 and math.isfinite(self.lambda_k)):
            raise ConfigError(f"{c}.lambda_k={self.lambda_k} must be a finite number > 0")
        if not (0.0 <= self.distill_weight < math.inf):
            raise ConfigError(f"{c}.distill_weight={self.distill_weight} must be >= 0 (0 = no distillation)")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ConfigError(f"{c}.distill_temperature={self.distill_temperature} must be > 0")

    @property
    def k(self) -> float:
        return self.lambda_k if self.lambda_k is not None else _DEFAULT_K.get(self.lambda_schedule, 1.0)


def lambda_at(step: int, fc: FinetuneConfig) -> float:
    """λ for optimizer step ``step`` (0-based), in [0, 1]; 1 once ``step >= lambda_steps``."""
    if fc.source is None or fc.lambda_schedule == "none" or step >= fc.lambda_steps:
        return 1.0
    t = max(step, 0) / fc.lambda_steps
    if fc.lambda_schedule == "linear":
        lam = t
    elif fc.lambda_schedule == "exponential":
        lam = 1.0 - (1.0 - t) ** fc.k
    else:
        lam = 1.0 / (1.0 + math.exp(-fc.k * (t - 0.5)))
    return min(max(lam, 0.0), 1.0)


# ---------------------------------------------------------------------------------------------
# quantize_model
# ---------------------------------------------------------------------------------------------

def _bitlinear_from(lin: nn.Linear, *, lam: float, norm: bool, eps: float) -> BitLinear:
    new = BitLinear(lin.in_features, lin.out_features, norm=norm, norm_eps=eps, weight_quant=True,
                    act="int8", lam=lam, bias=lin.bias is not None)
    new.to(device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


@torch.no_grad()
def _input_rms(model: nn.Module, modules: dict[str, nn.Module], run) -> dict[str, float]:
    """Mean per-token RMS of each module's input while ``run()`` does a forward of ``model``."""
    sums: dict[str, list[float]] = {}

    def hook(name):
        def f(mod, inp):
            r = inp[0].float().pow(2).mean(-1).sqrt()
            sums.setdefault(name, []).append(r.mean().item())
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    was = model.training
    try:
        model.eval()
        run()
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {n: sum(v) / len(v) for n, v in sums.items()}


def _quantize_causal_lm(model, lam: float, calibration: torch.Tensor | None):
    from .model import DecoderLayer

    cfg: ModelConfig = model.config
    if cfg.linear == "bitnet":
        model.set_quant_lambda(lam)
        return model
    gains: dict[str, float] = {}
    if cfg.norm_placement == "pre" and calibration is not None:
        # the new sub-norms sit before o_proj / down_proj: start them at the RMS their input had
        targets = {}
        for i, layer in enumerate(model.model.layers):
            targets[f"model.layers.{i}.self_attn.attn_sub_norm.weight"] = layer.self_attn.o_proj
            targets[f"model.layers.{i}.mlp.ffn_sub_norm.weight"] = layer.mlp.down_proj
        gains = _input_rms(model, targets, lambda: model(calibration.to(model.rope_cos.device)))
    new_cfg = cfg.replace(linear="bitnet", activation_scheme="a8",
                          norm_placement="subln" if cfg.norm_placement == "pre" else cfg.norm_placement)
    p = next(model.parameters())
    state = model.state_dict()
    for i in range(cfg.num_hidden_layers):
        fresh = DecoderLayer(new_cfg).to(device=p.device, dtype=p.dtype)
        prefix = f"model.layers.{i}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        for name, t in fresh.state_dict().items():  # the new sub-norms start at 1
            if name.endswith("sub_norm.weight"):
                sub[name] = torch.full_like(t, gains.get(prefix + name, 1.0))
        fresh.load_state_dict(sub, strict=True)
        model.model.layers[i] = fresh
    model.config = new_cfg
    model.set_quant_lambda(lam)
    return model


def _model_type(model) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) if cfg is not None and not isinstance(cfg, ModelConfig) else None


def quantize_model(model: nn.Module, *, lam: float = 0.0, norm: bool = True,
                   calibration: torch.Tensor | None = None) -> nn.Module:
    """Turn a causal LM into a BitNet b1.58 model in place (and return it).

    ``model``: a transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` /
    ``Phi3ForCausalLM`` (attention and MLP linears, Phi-3's fused ``qkv_proj``/``gate_up_proj`` with
    one scale each, become ``BitLinear`` with ternary weights and INT8 activations; biases stay full
    precision) or an onebit ``CausalLM``. ``lam``: the initial blend λ in [0, 1] (set it later with
    ``set_quant_lambda(model, λ)``). ``norm`` (transformers models): put an RMSNorm (weight 1,
    trainable) before each BitLinear's activation quantizer, as the blog does. ``calibration``:
    token ids [B, T]; every RMSNorm the conversion adds then starts with the gain equal to the mean
    per-token RMS of its input on them (instead of 1), so that at λ = 0 the converted model stays
    close to the original (without it the added norms rescale every projection input).
    Raises ValueError naming the supported architectures for anything else.
    """
    from .model import CausalLM
    from .quant import _check_lam

    _check_lam(lam)
    if isinstance(model, CausalLM):
        return _quantize_causal_lm(model, lam, calibration)
    mt = _model_type(model)
    if mt not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"quantize_model: {type(model).__name__} (model_type={mt!r}) is not supported; "
                         f"supported: onebit CausalLM and transformers "
                         f"{', '.join(v[0] for v in SUPPORTED_ARCHITECTURES.values())}")
    names = SUPPORTED_ARCHITECTURES[mt][1]
    eps = float(getattr(model.config, "rms_norm_eps", 1e-5) or 1e-5)
    targets = {f"{pname}.{cname}": (parent, cname, child) for pname, parent in model.named_modules()
               for cname, child in parent.named_children() if cname in names and type(child) is nn.Linear}
    gains = {}
    if norm and calibration is not None and targets:
        dev = next(model.parameters()).device
        gains = _input_rms(model, {k: v[2] for k, v in targets.items()},
                           lambda: model(input_ids=calibration.to(dev)))
    for key, (parent, cname, child) in targets.items():
        new = _bitlinear_from(child, lam=lam, norm=norm, eps=eps)
        if key in gains:
            with torch.no_grad():
                new.norm.weight.fill_(gains[key])
        setattr(parent, cname, new)
    if not targets:
        raise ValueError(f"quantize_model: no nn.Linear named {list(names)} found in this {mt} model "
                         f"(already quantized?)")
    model.config.onebit_quantization = {"method": "bitnet_b1.58", "norm": norm, "act": "int8",
                                        "version": 1}
    return model


def set_quant_lambda(model: nn.Module, lam: float) -> None:
    """Set λ of every BitLinear in ``model`` (any module tree)."""
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.lam = lam


def load_quantized_pretrained(folder: str | os.PathLike, lam: float = 1.0):
    """Reload a transformers model saved after ``quantize_model`` (``save_pretrained``): the plain
    model is built by transformers, converted again, and every tensor (norms included) reloaded."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    q = cfg.get("onebit_quantization")
    if not isinstance(q, dict):
        raise ValueError(f"'{folder}' was not saved from a quantize_model() model (no "
                         f"onebit_quantization in config.json); load it with transformers")
    model = AutoModelForCausalLM.from_pretrained(folder)
    quantize_model(model, lam=lam, norm=bool(q.get("norm", True)))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"'{folder}' holds no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ValueError(f"'{folder}': weights do not match the quantized model (missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Sources: HF folder, onebit run, llama2.c file -> (fp CausalLM, tokenizer.json text)
# ---------------------------------------------------------------------------------------------

HF_TO_ONEBIT = ("llama", "mistral", "qwen2", "phi3")  # transformers folders `onebit finetune` reads
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _hf_config(folder: Path, raw: dict) -> ModelConfig:
    """onebit's fp ``CausalLM`` config for a transformers Llama / Mistral / Qwen2 / Phi-3 config.json.

    Qwen2's q/k/v biases become ``qkv_bias``; Phi-3's fused projections are split by ``_load_hf``.
    A sliding window shorter than the context becomes the context (attention is full below it, so
    the model is exact on every length it accepts). Anything onebit's decoder cannot reproduce
    (other activations, o_proj/MLP biases, scaled or partial RoPE) is refused, naming the field."""
    mt = raw.get("model_type")
    if mt not in HF_TO_ONEBIT:
        raise ValueError(f"'{folder}': model_type={mt!r} cannot be fine-tuned by `onebit finetune`; "
                         f"supported sources: transformers {', '.join(HF_TO_ONEBIT)} folders "
                         f"({', '.join(SUPPORTED_ARCHITECTURES[m][0] for m in HF_TO_ONEBIT)}), onebit "
                         f"runs and llama2.c .bin files")
    missing = [k for k in _HF_REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"'{folder}/config.json' lacks {missing}: not a complete transformers {mt} config")
    rope = raw.get("rope_parameters") or {}
    found = {"hidden_act": raw.get("hidden_act", "silu"),
             "attention_bias": bool(raw.get("attention_bias")),  # Llama's flag: o_proj too
             "mlp_bias": bool(raw.get("mlp_bias")),
             "rope_scaling": raw.get("rope_scaling") or None,
             "rope_type": rope.get("rope_type", "default"),
             "partial_rotary_factor": rope.get("partial_rotary_factor",
                                               raw.get("partial_rotary_factor", 1.0))}
    ours = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
            "rope_type": "default", "partial_rotary_factor": 1.0}
    bad = [f"{k}={found[k]!r:.60}" for k in ours if found[k] != ours[k]]  # rope_scaling lists can be long
    if bad:
        raise ValueError(f"'{folder}': {', '.join(bad)} of this {mt} model cannot be reproduced by onebit's "
                         f"decoder (silu, q/k/v biases only, plain full RoPE); use onebit.quantize_model "
                         f"on the transformers model instead")
    context = raw.get("max_position_embeddings", 2048)
    window = raw.get("sliding_window")
    if mt == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if isinstance(window, int) and isinstance(context, int) and 0 < window < context:
        context = window
    return ModelConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"], num_key_value_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"), hidden_act="silu", max_position_embeddings=context,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=_token_id(raw.get("bos_token_id"), raw["vocab_size"]),
        eos_token_id=_token_id(raw.get("eos_token_id"), raw["vocab_size"]),
        linear="fp", norm_placement="pre", qkv_bias=mt == "qwen2")


def _token_id(v, vocab: int) -> int:
    """config.json's bos/eos id (the first of a list), 0 when absent or outside the vocabulary: only
    metadata here, the trainer takes both from the tokenizer."""
    v = v[0] if isinstance(v, list) and v else v
    return v if isinstance(v, int) and 0 <= v < vocab else 0


def _split_fused(state: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path) -> None:
    """Phi-3's fused projections in ``state`` -> onebit's, in place, split as Phi3Attention and
    Phi3MLP do: qkv_proj [(H + 2 Hkv)·hd, D] rows = q | k | v; gate_up_proj [2F, D] rows = gate | up."""
    hd = cfg.resolved_head_dim
    q, kv, f = cfg.num_attention_heads * hd, cfg.kv_heads * hd, cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        for fused, parts, sizes in ((f"model.layers.{i}.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"),
                                     (q, kv, kv)),
                                    (f"model.layers.{i}.mlp.gate_up_proj", ("gate_proj", "up_proj"), (f, f))):
            w = state.pop(fused + ".weight", None)
            if w is None or w.dim() != 2 or w.shape[0] != sum(sizes):
                raise ValueError(f"'{folder}': Phi-3 tensor {fused}.weight must have {sum(sizes)} rows "
                                 f"({'+'.join(map(str, sizes))}), got {None if w is None else tuple(w.shape)}")
            prefix = fused.rsplit(".", 1)[0]
            for name, part in zip(parts, w.split(sizes)):
                state[f"{prefix}.{name}.weight"] = part.contiguous()


def _load_hf(folder: Path, raw: dict):
    from safetensors.torch import load_file

    from .model import CausalLM

    cfg = _hf_config(folder, raw)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"'{folder}' holds no *.safetensors weights (pytorch_model.bin is not read: no "
                         f"pickle); convert it with transformers' save_pretrained(safe_serialization=True)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k: v.float() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if raw["model_type"] == "phi3":
        _split_fused(state, cfg, folder)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = CausalLM(cfg)
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(state))
    if bad:
        raise ValueError(f"'{folder}': tensor names do not map onto onebit's {raw['model_type']} "
                         f"({bad[:4]}...)")
    wrong = [f"{k} {tuple(state[k].shape)} (config: {tuple(v.shape)})" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"'{folder}': tensor shapes do not match config.json: {wrong[:3]}")
    model.load_state_dict(state, strict=True)
    return model


def _read_tokenizer(path: Path) -> str:
    """tokenizer.json text of a tokenizer.json file/folder or a llama2.c tokenizer .bin."""
    from .formats.llama2c import Llama2cTokenizer

    if path.is_dir():
        path = path / "tokenizer.json"
    if path.suffix == ".bin":
        return Llama2cTokenizer.from_file(path).to_hf_tokenizer().to_str()
    if not path.is_file():
        raise ValueError(f"tokenizer '{path}' does not exist; pass a tokenizer.json or llama2.c tok*.bin")
    from .data import load_tokenizer
    return load_tokenizer(path).to_str()


def load_source(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """The model to fine-tune: ``(fp CausalLM, tokenizer.json text, kind)``, kind in
    {"hf", "onebit", "llama2c"}. Raises ValueError when the source or its tokenizer is missing."""
    from .checkpoint import TOKENIZER_FILE, load_model
    from .formats.llama2c import load_llama2c

    p = Path(path)
    if not p.exists():
        raise ValueError(f"finetune source '{p}' does not exist; pass a transformers folder, an onebit "
                         f"run/checkpoint folder or a llama2.c .bin")
    tok_path = Path(tokenizer) if tokenizer is not None else None
    if p.is_file():
        model, kind = load_llama2c(p), "llama2c"
        if tok_path is None:
            near = sorted(p.parent.glob("tok*.bin")) + sorted(p.parent.glob("tokenizer.json"))
            if len(near) != 1:
                raise ValueError(f"llama2.c model '{p}' has no tokenizer: pass --tokenizer (its tok*.bin "
                                 f"or a tokenizer.json); found {[n.name for n in near]} beside it")
            tok_path = near[0]
    else:
        raw = {}
        if (p / "config.json").is_file():
            raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
        if "model_type" in raw or "architectures" in raw:
            model, kind = _load_hf(p, raw), "hf"
            if tok_path is None:
                tok_path = p / TOKENIZER_FILE
        else:
            model, tok, folder = load_model(p)
            kind = "onebit"
            if tok_path is None:
                tok_path = folder / TOKENIZER_FILE
    if not tok_path.exists():
        raise ValueError(f"finetune source '{p}' has no tokenizer ({tok_path} is missing): pass "
                         f"--tokenizer PATH (tokenizer.json or llama2.c tok*.bin)")
    text = _read_tokenizer(tok_path)
    if kind == "hf" and tokenizer is None:  # its BOS convention may live in tokenizer_config.json:
        from tokenizers import Tokenizer  # state it in the tokenizer the data pipeline reads

        from .tokenizer_convention import declare_bos, folder_convention
        tok = Tokenizer.from_str(text)
        text = declare_bos(tok, folder_convention(p, tok, model.config.bos_token_id).prefix).to_str()
    return model.eval(), text, kind


# ---------------------------------------------------------------------------------------------
# Training hooks (called by train.train) and the entry point
# ---------------------------------------------------------------------------------------------

def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher || student) per token, on logits [..., V] at temperature T."""
    V = student_logits.shape[-1]
    s = torch.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def student_config(fc: FinetuneConfig) -> tuple[ModelConfig, str]:
    """The BitNet config the source becomes, and the source's tokenizer.json text."""
    from .model import CausalLM

    src, tok, _ = load_source(fc.source, fc.tokenizer)
    assert isinstance(src, CausalLM)
    return quantize_model(src, lam=0.0).config, tok


def init_student(model, fc: FinetuneConfig, device, calibration: torch.Tensor | None = None) -> nn.Module | None:
    """Load the converted source weights (sub-norm gains calibrated on ``calibration`` ids, training
    data) into the trainer's fresh ``model``; return the frozen fp teacher when distilling, else None."""
    src, _, _ = load_source(fc.source, fc.tokenizer)
    teacher = None
    if fc.distill_weight > 0:
        teacher = src.to(device).eval().requires_grad_(False)
        import copy
        src = copy.deepcopy(src)
    quantize_model(src, lam=0.0, calibration=calibration)
    model.load_state_dict(src.state_dict(), strict=True)
    return teacher


def teacher_for_resume(fc: FinetuneConfig, device) -> nn.Module | None:
    if fc.distill_weight <= 0:
        return None
    src, _, _ = load_source(fc.source, fc.tokenizer)
    return src.to(device).eval().requires_grad_(False)


def finetune(rc, resume: bool = False, export: str | os.PathLike | None = None,
             layout: str = "i2", force: bool = False) -> dict[str, Any]:
    """Fine-tune ``rc.finetune.source`` to 1.58 bits with the foundation trainer: the [model] table
    is replaced by the source's architecture (as BitNet), [data].tokenizer by the source's tokenizer
    (written to ``out_dir/source_tokenizer.json``). ``export``: also write the packed model there
    (``force``: replacing an earlier onebit output; summary["replaced"] lists it). Both
    destinations are checked before any work (DestinationError)."""
    import dataclasses

    from . import checkpoint as ckpt
    from .destination import RUN_ENTRIES, check_destination
    from .train import train

    fc = rc.finetune
    if fc.source is None:
        raise ConfigError("finetune.source is not set: pass --from <HF folder | onebit run | llama2.c .bin>")
    if fc.lambda_schedule != "none" and fc.lambda_steps > rc.train.steps:
        raise ConfigError(f"finetune.lambda_steps={fc.lambda_steps} exceeds train.steps={rc.train.steps}: λ "
                          f"would never reach 1 and the result would not be ternary; lower lambda_steps "
                          f"or raise steps")
    out = Path(rc.train.out_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 cleans and exports
    check_destination(out, "run", [fc.source], clean=main, label="train.out_dir")
    replaced = [] if export is None else check_destination(
        export, "model", [fc.source, out], force=force, clean=main,
        reserved=[out / n for n in RUN_ENTRIES], label="--export")
    mc, tok_json = student_config(fc)
    tok_file = out / "source_tokenizer.json"
    if not tok_file.is_file() or tok_file.read_text(encoding="utf-8") != tok_json:
        ckpt.atomic_write_text(tok_file, tok_json)
    rc = dataclasses.replace(rc, model=mc, data=dataclasses.replace(rc.data, tokenizer=str(tok_file)))
    summary = train(rc, resume=resume)
    if export is not None and main and not summary.get("interrupted"):
        from .formats.packed_model import export_packed
        summary["export"] = str(export_packed(out / "model", export, layout=layout, force=force))
        summary["replaced"] = replaced
    return summary
