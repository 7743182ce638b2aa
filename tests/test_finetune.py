"""Warm-up fine-tuning: quantize_model on tiny transformers models (built offline from configs) and on
onebit's CausalLM, the λ schedules, `onebit finetune` (resume, distillation, export; from llama2.c,
Qwen2 and Phi-3 folders; under torchrun) and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from onebit.config import ConfigError, ModelConfig
from onebit.finetune import (FinetuneConfig, distill_loss, lambda_at, load_quantized_pretrained,
                             load_source, quantize_model, set_quant_lambda)
from onebit.model import CausalLM
from onebit.nn import BitLinear
from conftest import SHARED_DATA

transformers = pytest.importorskip("transformers", reason="the transformers path needs transformers "
                                   "(pip install transformers); CI installs it")

DATA = SHARED_DATA
STORIES = DATA / "models" / "stories260K"
TINYSTORIES = DATA / "tinystories" / "tinystories_valid_head.txt"

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def hf_model(kind: str, **overrides):
    torch.manual_seed(0)
    kw = {**COMMON, **overrides}
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    if kind == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**kw, pad_token_id=0))
    raise AssertionError(kind)


KINDS = ["llama", "mistral", "qwen2", "phi3"]
IDS = torch.tensor([[1, 5, 9, 3, 22, 40, 7, 8], [2, 63, 0, 11, 12, 13, 14, 15]])


def logits_of(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb_norms(model):
    """Random RMSNorm gains, so an extra (unit) norm is not accidentally an identity."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("kind", KINDS)
def test_linears_replaced_embeddings_and_head_kept(kind):
    m = quantize_model(hf_model(kind), lam=1.0)
    names = {n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if isinstance(mod, BitLinear)}
    expected = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if kind == "phi3" else \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert names == expected
    assert sum(isinstance(mod, BitLinear) for mod in m.modules()) == len(expected) * 2
    assert type(m.lm_head) is nn.Linear and type(m.model.embed_tokens) is nn.Embedding
    assert all(mod.norm is not None for mod in m.modules() if isinstance(mod, BitLinear))


@pytest.mark.parametrize("kind", KINDS)
def test_lambda0_without_norm_is_the_original_model(kind):
    ref = hf_model(kind)
    want = logits_of(ref)
    got = logits_of(quantize_model(ref, lam=0.0, norm=False))
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_lambda0_with_norm_is_the_original_on_normalised_inputs(kind):
    """λ=0 turns the quantizers off but keeps the blog's RMSNorm: the model equals the original
    whose every projection sees RMSNorm(x) (unit gain)."""
    ref = hf_model(kind)
    perturb_norms(ref)
    m = quantize_model(hf_model(kind), lam=0.0)
    m.load_state_dict(ref.state_dict(), strict=False)  # same latent weights, norm gains 1
    names = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "q_proj", "k_proj", "v_proj",
             "gate_proj", "up_proj"}
    eps = ref.config.rms_norm_eps
    for n, mod in ref.named_modules():
        if n.rsplit(".", 1)[-1] in names and isinstance(mod, nn.Linear):
            mod.register_forward_pre_hook(
                lambda _m, inp: (inp[0] * torch.rsqrt(inp[0].pow(2).mean(-1, keepdim=True) + eps),))
    torch.testing.assert_close(logits_of(m), logits_of(ref), rtol=1e-5, atol=1e-5)
    # ... which is not the original model: the added norms change o_proj/down_proj inputs
    assert not torch.allclose(logits_of(quantize_model(hf_model(kind), lam=0.0)), logits_of(hf_model(kind)),
                              atol=1e-3)


def test_calibrated_norms_keep_lambda0_close_to_the_original():
    ref = hf_model("llama")
    perturb_norms(ref)
    want = logits_of(ref)
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    plain = hf_model("llama")
    plain.load_state_dict(ref.state_dict())
    err_plain = (logits_of(quantize_model(plain, lam=0.0)) - want).abs().mean()
    cal = hf_model("llama")
    cal.load_state_dict(ref.state_dict())
    err_cal = (logits_of(quantize_model(cal, lam=0.0, calibration=calib)) - want).abs().mean()
    assert err_cal < 0.5 * err_plain


