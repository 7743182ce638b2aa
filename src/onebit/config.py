"""Frozen configuration dataclasses with validation that names the field and the fix.

``ModelConfig`` field names are those of transformers' ``BitNetConfig`` / ``LlamaConfig`` so a
real checkpoint's ``config.json`` maps onto it key for key; the onebit-only fields come last.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


def short(value: Any, limit: int = 40) -> str:
    """repr(value) for an error message, cut to about ``limit`` characters: a value read from a
    hostile file (a 1,000-character string, a 309-digit number) must not flood the one-line error."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit - 10]}... ({len(r)} characters)"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def override_flag(cls_name: str, name: str) -> str:
    """The command-line spelling of a field: ``TrainConfig``, ``steps`` -> ``--train.steps=``."""
    section = cls_name[:-len("Config")].lower() if cls_name.endswith("Config") else ""
    return f"--{section}.{name}=" if section else f"--{name}="


def coerce(cls_name: str, name: str, tp: Any, value: Any) -> Any:
    """Check/convert ``value`` for field ``name`` of type ``tp`` (int, float, bool, str, optionals,
    tuples/lists of those). Strings from the command line are parsed; JSON-like values are checked."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(cls_name, name, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{cls_name}.{name}: bad value {short(value)}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls_name}.{name} must be a list, got {short(value)}")
        elem = args[0] if args else str
        return tuple(coerce(cls_name, name, elem, v) for v in value)
    bad = ConfigError(f"{cls_name}.{name} must be of type {_type_name(tp)}, got {short(value)} "
                      f"({type(value).__name__}): fix the value in the config or the "
                      f"{override_flag(cls_name, name)} override")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{cls_name}.{name}: unsupported field type {tp}")


def from_dict(cls, d: dict[str, Any], *, allow_unknown: bool = False):
    """Build dataclass ``cls`` from ``d``, converting and validating every value.

    Unknown keys raise (naming the valid ones) unless ``allow_unknown``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__} must be built from a table/dict, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(d) - set(known))
    if unknown and not allow_unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; valid keys are: "
                          f"{', '.join(sorted(known))}")
    kwargs = {}
    for k, v in d.items():
        if k not in known:
            continue
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = v if isinstance(v, tp) else from_dict(tp, v, allow_unknown=allow_unknown)
        else:
            kwargs[k] = coerce(cls.__name__, k, tp, v)
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _type_label(tp: Any) -> str:
    """``INT``, ``FLOAT|none``, ``LIST`` (comma-separated) for the option listing."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [_type_label(a) for a in args if a is not type(None)]
        return "|".join(inner) + ("|none" if type(None) in args else "")
    if origin in (tuple, list):
        return "A,B,..."
    return _type_name(tp).upper()


def field_comments(cls) -> dict[str, str]:
    """The ``# comment`` after each field of dataclass ``cls`` in its source (and the comment lines
    right below it), or {} when the source is not available."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in fields(cls)}
    out: dict[str, str] = {}
    last = None
    for line in lines:
        m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if m and m.group(1) in names:
            last = m.group(1)
            out[last] = (m.group(2) or "").strip()
            continue
        c = re.match(r"\s+#\s*(.*)$", line)
        if c and last is not None and out.get(last):
            out[last] += " " + c.group(1).strip()
        else:
            last = None
    return out


def options_help(sections: dict[str, type], defaults: dict[str, dict[str, Any]] | None = None,
                 notes: dict[str, str] | None = None) -> str:
    """The ``--section.key=value`` options of the config dataclasses ``sections`` ({"train":
    TrainConfig, ...}), one a line: flag, type, default (``defaults`` override the dataclass's),
    choices (a class's ``CHOICES``) and the field's source comment. ``notes``: a first line per
    section (e.g. the model presets)."""
    out = ["options: --section.key=value, over the --config file's values (defaults shown are those "
           "without --config)"]
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        docs, choices = field_comments(cls), getattr(cls, "CHOICES", {})
        out.append(f"  [{section}]" + (f"  {notes[section]}" if notes and section in notes else ""))
        for f in fields(cls):
            if not f.init or f.name == "format_version":
                continue
            if f.name in (defaults or {}).get(section, {}):
                default = defaults[section][f.name]
            elif f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory()  # type: ignore[misc]
            if isinstance(default, tuple):
                default = ",".join(map(str, default)) or "(empty)"
            label = ("{" + ",".join(map(str, choices[f.name])) + "}" if f.name in choices
                     else _type_label(hints[f.name]))
            text = f"    --{section}.{f.name}={label}  default {default}"
            if docs.get(f.name):
                text += f"  - {docs[f.name]}"
            out.append(text)
    return "\n".join(out)


