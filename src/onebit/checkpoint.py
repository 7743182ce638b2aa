"""Checkpoints: safetensors weights + JSON config, written atomically, loaded defensively.

A model folder (what ``onebit generate`` / ``eval`` take) holds::

    model.safetensors   the model's state_dict (float32 latent weights), metadata format=onebit
    config.json         {"model": ModelConfig, ...}; extra run settings are kept for reference
    tokenizer.json      the tokenizer the model was trained with

A training checkpoint is a model folder plus ``trainer_state.safetensors`` (optimizer moments,
torch RNG) and ``trainer_state.json`` (step, schedule, Python/numpy RNG, data position). No pickle
anywhere: every file is safetensors or JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write_text, write_dir_atomic
from .config import ConfigError, ModelConfig
from .jsonio import read_json, read_tokenizer

FORMAT = "onebit"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model/config it is loaded into."""


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------

def write_model_files(folder: Path, model: torch.nn.Module, config: dict[str, Any],
                      tokenizer_json: str | dict[str, str] | None) -> None:
    """Write model.safetensors, config.json (and tokenizer.json, or tokenizer files given as
    {name: text}, e.g. with the tokenizer_config.json stating its BOS) into an existing folder."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": str(config["model"]["format_version"])}
    save_file(state, str(folder / MODEL_FILE), metadata=meta)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    files = {TOKENIZER_FILE: tokenizer_json} if isinstance(tokenizer_json, str) else tokenizer_json or {}
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")


def save_model(folder: str | Path, model: torch.nn.Module, model_config: ModelConfig,
               tokenizer_json: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Atomically write a model folder (see module doc)."""
    config = {"model": model_config.to_dict(), **(extra or {})}
    return write_dir_atomic(Path(folder), lambda d: write_model_files(d, model, config, tokenizer_json))


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model folder, a training checkpoint folder, or a run folder (→ its latest
    checkpoint, or its exported ``model/``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model path '{p}' does not exist; pass a folder written by "
                              f"'onebit train' (its out_dir, out_dir/model or a checkpoint)")
    if (p / MODEL_FILE).is_file():
        return p
    if (p / "model" / MODEL_FILE).is_file():
        return p / "model"
    latest = latest_checkpoint(p / "checkpoints") if (p / "checkpoints").is_dir() else None
    if latest is not None:
        return latest
    raise CheckpointError(f"no {MODEL_FILE} found in '{p}' (nor in {p}/model or {p}/checkpoints); "
                          f"pass a folder written by 'onebit train'")


def read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.exists():
        raise CheckpointError(f"'{cfg_path}' is missing; the checkpoint folder is incomplete")
    raw = read_json(cfg_path, CheckpointError, fix="the checkpoint is corrupt")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"'{cfg_path}' has no 'model' table; it was not written by onebit")
    return raw


def read_model_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(read_config(folder)["model"])
    except ConfigError as e:
        raise CheckpointError(f"'{folder / CONFIG_FILE}': {e}") from None


def _check_names_and_shapes(expected: dict[str, tuple], got: dict[str, tuple], file: Path) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"'{file}' was written for a different model config: missing tensors "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; load it with "
                              f"the config.json saved beside it")
    for k, shape in expected.items():
        if tuple(got[k]) != tuple(shape):
            raise CheckpointError(f"'{file}': tensor {k} has shape {tuple(got[k])} but the model "
                                  f"expects {tuple(shape)}; the checkpoint is from a different config")


def check_weights_header(cfg: ModelConfig, file: Path) -> None:
    """Check the tensor names and shapes in ``file``'s safetensors header against a ``CausalLM``
    of ``cfg`` built on the meta device (no memory), so a config.json that does not match the
    weights (hidden_size=192000, vocab_size=2**31 beside a small model) fails before the model is
    allocated. Raises CheckpointError / SafetensorsError naming the file."""
    from .formats.safetensors_mmap import SafetensorsError, read_safetensors
    from .model import CausalLM

    try:
        tensors, _ = read_safetensors(file)  # the header checked against the file; no data read
    except FileNotFoundError:
        raise CheckpointError(f"'{file}' is missing; the checkpoint folder is incomplete") from None
    except SafetensorsError as e:  # names the file; "truncated or corrupt"
        raise CheckpointError(f"{e} (or use an earlier checkpoint)") from None
    # cheap first: the embedding's shape and the layer count (a meta model of 1,000 layers takes
    # seconds to build)
    emb = tensors.get("model.embed_tokens.weight")
    layers = {n.split(".")[2] for n in tensors if n.startswith("model.layers.")}
    if emb is not None and tuple(emb.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise CheckpointError(f"'{file}': tensor model.embed_tokens.weight has shape {tuple(emb.shape)} "
                              f"but the config (vocab_size={cfg.vocab_size}, hidden_size="
                              f"{cfg.hidden_size}) expects {(cfg.vocab_size, cfg.hidden_size)}; the "
                              f"checkpoint is from a different config")
    if len(layers) != cfg.num_hidden_layers:
        raise CheckpointError(f"'{file}' holds {len(layers)} layers but the config says "
                              f"num_hidden_layers={cfg.num_hidden_layers}; the checkpoint is from a "
                              f"different config")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CausalLM(cfg).state_dict().items()}
    _check_names_and_shapes(expected, {k: v.shape for k, v in tensors.items()}, file)


