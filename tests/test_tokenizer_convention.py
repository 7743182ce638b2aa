"""Prompts start the way the tokenizer says (tokenizer_convention.py), checked against transformers
text in, text out: greedy ``model.generate(**tok(text))`` on a random BitNet built offline vs
``onebit.load(folder).generate(text)`` / ``onebit generate`` on the same weights, for a tokenizer
that adds BOS (Llama-3) and two that add none (GPT-2, a Qwen2-style one); chat templates that
render {{ bos_token }} get no second BOS; onebit's own models keep the BOS they were trained with."""

import json
import os

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' bitnet code is @torch.compile'd
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is the oracle")

import onebit
from onebit.engine import BITNET_CHAT_TEMPLATE, default_model_path
from onebit.tokenizer_convention import (BosConvention, bos_convention, declare_bos, encode_prompt,
                                         post_processor_prefix)
from conftest import SHARED_DATA
from tokenizers import Tokenizer

TOKS = SHARED_DATA / "tokenizers"
TEXT = "Once upon a time, the little"


def _tokenizer_files(name: str) -> dict[str, bytes]:
    if name == "qwen2":  # Qwen2's convention: byte-level BPE, no post-processor, no BOS at all
        j = json.loads((TOKS / "gpt2" / "tokenizer.json").read_text(encoding="utf-8"))
        j["post_processor"] = None
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
              "eos_token": "<|endoftext|>", "add_bos_token": False}
        return {"tokenizer.json": json.dumps(j).encode(), "tokenizer_config.json": json.dumps(tc).encode()}
    return {f: (TOKS / name / f).read_bytes() for f in ("tokenizer.json", "tokenizer_config.json")}


