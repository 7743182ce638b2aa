"""Hugging Face checkpoint folders in and out (BITNET.md §4), torch-free.

Layouts read (auto-detected from config.json and the tensors; ``describe_hf`` says which):

========================  =====================================  ==========================================
layout                    looks like                             weights
========================  =====================================  ==========================================
bitnet-packed             microsoft/bitnet-b1.58-2B-4T           uint8 [ceil(N/4), K] + weight_scale,
                          (BitNetForCausalLM, autobitlinear)     y = (x W) * weight_scale
bitnet-latent             microsoft/bitnet-b1.58-2B-4T-bf16      bf16 master weights, absmean at load
llama-packed              HF1BitLLM/Llama3-8B-1.58, Falcon3      uint8 packed + weight_scale,
                          (LlamaForCausalLM, linear_class         y = (x W) / weight_scale
                          bitlinear)
1bitllm-latent            1bitLLM/bitnet_b1_58-large             fp16 master weights, absmean at load;
                          (BitnetForCausalLM)                    sub-norms inner_attn_ln / ffn_layernorm
========================  =====================================  ==========================================

transformers' 2-bit packing: packed row r of a [R, K] uint8 matrix holds unpacked rows r, r+R,
r+2R, r+3R in bits 1:0, 3:2, 5:4, 7:6 as value + 1. ``write_hf`` writes the bitnet-packed layout
(autobitlinear, offline), which transformers loads with the same logits (tests/test_hf.py).
Every file is read through the defensive safetensors reader; pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from .model_io import (TOKENIZER_FILES, Dense, TernaryModel, check_tokenizer_files, projections,
                       write_model_dir)
from .safetensors_mmap import bf16_to_f32, read_safetensors

__all__ = [
    "HFFormatError",
    "absmean_codes",
    "describe_hf",
    "is_hf_folder",
    "pack_hf_rows",
    "read_hf",
    "unpack_hf_rows",
    "write_hf",
]

MAX_JSON = 16 << 20


class HFFormatError(ValueError):
    """A Hugging Face folder onebit cannot read: unsupported layout, missing or malformed files."""


def _json(path: Path) -> dict:
    from ..jsonio import read_json

    d = read_json(path, HFFormatError, fix="re-download it", max_bytes=MAX_JSON)
    if not isinstance(d, dict):
        raise HFFormatError(f"'{path}' must hold a JSON object")
    return d


def is_hf_folder(folder: str | Path) -> bool:
    """True for a folder whose config.json is a transformers config (not an onebit one)."""
    from ..jsonio import read_json

    cfg = Path(folder) / "config.json"
    try:
        d = read_json(cfg) if cfg.is_file() else None
    except ValueError:
        return False
    return isinstance(d, dict) and "model_type" in d and "packed" not in d and "model" not in d


# --------------------------------------------------------------------------------------------
# transformers' 2-bit packing (integrations/bitnet.py layout)
# --------------------------------------------------------------------------------------------

def unpack_hf_rows(packed: np.ndarray, n: int, name: str = "weight") -> np.ndarray:
    """uint8 [R, K] -> codes int8 [n, K] (n <= 4R). Raises HFFormatError on a code of 3."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise HFFormatError(f"tensor {name!r}: packed weights must be uint8 [R, K], got "
                            f"{packed.dtype} {packed.shape}")
    R = packed.shape[0]
    if not 4 * (R - 1) < n <= 4 * R:
        raise HFFormatError(f"tensor {name!r}: {R} packed rows cannot hold {n} output rows "
                            f"(need ceil({n}/4) = {-(-n // 4)}); the config does not match the weights")
    out = np.empty((4 * R, packed.shape[1]), np.int8)
    for i in range(4):
        out[i * R:(i + 1) * R] = (packed >> (2 * i)) & 3
    out = out[:n]
    if (out == 3).any():
        r = int(np.argwhere(out == 3)[0][0])
        raise HFFormatError(f"tensor {name!r}: row {r} holds the invalid 2-bit code 3 (valid: 0, 1, 2 "
                            f"for -1, 0, +1); the file is corrupt: re-download it")
    out -= 1
    return out