@pytest.mark.parametrize("kind", KINDS)
def test_lambda1_weights_are_ternary_and_everything_trains(kind):
    m = quantize_model(hf_model(kind), lam=1.0)
    for mod in m.modules():
        if isinstance(mod, BitLinear):
            from onebit.quant import fake_ternary
            w = fake_ternary(mod.weight.detach())
            assert w.unique().numel() <= 3
    out = m(input_ids=IDS, labels=IDS)
    out.loss.backward()
    for n, p in m.named_parameters():
        if "rotary" in n:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_qwen2_bias_is_kept_in_full_precision():
    ref = hf_model("qwen2")
    b = ref.model.layers[0].self_attn.q_proj.bias
    assert b is not None
    torch.nn.init.normal_(b)
    want = b.detach().clone()
    m = quantize_model(ref, lam=1.0)
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, BitLinear) and torch.equal(q.bias.detach(), want)
    x = torch.randn(3, 32)
    with torch.no_grad():
        from onebit.quant import fake_ternary
        no_bias = torch.nn.functional.linear(q.quantize_input(q.norm(x)), fake_ternary(q.weight, 1.0))
        assert torch.allclose(q(x), no_bias + want, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi3"])
def test_generate_save_and_reload(kind, tmp_path):
    m = quantize_model(hf_model(kind), lam=1.0).eval()
    gen = m.generate(IDS[:1, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen.shape == (1, 10)
    m.save_pretrained(tmp_path / "q")
    back = load_quantized_pretrained(tmp_path / "q")
    assert torch.equal(logits_of(back), logits_of(m))
    assert torch.equal(back.generate(IDS[:1, :4], max_new_tokens=6, min_new_tokens=6, do_sample=False), gen)


def test_unsupported_architecture_lists_supported():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM.*Phi3ForCausalLM"):
        quantize_model(gpt2)
    with pytest.raises(ValueError, match="not supported"):
        quantize_model(nn.Sequential(nn.Linear(2, 2)))


def test_lam_out_of_range():
    with pytest.raises(ValueError, match="lam"):
        quantize_model(hf_model("llama"), lam=1.5)
    m = quantize_model(hf_model("llama"))
    with pytest.raises(ValueError, match="lam"):
        set_quant_lambda(m, -0.1)


# ---------------------------------------------------------------------------------------------
# onebit CausalLM
# ---------------------------------------------------------------------------------------------

def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 hidden_act="silu"), **kw})


@pytest.mark.parametrize("placement", ["subln", "inner"])
def test_fp_twin_at_lambda0_is_unchanged_and_becomes_the_bitnet_model(placement):
    torch.manual_seed(0)
    fp = CausalLM(tiny(linear="fp", norm_placement=placement))
    want = fp(IDS)[0].detach()
    m = quantize_model(fp, lam=0.0)
    assert m.config == tiny(linear="bitnet", norm_placement=placement)
    assert torch.equal(m(IDS)[0].detach(), want)
    m.set_quant_lambda(1.0)
    fresh = CausalLM(m.config)
    fresh.load_state_dict(m.state_dict())
    assert list(fresh.state_dict()) == list(m.state_dict())  # parameter order as a fresh model (resume)
    assert torch.equal(fresh(IDS)[0], m(IDS)[0])


def test_pre_norm_llama_becomes_subln_with_calibrated_sub_norms():
    torch.manual_seed(0)
    fp = CausalLM(tiny(linear="fp", norm_placement="pre"))
    want = fp(IDS)[0].detach()
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    import copy
    plain = quantize_model(copy.deepcopy(fp), lam=0.0)
    cal = quantize_model(fp, lam=0.0, calibration=calib)
    assert cal.config.norm_placement == "subln" and cal.config.linear == "bitnet"
    g = cal.model.layers[0].self_attn.attn_sub_norm.weight
    assert not torch.allclose(g, torch.ones_like(g)) and torch.all(g == g[0])
    assert (cal(IDS)[0] - want).abs().mean() < 0.5 * (plain(IDS)[0] - want).abs().mean()


# ---------------------------------------------------------------------------------------------
# λ schedules
# ---------------------------------------------------------------------------------------------

