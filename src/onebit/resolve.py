"""One resolver for every ``--model``: what kind of model a path holds, and how a command runs it.

    src = classify(path)            # ModelSource(path, kind)
    m = load_runnable(path)         # an engine-API Model (generate / stream / chat / logits)

Kinds (``ModelSource.kind``):

    packed       onebit packed folder (``onebit export`` / ``convert --to onebit``)   engine
    hf-ternary   transformers BitNet / HF1BitLLM / 1bitLLM folder                     engine (imported once)
    gguf         GGUF file (TQ1_0 / TQ2_0 / I2_S)                                     engine (imported once)
    run          onebit training run, model or checkpoint folder (ternary or fp twin) PyTorch
    hf-fp        transformers Llama / Mistral / Qwen2 / Phi-3 folder (full precision) PyTorch
    llama2c      llama2.c ``.bin`` (full precision; its tok*.bin beside it)           PyTorch

Ternary kinds run on the torch-free C engine; the others run their PyTorch forward behind the same
``engine.api.Model`` interface (``TorchRuntime``), so generate / chat / eval ppl work on all of
them. A command that can do nothing useful with a kind says what to do instead
(``ModelSource.cannot``). Importing this module does not import torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENGINE_KINDS", "KINDS", "ModelSource", "TorchRuntime", "classify", "load_runnable",
           "load_torch", "require_engine"]

KINDS = ("packed", "hf-ternary", "gguf", "run", "hf-fp", "llama2c")
ENGINE_KINDS = ("packed", "hf-ternary", "gguf")
# transformers model types `onebit finetune` loads in full precision (finetune.HF_TO_ONEBIT)
_HF_FP_TYPES = ("llama", "mistral", "qwen2", "phi3")
_WHAT = {"packed": "an onebit packed model", "hf-ternary": "a ternary Hugging Face checkpoint",
         "gguf": "a GGUF model", "run": "an onebit training folder",
         "hf-fp": "a full-precision Hugging Face model", "llama2c": "a full-precision llama2.c model"}


@dataclass(frozen=True)
class ModelSource:
    path: Path
    kind: str

    @property
    def engine(self) -> bool:
        """True when the C engine runs it (ternary formats); False: PyTorch."""
        return self.kind in ENGINE_KINDS

    def describe(self) -> str:
        return f"'{self.path}' is {_WHAT[self.kind]}"

    def cannot(self, command: str) -> str:
        """One line: why ``command`` (which needs a ternary model) cannot take it, and what to do."""
        p = self.path
        if self.kind == "run":
            return (f"{self.describe()}: `onebit {command}` needs a packed ternary model; pack it with "
                    f"`onebit export {p} DIR` and pass DIR (generate, chat and eval ppl run {p} as is)")
        return (f"{self.describe()}: `onebit {command}` needs a ternary model; make one with "
                f"`onebit finetune --from {p} --export DIR` and pass DIR (generate, chat and eval ppl "
                f"run {p} as is, in PyTorch)")


def _json_object(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _is_run_folder(p: Path) -> bool:
    """checkpoint.resolve_model_dir's folders (without importing torch)."""
    if (p / "model.safetensors").is_file() or (p / "model" / "model.safetensors").is_file():
        return True
    if (p / "sharded").is_dir() and (p / "trainer_state.json").is_file():  # an fsdp checkpoint
        return True
    return (p / "checkpoints" / "latest").is_file()