def pack_hf_rows(codes: np.ndarray) -> np.ndarray:
    """codes int8 [N, K] in {-1, 0, 1} -> uint8 [ceil(N/4), K] (padding rows hold code 0 = -1,
    as transformers' pack_weights leaves them)."""
    codes = np.asarray(codes)
    n, k = codes.shape
    R = -(-n // 4)
    u = np.zeros((4 * R, k), np.uint8)
    u[:n] = (codes + 1).astype(np.uint8)
    out = np.zeros((R, k), np.uint8)
    for i in range(4):
        out |= u[i * R:(i + 1) * R] << (2 * i)
    return out


def absmean_codes(w: np.ndarray) -> tuple[np.ndarray, float]:
    """BitNet b1.58 weight quantizer of a float matrix (BITNET.md §1), as transformers' online
    WeightQuant computes it in float32: s = 1 / max(mean|W|, 1e-5); codes = clip(round(W s))."""
    w = np.asarray(w, dtype=np.float32)
    mean = np.float32(np.abs(w).mean(dtype=np.float64))
    s = np.float32(1.0) / max(mean, np.float32(1e-5))
    codes = np.clip(np.rint(w * s), -1, 1).astype(np.int8)
    return codes, float(np.float32(1.0) / s)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _weights(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = _json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise HFFormatError(f"'{index}' has no weight_map")
        for f in wm.values():
            if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith(".") or not f:
                raise HFFormatError(f"'{index}' names the shard {str(f)[:80]!r}; shards must be plain "
                                    f"file names inside the folder")
            if not (folder / f).is_file():
                raise HFFormatError(f"'{index}' names the shard {f!r}, which is not a file in "
                                    f"'{folder}'; the download is incomplete")
        files = sorted(set(wm.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = (f" ({', '.join(pickles[:3])} are pickle files, which onebit never loads: convert "
                f"them to safetensors with the tool that made them)" if pickles else "")
        raise HFFormatError(f"'{folder}' has no model.safetensors or model.safetensors.index.json"
                            f"{hint}")
    out: dict[str, np.ndarray] = {}
    for f in files:
        tensors, _ = read_safetensors(folder / f)
        for name, arr in tensors.items():
            if name in out:
                raise HFFormatError(f"'{folder}': tensor {name!r} appears in two shards")
            out[name] = arr
    return out


def _float(arr: np.ndarray, dtype_of: str, name: str) -> np.ndarray:
    """A float tensor as float32 (bf16 arrives as uint16 from the mmap reader)."""
    if dtype_of == "bf16":
        return bf16_to_f32(arr)
    if arr.dtype not in (np.float32, np.float16, np.float64):
        raise HFFormatError(f"tensor {name!r} is {arr.dtype}; expected a float tensor")
    return arr.astype(np.float32)


def describe_hf(folder: str | Path) -> tuple[str, dict]:
    """``(layout, hf_config)`` for a transformers folder, or HFFormatError listing the supported
    layouts."""
    folder = Path(folder)
    hf = _json(folder / "config.json")
    arch = hf.get("architectures") or []
    mt = hf.get("model_type")
    qc = hf.get("quantization_config") or {}
    if not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)) or not isinstance(mt, (str, type(None))):
        raise HFFormatError(f"'{folder}/config.json': architectures must be a list of names and "
                            f"model_type a string")
    if not isinstance(qc, dict):
        raise HFFormatError(f"'{folder}/config.json': quantization_config must be an object")
    if qc and qc.get("quant_method") != "bitnet":
        raise HFFormatError(f"'{folder}': quant_method {qc.get('quant_method')!r} is not a ternary "
                            f"format; onebit reads quant_method 'bitnet' checkpoints (or latent "
                            f"weights with `onebit finetune`)")
    if qc.get("use_rms_norm"):
        raise HFFormatError(f"'{folder}': quantization_config.use_rms_norm=true (an RMSNorm inside "
                            f"every BitLinear on top of the block norms) is not supported yet")
    cls = qc.get("linear_class", "bitlinear") if qc else None
    mode = qc.get("quantization_mode", "offline") if qc else None
    if mt == "bitnet" or "BitNetForCausalLM" in arch:
        if qc and cls != "autobitlinear":
            raise HFFormatError(f"'{folder}': a bitnet model with linear_class {cls!r}; expected "
                                f"'autobitlinear'")
        return ("bitnet-packed" if qc and mode == "offline" else "bitnet-latent"), hf
    if "BitnetForCausalLM" in arch:
        return "1bitllm-latent", hf
    if mt == "llama" or "LlamaForCausalLM" in arch:
        if qc and mode == "offline":
            return "llama-packed", hf
        raise HFFormatError(f"'{folder}' is a full-precision Llama checkpoint; turn it into a 1.58-bit "
                            f"model with `onebit finetune --from {folder}` first")
    raise HFFormatError(f"'{folder}': model_type {mt!r} / architectures {arch} is not a supported "
                        f"ternary layout. Supported: bitnet-packed (microsoft/bitnet-b1.58-2B-4T), "
                        f"bitnet-latent (-bf16), llama-packed (HF1BitLLM / Falcon3-1.58bit, "
                        f"quant_method bitnet), 1bitllm-latent (1bitLLM/bitnet_b1_58-*)")


def _model_config(layout: str, hf: dict, folder: Path) -> ModelConfig:
    try:
        return _model_config_unchecked(layout, hf, folder)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        if isinstance(e, HFFormatError):
            raise
        raise HFFormatError(f"'{folder}/config.json' does not describe a valid model: {str(e)[:300]}") from None


def _model_config_unchecked(layout: str, hf: dict, folder: Path) -> ModelConfig:
    def get(key, default=None):
        v = hf.get(key, default)
        if v is None:
            raise HFFormatError(f"'{folder}/config.json' lacks {key!r}")
        return v

    act = hf.get("hidden_act", "silu")
    act = {"relu2": "relu2", "silu": "silu"}.get(act)
    if act is None:
        raise HFFormatError(f"'{folder}': hidden_act {hf.get('hidden_act')!r} is not supported "
                            f"(relu2 or silu)")
    if hf.get("rope_scaling") not in (None, {}):
        raise HFFormatError(f"'{folder}': rope_scaling {hf.get('rope_scaling')} is not supported yet "
                            f"(plain RoPE only)")
    # transformers >= 5 writes RoPE as rope_parameters {"rope_theta", "rope_type"} (BitNetConfig's
    # default theta is 500000, not the 10000 of a config that names none)
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise HFFormatError(f"'{folder}': rope_parameters {rope!r} are not supported yet (plain RoPE "
                            f"only)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFFormatError(f"'{folder}': attention/MLP biases are not supported (BitNet has none)")
    eos = get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    heads = get("num_attention_heads")
    hd = hf.get("head_dim")
    if hd is not None and hd == get("hidden_size") // heads:
        hd = None
    placement = "pre" if layout == "llama-packed" else "subln"
    try:
        return ModelConfig(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hd, hidden_act=act,
            max_position_embeddings=get("max_position_embeddings", 2048),
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)), rope_theta=float(theta),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=get("bos_token_id", 1), eos_token_id=eos, norm_placement=placement)
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"'{folder}/config.json' does not map onto an onebit model: {str(e)[:300]}") from None


