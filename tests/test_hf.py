"""Hugging Face layouts in and out, with transformers' own forward as the oracle.

Each test builds a small random checkpoint in exactly one layout with transformers (offline),
loads it with transformers (float32) for the reference logits, converts it with onebit and runs
our engine on the same tokens. Layouts: microsoft 2B4T packed (autobitlinear: weight_scale
multiplies) and -bf16 latent, HF1BitLLM Llama packed (bitlinear: weight_scale divides), 1bitLLM
latent (renamed sub-norms), and our HF export read back by transformers.
"""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' bitnet code is @torch.compile'd
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is the oracle")

import onebit
from onebit.formats import hf as hfmt
from onebit.formats.model_io import (
    compare_logits,
    read_packed_folder,
    reference_logits,
    write_packed_folder,
)
from conftest import SHARED_DATA

IDS = [1, 5, 17, 42, 3, 77, 9, 60, 33, 2, 88, 41]


def _small(cls, **kw):
    base = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}
    base.update(kw)
    return cls(**base)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "_ln" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _hf_logits(folder):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor([IDS])).logits[0].double().numpy()


def _engine_logits(folder):
    m = onebit.load(folder)
    m.runtime.reset(len(IDS) + 4)
    return np.asarray(m.runtime.forward(np.asarray(IDS), 0, last_only=False), np.float64)


def _set_quant(folder, qc):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))


def _check(src, tmp_path, layout):
    assert hfmt.describe_hf(src)[0] == layout
    ref = _hf_logits(src)
    tm = hfmt.read_hf(src)
    out = write_packed_folder(tm, tmp_path / "onebit")
    ours = _engine_logits(out)
    res = compare_logits(ref, ours, layout, rtol=5e-3)
    assert res["top1_agree"] == 1.0
    np.testing.assert_allclose(reference_logits(tm, IDS), ref, rtol=0, atol=5e-3 * np.abs(ref).max())
    return tm, ref


def _pack_like_transformers(state, names, scale_of):
    """Quantize latent weights and pack them with transformers' own pack_weights."""
    from transformers.integrations.bitnet import pack_weights
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight" and v.data_ptr() == state["model.embed_tokens.weight"].data_ptr():
            continue  # tied (2B4T ships no lm_head tensor)
        mod = k.rsplit(".", 1)[0]
        if mod in names and k.endswith(".weight"):
            codes, gamma = hfmt.absmean_codes(v.float().numpy())
            out[k] = pack_weights(torch.from_numpy(codes.astype(np.int8)).clone())
            out[mod + ".weight_scale"] = torch.tensor([scale_of(gamma)], dtype=torch.float32)
        else:
            out[k] = v.float().contiguous()
    return out


