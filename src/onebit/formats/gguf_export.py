"""Export a packed model folder to GGUF (llama.cpp) with ternary TQ2_0 / TQ1_0 weights.

Spec: docs/formats.md §7b. The target is llama.cpp's ``bitnet`` architecture, whose graph is
(llama.cpp ``src/models/bitnet.cpp``): RMSNorm ``attn_norm`` -> q/k/v -> NEOX ("rotate_half")
RoPE -> attention -> RMSNorm ``attn_sub_norm`` -> o; RMSNorm ``ffn_norm`` -> SiLU(gate) * up ->
RMSNorm ``ffn_sub_norm`` -> down; final ``output_norm``; the LM head is always ``token_embd``
(tied). Every projection ``W`` may carry an optional F32 ``{W}.scale`` [1] tensor that the graph
multiplies into the matmul result.

That is onebit's ``norm_placement="subln"`` with ``hidden_act="silu"`` exactly. The released
2B4T layout (``hidden_act="relu2"``) has the same tensors, but stock llama.cpp computes SiLU in
that graph, so exporting a ReLU² model is refused unless ``allow_relu2=True`` (for llama.cpp forks
that patch the activation to ReLU²).

The ternary weights are written from the packed codes exactly: TQ2_0 blocks are our ``i2`` bytes
re-blocked (two 128-value ``i2`` blocks = the 64 ``qs`` bytes of one 256-value TQ2_0 block) and
TQ1_0 blocks re-encode the same trits. The per-tensor scale goes either into a separate F32
``.scale`` tensor with every block's ``d`` = 1.0 (``scales="tensor"``, the default: exact for any
scale), or into every block's fp16 ``d`` (``scales="block"``: what llama.cpp's own converter
produces; exact only when the scale is representable in fp16, which is checked).

Needs the ``gguf`` package (``pip install onebit[gguf]``); no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from .packed_model import packed_config

__all__ = [
    "ARCH",
    "QTYPES",
    "GGUFExportError",
    "encode_tq1_0",
    "encode_tq2_0",
    "export_gguf",
    "gguf_tensor_name",
    "write_gguf_model",
]

ARCH = "bitnet"
QK = 256  # values per TQ1_0 / TQ2_0 block (ggml's QK_K)
QTYPES = ("tq2_0", "tq1_0", "i2_s")
ARCH_B158 = "bitnet-b1.58"  # bitnet.cpp's 2B4T (ReLU²) architecture, the one I2_S files use
I2_S_TYPE = 36  # GGML_TYPE_I2_S in bitnet.cpp's ggml (not in upstream ggml / the gguf package)
TQ2_0_BYTES = 66   # qs[64] + fp16 d
TQ1_0_BYTES = 54   # qs[48] + qh[4] + fp16 d

# onebit (HF) projection name -> llama.cpp tensor name (within blk.N)
_PROJ = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_NORMS = {
    "input_layernorm": "attn_norm", "self_attn.attn_sub_norm": "attn_sub_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.ffn_sub_norm": "ffn_sub_norm",
}


class GGUFExportError(ValueError):
    """The packed model cannot be written as a llama.cpp GGUF (unsupported architecture/shape)."""


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for one of our tensor names (``model.layers.3.mlp.up_proj`` -> ``blk.3.ffn_up``)."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name.startswith("model.layers."):
        i, rest = name[len("model.layers."):].split(".", 1)
        if rest in _PROJ:
            return f"blk.{i}.{_PROJ[rest]}"
        if rest.endswith(".weight") and rest[:-len(".weight")] in _NORMS:
            return f"blk.{i}.{_NORMS[rest[:-len('.weight')]]}.weight"
    raise GGUFExportError(f"tensor {name!r} has no counterpart in llama.cpp's {ARCH!r} architecture")


# ---------------------------------------------------------------------------------------------
# Block encoders: ternary codes int8 [N, K] (K a multiple of 256) -> raw blocks uint8 [N, K/256*B]
# ---------------------------------------------------------------------------------------------

def _check_codes(codes: np.ndarray, name: str = "codes") -> tuple[int, int]:
    if not isinstance(codes, np.ndarray) or codes.dtype != np.int8 or codes.ndim != 2:
        raise TypeError(f"{name} must be an int8 [N, K] numpy array of -1/0/1")
    n, k = codes.shape
    if k % QK:
        raise GGUFExportError(
            f"{name}: rows of {k} values are not a multiple of {QK}, the block of llama.cpp's "
            f"TQ1_0/TQ2_0; give the model hidden_size/intermediate_size (and heads*head_dim) that "
            f"are multiples of {QK}, or export to the onebit packed format instead")
    return n, k


def _fp16_d(d: float) -> np.ndarray:
    return np.full(1, d, dtype=np.float16).view(np.uint8)


def encode_tq2_0(codes: np.ndarray, d: float = 1.0) -> np.ndarray:
    """TQ2_0 blocks of ternary ``codes`` with every block's scale ``d``: uint8 [N, K/256*66].

    Block: qs[64], byte 32*c + m (chunk c = 0, 1) holds elements 128c + m + 32j at bits 2j+1:2j as
    value+1 (exactly two onebit ``i2`` blocks), then fp16 d.
    """
    n, k = _check_codes(codes)
    nb = k // QK
    c = (codes.astype(np.int16) + 1).astype(np.uint8).reshape(n, nb, 2, 4, 32)  # [.., chunk, j, m]
    qs = c[:, :, :, 0] | (c[:, :, :, 1] << 2) | (c[:, :, :, 2] << 4) | (c[:, :, :, 3] << 6)
    out = np.empty((n, nb, TQ2_0_BYTES), np.uint8)
    out[:, :, :64] = qs.reshape(n, nb, 64)
    out[:, :, 64:] = _fp16_d(d)
    return out.reshape(n, nb * TQ2_0_BYTES)


def _trits_to_byte(q: np.ndarray) -> np.ndarray:
    # q in 0..242 (5 trits, first most significant) -> ceil(q * 256 / 243), ggml's fixed point
    return ((q.astype(np.uint32) * 256 + 242) // 243).astype(np.uint8)


def encode_tq1_0(codes: np.ndarray, d: float = 1.0) -> np.ndarray:
    """TQ1_0 blocks of ternary ``codes`` with every block's scale ``d``: uint8 [N, K/256*54].

    Block (256 values): qs[0:32] byte m = elements m + 32j (j < 5, first most significant, the
    onebit ``t1_6`` encoding of values 0..159); qs[32:48] byte m = elements 160 + m + 16j (j < 5);
    qh[4] byte m = elements 240 + m + 4j (j < 4, then a zero trit); then fp16 d.
    """
    n, k = _check_codes(codes)
    nb = k // QK
    c = (codes.astype(np.int16) + 1).astype(np.uint16).reshape(n, nb, QK)
    w5 = np.array([81, 27, 9, 3, 1], np.uint16)
    a = c[:, :, :160].reshape(n, nb, 5, 32)                    # [.., j, m]: element m + 32j
    b = c[:, :, 160:240].reshape(n, nb, 5, 16)                 # element 160 + m + 16j
    h = c[:, :, 240:].reshape(n, nb, 4, 4)                     # element 240 + m + 4j
    out = np.empty((n, nb, TQ1_0_BYTES), np.uint8)
    out[:, :, 0:32] = _trits_to_byte(np.einsum("...jm,j->...m", a, w5))
    out[:, :, 32:48] = _trits_to_byte(np.einsum("...jm,j->...m", b, w5))
    out[:, :, 48:52] = _trits_to_byte(np.einsum("...jm,j->...m", h, w5[:4]))
    out[:, :, 52:] = _fp16_d(d)
    return out.reshape(n, nb * TQ1_0_BYTES)


_ENCODERS = {"tq2_0": encode_tq2_0, "tq1_0": encode_tq1_0}


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

def _check_arch(cfg, where: str, allow_relu2: bool, arch: str = ARCH) -> None:
    from ..config import ModelConfig

    assert isinstance(cfg, ModelConfig)
    bad = None
    if cfg.norm_placement != "subln":
        bad = (f"norm_placement={cfg.norm_placement!r}: llama.cpp's {ARCH!r} graph has the SubLN "
               f"layout (attn_sub_norm/ffn_sub_norm), not a norm inside every projection")
    elif cfg.activation_scheme != "a8":
        bad = f"activation_scheme={cfg.activation_scheme!r}: llama.cpp runs 8-bit activations only"
    elif cfg.qkv_bias:
        bad = (f"qkv_bias=True (a fine-tuned Qwen2): this export writes no q/k/v bias tensors; run "
               f"the packed folder with onebit's engine instead")
    elif not cfg.tie_word_embeddings:
        bad = (f"tie_word_embeddings=False: llama.cpp's {ARCH!r} graph always uses token_embd as "
               f"the LM head")
    elif cfg.resolved_head_dim * cfg.num_attention_heads != cfg.hidden_size:
        bad = (f"head_dim*num_attention_heads={cfg.resolved_head_dim * cfg.num_attention_heads} != "
               f"hidden_size={cfg.hidden_size}: llama.cpp's {ARCH!r} q/o projections are square")
    elif cfg.hidden_act == "relu2" and not allow_relu2 and arch == ARCH:
        bad = (f"hidden_act='relu2': stock llama.cpp's {ARCH!r} graph computes SiLU(gate)*up, so a "
               f"ReLU² (2B4T-style) model would run but compute a different function; export a "
               f"hidden_act='silu' model, or pass allow_relu2=True / --allow-relu2 for a llama.cpp "
               f"build patched to LLM_FFN_RELU_SQR")
    if bad:
        raise GGUFExportError(f"{where} cannot be exported to GGUF: {bad}")


def _embedding(d, want: str) -> np.ndarray:
    """token_embd from the stored embedding ``d`` (model_io.Dense): "auto" keeps f16 as f16,
    anything else (f32, int8 / 4-bit rows, dequantized) as f32."""
    if want == "auto":
        want = "f16" if d.kind == "f16" else "f32"
    t = d.data if d.kind == want else d.f32()
    return np.ascontiguousarray(np.asarray(t).astype(np.float16 if want == "f16" else np.float32))


def export_gguf(packed_folder: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "tq2_0",
                *, scales: str = "tensor", embedding: str = "auto", allow_relu2: bool = False,
                name: str | None = None) -> Path:
    """Write the packed model folder ``packed_folder`` as a GGUF file ``out_path`` for llama.cpp
    (``write_gguf_model`` on the folder's TernaryModel; errors name the folder)."""
    from .model_io import read_packed_folder

    folder = Path(packed_folder)
    packed_config(folder)  # checks it is a packed folder of a known version
    return write_gguf_model(read_packed_folder(folder), out_path, qtype, scales=scales,
                            embedding=embedding, allow_relu2=allow_relu2,
                            name=name or folder.resolve().name, where=f"'{folder}'")


def _fallback_f16(qtype: str, arch: str, k: int, where: str, tname: str) -> bool:
    """Whether projection ``tname`` (rows of ``k`` values) is written as F16 codes instead of
    ``qtype`` blocks, as llama.cpp's converter falls back to F16 for rows its quantizer cannot
    block; GGUFExportError where no reader would compute the same function from a fallback."""
    block = 128 if qtype == "i2_s" else QK
    if k % block == 0:
        return False
    if qtype == "i2_s" and arch != ARCH:
        raise GGUFExportError(
            f"{where}: tensor {tname!r} has rows of {k} values, not a multiple of {block} (bitnet.cpp's "
            f"I2_S block), and an F16 fallback needs a per-tensor scale that bitnet.cpp's {arch!r} "
            f"graph is not known to apply: use hidden_size, intermediate_size and heads*head_dim "
            f"that are multiples of {block}, or export gguf-tq2_0 / gguf-tq1_0 (--allow-relu2), "
            f"which fall back to F16")
    return True


def write_gguf_model(tm, out_path: str | os.PathLike, qtype: str = "tq2_0", *, scales: str = "tensor",
                     embedding: str = "auto", allow_relu2: bool = False, name: str | None = None,
                     where: str | None = None) -> Path:
    """Write TernaryModel ``tm`` as a GGUF file ``out_path`` (atomically) for llama.cpp.

    ``qtype``: "tq2_0" (2.0625 bpw) or "tq1_0" (1.6875 bpw) for every ternary projection, "i2_s"
    (bitnet.cpp). A projection whose rows are not whole blocks (256 values; 128 for I2_S) is
    written as F16 codes (-1/0/+1, exact) times its scale, as llama.cpp's converter falls back to
    F16; llama.cpp then runs that projection with float instead of 8-bit activations.
    ``scales``: "tensor" (d = 1 in every block, F16 codes; the exact float32 scale in ``{W}.scale``)
    or "block" (d = fp16(scale) in every block, F16 values code*scale; refused when the scale is
    not exactly an fp16). ``embedding``: token_embd (also the LM head) as "auto" (f16 if stored
    f16, else f32), "f32" or "f16". Norms are F32. ``where`` names the source in errors.
    Raises GGUFExportError (unsupported architecture or shape, no tokenizer).
    """
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the 'gguf' package: pip install 'onebit[gguf]' "
                          "(or pip install gguf)") from None
    from .gguf_tokenizer import GGUFTokenizerError, add_tokenizer
    from .model_io import projections

    if qtype not in QTYPES:
        raise ValueError(f"qtype={qtype!r} is unknown; use one of {list(QTYPES)}")
    if scales not in ("tensor", "block"):
        raise ValueError(f"scales={scales!r} is unknown; use 'tensor' or 'block'")
    if embedding not in ("auto", "f32", "f16"):
        raise ValueError(f"embedding={embedding!r} is unknown; use 'auto', 'f32' or 'f16'")
    where = where or f"'{tm.source}'"
    cfg = tm.config
    # I2_S files are bitnet.cpp's: its bitnet-b1.58 graph computes ReLU², its bitnet graph SiLU
    arch = ARCH_B158 if qtype == "i2_s" and cfg.hidden_act == "relu2" else ARCH
    _check_arch(cfg, where, allow_relu2, arch)

    L, D, F, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qt = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0,
          "i2_s": I2_S_TYPE}[qtype]
    encode = _ENCODERS.get(qtype)

    # check every tensor is there and every row length has a form, before writing
    shapes = {n: (rows, k) for n, rows, k in projections(cfg)}
    missing = [p for p in shapes if p not in tm.ternary]
    want_dense = (["model.embed_tokens.weight", "model.norm.weight"]
                  + [f"model.layers.{i}.{n}.weight" for i in range(L) for n in _NORMS])
    missing += [e for e in want_dense if e not in tm.dense]
    if missing:
        raise GGUFExportError(f"{where}: tensors {missing[:4]} are missing; re-export the model")
    f16 = {p: _fallback_f16(qtype, arch, k, where, p) for p, (_, k) in shapes.items()}
    for p in shapes:
        if scales == "block" and qtype != "i2_s":
            _, s = tm.ternary[p]()  # decoded again when written: a 2B model's codes stay lazy
            if float(np.float16(s)) != s:
                raise GGUFExportError(
                    f"{where}: tensor {p!r} scale {s!r} is not exactly representable in fp16 "
                    f"(it would become {float(np.float16(s))!r}); use scales='tensor' (exact)")

    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or Path(tm.source.split(" (")[0]).name or "model")
        if qtype != "i2_s":
            w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if qtype == "tq2_0"
                            else gguf.LlamaFileType.MOSTLY_TQ1_0)
        w.add_string("onebit.hidden_act", cfg.hidden_act)  # the GGUF graph name does not say it
        w.add_vocab_size(V)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(D)
        w.add_block_count(L)
        w.add_feed_forward_length(F)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_rope_dimension_count(cfg.resolved_head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        try:
            add_tokenizer(w, tm.files, V, cfg.bos_token_id, cfg.eos_token_id, where)
        except GGUFTokenizerError as e:
            raise GGUFExportError(str(e)) from None

        w.add_tensor("token_embd.weight", _embedding(tm.dense["model.embed_tokens.weight"], embedding))
        w.add_tensor("output_norm.weight", tm.dense["model.norm.weight"].f32())
        for i in range(L):
            for n in _NORMS:
                t = f"model.layers.{i}.{n}.weight"
                w.add_tensor(gguf_tensor_name(t), tm.dense[t].f32())
            for p in _PROJ:
                full = f"model.layers.{i}.{p}"
                codes, scale = tm.ternary[full]()
                base = gguf_tensor_name(full)
                if f16[full]:  # codes exactly in F16 (block: code * fp16-exact scale)
                    own_scale = scales == "tensor" or qtype == "i2_s"
                    d = 1.0 if own_scale else scale
                    vals = (codes.astype(np.float32) * np.float32(d)).astype(np.float16)
                    w.add_tensor(base + ".weight", vals)
                    if own_scale:
                        w.add_tensor(base + ".scale", np.array([scale], np.float32))
                    continue
                if qtype == "i2_s":  # the scale travels inside the tensor's bytes
                    from .gguf_io import encode_i2_s
                    w.add_tensor(base + ".weight", encode_i2_s(codes, scale).view(np.int8),
                                 raw_shape=codes.shape, raw_dtype=qt)
                    continue
                d = 1.0 if scales == "tensor" else scale
                w.add_tensor(base + ".weight", encode(codes, d), raw_dtype=qt)
                if scales == "tensor":
                    w.add_tensor(base + ".scale", np.array([scale], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_path