_SUBNORM_NAMES = {"bitnet": ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
                  "1bitllm": ("self_attn.inner_attn_ln", "mlp.ffn_layernorm")}


def _naming(folder: Path, fn):
    """``fn`` whose HFFormatError names ``folder`` (the tensor-level checks name only the tensor)."""
    def call(*a):
        try:
            return fn(*a)
        except HFFormatError as e:
            if str(folder) in str(e):
                raise
            raise HFFormatError(f"'{folder}': {e}") from None
    return call


def read_hf(folder: str | Path) -> TernaryModel:
    """A transformers checkpoint folder (layouts in the module docstring) as a TernaryModel.
    Every expected tensor is checked for presence, shape and dtype; unknown tensors are an error
    (nothing is silently dropped). Every HFFormatError names the folder or the file."""
    folder = Path(folder)
    return _naming(folder, _read_hf)(folder)


def _read_hf(folder: Path) -> TernaryModel:
    layout, hf = describe_hf(folder)
    tensors = _weights(folder)
    n_layers = hf.get("num_hidden_layers")
    present = {int(n.split(".")[2]) for n in tensors
               if n.startswith("model.layers.") and n.split(".")[2].isdecimal()
               and len(n.split(".")[2]) < 10}  # int() of a 5,000-digit name raises
    if (type(n_layers) is not int or n_layers != len(present)  # before range(): no huge set
            or present != set(range(n_layers))):
        raise HFFormatError(f"'{folder}/config.json' says num_hidden_layers={n_layers!r} but the "
                            f"weights hold layers {sorted(present)[:3]}..{sorted(present)[-1:]} "
                            f"({len(present)} of them); the config does not belong to these weights")
    cfg = _model_config(layout, hf, folder)
    st_dtypes = _dtypes(folder)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise HFFormatError(f"'{folder}': tensor {name!r} is missing")
        a = tensors[name]
        if tuple(a.shape) != shape:
            raise HFFormatError(f"'{folder}': tensor {name!r} has shape {list(a.shape)}, the config "
                                f"implies {list(shape)}")
        used.add(name)
        return a

    packed = layout.endswith("-packed")
    divide = layout == "llama-packed"
    ternary = {}
    for name, n, k in projections(cfg):
        if packed:
            w = take(name + ".weight", (-(-n // 4), k))
            if w.dtype != np.uint8:
                raise HFFormatError(f"'{folder}': {name}.weight is {w.dtype}; a packed checkpoint "
                                    f"stores uint8")
            ws = take(name + ".weight_scale", (1,))
            s = float(_float(ws, st_dtypes.get(name + ".weight_scale"), name)[0])
            if not math.isfinite(s) or s <= 0:
                raise HFFormatError(f"'{folder}': {name}.weight_scale = {s}; it must be finite and > 0")
            scale = 1.0 / s if divide else s
            ternary[name] = _naming(folder, lambda w=w, n=n, name=name, scale=scale:
                                    (unpack_hf_rows(w, n, name), scale))
        else:
            w = take(name + ".weight", (n, k))
            dt = st_dtypes.get(name + ".weight")
            ternary[name] = _naming(folder, lambda w=w, dt=dt, name=name:
                                    absmean_codes(_float(w, dt, name)))
    D = cfg.hidden_size
    QD, F = cfg.num_attention_heads * cfg.resolved_head_dim, cfg.intermediate_size
    sub = _SUBNORM_NAMES["1bitllm" if layout.startswith("1bitllm") else "bitnet"]
    dense: dict[str, Dense] = {}

    def dense_f32(src: str, dst: str, shape) -> None:
        dense[dst] = Dense(_float(take(src, shape), st_dtypes.get(src), src))

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        dense_f32(p + "input_layernorm.weight", p + "input_layernorm.weight", (D,))
        dense_f32(p + "post_attention_layernorm.weight", p + "post_attention_layernorm.weight", (D,))
        if cfg.norm_placement == "subln":
            dense_f32(p + sub[0] + ".weight", p + "self_attn.attn_sub_norm.weight", (QD,))
            dense_f32(p + sub[1] + ".weight", p + "mlp.ffn_sub_norm.weight", (F,))
    dense_f32("model.norm.weight", "model.norm.weight", (D,))
    heads = ["model.embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        used.add("lm_head.weight")  # some exports write the tied head twice
    for name in heads:
        a = take(name, (cfg.vocab_size, D))
        dt = st_dtypes.get(name)
        if dt == "bf16":
            w = bf16_to_f32(a)
            if np.abs(w).max() < 65504:  # bf16 -> f16 is exact above 6.1e-5 and loses < 3e-8 below
                dense[name] = Dense(w.astype(np.float16), "f16")
            else:
                dense[name] = Dense(w, "f32")
        else:
            dense[name] = Dense(_float(a, dt, name), "f16" if a.dtype == np.float16 else "f32")
    stray = sorted(t for t in tensors if t not in used and not t.endswith("rotary_emb.inv_freq"))
    if stray:
        raise HFFormatError(f"'{folder}': tensors {stray[:5]} are not part of the {layout} layout "
                            f"onebit reads; refusing to drop them silently")
    files = {f: (folder / f).read_bytes() for f in TOKENIZER_FILES if (folder / f).is_file()}
    check_tokenizer_files(folder, cfg.vocab_size, HFFormatError)
    if "tokenizer.json" not in files and "tokenizer.model" in files:
        files["tokenizer.json"] = _sentencepiece_to_json(folder)
    return TernaryModel(cfg, ternary, dense, files, f"{folder} ({layout})")


def _dtypes(folder: Path) -> dict[str, str]:
    """name -> "bf16" for the bf16 tensors (the mmap reader returns them as uint16)."""
    out = {}
    index = folder / "model.safetensors.index.json"
    files = sorted(set(_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for f in files:
        with open(folder / f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        out.update({k: "bf16" for k, v in header.items() if isinstance(v, dict) and v.get("dtype") == "BF16"})
    return out


def _sentencepiece_to_json(folder: Path) -> bytes:
    """tokenizer.model alone (SentencePiece, Llama-2): refused with the fix. Converting it here
    was tried with transformers 5's converters, which returned an empty vocabulary without an
    error; silent garbage is worse than asking for the file."""
    raise HFFormatError(f"'{folder}' has tokenizer.model (SentencePiece) but no tokenizer.json; "
                        f"onebit reads tokenizer.json: copy the one published with the model (Llama-2 "
                        f"repositories ship it), or write it with the `tokenizers` library")


# --------------------------------------------------------------------------------------------
# Writing (bitnet-packed: transformers BitNetForCausalLM, autobitlinear offline)
# --------------------------------------------------------------------------------------------

def write_hf(tm: TernaryModel, dst: str | Path, verify=None) -> Path:
    """Write ``tm`` as a transformers BitNet packed checkpoint (the 2B4T layout) atomically.
    Refuses what that layout cannot hold exactly: inner norms, int8/4-bit embeddings, output
    sizes that are not multiples of 4. ``metadata["onebit.writer"]`` marks the folder as onebit's
    (onebit.destination), so a later write may replace it (with --force)."""
    from safetensors.numpy import save_file

    cfg = tm.config
    if cfg.norm_placement != "subln":
        raise HFFormatError(f"{tm.source}: norm_placement {cfg.norm_placement!r} has no transformers "
                            f"BitNet equivalent (it has block norms + sub-norms, 'subln'); keep this "
                            f"model in the onebit format")
    kinds = {d.kind for n, d in tm.dense.items() if n in ("model.embed_tokens.weight", "lm_head.weight")}
    if kinds & {"i8", "i4"}:
        raise HFFormatError(f"{tm.source}: the embeddings are stored as {sorted(kinds)}; transformers "
                            f"has no such embedding type and widening them would add nothing: "
                            f"re-export the model with --embedding f16 or f32")
    out: dict[str, np.ndarray] = {}
    for name, n, k in projections(cfg):
        if n % 4:
            raise HFFormatError(f"{tm.source}: {name} has {n} output rows; transformers' packed "
                                f"BitNet layout needs a multiple of 4")
        codes, scale = tm.ternary[name]()
        out[name + ".weight"] = pack_hf_rows(codes)
        out[name + ".weight_scale"] = np.array([scale], np.float32)
    for name, d in tm.dense.items():
        out[name] = np.ascontiguousarray(d.data if d.kind in ("f16", "f32") else d.f32())
    dtype = "float16" if kinds == {"f16"} else "float32"
    hf = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
          "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.kv_heads,
          "head_dim": cfg.resolved_head_dim, "hidden_act": cfg.hidden_act,
          "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
          "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings,
          "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
          "attention_bias": False, "torch_dtype": dtype,
          "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                  "quantization_mode": "offline"}}

    return write_model_dir(dst, hf, tm.files, verify, lambda d: save_file(
        out, str(d / "model.safetensors"), metadata={"format": "pt", "onebit.writer": "onebit"}))