def _bitnet_folder(folder, files: dict[str, bytes], seed: int = 7):
    """A random BitNet b1.58 (2B4T layout, latent weights) with these tokenizer files. Projections
    large enough that attention and the MLP shape the output (tiny ones only echo the input)."""
    tok = Tokenizer.from_str(files["tokenizer.json"].decode())
    tc = json.loads(files["tokenizer_config.json"])
    eos = tok.token_to_id(tc["eos_token"])
    bos = tok.token_to_id(tc["bos_token"]) if tc.get("bos_token") else eos
    cfg = transformers.BitNetConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, hidden_act="relu2",
        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, rms_norm_eps=1e-5)
    model = transformers.BitNetForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            std, mean = (0.2, 1.0) if "norm" in n else (1.0, 0.0) if "embed" in n else (0.3, 0.0)
            p.copy_(mean + std * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(folder))
    c = json.loads((folder / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online"}
    (folder / "config.json").write_text(json.dumps(c))
    for f, b in files.items():
        (folder / f).write_bytes(b)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = os.environ.get("ONEBIT_CACHE")
    os.environ["ONEBIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("ONEBIT_CACHE")
    else:
        os.environ["ONEBIT_CACHE"] = old


@pytest.mark.parametrize("name", ["llama3", "gpt2", "qwen2"])
def test_generate_equals_transformers(name, tmp_path, cache, capsys):
    folder = _bitnet_folder(tmp_path / name, _tokenizer_files(name))
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    enc = tok(TEXT, return_tensors="pt")
    n = enc.input_ids.shape[1]
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    theirs = out.sequences[0, n:].tolist()
    # the premise: every greedy step is decided by far more than engine-vs-torch float noise
    gaps = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
    assert min(gaps) > 0.05

    m = onebit.load(folder)  # imported once into the cache, then the engine
    assert m.encode(TEXT) == enc.input_ids[0].tolist()
    assert (m.bos_convention.add_bos, name) in ((True, "llama3"), (False, "gpt2"), (False, "qwen2"))
    assert list(m.generate_ids(m.encode(TEXT), 8, temperature=0)) == theirs
    seq = out.sequences[0].tolist()  # and the same function at every position (RoPE included)
    with torch.no_grad():
        ref = model(out.sequences).logits[0].double().numpy()
    assert abs(m.logits(seq) - ref).max() < 1e-3 * abs(ref).max()  # wrong RoPE theta: 0.1
    text = tok.decode(theirs, skip_special_tokens=True)
    assert m.generate(TEXT, max_new_tokens=8, temperature=0) == text
    if name == "gpt2":  # and the command line, text in and text out
        from onebit.cli import main
        capsys.readouterr()
        assert main(["generate", TEXT, "--model", str(folder), "--max-new-tokens", "8",
                     "--temperature", "0", "--quiet"]) == 0
        assert capsys.readouterr().out == TEXT + text + "\n"
    if name == "llama3":  # a chat template rendering {{ bos_token }}: one BOS, as transformers
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        ref = tok.apply_chat_template(msgs, chat_template=BITNET_CHAT_TEMPLATE,
                                      add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if not isinstance(ref, list) else ref
        ids = m.chat_ids(msgs)
        assert ids == list(ref) and ids.count(128000) == 1 and ids[0] == 128000


def test_convention_rules():
    """The order of the rule (tokenizer_config add_bos_token, post-processor, onebit folder)."""
    l3 = Tokenizer.from_file(str(TOKS / "llama3" / "tokenizer.json"))
    g2 = Tokenizer.from_file(str(TOKS / "gpt2" / "tokenizer.json"))
    assert post_processor_prefix(l3) == (128000,) and post_processor_prefix(g2) == ()
    assert bos_convention(l3).prefix == (128000,)
    assert bos_convention(l3, {"add_bos_token": False}).prefix == ()       # Llama-2 style override
    assert bos_convention(g2, {"add_bos_token": True, "bos_token": "<|endoftext|>"}).prefix == (50256,)
    assert bos_convention(g2, onebit_folder=True, bos_id=50256).prefix == (50256,)  # trained so
    assert bos_convention(g2, {"add_bos_token": False}, onebit_folder=True, bos_id=50256).prefix == ()
    bare = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))   # no post-processor
    assert post_processor_prefix(bare) is None
    assert bos_convention(bare, bos_id=0).prefix == ()
    assert bos_convention(bare, onebit_folder=True, bos_id=0).prefix == (0,)  # trained with BOS
    # never a second BOS: a text that starts with it (a rendered chat template) keeps one
    conv = BosConvention((128000,), "test")
    assert encode_prompt(l3, "<|begin_of_text|>Hi", conv) == encode_prompt(l3, "Hi", conv) == [128000, 13347]
    # declaring a convention writes it into the post-processor, where transformers reads it
    assert post_processor_prefix(declare_bos(bare, (0,))) == (0,)
    assert bare.encode("Once").ids[0] == 0
    assert post_processor_prefix(declare_bos(bare, ())) == ()


def test_builtin_model_keeps_its_training_bos():
    """The built-in model was trained with BOS before every document and its tokenizer declares
    nothing: it still gets exactly one BOS, so its greedy output is what it always was."""
    m = onebit.load(default_model_path())
    raw = m.tokenizer.encode("Once upon a time", add_special_tokens=False).ids
    assert m.encode("Once upon a time") == [m.config.bos_token_id] + raw
    assert m.encode("Once upon a time", add_bos=False) == raw
    assert m.chat_ids([{"role": "user", "content": "Hi"}]).count(m.config.bos_token_id) == 1
    ids = [m.config.bos_token_id] + raw
    assert m.generate("Once upon a time", max_new_tokens=12, temperature=0) == \
        m.decode(list(m.generate_ids(ids, 12, temperature=0)))


def test_onebit_model_exported_to_hf_tells_transformers_its_bos(tmp_path, cache):
    """convert writes the convention into the files (tokenizer.json post-processor and
    tokenizer_config.json add_bos_token), so transformers encodes the built-in model's prompts
    with the BOS it was trained with."""
    from onebit.formats.convert import convert
    out = convert(default_model_path(), tmp_path / "hf", "hf")["output"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    m = onebit.load(default_model_path())
    assert tok("Once upon a time")["input_ids"] == m.encode("Once upon a time")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert onebit.load(out).encode("Once upon a time") == m.encode("Once upon a time")


def test_training_documents_start_as_the_tokenizer_says(tmp_path):
    """data.py's BOS before every document (onebit train / finetune): the tokenizer's convention
    when it states one, onebit's BOS for tokenizers that state nothing (its own bpe:N)."""
    from onebit.data import DataConfig, document_bos, prepare_data
    l3 = Tokenizer.from_file(str(TOKS / "llama3" / "tokenizer.json"))
    g2 = Tokenizer.from_file(str(TOKS / "gpt2" / "tokenizer.json"))
    bare = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    assert document_bos(l3) == 128000 and document_bos(g2) is None and document_bos(bare) == 0
    qwen = _tokenizer_files("qwen2")
    for f, b in qwen.items():
        (tmp_path / f).write_bytes(b)
    qt = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert document_bos(qt) == 50256  # nothing stated in tokenizer.json alone: <|endoftext|>
    assert document_bos(qt, json.loads(qwen["tokenizer_config.json"])) is None
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("Once upon a time there was a story. " * 400)
    (tmp_path / "corpus" / "b.txt").write_text("The end came soon after that, they said. " * 400)
    pd = prepare_data(DataConfig(paths=[str(tmp_path / "corpus")], tokenizer=str(tmp_path),
                                 seq_len=16, val_fraction=0.5, cache_dir=str(tmp_path / "cache")))
    assert pd.bos_id is None and pd.train[0] != 50256 and pd.train[-1] == 50256