def load_state_into(model: torch.nn.Module, file: Path) -> None:
    """Load a safetensors state_dict into ``model``, checking every key, shape and dtype first."""
    try:
        state = load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"'{file}' is missing; the checkpoint folder is incomplete") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"'{file}' is not a readable safetensors file ({e}); the checkpoint "
                              f"is corrupt: re-export it or use an earlier checkpoint") from None
    expected = model.state_dict()
    _check_names_and_shapes({k: tuple(v.shape) for k, v in expected.items()},
                            {k: tuple(v.shape) for k, v in state.items()}, file)
    for k, v in expected.items():
        if not state[k].is_floating_point() or not torch.isfinite(state[k]).all():
            raise CheckpointError(f"'{file}': tensor {k} is not finite floating point; the checkpoint is corrupt")
    model.load_state_dict(state, strict=True)


def load_model(path: str | Path, device: str = "cpu"):
    """Load a trained model for inference: returns ``(model, tokenizer | None, folder)``."""
    from .model import CausalLM

    folder = resolve_model_dir(path)
    cfg = read_model_config(folder)
    check_weights_header(cfg, folder / MODEL_FILE)  # before CausalLM(cfg) allocates anything
    model = CausalLM(cfg)
    load_state_into(model, folder / MODEL_FILE)
    model.source = str(folder)  # named by generation errors (generate.py)
    model.to(device).eval()
    tokenizer = None
    if (folder / TOKENIZER_FILE).is_file():
        tokenizer = read_tokenizer(folder / TOKENIZER_FILE, CheckpointError, cfg.vocab_size)
    return model, tokenizer, folder


# --------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The folder named by ``ckpt_root/latest``, if it exists and is complete."""
    pointer = Path(ckpt_root) / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    folder = Path(ckpt_root) / name
    if not name or "\0" in name or not (folder / MODEL_FILE).is_file():
        raise CheckpointError(f"'{pointer}' names '{folder.name}' which is missing or incomplete; "
                              f"point it at an existing step_* folder or delete it")
    return folder


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer state_dict into safetensors-compatible tensors + JSON."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"optim.{pid}.{key}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    groups = meta["param_groups"]
    if len(groups) != len(opt.param_groups) or any(
            len(g["params"]) != len(h["params"]) for g, h in zip(groups, opt.param_groups)):
        raise CheckpointError("the optimizer state in the checkpoint does not match this model's "
                              "parameters; resume with the same model config")
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_training_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, config: dict[str, Any],
                             tokenizer_json: str | None, opt: torch.optim.Optimizer,
                             trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write ``ckpt_root/step_N`` and then point ``ckpt_root/latest`` at it; prune to
    the ``keep`` newest checkpoints."""
    ckpt_root = Path(ckpt_root)

    def fill(d: Path) -> None:
        write_model_files(d, model, config, tokenizer_json)
        tensors, meta = optimizer_to_tensors(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(d / STATE_FILE), metadata={"format": FORMAT})
        (d / STATE_JSON).write_text(json.dumps({**trainer_state, "optimizer": meta}, indent=1),
                                    encoding="utf-8")

    folder = write_dir_atomic(ckpt_root / checkpoint_name(step), fill)
    atomic_write_text(ckpt_root / LATEST, folder.name + "\n")
    done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_training_checkpoint(folder: Path, model: torch.nn.Module,
                             opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and torch RNG from ``folder``; return the trainer state JSON."""
    load_state_into(model, folder / MODEL_FILE)
    try:
        tensors = load_file(str(folder / STATE_FILE))
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"'{folder}' has no trainer state ({e.filename}); it is a model export, "
                              f"not a resumable checkpoint") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"trainer state in '{folder}' is corrupt ({e}); resume from an "
                              f"earlier checkpoint") from None
    optimizer_from_tensors(opt, tensors, state.pop("optimizer"))
    torch.set_rng_state(tensors["rng.torch"])
    return state
