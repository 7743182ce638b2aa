"""Does llama.cpp run our GGUF export like our engine? Greedy tokens and logits, TQ2_0 and TQ1_0.

Run with a Python that has llama-cpp-python and gguf (plus numpy, safetensors):

    PYTHONPATH=src /work/peers-venv/bin/python bench/gguf_check.py [--model PACKED] [--out DIR]

Without --model it writes a packed model whose dims are multiples of 256 (hidden 256, ffn 768,
2 layers, 4 heads / 2 KV heads, SubLN + SiLU: llama.cpp's ``bitnet`` graph) with random ternary
codes, and deliberately non-uniform per-tensor scales and norm weights (so a swapped tensor or a
wrong scale shows up), and an embedding of std 0.1 (varied greedy continuations; larger makes the residual stream
predict its own token forever),
vocab = the built-in tokenizer's 4096. Then for each qtype it exports GGUF, loads it with llama.cpp
(n_threads=2, logits of every position) and compares, feeding token ids (no text tokenization):

- greedy: a 50-token continuation of a few prompts, token for token (llama.cpp's own eval loop vs
  our engine's ``Runtime.forward`` loop);
- logits: both fed the same sequence (prompt + our continuation): per-position correlation, max
  |diff| relative to the logit range, top-1 agreement.

Bitwise equality is not expected: llama.cpp quantizes activations to Q8_K (an int8 scale per 256
values) where the engine uses one int8 scale per token (the whole row). With --ffn 256 every
projection input is exactly one 256-block, the two quantizations coincide and so should the
results (up to float summation order); with --ffn 768 the down_proj input is 3 Q8_K blocks and the
logits differ at the level of that quantization noise (a numpy emulation of the model with
per-256-block activation quantization matches llama.cpp to ~1e-6, see --emulate). llama.cpp keeps
the KV cache in F16 by default; --kv f32 (the default here) removes that difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from onebit.config import ModelConfig
from onebit.formats.gguf_export import export_gguf
from onebit.formats.packed_model import PACKED_VERSION
from onebit.formats.packing import save_packed

TOKENIZER = ROOT / "src/onebit/models/default/tokenizer.json"


def write_check_model(folder: Path, seed: int = 0, layout: str = "i2", hidden_act: str = "silu",
                      embed_std: float = 0.1, ffn: int = 768) -> Path:
    """A packed SubLN model (dims multiples of 256) with random codes, scales and norm weights."""
    cfg = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=ffn, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act=hidden_act,
                      max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                      bos_token_id=0, eos_token_id=1)
    rng = np.random.default_rng(seed)
    D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.resolved_head_dim
    H, Hkv = cfg.num_attention_heads, cfg.kv_heads
    packed, extra = {}, {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for role, n, k in (("self_attn.q_proj", H * hd, D), ("self_attn.k_proj", Hkv * hd, D),
                           ("self_attn.v_proj", Hkv * hd, D), ("self_attn.o_proj", D, H * hd),
                           ("mlp.gate_proj", F, D), ("mlp.up_proj", F, D), ("mlp.down_proj", D, F)):
            # about a third zeros, like absmean-quantized weights
            codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k), p=[0.33, 0.34, 0.33])
            packed[p + role] = (codes, float(rng.uniform(0.5, 2.0) / np.sqrt(k)))
        for name, n in (("input_layernorm", D), ("post_attention_layernorm", D),
                        ("self_attn.attn_sub_norm", H * hd), ("mlp.ffn_sub_norm", F)):
            extra[p + name + ".weight"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
    extra["model.norm.weight"] = rng.uniform(0.5, 1.5, D).astype(np.float32)
    extra["model.embed_tokens.weight"] = (rng.standard_normal((V, D)) * embed_std).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_packed(folder / "model.safetensors", packed, layout, extra_tensors=extra,
                metadata={"source": "bench/gguf_check.py"})
    config = {"model": cfg.to_dict(),
              "packed": {"layout": layout, "embedding": "f32", "format_version": PACKED_VERSION}}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean() + eps) * w


def _quant_act(x: np.ndarray, block: int | None) -> np.ndarray:
    """Absmax INT8 fake-quant of a vector: one scale per ``block`` values (None: the whole row)."""
    out = np.empty_like(x)
    step = len(x) if block is None else block
    for b in range(0, len(x), step):
        s = np.abs(x[b:b + step]).max() / 127
        out[b:b + step] = x[b:b + step] if s == 0 else np.clip(np.rint(x[b:b + step] / s), -127, 127) * s
    return out


def emulate_first_token(model_dir: Path, tok: int, block: int | None) -> np.ndarray:
    """float64 numpy logits of a single token at position 0 (attention = its own V) with the
    activation quantization of the engine (block=None: per token) or of llama.cpp (block=256, Q8_K);
    SubLN + SiLU/ReLU², tied head."""
    from onebit.formats.packing import load_packed, unpack

    cfg = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text())["model"])
    packed, extra, _ = load_packed(model_dir / "model.safetensors")
    W = {k: unpack(v.packed, v.shape[1], v.layout).astype(np.float64) * v.scale for k, v in packed.items()}
    E = extra["model.embed_tokens.weight"].astype(np.float64)
    eps, rep, hd = cfg.rms_norm_eps, cfg.num_attention_heads // cfg.kv_heads, cfg.resolved_head_dim
    x = E[tok].copy()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."

        def n(name: str, v: np.ndarray, p: str = p) -> np.ndarray:
            return _rms(v, extra[p + name + ".weight"].astype(np.float64), eps)

        h = _quant_act(n("input_layernorm", x), block)
        v = np.repeat((W[p + "self_attn.v_proj"] @ h).reshape(cfg.kv_heads, hd), rep, axis=0).ravel()
        x = x + W[p + "self_attn.o_proj"] @ _quant_act(n("self_attn.attn_sub_norm", v), block)
        h = _quant_act(n("post_attention_layernorm", x), block)
        g, u = W[p + "mlp.gate_proj"] @ h, W[p + "mlp.up_proj"] @ h
        a = (np.maximum(g, 0) ** 2 if cfg.hidden_act == "relu2" else g / (1 + np.exp(-g))) * u
        x = x + W[p + "mlp.down_proj"] @ _quant_act(n("mlp.ffn_sub_norm", a), block)
    return E @ _rms(x, extra["model.norm.weight"].astype(np.float64), eps)


def engine_greedy(rt, prompt: list[int], n: int) -> list[int]:
    rt.reset(len(prompt) + n)
    logits = rt.forward(prompt, 0)
    out = []
    for i in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        if i + 1 < n:
            logits = rt.forward([t], len(prompt) + i)
    return out


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for i in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        if i + 1 < n:
            llm.eval([t])
    return out


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def compare(model_dir: Path, out_dir: Path, qtypes: list[str], n_new: int, prompts: list[list[int]],
            scales: str, kv: str = "f32") -> list[dict]:
    from llama_cpp import Llama

    import onebit

    m = onebit.load(model_dir)
    rt = m.runtime
    results = []
    for qt in qtypes:
        path = out_dir / f"{model_dir.name}.{qt}.gguf"
        t0 = time.perf_counter()
        export_gguf(model_dir, path, qt, scales=scales)
        t_exp = time.perf_counter() - t0
        kvt = {"f32": 0, "f16": 1}[kv]  # GGML_TYPE_F32 / F16 (llama.cpp's default KV cache is F16)
        llm = Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                    type_k=kvt, type_v=kvt, verbose=False)
        for pi, prompt in enumerate(prompts):
            ours = engine_greedy(rt, prompt, n_new)
            theirs = llama_greedy(llm, prompt, n_new)
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
            seq = prompt + ours
            lo = m.logits(seq)
            ll = llama_logits(llm, seq)
            corr = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(lo, ll)]
            rng_ = float(np.ptp(lo))
            maxdiff = float(np.abs(lo - ll).max())
            top1 = float((lo.argmax(1) == ll.argmax(1)).mean())
            near = float((np.abs(lo - ll).max(1) < 1e-3).mean())  # positions equal to 1e-3
            # margin of our top-1 over our top-2 where they disagree (are they near-ties?)
            srt = np.sort(lo, axis=1)
            dis = np.nonzero(lo.argmax(1) != ll.argmax(1))[0]
            div_margin = (float(srt[len(prompt) - 1 + same, -1] - srt[len(prompt) - 1 + same, -2])
                          if same < len(ours) else None)
            r = dict(qtype=qt,  # noqa: C408 kv=kv, prompt=pi, prompt_len=len(prompt), n_new=n_new,
                     greedy_equal=ours == theirs, first_divergence=same, margin_at_divergence=div_margin,
                     min_corr=min(corr), mean_corr=float(np.mean(corr)), max_abs_diff=maxdiff,
                     logit_range=rng_, rel_max_diff=maxdiff / rng_, top1_agree=top1,
                     positions_equal_1e3=near, mean_abs_diff=float(np.abs(lo - ll).mean()),
                     disagree_margins=[float(srt[i, -1] - srt[i, -2]) for i in dis[:5]],
                     gguf_mb=path.stat().st_size / 1e6, export_s=t_exp)
            results.append(r)
            print(f"{qt} kv {kv} prompt {pi} (len {len(prompt)}): greedy {n_new} tokens "
                  f"{'IDENTICAL' if r['greedy_equal'] else f'diverge at {same}'}; logits over "
                  f"{len(seq)} positions: corr min {r['min_corr']:.6f} mean {r['mean_corr']:.6f}, "
                  f"max|diff| {maxdiff:.4f} (range {rng_:.2f}, {100 * maxdiff / rng_:.3f}%), "
                  f"top-1 agree {100 * top1:.1f}%, positions equal to 1e-3: {100 * near:.0f}%",
                  flush=True)
            if not r["greedy_equal"]:
                print(f"   ours   {ours}\n   llama  {theirs}\n   our top1-top2 margin where it "
                      f"diverges: {div_margin:.5f}; margins at teacher-forced top-1 disagreements: "
                      f"{r['disagree_margins']}", flush=True)
        del llm
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="packed model folder (default: write the check model)")
    ap.add_argument("--out", default=None, help="folder for the model and GGUF files (default: temp)")
    ap.add_argument("--qtypes", default="tq2_0,tq1_0")
    ap.add_argument("--scales", default="tensor", choices=["tensor", "block"])
    ap.add_argument("--n", type=int, default=50, help="greedy tokens per prompt")
    ap.add_argument("--layout", default="i2", choices=["i2", "t1_6"])
    ap.add_argument("--embed-std", type=float, default=0.1,
                    help="embedding std (0.1: varied continuations; >= 0.5: the token repeats itself)")
    ap.add_argument("--ffn", type=int, default=768,
                    help="intermediate_size; 256 makes every projection input one Q8_K block, where "
                         "llama.cpp's activation quantization equals the engine's per-token one")
    ap.add_argument("--kv", default="f32", choices=["f32", "f16"],
                    help="llama.cpp KV cache type (f16 = llama.cpp's default; the engine keeps f32)")
    ap.add_argument("--text", action="append", default=[],
                    help="a text prompt (encoded with the model's tokenizer, BOS first); repeatable; "
                         "default: three prompts of random token ids")
    ap.add_argument("--emulate", action="store_true",
                    help="also compare single-token logits with a numpy emulation of the model "
                         "using per-token (engine) and per-256 (llama.cpp Q8_K) activation scales")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gguf_check_"))
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else write_check_model(
        out / f"check_{args.layout}_ffn{args.ffn}", layout=args.layout, embed_std=args.embed_std,
        ffn=args.ffn)
    rng = np.random.default_rng(1)
    V = json.loads((model / "config.json").read_text())["model"]["vocab_size"]
    prompts = [[0] + rng.integers(2, V, size=n).tolist() for n in (1, 7, 30)]
    if args.text:
        import onebit

        tm = onebit.load(model)
        prompts = [tm.encode(t, add_bos=True) for t in args.text]
        del tm
    res = compare(model, out, args.qtypes.split(","), args.n, prompts, args.scales, args.kv)
    if args.emulate:
        from llama_cpp import Llama

        import onebit

        m = onebit.load(model)
        for qt in args.qtypes.split(","):
            llm = Llama(model_path=str(out / f"{model.name}.{qt}.gguf"), n_ctx=64, n_threads=2,
                        logits_all=True, type_k=0, type_v=0, verbose=False)
            for tok in prompts[-1][:4]:
                ours = m.logits([tok])[0]
                llm.reset()
                llm.eval([tok])
                theirs = np.array(llm.scores[0], np.float64)
                e_tok, e_blk = emulate_first_token(model, tok, None), emulate_first_token(model, tok, 256)
                print(f"emulate {qt} token {tok}: max|engine - emu(per-token)| "
                      f"{np.abs(ours - e_tok).max():.2e}, max|llama.cpp - emu(per-256 Q8_K)| "
                      f"{np.abs(theirs - e_blk).max():.2e}, max|engine - llama.cpp| "
                      f"{np.abs(ours - theirs).max():.2e}", flush=True)
            del llm
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    ok = all(r["greedy_equal"] for r in res)
    print(f"greedy identical in {sum(r['greedy_equal'] for r in res)}/{len(res)} runs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