def test_lambda_schedules():
    f = lambda **kw: FinetuneConfig(source="x", lambda_steps=100, **kw)  # noqa: E731
    lin, exp, sig, none = f(), f(lambda_schedule="exponential"), f(lambda_schedule="sigmoid"), \
        f(lambda_schedule="none")
    assert [lambda_at(s, lin) for s in (0, 25, 50, 100, 500)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert lambda_at(50, exp) == pytest.approx(1 - 0.5 ** 4)
    assert lambda_at(50, sig) == pytest.approx(0.5) and lambda_at(0, sig) == pytest.approx(1 / (1 + math.exp(5)))
    assert lambda_at(0, none) == 1.0 and lambda_at(0, FinetuneConfig()) == 1.0  # no source: λ = 1
    for cfg in (lin, exp, sig):
        vals = [lambda_at(s, cfg) for s in range(0, 120)]
        assert vals == sorted(vals) and 0 <= vals[0] < 0.01 and vals[-1] == 1.0


@pytest.mark.parametrize("kw, field", [(dict(lambda_schedule="cosine"), "lambda_schedule"),
                                       (dict(lambda_steps=0), "lambda_steps"),
                                       (dict(lambda_k=-1.0), "lambda_k"),
                                       (dict(distill_weight=-0.5), "distill_weight"),
                                       (dict(distill_temperature=0.0), "distill_temperature")])
def test_bad_schedule_fields_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        FinetuneConfig(**kw)


def test_distill_loss_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert distill_loss(a, a, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(a, torch.randn(2, 5, 11), 1.0).item() > 0.01


# ---------------------------------------------------------------------------------------------
# Sources and `onebit finetune`
# ---------------------------------------------------------------------------------------------

def hf_folder(path: Path, kind: str, **overrides) -> nn.Module:
    """A tiny random transformers ``kind`` model saved to ``path`` (no tokenizer), with random norm
    gains and (Qwen2) random q/k/v biases so that every tensor's mapping shows in the logits."""
    model = hf_model(kind, **overrides)
    perturb_norms(model)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if n.endswith("bias"):
                prm.normal_()
    model.eval().save_pretrained(path)
    return model


def word_tokenizer(path: Path, n: int = 64) -> None:
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0")).save(str(path))


@pytest.mark.parametrize("kind, tied", [(k, False) for k in KINDS] + [("qwen2", True)])
def test_hf_folder_maps_onto_causal_lm(kind, tied, tmp_path):
    ref = hf_folder(tmp_path / "hf", kind, tie_word_embeddings=tied)
    with pytest.raises(ValueError, match="no tokenizer"):
        load_source(tmp_path / "hf")
    word_tokenizer(tmp_path / "hf" / "tokenizer.json")
    model, tok_json, src_kind = load_source(tmp_path / "hf")
    assert src_kind == "hf" and model.config.norm_placement == "pre" and model.config.linear == "fp"
    assert model.config.qkv_bias == (kind == "qwen2") and model.config.tie_word_embeddings == tied
    torch.testing.assert_close(model(IDS)[0], logits_of(ref), rtol=1e-5, atol=1e-5)


def test_sliding_window_shorter_than_the_context_becomes_the_context(tmp_path):
    ref = hf_folder(tmp_path / "hf", "mistral", sliding_window=16)
    word_tokenizer(tmp_path / "hf" / "tokenizer.json")
    model, _, _ = load_source(tmp_path / "hf")
    assert model.config.max_position_embeddings == 16  # full attention below the window: exact
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(ids)[0], logits_of(ref, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, edit, needle", [
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type='llama3'"),
    ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ("llama", {"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_hf_config_onebit_cannot_reproduce_is_refused_naming_the_field(kind, edit, needle, tmp_path):
    hf_folder(tmp_path / "hf", kind)
    word_tokenizer(tmp_path / "hf" / "tokenizer.json")
    cfg_file = tmp_path / "hf" / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw.update(edit)
    cfg_file.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    with pytest.raises(ValueError, match=needle):
        load_source(tmp_path / "hf")


def test_unsupported_hf_folder_lists_supported(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    word_tokenizer(tmp_path / "gpt2" / "tokenizer.json")
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*llama, mistral, qwen2, phi3 .*LlamaForCausalLM, "
                                         r"MistralForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM"):
        load_source(tmp_path / "gpt2")


def ft_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["finetune", "--from", str(STORIES / "stories260K.bin"), f"--data.paths={TINYSTORIES}",
            "--data.val_fraction=0.1", "--data.seq_len=64", f"--data.cache_dir={cache}",
            "--train.steps=6", "--train.batch_size=4", "--train.eval_every=3", "--train.eval_tokens=512",
            "--train.log_every=1", "--train.ckpt_every=3", "--train.progress=false",
            "--train.tensorboard=false", "--train.warmup_steps=1", "--train.threads=1",
            "--finetune.lambda_steps=4", f"--train.out_dir={out}", *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_finetune_cli_logs_lambda_distills_and_exports(tmp_path):
    from onebit.cli import main

    cache = tmp_path / "cache"
    full = tmp_path / "full"
    assert main(ft_args(full, cache, "--finetune.distill_weight=0.5", "--export", str(tmp_path / "packed"))) == 0
    recs = records(full)
    assert [r["lam"] for r in recs] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert all("distill_kl" in r for r in recs) and recs[0]["distill_kl"] < 0.5
    # the first step starts from the pretrained model (TinyStories loss ~1.8, random ~6.2)
    assert recs[0]["loss"] < 2.5
    cfg = json.loads((full / "model" / "config.json").read_text())["model"]
    assert cfg["linear"] == "bitnet" and cfg["norm_placement"] == "subln"

    # the packed export runs on the torch-free engine
    import onebit
    m = onebit.load(tmp_path / "packed")
    assert len(list(m.generate_ids([1], 5, temperature=0))) == 5


def test_finetune_resume_is_exact(tmp_path):
    from onebit.cli import main

    cache = tmp_path / "cache"
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(ft_args(full, cache)) == 0
    assert main(ft_args(part, cache)) == 0
    # cut the run back to its step-3 checkpoint and resume from there
    ck = part / "checkpoints"
    (ck / "latest").write_text("step_00000003\n")
    assert main(ft_args(part, cache, "--resume")) == 0
    want = [(r["step"], r["loss"], r["lam"]) for r in records(full)]
    got = [(r["step"], r["loss"], r["lam"]) for r in records(part)]
    assert got == want


@pytest.mark.parametrize("argv, needle", [
    (["--finetune.lambda_schedule=cosine"], "lambda_schedule"),
    (["--finetune.lambda_steps=-3"], "lambda_steps"),
    (["--finetune.lambda_steps=100"], "lambda_steps"),
    (["--model.hidden_size=64"], "--model"),
])
def test_finetune_bad_input_exits_2(tmp_path, capsys, argv, needle):
    from onebit.cli import main

    assert main(ft_args(tmp_path / "o", tmp_path / "c", *argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("onebit finetune: error:")


def test_finetune_without_tokenizer_is_a_clear_error(tmp_path, capsys):
    from onebit.cli import main

    lone = tmp_path / "m" / "stories260K.bin"
    lone.parent.mkdir()
    lone.write_bytes((STORIES / "stories260K.bin").read_bytes())
    args = ft_args(tmp_path / "o", tmp_path / "c")
    args[2] = str(lone)
    assert main(args) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert main(args + ["--tokenizer", str(STORIES / "tok512.bin")]) == 0


# ---------------------------------------------------------------------------------------------
# `onebit finetune --from` a Qwen2 / Phi-3 folder, and under torchrun
# ---------------------------------------------------------------------------------------------

TOK512 = DATA / "tokenizers" / "tok512" / "tokenizer.json"


@pytest.mark.parametrize("kind", ["qwen2", "phi3"])
def test_finetune_cli_from_qwen2_and_phi3_folders(kind, tmp_path, capsys):
    """Fine-tune, resume exactly, export, and the engine runs the packed model like PyTorch (Qwen2:
    its full-precision q/k/v biases travel as float32 tensors and the engine adds them)."""
    import shutil

    import numpy as np

    from onebit import checkpoint as ckpt
    from onebit.cli import main
    from onebit.engine import EngineError, Runtime
    from onebit.formats.model_io import read_packed_folder, reference_logits

    src = tmp_path / kind
    ref = hf_folder(src, kind, vocab_size=520)  # embedding rows past the tokenizer's 512, as Qwen2/Phi-3 pad
    shutil.copy(TOK512, src / "tokenizer.json")
    out, packed = tmp_path / "run", tmp_path / "packed"
    args = ft_args(out, tmp_path / "cache")
    args[2] = str(src)
    assert main(args + ["--export", str(packed)]) == 0
    want = [(r["step"], r["loss"], r["lam"]) for r in records(out)]
    assert [lam for _, _, lam in want] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    (out / "checkpoints" / "latest").write_text("step_00000003\n")
    assert main(args + ["--resume"]) == 0
    assert [(r["step"], r["loss"], r["lam"]) for r in records(out)] == want

    model, _, _ = ckpt.load_model(out)
    assert model.config.linear == "bitnet" and model.config.vocab_size == 520
    assert model.config.qkv_bias == (kind == "qwen2")
    # the student started from the source: 6 steps at lr 1e-4 move the weights by < 1e-2
    moved = (model.model.embed_tokens.weight - ref.model.embed_tokens.weight).abs()
    assert 0 < moved.max() < 1e-2
    if kind == "qwen2":
        b = model.model.layers[1].self_attn.k_proj.bias
        assert (b - ref.model.layers[1].self_attn.k_proj.bias).abs().max() < 1e-2 and b.abs().max() > 0.5
    # the packed model on the engine (and the float64 reference) equals the fine-tuned PyTorch model
    ids = np.random.default_rng(1).integers(0, 512, 40)
    with torch.no_grad():
        want_logits = model(torch.tensor(ids)[None])[0][0].numpy()
    ref_logits = reference_logits(read_packed_folder(packed), ids)
    np.testing.assert_allclose(ref_logits, want_logits, rtol=0, atol=1e-4 * np.abs(want_logits).max())
    rt = Runtime(packed)
    rt.reset(64)
    got = rt.forward(ids, 0, last_only=False)
    err = np.abs(got - want_logits).max(axis=-1) / np.abs(want_logits).max()
    assert err[0] < 2e-5 and err.max() < 0.05, np.round(err, 6)
    if kind == "qwen2":  # a config that drops the biases is refused, not run without them
        raw = json.loads((packed / "config.json").read_text())
        raw["model"]["qkv_bias"] = False
        (packed / "config.json").write_text(json.dumps(raw))
        with pytest.raises(EngineError, match="does not account for.*q_proj.bias"):
            Runtime(packed)
        return
    # a packed folder that claims q/k/v biases it does not hold is refused, naming the tensor
    cfg_file = packed / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw["model"]["qkv_bias"] = True
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="q_proj.bias"):
        Runtime(packed)


def test_finetune_tokenizer_larger_than_the_source_embedding_is_refused(tmp_path, capsys):
    import shutil

    from onebit.cli import main

    src = tmp_path / "phi3"
    hf_folder(src, "phi3", vocab_size=500)
    shutil.copy(TOK512, src / "tokenizer.json")
    args = ft_args(tmp_path / "run", tmp_path / "cache")
    args[2] = str(src)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "512 tokens" in err and "500 embedding rows" in err and "--tokenizer" in err


@pytest.mark.slow
def test_finetune_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2` (gloo, CPU) fine-tunes stories260K with λ warm-up and
    distillation like one process does, and its result loads; with DDP and with FSDP2 (the
    student and the frozen teacher both sharded)."""
    import os
    import subprocess
    import sys

    from onebit import checkpoint as ckpt
    from onebit.cli import main

    cache = tmp_path / "cache"
    args = lambda out: ft_args(out, cache, "--train.micro_batch_size=1",  # noqa: E731
                               "--finetune.distill_weight=0.5")
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    assert main(args(one)) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "onebit", *args(ddp)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    assert r.stdout.count("done: step") == 1, r.stdout  # rank 0 alone prints the summary
    a, b = records(one), records(ddp)
    assert [(x["step"], x["lam"]) for x in a] == [(x["step"], x["lam"]) for x in b]
    # step 1 equal to float noise; then the all-reduce's summation order moves weights by ~1e-6,
    # and as λ grows a few of them cross a ternary rounding threshold (measured: losses within 0.2%)
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    assert b[0]["distill_kl"] == pytest.approx(a[0]["distill_kl"], rel=1e-5)
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-2)
    # the weight updates of steps 4-6 agree (measured: 2.4% apart; one rank training alone on its
    # half batch, i.e. no gradient all-reduce, lands 70% apart)
    ma, _, _ = ckpt.load_model(one)
    mb, _, _ = ckpt.load_model(ddp)
    assert mb.config == ma.config and mb.config.linear == "bitnet"
    delta = lambda run, m: torch.cat([(v - w).flatten() for v, w in zip(  # noqa: E731
        m.state_dict().values(), ckpt.load_model(run / "checkpoints" / "step_00000003")[0].state_dict().values())])
    da, db = delta(one, ma), delta(ddp, mb)
    assert (db - da).norm() < 0.1 * da.norm()
    fsdp = tmp_path / "fsdp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "onebit", *args(fsdp), "--train.parallel=fsdp"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) (fsdp)" in r.stdout
    c = records(fsdp)
    assert [(x["step"], x["lam"]) for x in a] == [(x["step"], x["lam"]) for x in c]
    assert c[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    assert c[0]["distill_kl"] == pytest.approx(a[0]["distill_kl"], rel=1e-5)  # the sharded teacher's logits
    for x, y in zip(a, c):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-2)
        assert y["distill_kl"] == pytest.approx(x["distill_kl"], rel=5e-2, abs=1e-4)
    assert ckpt.latest_checkpoint(fsdp / "checkpoints").joinpath("sharded").is_dir()
    mc, _, _ = ckpt.load_model(fsdp)
    assert mc.config == ma.config
    assert (delta(fsdp, mc) - da).norm() < 0.1 * da.norm()  # (delta reads the sharded step 3)