def classify(path) -> ModelSource:
    """The kind of model at ``path`` (see the module doc); ValueError naming the path otherwise."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"model path '{p}' does not exist; pass a packed model folder, a Hugging "
                         f"Face folder, a GGUF file, a llama2.c .bin or an onebit training folder")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return ModelSource(p, "gguf")
        from .formats.llama2c import Llama2cError, read_header
        try:
            read_header(p)
        except Llama2cError as e:
            raise ValueError(f"'{p}' is not GGUF and not a llama2.c model ({e}); pass a model "
                             f"folder, a .gguf file or a llama2.c .bin") from None
        return ModelSource(p, "llama2c")
    cfg = _json_object(p / "config.json") if (p / "config.json").is_file() else None
    if cfg is not None and "packed" in cfg:
        return ModelSource(p, "packed")
    if cfg is not None and "model_type" in cfg and "model" not in cfg:
        qc = cfg.get("quantization_config")
        if cfg.get("model_type") in _HF_FP_TYPES and not qc and "BitnetForCausalLM" not in (
                cfg.get("architectures") or []):
            return ModelSource(p, "hf-fp")
        return ModelSource(p, "hf-ternary")  # hf.read_hf names what it cannot read
    if _is_run_folder(p):
        return ModelSource(p, "run")
    raise ValueError(f"'{p}' is not a model onebit knows: expected an onebit packed folder, a Hugging "
                     f"Face folder (config.json + safetensors), a GGUF file, a llama2.c .bin or an "
                     f"onebit training run / checkpoint folder")


def require_engine(path, command: str) -> ModelSource:
    """``classify(path)``, or ValueError (one line, what to do) when the engine cannot run it."""
    src = classify(path)
    if not src.engine:
        raise ValueError(src.cannot(command))
    return src


class TorchRuntime:
    """The engine ``Runtime`` interface (``reset``, ``forward``) over a PyTorch ``CausalLM``, so
    ``engine.api.Model`` samples, streams and chats with models the C engine cannot run. One
    sequence at a time; logits float32 numpy as the engine's."""

    def __init__(self, model, folder: Path):
        self.model, self.config, self.folder = model.eval(), model.config, Path(folder)

    def reset(self, max_len: int, slots: int = 1) -> None:
        if slots != 1:
            raise ValueError("batched generation runs on the engine only: pass one prompt at a time "
                             "for a PyTorch model")
        self.model.clear_cache()
        self.model.setup_cache(batch=1, max_len=max_len, dtype=self.model.output_weight.dtype)

    def forward(self, ids, pos: int, last_only: bool = True, slot: int = 0):
        import torch

        x = torch.as_tensor([[int(t) for t in ids]], dtype=torch.long)
        with torch.no_grad():
            logits, _ = self.model(x, pos=pos)                    # [1, T, V]
        out = logits[0].float().numpy()
        return out[-1] if last_only else out

    def forward_batch(self, *args, **kwargs):
        raise ValueError("batched generation runs on the engine only: pass one prompt at a time "
                         "for a PyTorch model")


def load_torch(path):
    """``(CausalLM, tokenizers.Tokenizer | None, folder, BosConvention | None)`` for the PyTorch
    kinds (run, hf-fp, llama2c). The folder is where the tokenizer files live."""
    from tokenizers import Tokenizer

    from .tokenizer_convention import folder_convention

    src = path if isinstance(path, ModelSource) else classify(path)
    if src.kind == "run":
        from .checkpoint import load_model
        model, tok, folder = load_model(src.path)
    elif src.kind in ("hf-fp", "llama2c"):
        from .finetune import load_source
        model, tok_json, _ = load_source(src.path)
        tok = Tokenizer.from_str(tok_json)
        folder = src.path.parent if src.kind == "llama2c" else src.path
    else:
        raise ValueError(f"{src.describe()}: it runs on the engine (onebit.load), not in PyTorch")
    conv = None if tok is None else folder_convention(folder, tok, model.config.bos_token_id)
    return model, tok, Path(folder), conv


def load_runnable(path, *, kv_bits: int | None = None):
    """An ``engine.api.Model`` for any kind: ternary kinds on the engine (``onebit.load``), the
    others on ``TorchRuntime`` (``kv_bits`` 8/4/3 fake-quantize its cache; 32 and 16 are the
    unquantized float cache)."""
    src = path if isinstance(path, ModelSource) else classify(path)
    from .engine.api import Model, load

    if src.engine:
        return load(src.path, kv_bits=kv_bits)
    model, tok, folder, conv = load_torch(src)
    if kv_bits is not None:
        model.set_kv_bits(min(kv_bits, 16))
    return Model(TorchRuntime(model, folder), tok, bos_convention=conv)
