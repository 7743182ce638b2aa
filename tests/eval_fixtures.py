"""A tiny random BitNet model (tok512 tokenizer) as a training folder, a packed folder and a
transformers export, for the evaluation tests (tests/test_eval_*.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import SHARED_DATA

TOK = SHARED_DATA / "tokenizers" / "tok512"


def tiny_model(root: Path, seed: int = 0, hf: bool = False) -> dict[str, Path]:
    """{"run": training model folder, "packed": onebit packed folder[, "hf": HF BitNet folder]}:
    2 layers, hidden 64, SubLN, ReLU², vocab 512 (llama2.c's tok512: BOS 1, EOS 2)."""
    import torch

    from onebit.checkpoint import save_model
    from onebit.config import ModelConfig
    from onebit.formats.packed_model import export_packed
    from onebit.model import CausalLM

    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, initializer_range=0.1,
                      norm_placement="subln", hidden_act="relu2")
    torch.manual_seed(seed)
    model = CausalLM(cfg).eval()
    out = {"run": save_model(root / "run", model, cfg,
                             tokenizer_json=(TOK / "tokenizer.json").read_text(encoding="utf-8"))}
    out["packed"] = export_packed(out["run"], root / "packed")
    shutil.copy(TOK / "tokenizer_config.json", out["packed"] / "tokenizer_config.json")
    if hf:
        from onebit.formats.convert import convert

        convert(out["packed"], root / "hf", "hf")
        out["hf"] = root / "hf"
    return out
