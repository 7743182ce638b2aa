"""The torch-free inference runtime: a packed model folder run with numpy and the C kernels.

One forward pass, per layer (``B`` = 1 sequence, ``T`` new tokens at positions pos..pos+T-1):

    h = quantize(norm(x))                      # C: fused RMSNorm + per-token INT8 (one call)
    q, k, v = linear(h)                        # C: ternary x INT8 GEMM, int32, scaled
    y = attention(q, k, v)                     # C: RoPE, cache write, causal GQA softmax
    x += o_proj(quantize(attn_sub_norm(y)))    # C
    h = quantize(norm(x)); g, u = gate(h), up(h)
    x += down(quantize(ffn_sub_norm(act(g) * u)))

For the b1.58 "inner" placement every projection normalises its own input (its own norm weight,
so one quantize call per projection). Weights are memory-mapped from model.safetensors;
activations are float32; the KV cache is float32 by default, float16 with ``kv_bits=16``, or with
``kv_bits`` 8/4/3 packed codes + fp16 steps (docs/formats.md §10, written quantized and read
dequantized by the C attention); buffers are preallocated so a decode step allocates little. The logits equal the PyTorch fake-quant forward up to float summation order
(tests/test_engine.py pins it, and greedy generations token for token).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np

from .. import kernels
from ..formats.packed_model import I8_SCALE_SUFFIX, read_packed_config, unpack_i4_rows
from ..formats.packing import (META_TENSORS, QWEIGHT_SUFFIX, SCALE_SUFFIX, PackedFormatError,
                               packed_row_bytes, read_declared)
from ..formats.safetensors_mmap import read_safetensors

__all__ = ["Runtime", "EngineError"]


KV_CACHE_BITS = (32, 16, 8, 4, 3)  # bits per cached value: float32, float16, quantized


class EngineError(ValueError):
    """A packed model folder cannot be run (missing or inconsistent tensors, wrong config)."""


class _Linear:
    """One packed projection: validated once, then called straight through ctypes. ``layout`` is
    the tensor's own declaration in model.safetensors (the one source of truth; the caller has
    checked ``q`` is uint8 [n, packed_row_bytes(k, layout)]), and C checks it again by the byte
    length."""

    def __init__(self, name: str, q: np.ndarray, scale: float, layout: str, n: int, k: int,
                 where: str = ""):
        self.name, self.q, self.scale, self.n, self.k = name, q, float(scale), n, k
        self.layout = layout
        lib = kernels._lib()
        # validated once here, so every call can skip the per-block code check
        st = lib.ob_validate_packed(q.ctypes.data, q.nbytes, n, k, 0 if layout == "i2" else 1)
        if st:
            raise PackedFormatError(f"{where}packed weight {name!r} holds an invalid code (status "
                                    f"{st}): the model file is corrupt; re-export it")
        self._fn = lib.ob_linear_i2_unchecked if layout == "i2" else lib.ob_linear_t1_6_unchecked
        self._w = q.ctypes.data

    def __call__(self, xc: np.ndarray, xs: np.ndarray, out: np.ndarray) -> np.ndarray:
        m = xc.shape[0]
        st = self._fn(self._w, self.q.nbytes, self.n, self.k, xc.ctypes.data, m, self.k, self.scale,
                      xs.ctypes.data, out.ctypes.data)
        if st:
            if st == -4:
                raise PackedFormatError(f"packed weight {self.name!r} holds an invalid code: the "
                                        f"model file is corrupt; re-export it")
            raise EngineError(f"kernel error {st} in {self.name!r}")
        return out


class _Quantizer:
    """Fused RMSNorm (optional weight) + per-token INT8 into preallocated code/scale buffers."""

    def __init__(self, k: int, weight: np.ndarray | None, eps: float, where: str = ""):
        self.k, self.eps, self.where = k, float(eps), where
        self.w = None if weight is None else np.ascontiguousarray(weight, dtype=np.float32)
        self._fn = kernels._lib().ob_quantize_act_i8

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = x.shape[0]
        codes = np.empty((m, self.k), dtype=np.int8)
        scale = np.empty(m, dtype=np.float32)
        st = self._fn(x.ctypes.data, m, self.k, self.k, None if self.w is None else self.w.ctypes.data,
                      self.eps, codes.ctypes.data, scale.ctypes.data)
        if st:
            raise EngineError(f"{self.where}the activations became NaN or inf (status {st}): the "
                              f"model or its input is broken")
        return codes, scale


def _transposed(lin: "_Linear") -> np.ndarray:
    """The i2 packing of lin's W^T (what ob_linear_colsparse_i2 reads), in anonymous memory with
    transparent huge pages requested: its reads jump between rows, and 4 KiB pages made every
    jump a TLB miss."""
    import mmap

    rbt = packed_row_bytes(lin.n, "i2")
    size = lin.k * rbt
    buf = mmap.mmap(-1, max(size, 1))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    wt = np.frombuffer(buf, dtype=np.uint8, count=size).reshape(lin.k, rbt)
    st = kernels._lib().ob_transpose_packed_i2(lin.q.ctypes.data, lin.q.nbytes, lin.n, lin.k,
                                               wt.ctypes.data)
    if st != 0:
        raise EngineError(f"projection {lin.name!r}: building its transposed copy failed (status {st})")
    return wt


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(ms + np.float32(eps)))).astype(np.float32) * w


class Runtime:
    """A loaded packed model: ``forward(ids, pos) -> logits`` with its own KV cache."""

    def __init__(self, folder: str | Path, sparse: bool | None = None,
                 activation_scheme: str | None = None, sparse_min_zeros: int = 65,
                 kv_bits: int | None = None, batch_invariant: bool = False):
        """``sparse``: skip the weight reads of zero activations when decoding (bit-identical
        results). True: up_proj rows whose ReLU² gate is 0, and the columns of zero down_proj
        inputs (ReLU²) and o_proj inputs (a4.8 top-K), which needs transposed copies of those
        projections in RAM (``sparse_bytes``: +133 MB on 2B4T). None (default): up_proj row
        skipping on ReLU² models (no extra memory), plus the column-sparse copies only for a4.8
        activations; False: off. i2 layout only. ``activation_scheme``: run "a8" or
        "a4.8" activations instead of the trained one (warns: a quality cost).
        ``sparse_min_zeros``: percent of zero inputs (or of up_proj rows off) from which a decode
        step uses the sparse kernels (below it the dense kernel is faster; 0 forces them).
        ``kv_bits``: bits per cached K/V value instead of the config's: 32 (float32), 16 (IEEE
        float16, llama.cpp's default cache type), 8, 4 or 3 (quantized, docs/formats.md §10; like
        llama.cpp's quantized cache types: a model trained without KV quantization loses a little
        quality, measured in docs/results.md). Default: the config's ``kv_bits``, where 16 (the
        training default: not quantized) runs the float32 cache, the engine's lossless one.
        ``batch_invariant``: every row's logits depend on its own sequence only, not on the rows
        run beside it, the prompt's chunking or the thread count (attention never splits a
        step's keys over threads; ob_layer.batch_invariant). The batched engine sets it."""
        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise EngineError(f"'{folder}' is not a packed model folder (needs config.json and "
                              f"model.safetensors); create one with `onebit export`")
        self.packed, cfg = read_packed_config(folder, EngineError)
        self.folder, self.config = folder, cfg
        self.options = dict(sparse=sparse, activation_scheme=activation_scheme,
                            sparse_min_zeros=sparse_min_zeros, kv_bits=kv_bits)  # to load a twin
        self.batch_invariant = bool(batch_invariant)
        scheme = cfg.activation_scheme if activation_scheme is None else activation_scheme
        if scheme not in ("a8", "a4.8"):
            raise EngineError(f"activation_scheme={activation_scheme!r} is not valid: use 'a8' or 'a4.8'")
        if scheme != cfg.activation_scheme:
            import warnings

            warnings.warn(f"'{folder}' was trained with activation_scheme={cfg.activation_scheme!r}; "
                          f"running it with {scheme!r} activations costs quality (measure it with "
                          f"`onebit eval ppl`); train for a4.8 with --model.activation_scheme=a4.8 "
                          f"--train.a48_switch=0.95", stacklevel=2)
        self.activation_scheme = scheme
        # per shape class the kernel variant measured fastest on this machine (cached; measured
        # once, in a child process, if missing): onebit.kernels.wisdom
        from ..kernels import wisdom

        wisdom.ensure_plan()
        tensors, meta = read_safetensors(folder / "model.safetensors")
        declared = read_declared(folder / "model.safetensors", meta)
        # one source of truth for the layout: each tensor's own declaration, which lin() checks
        # against the tensor's byte size; the config's must agree (the C layer runs one layout)
        layouts = sorted({d[0] for d in declared.values()})
        if layouts != [self.packed["layout"]]:
            raise EngineError(f"'{folder}/config.json' says packed layout {self.packed['layout']!r} but "
                              f"'{folder}/model.safetensors' declares {' and '.join(layouts)} tensors: "
                              f"the config does not belong to these weights; re-export the model")
        self.layout = layouts[0]
        self._tensors = tensors
        used: set[str] = set()  # every tensor must be accounted for (no silently ignored layers)
        D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        H, Hkv, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.resolved_head_dim
        self.H, self.Hkv, self.hd = H, Hkv, hd
        eps, inner = cfg.rms_norm_eps, cfg.norm_placement == "inner"
        self.eps, self.inner, self.relu2 = eps, inner, cfg.hidden_act == "relu2"
        if kv_bits is not None and (isinstance(kv_bits, bool) or kv_bits not in KV_CACHE_BITS):
            raise EngineError(f"kv_bits={kv_bits!r} is not valid: use 32 (float32 cache), 16 (float16), "
                              f"8, 4 or 3")
        # the C cache width: 32 float32, 16 float16, 8/4/3 quantized (formats.md §10); the
        # config's 16 (trained without KV quantization) runs float32
        self.kv_bits = (32 if cfg.kv_bits == 16 else cfg.kv_bits) if kv_bits is None else int(kv_bits)

        def vec(name: str, n: int) -> np.ndarray:
            t = tensors.get(name)
            if t is None or t.shape != (n,) or t.dtype != np.float32:
                raise EngineError(f"'{folder}': tensor {name!r} must be float32 [{n}], got "
                                  f"{None if t is None else (t.dtype, t.shape)}; re-export the model")
            if not np.isfinite(t).all():
                raise EngineError(f"'{folder}': tensor {name!r} holds NaN or inf; the model file is "
                                  f"corrupt: re-export it")
            used.add(name)
            return t

        def lin(name: str, n: int, k: int) -> _Linear:
            d = declared.get(name)
            if d is None or d[1] != (n, k):
                raise EngineError(f"'{folder}': packed projection {name!r} must be [{n}, {k}] "
                                  f"(declared {d}); the folder does not match its config")
            q, s = tensors.get(name + QWEIGHT_SUFFIX), tensors.get(name + SCALE_SUFFIX)
            if q is None or s is None or q.dtype != np.uint8 or q.shape != (n, packed_row_bytes(k, d[0])) \
                    or s.dtype != np.float32 or s.shape != (1,) or not (math.isfinite(s[0]) and s[0] >= 0):
                raise EngineError(f"'{folder}': tensors of {name!r} are missing or malformed (see "
                                  f"{META_TENSORS}); re-export the model")
            used.update((name + QWEIGHT_SUFFIX, name + SCALE_SUFFIX))
            return _Linear(name, q, float(s[0]), d[0], n, k, where=f"'{folder}': ")

        def quantizer(k: int, norm: str | None) -> _Quantizer:
            return _Quantizer(k, None if norm is None else vec(norm, k), eps)

        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            L: dict = {}
            for role, n, k in (("self_attn.q_proj", H * hd, D), ("self_attn.k_proj", Hkv * hd, D),
                               ("self_attn.v_proj", Hkv * hd, D), ("self_attn.o_proj", D, H * hd),
                               ("mlp.gate_proj", F, D), ("mlp.up_proj", F, D), ("mlp.down_proj", D, F)):
                L[role] = lin(p + role, n, k)
                if cfg.qkv_bias and role in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    L[role + ".bias"] = vec(p + role + ".bias", n)  # Qwen2: full precision
                if inner:
                    L[role + ".quant"] = quantizer(k, p + role + ".norm.weight")
            if not inner:
                L["attn_in"] = quantizer(D, p + "input_layernorm.weight")
                sub = cfg.norm_placement == "subln"  # "pre" (Llama): no sub-norms
                L["o_in"] = quantizer(H * hd, p + "self_attn.attn_sub_norm.weight" if sub else None)
                L["mlp_in"] = quantizer(D, p + "post_attention_layernorm.weight")
                L["down_in"] = quantizer(F, p + "mlp.ffn_sub_norm.weight" if sub else None)
            self.layers.append(L)
        if sparse and self.layout != "i2":
            raise EngineError(f"sparse decoding needs the i2 layout; '{folder}' is "
                              f"{self.layout}: re-export with --layout i2 or pass sparse=False")
        i2 = self.layout == "i2"
        # column-sparse copies cost RAM; by default only where a4.8 makes sparsity certain
        columns = bool(sparse) or (sparse is None and i2 and scheme == "a4.8")
        self.sparse = bool(sparse) or (sparse is None and i2 and (self.relu2 or scheme == "a4.8"))
        # projections read column-sparse (transposed copies): down after ReLU², o after top-K
        sparse_roles = set()
        if columns:
            if self.relu2:
                sparse_roles.add("mlp.down_proj")
            if scheme == "a4.8":
                sparse_roles.add("self_attn.o_proj")
        self.sparse_bytes = 0
        self._structs, self._keep = [], []
        roles = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        for L in self.layers:
            st = kernels.Layer(hidden=D, ffn=F, heads=H, kv_heads=Hkv, head_dim=hd,
                               layout=0 if self.layout == "i2" else 1,
                               relu2=int(self.relu2), inner=int(inner), eps=eps,
                               kv_bits=self.kv_bits, act_scheme=int(scheme == "a4.8"),
                               topk_keep=cfg.topk_keep,
                               skip_up=int(self.sparse and self.relu2),
                               sparse_min_zeros=int(sparse_min_zeros),
                               batch_invariant=int(bool(batch_invariant)))
            transposed = []
            for j, role in enumerate(roles):
                assert L[role].layout == self.layout
                st.w[j], st.w_scale[j] = L[role].q.ctypes.data, L[role].scale
                st.w_bytes[j] = L[role].q.nbytes  # C refuses a buffer of another length
                if role + ".bias" in L:
                    st.bias[j] = L[role + ".bias"].ctypes.data
                if role in sparse_roles:
                    wt = _transposed(L[role])
                    st.wt[j], st.wt_bytes[j] = wt.ctypes.data, wt.nbytes
                    transposed.append(wt)
                    self.sparse_bytes += wt.nbytes
            if inner:
                norms = [L[role + ".quant"].w for role in roles]
            else:
                norms = [L["attn_in"].w, L["mlp_in"].w, L["o_in"].w, L["down_in"].w]
            for j, nw in enumerate(norms):
                st.norm[j] = None if nw is None else nw.ctypes.data
            self._structs.append(st)
            self._keep.append((norms, transposed))  # the arrays behind the struct's pointers
        self._struct_p = [ctypes.addressof(st) for st in self._structs]
        self._layer_fn = kernels._lib().ob_decoder_layer
        self._batch_fn = kernels._lib().ob_decoder_layer_batch
        self.norm_w = vec("model.norm.weight", D)
        self._stored_names: set[str] = set()
        self.embed = self._stored("model.embed_tokens.weight", V, D)
        head = self.embed if cfg.tie_word_embeddings else self._stored("lm_head.weight", V, D)
        used.update(self._stored_names)
        stray = sorted(set(tensors) - used)
        if stray:
            raise EngineError(f"'{folder}/model.safetensors' holds tensors the config does not account "
                              f"for ({', '.join(stray[:4])}{', ...' if len(stray) > 4 else ''}; "
                              f"config.json: num_hidden_layers={cfg.num_hidden_layers}, "
                              f"tie_word_embeddings={cfg.tie_word_embeddings}): the config does not "
                              f"belong to these weights; re-export the model")
        if head[0].dtype in (np.int8, np.uint8):  # 8/4-bit: fused final norm + INT8, int kernel
            self.head_i8 = head
            self.head_quant = _Quantizer(D, self.norm_w, eps, where=f"'{folder}': ")
            self.head = None
        else:                         # float16: the f16 kernel; float32: numpy (BLAS) GEMV
            self.head_i8 = None
            self.head = head[0]
        self._i8 = kernels._lib().ob_linear_i8
        self._f16 = kernels._lib().ob_linear_f16
        self._i4 = kernels._lib().ob_linear_i4
        self._attn = kernels._lib().ob_attention
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        self._inv_freq = inv_freq
        self.cache_k: list[np.ndarray] = []
        self.cache_v: list[np.ndarray] = []
        self.max_len = self.slots = 0
        self.cache_bytes = 0  # bytes of all KV caches allocated by reset (every layer and slot)

    # -- weights -------------------------------------------------------------------------------
    def _stored(self, name: str, V: int, D: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Embedding / LM head as stored: (float32 or float16 [V, D], None), (int8 [V, D], scale
        [V]) or (4-bit: uint8 [V, ceil(D/64)*32], scale [V])."""
        t = self._tensors.get(name)
        self._stored_names.update((name, name + I8_SCALE_SUFFIX))
        i4 = t is not None and t.dtype == np.uint8
        shape = (V, -(-D // 64) * 32) if i4 else (V, D)
        if t is None or t.shape != shape:
            raise EngineError(f"'{self.folder}': tensor {name!r} must be {list(shape)}, got "
                              f"{None if t is None else t.shape}; re-export the model")
        if t.dtype in (np.float32, np.float16):
            return t, None
        if t.dtype in (np.int8, np.uint8):
            s = self._tensors.get(name + I8_SCALE_SUFFIX)
            if s is None or s.shape != (V,) or s.dtype != np.float32:
                raise EngineError(f"'{self.folder}': {'4' if i4 else '8'}-bit {name!r} needs float32 "
                                  f"{name + I8_SCALE_SUFFIX!r} [{V}]; re-export the model")
            return t, s
        raise EngineError(f"'{self.folder}': tensor {name!r} has dtype {t.dtype}; expected float32, "
                          f"float16, int8 or 4-bit (uint8)")

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        w, s = self.embed
        rows = w[ids]
        if w.dtype == np.uint8:
            rows = unpack_i4_rows(rows, self.config.hidden_size)
        x = rows.astype(np.float32)
        return x * s[ids, None] if s is not None else x

    def _logits(self, x: np.ndarray) -> np.ndarray:
        if self.head_i8 is not None:
            q, s = self.head_i8
            xc, xs = self.head_quant(x)
            out = np.empty((x.shape[0], q.shape[0]), np.float32)
            D = self.config.hidden_size
            fn = self._i8 if q.dtype == np.int8 else self._i4
            st = fn(q.ctypes.data, q.nbytes, s.ctypes.data, q.shape[0], D, xc.ctypes.data,
                    x.shape[0], D, xs.ctypes.data, out.ctypes.data)
            if st:
                raise EngineError(f"'{self.folder}': int8 LM head kernel failed (status {st})")
            return out
        h = np.ascontiguousarray(_rms_norm(x, self.norm_w, self.eps), dtype=np.float32)
        if self.head.dtype == np.float16:
            out = np.empty((x.shape[0], self.head.shape[0]), np.float32)
            st = self._f16(self.head.ctypes.data, self.head.nbytes, self.head.shape[0],
                           self.head.shape[1], h.ctypes.data, h.shape[0], h.shape[1], out.ctypes.data)
            if st:
                raise EngineError(f"'{self.folder}': fp16 LM head kernel failed (status {st})")
            return out
        # row by row, always: BLAS picks other kernels (and summation orders) for a matrix than for
        # a vector, and a batched decode must give the floats of one sequence alone
        with np.errstate(over="ignore", invalid="ignore"):  # _finite names the file instead
            return np.stack([self.head @ row for row in h])

    # -- cache ---------------------------------------------------------------------------------
    def reset(self, max_len: int | None = None, slots: int = 1) -> None:
        """(Re)allocate empty KV caches: ``slots`` sequences of ``max_len`` positions each
        (default: the model's context, one sequence)."""
        cfg = self.config
        max_len = cfg.max_position_embeddings if max_len is None else int(max_len)
        if not 0 < max_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len} must be in [1, {cfg.max_position_embeddings}]")
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots={slots!r} must be an integer >= 1 (sequences held at once)")
        if max_len != self.max_len or slots != self.slots:
            # per layer and slot one K and one V block: float32 [Hkv, max_len, hd], or the
            # quantized block of ob_kv_cache_bytes (uint8; layout in onebit_kernels.h)
            self._slot_bytes = kernels._lib().ob_kv_cache_bytes(self.Hkv, max_len, self.hd, self.kv_bits)
            assert self._slot_bytes > 0
            if self.kv_bits == 32:
                shape, dtype = (slots, self.Hkv, max_len, self.hd), np.float32
            else:
                shape, dtype = (slots, self._slot_bytes), np.uint8
            self.cache_k = self.cache_v = []  # free the old caches before allocating the new
            self.cache_k = [np.zeros(shape, dtype) for _ in self.layers]
            self.cache_v = [np.zeros(shape, dtype) for _ in self.layers]
            self._ck_p = [c.ctypes.data for c in self.cache_k]
            self._cv_p = [c.ctypes.data for c in self.cache_v]
            self.cache_bytes = 2 * len(self.layers) * slots * self._slot_bytes
            if max_len != self.max_len:
                # RoPE tables as the PyTorch model builds them: float64 angles, float32 cos/sin
                ang = np.outer(np.arange(max_len, dtype=np.float64), self._inv_freq)   # [L, hd/2]
                self._cos, self._sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
                self._cos_p, self._sin_p = self._cos.ctypes.data, self._sin.ctypes.data
            self.max_len, self.slots = max_len, slots

    # -- forward -------------------------------------------------------------------------------
    def forward(self, ids, pos: int = 0, last_only: bool = True, slot: int = 0) -> np.ndarray:
        """Feed token ids [T] at positions pos..pos+T-1 of sequence ``slot`` (its cache holds
        0..pos-1). Returns float32 logits [V] of the last token (``last_only``) or [T, V].
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T = ids.shape[0]
        if T < 1:
            raise ValueError("forward needs at least one token")
        self._check(ids, [pos], [T], [slot])
        x = np.ascontiguousarray(self._embed(ids))                      # [T, D]
        xp = x.ctypes.data
        off = slot * self._slot_bytes
        for li, sp in enumerate(self._struct_p):                        # C: one call per layer
            st = self._layer_fn(sp, xp, T, pos, self._cos_p, self._sin_p, self.max_len,
                                self._ck_p[li] + off, self._cv_p[li] + off, self.max_len)
            self._raise(st, li)
        if last_only:
            x = x[-1:]
        logits = self._finite(self._logits(np.ascontiguousarray(x)))        # [T, V]
        return logits[0] if last_only else logits

    def forward_batch(self, tokens, positions, slots) -> np.ndarray:
        """One decode step for several sequences at once: token ``tokens[i]`` at position
        ``positions[i]`` of sequence ``slots[i]`` (distinct slots). The projections run as one
        GEMM over the batch; the logits [B, V] are bit-identical to ``forward`` one by one."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.shape[0] < 1 or len(positions) != ids.shape[0] or len(slots) != ids.shape[0]:
            raise ValueError("forward_batch needs equal-length tokens/positions/slots, distinct slots")
        return self.forward_step([([t], p, s) for t, p, s in zip(ids, positions, slots)])

    def forward_step(self, seqs, logit_rows=None) -> np.ndarray:
        """One step over several sequences, each with its own number of new tokens (a prefill
        chunk or one decode token): ``seqs`` = [(ids, pos, slot)], distinct slots. All rows run
        as one GEMM per projection, attention per sequence. Returns float32 logits [R, V] of
        ``logit_rows`` (indices into the concatenated rows; default: each sequence's last)."""
        ids_l, pos, lens, slots = [], [], [], []
        for ids, p, s in seqs:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            ids_l.append(ids)
            pos.append(int(p))
            lens.append(ids.shape[0])
            slots.append(int(s))
        B = len(seqs)
        if B < 1 or min(lens) < 1 or len(set(slots)) != B:
            raise ValueError("forward_step needs >= 1 sequence, each with >= 1 token, in distinct slots")
        ids = np.concatenate(ids_l)
        self._check(ids, pos, lens, slots)
        x = np.ascontiguousarray(self._embed(ids))                      # [sum(lens), D]
        cl = (ctypes.c_int64 * B)(*lens)
        ps = (ctypes.c_int64 * B)(*pos)
        offs = [s * self._slot_bytes for s in slots]
        for li, sp in enumerate(self._struct_p):
            ck = (ctypes.c_void_p * B)(*[self._ck_p[li] + o for o in offs])
            cv = (ctypes.c_void_p * B)(*[self._cv_p[li] + o for o in offs])
            st = self._batch_fn(sp, x.ctypes.data, B, cl, ps, self._cos_p, self._sin_p,
                                self.max_len, ck, cv, self.max_len)
            self._raise(st, li)
        if logit_rows is None:
            logit_rows = np.cumsum(lens) - 1
        rows = np.asarray(logit_rows, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return np.empty((0, self.config.vocab_size), np.float32)
        return self._finite(self._logits(np.ascontiguousarray(x[rows])))

    def forward_seqs(self, seqs, positions, slots, all_rows=None) -> list[np.ndarray]:
        """``forward_step`` for scoring: token ids ``seqs[i]`` [T_i] at positions
        ``positions[i]``.. of sequence ``slots[i]`` (distinct slots), in one step (a prefill of
        many prompts, or many continuations scored after a shared context). Returns per sequence
        float32 logits: [T_i, V] where ``all_rows[i]`` is true, else [V] of its last token.
        Bit-identical to ``forward`` of each sequence alone (per-row quantization, exact integer
        GEMM, attention per sequence)."""
        seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
        B = len(seqs)
        all_rows = [False] * B if all_rows is None else [bool(a) for a in all_rows]
        if B < 1 or len(positions) != B or len(slots) != B or len(all_rows) != B \
                or any(len(s) < 1 for s in seqs):
            raise ValueError("forward_seqs needs non-empty sequences with one position, one "
                             "distinct slot and one all_rows flag each")
        lens = [len(s) for s in seqs]
        ends = np.cumsum(lens)
        rows = np.concatenate([np.arange(e - n, e) if a else [e - 1]
                               for e, n, a in zip(ends, lens, all_rows)])
        logits = self.forward_step(list(zip(seqs, positions, slots)), rows)   # [rows, V]
        out, r = [], 0
        for n, a in zip(lens, all_rows):
            out.append(logits[r:r + n] if a else logits[r])
            r += n if a else 1
        return out

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Make sequence ``dst`` hold the first ``length`` cached positions of sequence ``src``
        (a context prefilled once, then continued several ways)."""
        if not (0 <= src < self.slots and 0 <= dst < self.slots) or not 0 <= length <= self.max_len:
            raise ValueError(f"copy_slot({src}, {dst}, {length}): slots are 0..{self.slots - 1} "
                             f"and lengths 0..{self.max_len}")
        for cache in (*self.cache_k, *self.cache_v):
            if self.kv_bits == 32:                       # [slots, Hkv, max_len, hd]
                cache[dst, :, :length] = cache[src, :, :length]
            else:                                        # quantized: the slot's whole block
                cache[dst] = cache[src]

    def _check(self, ids: np.ndarray, pos: list[int], lens: list[int], slots: list[int]) -> None:
        V = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"token ids must be in [0, {V}), got {int(ids.min())}..{int(ids.max())}")
        if not self.max_len:
            self.reset()
        for p, n, s in zip(pos, lens, slots):
            if not 0 <= s < self.slots:
                raise ValueError(f"slot {s} does not exist: reset(max_len, slots) holds {self.slots}")
            if p < 0 or p + n > self.max_len:
                raise ValueError(f"positions {p}..{p + n - 1} do not fit the KV cache of "
                                 f"{self.max_len}; call reset(max_len) with a larger max_len")

    def _finite(self, logits: np.ndarray) -> np.ndarray:
        if not np.isfinite(logits).all():  # V floats per row: cheap next to the LM head itself
            raise EngineError(f"'{self.folder}': the logits are NaN/inf: weights out of float range "
                              f"(the file is corrupt); re-export the model")
        return logits

    def _raise(self, st: int, li: int) -> None:
        if st:
            raise EngineError(f"'{self.folder}': layer {li} failed (kernel status {st}): "
                              + ("NaN/inf activations" if st == -7 else "see onebit_kernels.h"))
