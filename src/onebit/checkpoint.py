"""Checkpoints: safetensors weights + JSON config, written atomically, loaded defensively.

A model folder (what ``onebit generate`` / ``eval`` take) holds::

    model.safetensors   the model's state_dict (float32 latent weights), metadata format=onebit
    config.json         {"model": ModelConfig, ...}; extra run settings are kept for reference
    tokenizer.json      the tokenizer the model was trained with

A training checkpoint is a model folder plus ``trainer_state.safetensors`` (optimizer moments,
torch RNG) and ``trainer_state.json`` (step, schedule, Python/numpy RNG, data position). No pickle
anywhere: every file is safetensors or JSON.

A checkpoint of an fsdp run (``train.parallel=fsdp``) is sharded: instead of model.safetensors and
the optimizer tensors it holds ``sharded/shard-0000R-model-00001-of-00001.safetensors``, one file
per rank, written through torch.distributed.checkpoint (DCP) with its safetensors storage layer
(``HuggingFaceStorageWriter``): the tensors are the model's and the Adam moments' local shards,
named ``model.<param>`` and ``optim.<param>.<exp_avg|exp_avg_sq|step>``, and each file's header
states where its shards sit in the full tensors (``DCP_SHARDING_INFO``, JSON). DCP's default
``FileSystemReader`` unpickles a ``.metadata`` file; onebit never uses it: the reader builds the
layout from the safetensors headers, onebit checks that the shards cover every expected tensor
exactly once before loading, and nothing is unpickled. Loading reshards: a checkpoint written by
N ranks resumes on M, and ``load_model`` consolidates it in one process (``onebit export``,
``generate``, ``eval`` take it like any other checkpoint).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
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
SHARDED_DIR = "sharded"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model/config it is loaded into."""


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------

def write_model_files(folder: Path, model: torch.nn.Module | None, config: dict[str, Any],
                      tokenizer_json: str | dict[str, str] | None,
                      state: dict[str, torch.Tensor] | None = None) -> None:
    """Write model.safetensors, config.json (and tokenizer.json, or tokenizer files given as
    {name: text}, e.g. with the tokenizer_config.json stating its BOS) into an existing folder.
    ``state``: the weights to write instead of ``model.state_dict()`` (an fsdp model's gathered
    full state); ``model=None, state=None``: no model.safetensors (a sharded checkpoint's folder)."""
    if state is None and model is not None:
        state = model.state_dict()
    if state is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        meta = {"format": FORMAT, "format_version": str(config["model"]["format_version"])}
        save_file(state, str(folder / MODEL_FILE), metadata=meta)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    files = {TOKENIZER_FILE: tokenizer_json} if isinstance(tokenizer_json, str) else tokenizer_json or {}
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")


