"""BitLinear against the paper's reference, the decoder model, and ModelConfig validation."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from onebit import nn as onn
from onebit.config import PRESETS, ConfigError, ModelConfig
from onebit.model import ACT_SCHEMES, CausalLM
from onebit.nn import BitLinear



# ---------------------------------------------------------------------------------------------
# The paper's reference BitLinear (b1.58 training FAQ), plus a4.8's INT4 / top-K from the formulas
# ---------------------------------------------------------------------------------------------


def ref_rmsnorm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ref_weight_quant(w):
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp_(-1, 1) / scale


def ref_activation_quant(x):
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


def ref_int4(x):
    beta = x.abs().mean(dim=-1, keepdim=True)
    return (x * (math.sqrt(7) / (beta + 1e-5))).round().clamp(-8, 7) * (beta / math.sqrt(7))


def ref_topk(x, keep=0.5):
    k = math.ceil(keep * x.shape[-1])
    idx = x.abs().topk(k, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


REF_ACT = {
    "int8": ref_activation_quant,
    "int4": ref_int4,
    "topk_int8": lambda x: ref_activation_quant(ref_topk(x)),
    None: lambda x: x,
}


def ref_bitlinear(layer: BitLinear, x):
    if layer.norm is not None:
        x = ref_rmsnorm(x, layer.norm.weight, layer.norm.eps)
    w = ref_weight_quant(layer.weight) if layer.weight_quant else layer.weight
    return F.linear(REF_ACT[layer.act](x), w)


# ---------------------------------------------------------------------------------------------
# BitLinear
# ---------------------------------------------------------------------------------------------

def test_bitlinear_fp_is_f_linear():
    layer = BitLinear(37, 19, weight_quant=False, act=None, norm=False)
    x = torch.randn(3, 4, 37)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    assert layer.bias is None


@pytest.mark.parametrize("shape", [(1, 37), (2, 5, 37)])
@pytest.mark.parametrize("act", ["int8", "int4", "topk_int8", None])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("weight_quant", [True, False])
def test_bitlinear_matches_reference(shape, act, norm, weight_quant):
    torch.manual_seed(0)
    layer = BitLinear(37, 19, norm=norm, weight_quant=weight_quant, act=act)
    if norm:
        with torch.no_grad():
            layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape) * 2
    y = layer(x)
    assert y.shape == (*shape[:-1], 19)
    assert torch.equal(y, ref_bitlinear(layer, x))


def test_bitlinear_lambda_blend():
    torch.manual_seed(0)
    layer = BitLinear(32, 8, norm=True, lam=0.25)
    x = torch.randn(4, 32)
    xn = ref_rmsnorm(x, layer.norm.weight)
    w = layer.weight
    xq = xn + 0.25 * (ref_activation_quant(xn) - xn)
    wq = w + 0.25 * (ref_weight_quant(w) - w)
    assert torch.equal(layer(x), F.linear(xq, wq))
    with pytest.raises(ValueError, match="λ"):
        layer.lam = 1.5


def test_bitlinear_gradients_are_ste():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, norm=False)
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 8)
    layer(x).backward(g)
    # STE: dL/dW = g^T xq, dL/dx = g wq (the quantized values, identity through the quantizers)
    xq, wq = ref_activation_quant(x.detach()), ref_weight_quant(layer.weight.detach())
    torch.testing.assert_close(layer.weight.grad, g.t() @ xq)
    torch.testing.assert_close(x.grad, g @ wq)


@pytest.mark.parametrize("act", ["int4", "topk_int8"])
def test_bitlinear_a48_gradients_pass_through_quantizer_and_topk_mask(act):
    """a4.8 STE (paper: "through the quantizers and the top-K mask"): dL/dx = g·Wq for EVERY input
    entry, the ones top-K zeroed included; dL/dW = gᵀ·xq with xq the sparsified, quantized input."""
    torch.manual_seed(0)
    layer = BitLinear(16, 8, norm=False, act=act)
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 8)
    layer(x).backward(g)
    xq, wq = REF_ACT[act](x.detach()), ref_weight_quant(layer.weight.detach())
    torch.testing.assert_close(layer.weight.grad, g.t() @ xq)
    torch.testing.assert_close(x.grad, g @ wq)
    if act == "topk_int8":
        masked = xq == 0
        assert masked.sum() >= 5 * 8 and (x.grad[masked] != 0).all()


def test_bitlinear_bad_args():
    with pytest.raises(ValueError, match="act"):
        BitLinear(4, 4, act="int2")
    with pytest.raises(ValueError, match="keep"):
        BitLinear(4, 4, act="topk_int8", keep=0.0)
    with pytest.raises(ValueError, match="λ"):
        BitLinear(4, 4, lam=-0.1)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


GRID = [dict(linear=lin, norm_placement=np_, tie_word_embeddings=tie, hidden_act=act)
        for lin, np_, tie, act in itertools.product(("bitnet", "fp"), ("subln", "inner"),
                                                    (True, False), ("relu2", "silu"))]
GRID += [dict(linear="bitnet", norm_placement=np_, tie_word_embeddings=tie, hidden_act="relu2",
              activation_scheme="a4.8") for np_, tie in itertools.product(("subln", "inner"), (True, False))]
GRID += [dict(linear=lin, norm_placement="subln", tie_word_embeddings=True, hidden_act="silu", qkv_bias=True)
         for lin in ("bitnet", "fp")]  # a fine-tuned Qwen2


def _cfg_id(kw):
    return "-".join(str(v) for v in kw.values())


@pytest.mark.parametrize("kw", GRID, ids=_cfg_id)
def test_every_parameter_gets_a_gradient(kw):
    torch.manual_seed(0)
    model = CausalLM(tiny(**kw))
    ids = torch.randint(0, 64, (2, 12))
    logits, loss = model(ids, targets=torch.roll(ids, -1, 1))
    assert logits.shape == (2, 12, 64) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("placement", ["subln", "inner"])
@pytest.mark.parametrize("scheme", ["a8", "a4.8"])
def test_fp_twin_has_same_parameters(placement, scheme):
    cfg = tiny(norm_placement=placement, activation_scheme=scheme, tie_word_embeddings=False)
    bit, fp = CausalLM(cfg), CausalLM(cfg.fp_twin())
    assert fp.config.linear == "fp"
    sb, sf = bit.state_dict(), fp.state_dict()
    assert list(sb) == list(sf)
    assert all(sb[k].shape == sf[k].shape for k in sb)
    fp.load_state_dict(sb)
    assert all(torch.equal(fp.state_dict()[k], sb[k]) for k in sb)
    torch.manual_seed(1)
    bit.load_state_dict(CausalLM(cfg.fp_twin()).state_dict())


@pytest.mark.parametrize("placement", ["subln", "inner"])
@pytest.mark.parametrize("scheme", ["a8", "a4.8"])
def test_lambda_zero_equals_fp_twin(placement, scheme):
    torch.manual_seed(0)
    cfg = tiny(norm_placement=placement, activation_scheme=scheme)
    bit, fp = CausalLM(cfg), CausalLM(cfg.fp_twin())
    fp.load_state_dict(bit.state_dict())
    ids = torch.randint(0, 64, (2, 10))
    quantized, _ = bit(ids)
    bit.set_quant_lambda(0.0)
    assert all(m.lam == 0.0 for m in bit.modules() if isinstance(m, BitLinear))
    assert torch.equal(bit(ids)[0], fp(ids)[0])
    assert not torch.allclose(quantized, fp(ids)[0])
    bit.set_quant_lambda(1.0)
    assert torch.equal(bit(ids)[0], quantized)


def test_hf_state_dict_names():
    for tie in (True, False):
        cfg = tiny(num_hidden_layers=2, tie_word_embeddings=tie)
        keys = set(CausalLM(cfg).state_dict())
        expect = {"model.embed_tokens.weight", "model.norm.weight"}
        for i in range(2):
            p = f"model.layers.{i}."
            expect |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                       p + "self_attn.attn_sub_norm.weight", p + "mlp.ffn_sub_norm.weight"}
            expect |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
            expect |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        if not tie:
            expect.add("lm_head.weight")
        assert keys == expect


def test_inner_placement_names():
    keys = set(CausalLM(tiny(norm_placement="inner")).state_dict())
    assert "model.layers.0.self_attn.q_proj.norm.weight" in keys
    assert "model.layers.0.mlp.down_proj.norm.weight" in keys
    assert not any("layernorm" in k or "sub_norm" in k for k in keys)


def test_shapes_gqa():
    cfg = tiny(num_attention_heads=4, num_key_value_heads=2)
    sd = CausalLM(cfg).state_dict()
    hd = 32 // 4
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (4 * hd, 32)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * hd, 32)
    assert sd["model.layers.0.self_attn.v_proj.weight"].shape == (2 * hd, 32)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (32, 48)


@pytest.mark.parametrize("kw", [dict(linear="bitnet"), dict(linear="fp"),
                                dict(linear="bitnet", norm_placement="inner"),
                                dict(linear="bitnet", activation_scheme="a4.8")], ids=_cfg_id)
def test_causality(kw):
    torch.manual_seed(0)
    model = CausalLM(tiny(**kw)).eval()
    ids = torch.randint(0, 64, (2, 16))
    base, _ = model(ids)
    for t in (1, 7, 15):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(16 - t)) % 64
        out, _ = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"logits before {t} changed"
        assert not torch.allclose(out[:, t], base[:, t])


def _capture_linear_calls(model, monkeypatch):
    """Record (module name, input, F.linear input, F.linear weight) for every BitLinear call."""
    calls, current = [], []
    orig = F.linear

    def spy(x, w, *a, **k):
        if current:
            calls.append((current[-1][0], current[-1][1], x.detach(), w.detach()))
        return orig(x, w, *a, **k)

    def enter(name):
        def hook(mod, args):
            current.append((name, args[0].detach()))
        return hook

    def leave(mod, args, out):
        current.pop()

    monkeypatch.setattr(onn.F, "linear", spy)
    for name, m in model.named_modules():
        if isinstance(m, BitLinear):
            m.register_forward_pre_hook(enter(name))
            m.register_forward_hook(leave)
    return calls


@pytest.mark.parametrize("scheme", ["a8", "a4.8"])
@pytest.mark.parametrize("placement", ["subln", "inner"])
def test_what_f_linear_sees(scheme, placement, monkeypatch):
    torch.manual_seed(0)
    model = CausalLM(tiny(activation_scheme=scheme, norm_placement=placement))
    calls = _capture_linear_calls(model, monkeypatch)
    model(torch.randint(0, 64, (2, 9)))
    assert len(calls) == 7 * 2
    modules = dict(model.named_modules())
    for name, inp, x, w in calls:
        m = modules[name]
        role = name.rsplit(".", 1)[1].removesuffix("_proj")
        assert m.act == ACT_SCHEMES[scheme][role]
        # ternary: exactly {-γ, 0, γ} with γ = mean|W|
        vals = w.unique()
        gamma = 1.0 / (1.0 / m.weight.detach().abs().mean())
        assert vals.numel() == 3, name
        assert torch.equal(vals, torch.stack([-gamma, torch.zeros(()), gamma])), name
        assert torch.allclose(gamma, m.weight.detach().abs().mean(), rtol=1e-6)
        # activation: the scheme's quantizer applied to the (normalised) input
        if m.norm is not None:
            inp = ref_rmsnorm(inp, m.norm.weight.detach(), m.norm.eps)
        assert torch.equal(x, REF_ACT[m.act](inp)), name
        if m.act == "topk_int8":
            assert ((x != 0).sum(-1) <= math.ceil(x.shape[-1] / 2)).all()
        if m.act == "int4":
            assert max(len(row.unique()) for row in x.reshape(-1, x.shape[-1])) <= 16


def test_a48_projection_modes():
    model = CausalLM(tiny(activation_scheme="a4.8"))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert [attn.q_proj.act, attn.k_proj.act, attn.v_proj.act] == ["int4"] * 3
    assert attn.o_proj.act == "topk_int8" and attn.o_proj.keep == 0.5
    assert [mlp.gate_proj.act, mlp.up_proj.act] == ["int4"] * 2
    assert mlp.down_proj.act == "int8"
    fp = CausalLM(tiny(linear="fp"))
    assert all(m.act is None and not m.weight_quant for m in fp.modules() if isinstance(m, BitLinear))


def test_set_activation_scheme_in_place():
    torch.manual_seed(0)
    model = CausalLM(tiny(activation_scheme="a4.8"))
    ids = torch.randint(0, 64, (2, 9))
    a48, _ = model(ids)
    model.set_activation_scheme("a8")
    assert model.activation_scheme == "a8" and model.config.activation_scheme == "a4.8"
    assert all(lin.act == ACT_SCHEMES["a8"][role] for _, role, lin in model.projections())
    ref = CausalLM(tiny())
    ref.load_state_dict(model.state_dict())
    assert torch.equal(model(ids)[0], ref(ids)[0])        # exactly the A8 model on the same weights
    model.set_activation_scheme("a4.8")
    assert torch.equal(model(ids)[0], a48)
    assert len(list(model.projections())) == 7 * 2
    with pytest.warns(UserWarning, match="activation_scheme='a8'"):
        ref.set_activation_scheme("a4.8")                # not trained for it: warned
    with pytest.raises(ConfigError, match="activation_scheme"):
        model.set_activation_scheme("a4")
    with pytest.raises(ConfigError, match="linear"):
        CausalLM(tiny(linear="fp")).set_activation_scheme("a8")


def test_embeddings_and_head_stay_full_precision():
    model = CausalLM(tiny(tie_word_embeddings=False))
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    ids = torch.randint(0, 64, (1, 10))
    full, _ = model(ids)
    model.setup_cache(1, 16)
    a, _ = model(ids[:, :6], pos=0)
    b, _ = model(ids[:, 6:], pos=6)
    model.clear_cache()
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ModelConfig
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(linear="int2"), "linear"),
    (dict(norm_placement="post"), "norm_placement"),
    (dict(activation_scheme="a4"), "activation_scheme"),
    (dict(activation_scheme="a4.8", hidden_act="silu"), "hidden_act"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(topk_keep=1.5), "topk_keep"),
    (dict(eos_token_id=64), "eos_token_id"),
    (dict(hidden_size="32"), "hidden_size"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(rope_theta="big"), "rope_theta"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
])
def test_config_validation_names_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        tiny(**kw)


@pytest.mark.parametrize("d, field", [
    ({"hidden_size": "big"}, "hidden_size"),
    ({"hidden_size": 1.5}, "hidden_size"),
    ({"num_hidden_layers": [2]}, "num_hidden_layers"),
    ({"tie_word_embeddings": "maybe"}, "tie_word_embeddings"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"hidden_act": 2}, "hidden_act"),
    ({"num_key_value_heads": "two"}, "num_key_value_heads"),
    ({"hidden_sizes": 32}, "hidden_sizes"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_from_dict_errors_name_field(d, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**TINY, **d})


def test_from_dict_unknown_keys_allowed_on_request():
    cfg = ModelConfig.from_dict({**TINY, "architectures": ["BitNetForCausalLM"]}, allow_unknown=True)
    assert cfg == tiny()
    assert ModelConfig.from_dict({**TINY, "hidden_size": "32"}) == tiny()  # CLI-style strings parse


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_roundtrip(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    twin = cfg.fp_twin()
    assert twin.linear == "fp" and ModelConfig.from_dict(twin.to_dict()) == twin
    a48 = cfg.replace(activation_scheme="a4.8", hidden_act="relu2")
    assert ModelConfig.from_dict(a48.to_dict()) == a48


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.preset("huge")


def test_2b4t_preset_shape():
    cfg = ModelConfig.preset("bitnet-2b4t")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (2560, 6912, 30)
    assert (cfg.num_attention_heads, cfg.kv_heads, cfg.resolved_head_dim) == (20, 5, 128)
    assert cfg.hidden_act == "relu2" and cfg.tie_word_embeddings


def test_config_normalises_numeric_types():
    import numpy as np

    cfg = tiny(vocab_size=np.int64(64), rope_theta=np.float32(500000.0), num_key_value_heads=np.int32(2))
    assert type(cfg.vocab_size) is int and type(cfg.num_key_value_heads) is int
    assert type(cfg.rope_theta) is float and cfg.rope_theta == 500000.0
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert type(tiny(rope_theta=10000).rope_theta) is float