def _choice(cls: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{cls}.{name}={short(value)} is not valid: use one of {list(choices)}")


def check_types(obj) -> None:
    """Raise ConfigError naming the field if dataclass ``obj`` holds a value of the wrong type
    (e.g. ``ModelConfig(hidden_size="256")``, which ``__post_init__`` could not even compare).
    Strict: strings are not parsed here (``from_dict`` does that) and a bool is not an int; other
    integers (numpy's) become ``int``, and real numbers in a float field become ``float``."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    for f in fields(obj):
        tp, v = hints[f.name], getattr(obj, f.name)
        allowed = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if v is None and type(None) in allowed:
            continue
        if isinstance(v, bool):
            ok = bool in allowed
        elif int in allowed and isinstance(v, numbers.Integral):
            ok, v = True, int(v)
        elif float in allowed and isinstance(v, numbers.Real):
            ok, v = True, float(v)
        elif str in allowed:
            ok = isinstance(v, str)
        else:
            ok = not set(allowed) & {bool, int, float, str}  # other field types are not checked here
        if not ok:
            raise ConfigError(f"{cls.__name__}.{f.name} must be of type {_type_name(tp)}, got {short(v)} "
                              f"({type(v).__name__}): fix the value in the config or the "
                              f"{override_flag(cls.__name__, f.name)} override")
        if v is not getattr(obj, f.name):
            object.__setattr__(obj, f.name, v)  # normalise numpy scalars (frozen dataclass)


def _positive(cls: str, name: str, value: Any) -> None:
    # `not value > 0` also refuses NaN; floats must be finite
    if value is None or not value > 0 or (isinstance(value, float) and value == float("inf")):
        raise ConfigError(f"{cls}.{name}={short(value)} must be a finite number > 0")


# Upper bounds of ModelConfig's sizes: several times the largest released models (Llama-3.1-405B:
# hidden 16,384, intermediate 53,248, 126 layers, 128 heads; vocabularies up to ~262k; contexts up
# to 1M), so a real model always fits and an absurd or corrupt value (hidden_size=2**31,
# num_hidden_layers=2**40) fails at once, naming the field, instead of allocating or looping.
MAX_SIZES: dict[str, int] = {
    "vocab_size": 1 << 22,               # 4,194,304
    "hidden_size": 1 << 16,              # 65,536
    "intermediate_size": 1 << 18,        # 262,144
    "num_hidden_layers": 1 << 10,        # 1,024
    "num_attention_heads": 1 << 10,      # 1,024
    "num_key_value_heads": 1 << 10,
    "head_dim": 1 << 12,                 # 4,096
    "max_position_embeddings": 1 << 20,  # 1,048,576
}


def _bounded(cls: str, name: str, value: Any) -> None:
    top = MAX_SIZES[name]
    if value is not None and value > top:
        raise ConfigError(f"{cls}.{name}={short(value)} is larger than onebit's limit of {top:,} (several "
                          f"times any released model); the config is corrupt or mistyped: fix the "
                          f"value in the config or the --{name}= override")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer; BitNet or its full-precision twin (``linear``).

    ``norm_placement``: ``"subln"`` = the released 2B4T layout (pre-norms ``input_layernorm`` /
    ``post_attention_layernorm`` + ``attn_sub_norm`` before o_proj and ``ffn_sub_norm`` before
    down_proj); ``"inner"`` = b1.58 paper layout (an RMSNorm inside every BitLinear, no block
    pre-norms); ``"pre"`` = a plain Llama (block pre-norms only, no norm before o_proj/down_proj):
    HF1BitLLM's ternary Llama, and how a pretrained fp model (llama2.c, transformers Llama) is
    imported before ``quantize_model`` turns it into a SubLN BitNet. ``activation_scheme``:
    ``"a8"`` (INT8 per token for every BitLinear input) or
    ``"a4.8"`` (BITNET.md §2: INT4 for q/k/v/gate/up, top-50% + INT8 for o_proj, INT8 for down).
    ``kv_bits``: K/V fake-quantized after RoPE per (token, kv head), absmax, unsigned codes
    (``onebit.quant.fake_kv``, docs/formats.md §10): 16 (off), 8, 4 or 3 (position 0 at 4 bits).
    ``qkv_bias``: q/k/v projections add a full-precision bias (a fine-tuned Qwen2), kept as float32
    ``*.bias`` tensors in the packed folder (the engine adds them; GGUF export refuses them).
    Sizes are bounded by ``MAX_SIZES`` (hidden_size <= 65,536, intermediate_size <= 262,144,
    vocab_size <= 4,194,304, num_hidden_layers / heads <= 1,024, head_dim <= 4,096,
    max_position_embeddings <= 1,048,576); floats must be finite.
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None = num_attention_heads (MHA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    hidden_act: str = "relu2"  # "relu2" (ReLU²-GLU, BitNet 2B4T) or "silu" (SwiGLU, Llama)
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1
    # onebit-only fields
    linear: str = "bitnet"  # "bitnet" (ternary weights, quantized activations) or "fp" (the twin)
    norm_placement: str = "subln"  # "subln" (2B4T), "inner" (b1.58 paper) or "pre" (Llama)
    activation_scheme: str = "a8"  # "a8" or "a4.8"
    topk_keep: float = 0.5  # a4.8: fraction of o_proj inputs kept per token
    kv_bits: int = 16  # KV cache: 16 (not quantized), 8, 4 or 3 bits (a4.8 §KV)
    qkv_bias: bool = False  # q/k/v projections carry a full-precision bias (Qwen2)
    format_version: int = FORMAT_VERSION
    CHOICES: ClassVar[dict[str, tuple]] = {
        "hidden_act": ("relu2", "silu"), "linear": ("bitnet", "fp"),
        "norm_placement": ("subln", "inner", "pre"), "activation_scheme": ("a8", "a4.8"),
        "kv_bits": (16, 8, 4, 3)}

    def __post_init__(self) -> None:
        c = "ModelConfig"
        check_types(self)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            _positive(c, name, getattr(self, name))
        for name in MAX_SIZES:  # before anything loops over or allocates by a size
            _bounded(c, name, getattr(self, name))
        if not (self.initializer_range >= 0 and self.initializer_range < float("inf")):
            raise ConfigError(f"{c}.initializer_range={self.initializer_range!r} must be finite and >= 0")
        _positive(c, "rms_norm_eps", self.rms_norm_eps)
        _positive(c, "rope_theta", self.rope_theta)
        for name, choices in self.CHOICES.items():
            _choice(c, name, getattr(self, name), choices)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{c}: num_attention_heads={self.num_attention_heads} does not divide "
                              f"hidden_size={self.hidden_size}; pick a head count that divides it "
                              f"(e.g. {_divisor_hint(self.hidden_size, self.num_attention_heads)}) "
                              f"or set head_dim explicitly")
        if self.head_dim is not None:
            _positive(c, "head_dim", self.head_dim)
        if self.resolved_head_dim % 2:
            raise ConfigError(f"{c}: head_dim={self.resolved_head_dim} must be even for rotary "
                              f"embeddings; change hidden_size/num_attention_heads")
        kv = self.kv_heads
        if kv <= 0 or self.num_attention_heads % kv:
            raise ConfigError(f"{c}: num_key_value_heads={kv} must divide num_attention_heads="
                              f"{self.num_attention_heads} (grouped-query attention)")
        if self.activation_scheme == "a4.8" and self.hidden_act != "relu2":
            raise ConfigError(f"{c}: activation_scheme='a4.8' needs hidden_act='relu2' (its down_proj "
                              f"sparsity comes from the ReLU² gate); set hidden_act='relu2'")
        if self.activation_scheme == "a4.8" and self.linear != "bitnet":
            raise ConfigError(f"{c}: activation_scheme='a4.8' only applies to linear='bitnet'")
        if not 0.0 < self.topk_keep <= 1.0:
            raise ConfigError(f"{c}.topk_keep={self.topk_keep} must be in (0, 1]")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ConfigError(f"{c}.{name}={v} must be a token id in [0, vocab_size={self.vocab_size})")
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(f"{c}.format_version={self.format_version} is not supported by this "
                              f"onebit (expects {FORMAT_VERSION}); upgrade onebit or re-convert")

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def fp_twin(self) -> "ModelConfig":
        """The same architecture with full-precision linears (the comparison baseline)."""
        return self.replace(linear="fp", activation_scheme="a8")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], allow_unknown: bool = False) -> "ModelConfig":
        return from_dict(cls, d, allow_unknown=allow_unknown)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        return from_dict(cls, {**PRESETS[name], **overrides})


def _divisor_hint(n: int, near: int) -> int:
    """The divisor k of n nearest ``near`` with n // k even (an even head_dim); 1 if none.
    O(sqrt(n)): divisors come in pairs (d, n // d) with d <= sqrt(n)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    divs = [k for d in small for k in {d, n // d} if (n // k) % 2 == 0]
    return min(divs, key=lambda k: (abs(k - near), k)) if divs else 1


# Presets. The two big shapes are those of the peer benchmarks (BITNET.md §4, the engine issue).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256),
    "bitnet-2b4t": dict(vocab_size=128256, hidden_size=2560, intermediate_size=6912,
                        num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=5,
                        hidden_act="relu2", max_position_embeddings=4096, rope_theta=500000.0,
                        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    "bitnet-700m": dict(vocab_size=32002, hidden_size=1536, intermediate_size=4096,
                        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                        hidden_act="silu", max_position_embeddings=2048,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # 1bitLLM/bitnet_b1_58-3B's shape (the 700M's family, scaled up)
    "bitnet-3b": dict(vocab_size=32002, hidden_size=3200, intermediate_size=8640,
                      num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=32,
                      hidden_act="silu", max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # HF1BitLLM/Llama3-8B-1.58-100B-tokens: Llama 3 8B with ternary projections, Llama's norms
    "llama3-8b-1.58": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           hidden_act="silu", max_position_embeddings=8192, rope_theta=500000.0,
                           norm_placement="pre", tie_word_embeddings=False,
                           bos_token_id=128000, eos_token_id=128001),
}