def _projection_names(model):
    return {n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


def _save(model, state, folder, qc):
    from safetensors.torch import save_file
    model.config.save_pretrained(str(folder))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _set_quant(folder, qc)


def test_bitnet_latent_bf16_master_weights(tmp_path):
    """microsoft/bitnet-b1.58-2B-4T-bf16: latent weights, quantized on load (transformers: online)."""
    cfg = _small(transformers.BitNetConfig, hidden_act="relu2", tie_word_embeddings=True)
    model = _randomize(transformers.BitNetForCausalLM(cfg), 0).to(torch.bfloat16)
    src = tmp_path / "bf16"
    model.save_pretrained(str(src))
    _set_quant(src, {"quant_method": "bitnet", "linear_class": "autobitlinear",
                     "quantization_mode": "online"})
    _check(src, tmp_path, "bitnet-latent")


def test_bitnet_packed_2b4t_layout_and_hf_export(tmp_path):
    """microsoft/bitnet-b1.58-2B-4T: uint8 packed [ceil(N/4), K] + weight_scale that multiplies;
    then our HF export of it loads in transformers with the same logits."""
    cfg = _small(transformers.BitNetConfig, hidden_act="relu2", tie_word_embeddings=True)
    model = _randomize(transformers.BitNetForCausalLM(cfg), 1)
    src = tmp_path / "packed"
    state = _pack_like_transformers(model.state_dict(), _projection_names(model), lambda g: g)
    _save(model, state, src, {"quant_method": "bitnet", "linear_class": "autobitlinear",
                              "quantization_mode": "offline"})
    _tm, ref = _check(src, tmp_path, "bitnet-packed")
    # export: onebit packed folder -> HF packed, read by transformers
    back = hfmt.write_hf(read_packed_folder(tmp_path / "onebit"), tmp_path / "hf_export")
    np.testing.assert_allclose(_hf_logits(back), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # and the bytes are transformers' own packing of the same codes
    from safetensors.numpy import load_file
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert np.array_equal(a[name], b[name])


def test_llama_bitlinear_packed_divides_by_weight_scale(tmp_path):
    """HF1BitLLM/Llama3-8B-1.58 / Falcon3-1.58bit: LlamaForCausalLM, linear_class bitlinear:
    y = (x W) / weight_scale, so weight_scale stores 1/mean|W|; plain Llama pre-norms, SiLU,
    untied head."""
    cfg = _small(transformers.LlamaConfig, hidden_act="silu", tie_word_embeddings=False)
    model = _randomize(transformers.LlamaForCausalLM(cfg), 2)
    src = tmp_path / "llama"
    state = _pack_like_transformers(model.state_dict(), _projection_names(model), lambda g: 1.0 / g)
    _save(model, state, src, {"quant_method": "bitnet", "linear_class": "bitlinear",
                              "quantization_mode": "offline"})
    tm, _ = _check(src, tmp_path, "llama-packed")
    assert tm.config.norm_placement == "pre" and not tm.config.tie_word_embeddings


def test_weight_scale_convention_is_pinned(tmp_path):
    """Reading a bitlinear checkpoint as if its scale multiplied must fail the parity check:
    the two conventions are not interchangeable (each test above pins one)."""
    cfg = _small(transformers.LlamaConfig, hidden_act="silu", tie_word_embeddings=False)
    model = _randomize(transformers.LlamaForCausalLM(cfg), 3)
    src = tmp_path / "llama"
    state = _pack_like_transformers(model.state_dict(), _projection_names(model), lambda g: 1.0 / g)
    _save(model, state, src, {"quant_method": "bitnet", "linear_class": "bitlinear",
                              "quantization_mode": "offline"})
    ref = _hf_logits(src)
    tm = hfmt.read_hf(src)
    wrong = {k: (lambda f=f: (f()[0], 1.0 / f()[1])) for k, f in tm.ternary.items()}
    tm.ternary = wrong
    with pytest.raises(ValueError, match="parity check failed"):
        compare_logits(ref, reference_logits(tm, IDS), "inverted weight_scale")


def test_1bitllm_latent_renamed_subnorms(tmp_path):
    """1bitLLM/bitnet_b1_58-large: fp16 latent weights, SiLU, sub-norms named inner_attn_ln /
    ffn_layernorm. Oracle: transformers' BitNet (online quantization, SiLU) on the same tensors."""
    cfg = _small(transformers.BitNetConfig, hidden_act="silu", tie_word_embeddings=False)
    model = _randomize(transformers.BitNetForCausalLM(cfg), 4).half().float()  # fp16 values
    oracle = tmp_path / "oracle"
    model.save_pretrained(str(oracle))
    _set_quant(oracle, {"quant_method": "bitnet", "linear_class": "autobitlinear",
                        "quantization_mode": "online"})
    ref = _hf_logits(oracle)
    from safetensors.torch import save_file
    src = tmp_path / "1bitllm"
    src.mkdir()
    state = {k.replace("attn_sub_norm", "inner_attn_ln").replace("ffn_sub_norm", "ffn_layernorm"):
             v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    hf = json.loads((oracle / "config.json").read_text())
    hf.pop("quantization_config")
    hf.update(model_type="llama", architectures=["BitnetForCausalLM"])
    (src / "config.json").write_text(json.dumps(hf))
    assert hfmt.describe_hf(src)[0] == "1bitllm-latent"
    tm = hfmt.read_hf(src)
    out = write_packed_folder(tm, tmp_path / "onebit", embedding="f16")
    res = compare_logits(ref, _engine_logits(out), "1bitllm", rtol=5e-3)
    assert res["top1_agree"] == 1.0


def test_hf_reader_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(hfmt.HFFormatError, match="Supported"):
        hfmt.read_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bitnet"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(hfmt.HFFormatError, match="pickle"):
        hfmt.read_hf(tmp_path)
    with pytest.raises(hfmt.HFFormatError, match="invalid 2-bit code 3"):
        hfmt.unpack_hf_rows(np.full((2, 8), 0xFF, np.uint8), 8, "x")
    with pytest.raises(hfmt.HFFormatError, match="cannot hold"):
        hfmt.unpack_hf_rows(np.zeros((2, 8), np.uint8), 9, "x")


def test_hf_packing_matches_transformers_bit_for_bit():
    from transformers.integrations.bitnet import pack_weights, unpack_weights
    rng = np.random.default_rng(0)
    for n in (4, 8, 12, 36):
        codes = rng.integers(-1, 2, size=(n, 24)).astype(np.int8)
        theirs = pack_weights(torch.from_numpy(codes).clone()).numpy()
        assert np.array_equal(hfmt.pack_hf_rows(codes), theirs)
        assert np.array_equal(hfmt.unpack_hf_rows(theirs, n), codes)
        assert np.array_equal(unpack_weights(torch.from_numpy(theirs), torch.float32).numpy()[:n], codes)


@pytest.mark.parametrize("tok", ["llama2", "llama3"])
def test_tokenizer_files_travel_with_the_model(tmp_path, tok):
    """Llama-2 (SentencePiece-BPE) and Llama-3 (tiktoken-style BPE) tokenizer.json: copied with
    the weights; onebit.load encodes exactly as the tokenizers library does; a folder with only
    tokenizer.model is refused with the fix."""
    import shutil

    from tokenizers import Tokenizer
    tdir = SHARED_DATA / "tokenizers" / tok
    vocab = Tokenizer.from_file(str(tdir / "tokenizer.json")).get_vocab_size()
    cfg = _small(transformers.BitNetConfig, hidden_act="relu2", tie_word_embeddings=True,
                 vocab_size=vocab, hidden_size=32, intermediate_size=32, num_hidden_layers=1)
    model = _randomize(transformers.BitNetForCausalLM(cfg), 5)
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tdir / f, src / f)
    out = write_packed_folder(hfmt.read_hf(src), tmp_path / "out", embedding="f16")
    m = onebit.load(out)
    text = "Hello world! Once upon a time, 3.14 café ünïcödé"
    assert m.tokenizer.encode(text).ids == Tokenizer.from_file(str(tdir / "tokenizer.json")).encode(text).ids
    (src / "tokenizer.json").unlink()
    shutil.copy(tdir / "tokenizer.model", src / "tokenizer.model")
    with pytest.raises(hfmt.HFFormatError, match="no tokenizer.json"):
        hfmt.read_hf(src)