def save_model(folder: str | Path, model: torch.nn.Module | None, model_config: ModelConfig,
               tokenizer_json: str | None = None, extra: dict[str, Any] | None = None,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write a model folder (see module doc); ``state`` as in ``write_model_files``."""
    config = {"model": model_config.to_dict(), **(extra or {})}
    return write_dir_atomic(Path(folder), lambda d: write_model_files(d, model, config, tokenizer_json,
                                                                      state))


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model folder, a training checkpoint folder, or a run folder (→ its latest
    checkpoint, or its exported ``model/``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model path '{p}' does not exist; pass a folder written by "
                              f"'onebit train' (its out_dir, out_dir/model or a checkpoint)")
    if (p / MODEL_FILE).is_file() or is_sharded_checkpoint(p):
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
    sharded = not (folder / MODEL_FILE).is_file() and is_sharded_checkpoint(folder)
    # the weights' headers against the config before CausalLM(cfg) allocates anything
    if sharded:
        with torch.device("meta"):
            meta = CausalLM(cfg).state_dict()
        check_sharded(folder, {f"model.{k}": (tuple(v.shape), v.dtype) for k, v in meta.items()},
                      ("optim.",))
    else:
        check_weights_header(cfg, folder / MODEL_FILE)
    model = CausalLM(cfg)
    if sharded:
        load_sharded_model(model, folder)  # consolidated in this process
    else:
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
    # a step_* name in this folder: never a path elsewhere ('..', '/', NUL)
    if not name or "\0" in name or "/" in name or name in (".", "..") \
            or (not (folder / MODEL_FILE).is_file() and not is_sharded_checkpoint(folder)):
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

    return _publish(ckpt_root, step, fill, keep)


def _publish(ckpt_root: Path, step: int, fill, keep: int) -> Path:
    """Write checkpoint ``step`` atomically with ``fill``, point LATEST at it, keep the newest
    ``keep`` (0: all)."""
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


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (train.parallel=fsdp): DCP with safetensors storage, never pickle
# --------------------------------------------------------------------------------------------

_SHARD_FILE = re.compile(r"^shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors$")


def is_sharded_checkpoint(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / SHARDED_DIR).is_dir() and (folder / STATE_JSON).is_file()


def checkpoint_layout(folder: Path) -> tuple[str, int | None]:
    """("sharded" | "full", the number of ranks that wrote it, if recorded)."""
    world = None
    try:
        world = json.loads((Path(folder) / STATE_JSON).read_text(encoding="utf-8")).get("world_size")
    except (OSError, ValueError, AttributeError):
        pass
    return ("sharded" if is_sharded_checkpoint(folder) else "full"), world


def _flat_sharded_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None):
    """The flat {name: tensor} that goes through DCP: ``model.<fqn>`` and ``optim.<fqn>.<key>``
    (local DTensor shards for an fsdp model), and the optimizer state_dict they come from."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    osd = None
    if opt is not None:
        osd = get_optimizer_state_dict(model, opt)  # creates the (zero) Adam state of a fresh optimizer
        for fqn, st in osd["state"].items():
            for key, v in st.items():
                if not torch.is_tensor(v):
                    raise CheckpointError(f"optimizer state {fqn}.{key} is not a tensor ({type(v).__name__}); "
                                          f"sharded checkpoints hold tensors only")
                flat[f"optim.{fqn}.{key}"] = v
    return flat, osd


def _boxes_overlap(a, b) -> bool:
    return all(oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(a[0], a[1], b[0], b[1]))


def check_sharded(folder: Path, expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  extra_prefixes: tuple[str, ...] = ()) -> None:
    """Read the layout of ``folder/sharded`` from its safetensors headers (JSON; DCP's pickled
    ``.metadata`` is never read) and check that every expected tensor is there with its shape and
    dtype, covered exactly once by the shards, and that nothing unexpected is (names starting with
    ``extra_prefixes`` may be: the optimizer's, when only the model is read). CheckpointError otherwise."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    d = Path(folder) / SHARDED_DIR
    try:
        names = sorted(p.name for p in d.iterdir())
    except OSError as e:
        raise CheckpointError(f"sharded checkpoint '{d}' cannot be read ({e.strerror}); resume from an "
                              f"earlier checkpoint") from None
    stray = [n for n in names if not _SHARD_FILE.match(n)]
    if stray or not names:
        what = f"holds {stray[:3]}, which onebit does not write" if stray else "holds no shard files"
        raise CheckpointError(f"sharded checkpoint '{d}' {what}; it is not an onebit checkpoint as "
                              f"written: resume from an earlier checkpoint")
    try:
        md = HuggingFaceStorageReader(str(d)).read_metadata().state_dict_metadata
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"sharded checkpoint '{d}' is corrupt ({type(e).__name__}: {str(e)[:200]}); "
                              f"resume from an earlier checkpoint") from None
    missing = sorted(set(expected) - set(md))
    unexpected = sorted(k for k in set(md) - set(expected) if not k.startswith(extra_prefixes))
    if missing or unexpected:
        raise CheckpointError(f"sharded checkpoint '{d}' was written for a different model or optimizer: "
                              f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                              f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; resume with the "
                              f"config.json saved beside it")
    for key, (shape, dtype) in expected.items():
        m = md[key]
        if tuple(m.size) != tuple(shape) or m.properties.dtype != dtype:
            raise CheckpointError(f"sharded checkpoint '{d}': the shards of {key} make a {tuple(m.size)} "
                                  f"{m.properties.dtype} tensor, the model expects {tuple(shape)} {dtype}; the "
                                  f"checkpoint is incomplete or from a different config: resume from an "
                                  f"earlier checkpoint, or with the config.json saved beside it")
        boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks]
        covered = 0
        for off, size in boxes:
            if len(off) != len(shape) or len(size) != len(shape) or any(
                    o < 0 or s < 0 or o + s > n for o, s, n in zip(off, size, shape)):
                raise CheckpointError(f"sharded checkpoint '{d}': a shard of {key} lies outside its "
                                      f"{tuple(shape)} tensor; the checkpoint is corrupt")
            covered += math.prod(size)
        overlap = any(_boxes_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                      if math.prod(a[1]) and math.prod(b[1]))
        if overlap or covered != math.prod(shape):
            raise CheckpointError(f"sharded checkpoint '{d}': the shards of {key} cover {covered} of its "
                                  f"{math.prod(shape)} values{' twice over in part' if overlap else ''}; "
                                  f"the checkpoint is incomplete or corrupt: resume from an earlier one")


def _dcp_load(flat: dict[str, torch.Tensor], folder: Path, no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors import SafetensorError
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    d = Path(folder) / SHARDED_DIR
    try:
        with warnings.catch_warnings():  # no_dist: DCP still warns that it loads in one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(d)), no_dist=no_dist)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"sharded checkpoint '{d}' cannot be loaded ({type(e).__name__}: "
                              f"{str(e)[:200]}); resume from an earlier checkpoint") from None
    for k, v in flat.items():
        local = v.to_local() if hasattr(v, "to_local") else v
        if not local.is_floating_point() or not torch.isfinite(local).all():
            raise CheckpointError(f"sharded checkpoint '{d}': tensor {k} is not finite floating point; "
                                  f"the checkpoint is corrupt")


def load_sharded_model(model: torch.nn.Module, folder: Path) -> None:
    """Consolidate the model weights of a sharded checkpoint into an unsharded ``model``, in this
    one process (no process group needed, any number of ranks having written it)."""
    state = model.state_dict()
    flat = {f"model.{k}": v for k, v in state.items()}
    check_sharded(folder, {k: (tuple(v.shape), v.dtype) for k, v in flat.items()}, ("optim.",))
    _dcp_load(flat, folder, no_dist=True)
    model.load_state_dict({k[len("model."):]: v for k, v in flat.items()}, strict=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An fsdp model's full weights gathered to rank 0 on the CPU (empty on the other ranks;
    collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _broadcast_name(name: str | None, device: torch.device) -> str:
    """Rank 0's ``name`` on every rank (a byte tensor: nothing pickled between ranks either)."""
    import torch.distributed as dist

    buf = torch.zeros(1024, dtype=torch.uint8, device=device)
    if name is not None:
        raw = name.encode("utf-8")
        if len(raw) >= buf.numel():
            raise CheckpointError(f"checkpoint path '{name}' is longer than {buf.numel() - 1} bytes; "
                                  f"choose a shorter train.out_dir")
        buf[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
    dist.broadcast(buf, src=0)
    raw = bytes(buf.cpu().tolist())
    return raw[:raw.index(0)].decode("utf-8")


def save_sharded_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, config: dict[str, Any],
                            tokenizer_json, opt: torch.optim.Optimizer, trainer_state: dict[str, Any],
                            rank: int, device: torch.device, keep: int = 2) -> Path:
    """Collective (every rank calls it): write ``ckpt_root/step_N`` with the ranks' shards in
    ``sharded/`` (DCP, safetensors) and rank 0's config, tokenizer and trainer state, in a temp
    folder that rank 0 renames into place; then rank 0 points ``latest`` at it and prunes to the
    ``keep`` newest. The folder must be on a file system every rank sees (one machine, or shared)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    ckpt_root = Path(ckpt_root)
    flat, osd = _flat_sharded_state(model, opt)
    param_groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]

    def write_shards(tmp: Path) -> None:
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED_DIR), save_distributed=True))

    if rank != 0:
        write_shards(Path(_broadcast_name(None, device)))
        return ckpt_root / checkpoint_name(step)

    def fill(tmp: Path) -> None:
        (tmp / SHARDED_DIR).mkdir()  # before the other ranks know the name (their writers make it too)
        _broadcast_name(str(tmp), device)
        write_shards(tmp)
        write_model_files(tmp, None, config, tokenizer_json)
        save_file({"rng.torch": torch.get_rng_state()}, str(tmp / STATE_FILE), metadata={"format": FORMAT})
        (tmp / STATE_JSON).write_text(json.dumps({**trainer_state, "parallel": "fsdp",
                                                  "optimizer": {"param_groups": param_groups}}, indent=1),
                                      encoding="utf-8")

    ckpt_root.mkdir(parents=True, exist_ok=True)
    return _publish(ckpt_root, step, fill, keep)


def load_sharded_checkpoint(folder: Path, model: torch.nn.Module,
                            opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: restore an fsdp ``model`` (any number of ranks, resharded), its optimizer and
    the torch RNG from a sharded checkpoint; return the trainer state JSON."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        rng = load_file(str(folder / STATE_FILE))["rng.torch"]
    except FileNotFoundError as e:
        raise CheckpointError(f"'{folder}' has no trainer state ({e.filename}); it is not a resumable "
                              f"checkpoint") from None
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"trainer state in '{folder}' is corrupt ({e}); resume from an earlier "
                              f"checkpoint") from None
    flat, osd = _flat_sharded_state(model, opt)
    check_sharded(folder, {k: (tuple(v.shape), v.dtype) for k, v in flat.items()})
    _dcp_load(flat, folder, no_dist=False)
    set_model_state_dict(model, {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")})
    for fqn, st in osd["state"].items():
        for key in st:
            st[key] = flat[f"optim.{fqn}.{key}"]
    set_optimizer_state_dict(model, opt, osd)
    if rng.dtype != torch.uint8 or rng.dim() != 1:
        raise CheckpointError(f"'{folder / STATE_FILE}': rng.torch is not a byte vector; the checkpoint is corrupt")
    torch.set_rng_state(rng)
    state.pop("optimizer", None)
    return state
