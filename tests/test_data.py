import json
import os
import pathlib

import numpy as np
import pytest
import torch

from onebit import data
from onebit.data import (BOS_TOKEN, EOS_TOKEN, DataConfig, DataError, Document, eval_windows,
                         load_tokenizer, prepare_data, read_documents, sample_batch, special_ids,
                         split_documents, train_tokenizer)
from conftest import SHARED_DATA

SHARED = SHARED_DATA
TOKENIZERS = SHARED / "tokenizers"
needs_shared_tokenizers = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason="shared tokenizers absent")

HEADER = "The Project Gutenberg eBook of X\nLicense blah\n"
FOOTER = "\nEnd of the Project Gutenberg EBook\nLicense text that must go\n"
WORDS = ("the cat sat on a mat while the dog ran over hills and rivers under a bright sky "
         "near old towers of stone where birds sing songs about wind rain and summer light").split()


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def _story(i: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(i)
    words = [WORDS[j] for j in rng.integers(0, len(WORDS), n_words)]
    return f"Story {i}.\n" + " ".join(words[:n_words // 2]) + ".\n" + " ".join(words[n_words // 2:]) + ".\n"


def _corpus(folder: pathlib.Path, n: int = 30) -> pathlib.Path:
    for i in range(n):
        _write(folder / f"doc{i:02d}.txt", _story(i))
    return folder


# --- reading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("article", ["THE", "THIS", "the"])
def test_gutenberg_header_and_footer_stripped(tmp_path, article):
    body = "Chapter 1\r\n\r\nIt was a dark night.\r\n"
    text = (HEADER + f"*** START OF {article} PROJECT GUTENBERG EBOOK SOME BOOK ***\r\n" + body
            + f"*** END OF {article} PROJECT GUTENBERG EBOOK SOME BOOK ***" + FOOTER)
    docs = read_documents([_write(tmp_path / "book.txt", text)])
    assert docs == [Document("book.txt", "Chapter 1\n\nIt was a dark night.")]


def test_text_without_markers_kept_whole(tmp_path):
    text = "First line\r\nmentions *** START OF THE PROJECT GUTENBERG EBOOK mid-line\nlast\n"
    docs = read_documents(_write(tmp_path / "plain.txt", text))
    assert docs == [Document("plain.txt", text.replace("\r\n", "\n").strip())]


def test_invalid_utf8_is_replaced(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bytes")
    assert read_documents(tmp_path / "bad.txt")[0].text == "ok \ufffd\ufffd bytes"


def test_folder_order_recursion_and_exclude(tmp_path):
    _write(tmp_path / "b.txt", "bee")
    _write(tmp_path / "a.txt", "ay")
    _write(tmp_path / "sub" / "c.txt", "sea")
    _write(tmp_path / "SOURCE.txt", "source notes")
    _write(tmp_path / "README.txt", "readme")
    _write(tmp_path / "LICENSE.txt", "license")
    _write(tmp_path / "notes.md", "not a txt")
    _write(tmp_path / "empty.txt", " \n\n")
    docs = read_documents([tmp_path])
    assert [d.name for d in docs] == ["a.txt", "b.txt", "sub/c.txt"]
    assert [d.text for d in docs] == ["ay", "bee", "sea"]
    only_b = read_documents([tmp_path], exclude=("a*", "c.txt", "SOURCE.txt", "README*", "LICENSE*"))
    assert [d.name for d in only_b] == ["b.txt"]


def test_endoftext_separated_file_gives_one_document_per_piece(tmp_path):
    text = "Once there was a cat.<|endoftext|>\nA dog barked.\n<|endoftext|>\n\n<|endoftext|>The end."
    docs = read_documents(_write(tmp_path / "stories.txt", text))
    assert docs == [Document("stories.txt#0", "Once there was a cat."),
                    Document("stories.txt#1", "A dog barked."),
                    Document("stories.txt#2", "The end.")]


@pytest.mark.skipif(not (SHARED / "gutenberg").is_dir(), reason="shared gutenberg absent")
def test_real_gutenberg_book_is_stripped():
    (doc,) = read_documents(SHARED / "gutenberg" / "alice_in_wonderland.txt")
    assert doc.name == "alice_in_wonderland.txt"
    assert "gutenberg" not in doc.text.lower()
    assert "Down the Rabbit-Hole" in doc.text[:1000] and doc.text.endswith("THE END")


# --- splitting -------------------------------------------------------------------------------------


def test_split_is_deterministic_order_independent_and_disjoint():
    docs = [Document(f"d{i}.txt", f"text {i}") for i in range(50)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 5 and len(train) == 45
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert sorted(d.name for d in train + val) == sorted(d.name for d in docs)
    rng = np.random.default_rng(0)
    shuffled = [docs[i] for i in rng.permutation(len(docs))]
    assert split_documents(shuffled, 0.1) == (train, val)
    assert split_documents(list(reversed(docs)), 0.1) == (train, val)
    # a larger val_fraction extends the same ranking: the smaller val set is a subset of it
    assert set(val) < set(split_documents(docs, 0.3)[1])


def test_split_of_tiny_corpus_keeps_one_val_document():
    train, val = split_documents([Document("a", "x"), Document("b", "y"), Document("c", "z")], 0.01)
    assert len(val) == 1 and len(train) == 2


def test_single_document_is_cut_into_line_pieces():
    text = "".join(f"line number {i} with some words\n" for i in range(100)).strip()
    train, val = split_documents([Document("only.txt", text)], 0.05)
    pieces = train + val
    assert len(pieces) == 20 and len(val) == 1
    assert all(p.name.startswith("only.txt@") for p in pieces)
    ordered = sorted(pieces, key=lambda p: int(p.name.split("@")[1]))
    assert "".join(p.text for p in ordered) == text
    assert all(p.text.endswith("\n") for p in ordered[:-1])  # cut at line boundaries
    assert split_documents([Document("only.txt", text)], 0.05) == (train, val)


def test_split_errors():
    with pytest.raises(DataError, match="leaves none for training"):
        split_documents([Document("a", "x"), Document("b", "y")], 0.9)
    with pytest.raises(DataError, match="leaves none for training"):
        split_documents([Document("one-line", "no newline at all")], 0.05)
    with pytest.raises(DataError, match="val_fraction"):
        split_documents([Document("a", "x"), Document("b", "y")], 0.0)


# --- tokenizers ------------------------------------------------------------------------------------


def test_train_tokenizer_is_deterministic_and_round_trips():
    texts = [_story(i, 200) for i in range(40)]
    tok = train_tokenizer(texts, 400)
    assert tok.to_str() == train_tokenizer(list(texts), 400).to_str()
    assert tok.get_vocab_size() == 400
    assert tok.token_to_id(BOS_TOKEN) == 0 and tok.token_to_id(EOS_TOKEN) == 1
    assert special_ids(tok) == (0, 1)
    for s in [texts[0], "  leading spaces\n\n\ttabs", "héllo wörld — 日本語 🙂 Ω≈ç√", "\r\nodd\x00bytes"]:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids) == s
    assert len(tok.encode(texts[0]).ids) < len(texts[0].encode()) / 2  # merges were learned


@needs_shared_tokenizers
@pytest.mark.parametrize("name,bos,eos", [("gpt2", 50256, 50256), ("llama2", 1, 2),
                                          ("llama3", 128000, 128001), ("tok512", 1, 2)])
def test_shared_tokenizers_load_with_special_ids(name, bos, eos):
    tok = load_tokenizer(TOKENIZERS / name / "tokenizer.json")
    assert special_ids(tok) == (bos, eos)
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False).ids).strip() == "Hello world"


@needs_shared_tokenizers
def test_load_tokenizer_from_folder():
    assert load_tokenizer(TOKENIZERS / "tok512").get_vocab_size() == 512


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path)  # folder without tokenizer.json
    _write(tmp_path / "tokenizer.json", '{"version": "1.0", "model": {"type": "Bogus"')
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    _write(tmp_path / "tokenizer.json", '{"hello": 1}')
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


# --- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"tokenizer": "bpe:abc"}, "tokenizer"), ({"tokenizer": "bpe:100"}, "tokenizer"),
    ({"tokenizer": ""}, "tokenizer"), ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 1.0}, "val_fraction"), ({"seq_len": 1}, "seq_len"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(DataError, match=f"DataConfig.{field}"):
        DataConfig(**kwargs)


def test_config_normalises_paths_and_round_trips():
    cfg = DataConfig(paths=["a", "b"], tokenizer="bpe:512")
    assert cfg.paths == ("a", "b") and hash(cfg)
    assert DataConfig(paths="corpus.txt").paths == ("corpus.txt",)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


# --- prepare_data ----------------------------------------------------------------------------------


def _cfg(tmp_path, **kw):
    base = dict(paths=(str(tmp_path / "corpus"),), tokenizer="bpe:300", val_fraction=0.1, seq_len=8,
                cache_dir=str(tmp_path / "cache"))
    return DataConfig(**{**base, **kw})


def test_prepare_data_writes_cache_with_documents_framed_by_specials(tmp_path):
    _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path)
    pd = prepare_data(cfg)
    assert pd.train.dtype == np.uint16 and pd.val.dtype == np.uint16
    assert not pd.train.flags.writeable and not pd.val.flags.writeable
    assert (pd.bos_id, pd.eos_id) == (0, 1) and pd.vocab_size == pd.tokenizer.get_vocab_size() <= 300
    assert pd.cache_path.parent == pathlib.Path(cfg.cache_dir)
    assert sorted(os.listdir(pd.cache_path)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    meta = json.loads((pd.cache_path / "meta.json").read_text())
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(pd.train), len(pd.val))
    assert (meta["train_documents"], meta["val_documents"]) == (27, 3)
    # every document is [bos] ids [eos]; val decodes back to exactly the held-out documents
    for arr, n_docs in ((pd.train, 27), (pd.val, 3)):
        assert arr[0] == 0 and arr[-1] == 1
        assert (arr == 0).sum() == n_docs and (arr == 1).sum() == n_docs
    val_texts = sorted(pd.tokenizer.decode(list(map(int, piece))) for piece in
                       np.split(np.asarray(pd.val), np.flatnonzero(pd.val == 0)[1:]))
    _, val_docs = split_documents(read_documents(cfg.paths), cfg.val_fraction)
    assert val_texts == sorted(d.text for d in val_docs)
    assert [d.name for d in val_docs] == meta["val_names"]


def test_prepare_data_reuses_cache_and_invalidates_on_change(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path)
    first = prepare_data(cfg)
    train_copy = np.array(first.train)

    def no_encoding(*args, **kwargs):
        raise AssertionError("cache should have been reused")

    with monkeypatch.context() as m:
        m.setattr(data, "encode_documents", no_encoding)
        m.setattr(data, "train_tokenizer", no_encoding)
        again = prepare_data(cfg)
        again_longer = prepare_data(_cfg(tmp_path, seq_len=16))  # seq_len is not part of the key
    assert again.cache_path == first.cache_path == again_longer.cache_path
    np.testing.assert_array_equal(again.train, train_copy)
    assert again.tokenizer.to_str() == first.tokenizer.to_str()

    _write(corpus / "doc03.txt", _story(3) + "A new sentence appears.\n")
    changed = prepare_data(cfg)
    assert changed.cache_path != first.cache_path
    other_split = prepare_data(_cfg(tmp_path, val_fraction=0.2))
    assert other_split.cache_path not in (first.cache_path, changed.cache_path)
    assert sorted(p.name for p in pathlib.Path(cfg.cache_dir).iterdir()) == sorted(
        p.cache_path.name for p in (first, changed, other_split))  # no temp folders left behind


def test_prepare_data_rebuilds_a_damaged_cache(tmp_path):
    _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path)
    first = prepare_data(cfg)
    n = len(first.train)
    del first
    with open(next(pathlib.Path(cfg.cache_dir).iterdir()) / "train.bin", "r+b") as f:
        f.truncate(10)
    again = prepare_data(cfg)
    assert len(again.train) == n


def test_losing_the_install_race_keeps_the_other_cache(tmp_path, monkeypatch):
    # Another rank installs the same cache while this one is still writing: keep theirs, no error.
    _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path)
    theirs = prepare_data(cfg)
    real, calls = data._read_meta, []

    def first_lookup_misses(folder, key):
        calls.append(folder)
        return None if len(calls) == 1 else real(folder, key)

    monkeypatch.setattr(data, "_read_meta", first_lookup_misses)
    ours = prepare_data(cfg)
    assert ours.cache_path == theirs.cache_path and len(calls) > 2
    assert [p.name for p in pathlib.Path(cfg.cache_dir).iterdir()] == [theirs.cache_path.name]


def test_crash_while_writing_leaves_no_cache(tmp_path, monkeypatch):
    _corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path)
    real = data.encode_documents
    calls = []

    def crash_on_val(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # train.bin is written, val.bin is being written
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "encode_documents", crash_on_val)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_data(cfg)
    assert list(pathlib.Path(cfg.cache_dir).iterdir()) == []
    monkeypatch.setattr(data, "encode_documents", real)
    assert len(prepare_data(cfg).val) > 0


@needs_shared_tokenizers
def test_prepare_data_with_loaded_tokenizers(tmp_path):
    _corpus(tmp_path / "corpus")
    small = prepare_data(_cfg(tmp_path, tokenizer=str(TOKENIZERS / "tok512")))
    assert small.train.dtype == np.uint16 and (small.bos_id, small.eos_id) == (1, 2)
    assert small.train[0] == 1 and small.vocab_size == 512
    big = prepare_data(_cfg(tmp_path, tokenizer=str(TOKENIZERS / "llama3" / "tokenizer.json")))
    assert big.train.dtype == np.uint32 and big.train[0] == 128000 and big.train[-1] == 128001
    assert small.cache_path != big.cache_path


# --- DataError cases -------------------------------------------------------------------------------


def test_missing_path_error(tmp_path):
    with pytest.raises(DataError, match="corpus path '.*nowhere' does not exist"):
        read_documents([tmp_path / "nowhere"])
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(_cfg(tmp_path, paths=(str(tmp_path / "nowhere"),)))


def test_empty_corpus_error(tmp_path):
    _write(tmp_path / "blank.txt", "\n  \n")
    _write(tmp_path / "header_only.txt",
           "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***")
    with pytest.raises(DataError, match="contain no text"):
        read_documents([tmp_path / "blank.txt", tmp_path / "header_only.txt"])
    with pytest.raises(DataError, match="no corpus paths"):
        prepare_data(DataConfig(cache_dir=str(tmp_path / "cache")))


def test_empty_folder_error(tmp_path):
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty" / "README.txt", "excluded")
    with pytest.raises(DataError, match="holds no \\*.txt files"):
        read_documents([tmp_path / "empty"])


def test_too_little_val_text_error(tmp_path):
    _corpus(tmp_path / "corpus", n=10)
    with pytest.raises(DataError, match="raise val_fraction or lower seq_len"):
        prepare_data(_cfg(tmp_path, seq_len=512))  # train has ~1300 tokens, val ~130
    with pytest.raises(DataError, match="train split .* add more text or lower seq_len"):
        prepare_data(_cfg(tmp_path, seq_len=512, val_fraction=0.9))


def test_bad_tokenizer_path_error(tmp_path):
    _corpus(tmp_path / "corpus", n=4)
    with pytest.raises(DataError, match="not found"):
        prepare_data(_cfg(tmp_path, tokenizer=str(tmp_path / "missing_tok")))


# --- batches ---------------------------------------------------------------------------------------


def test_sample_batch_is_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(tokens, 16, 8, seed=3, step=7)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    x2, y2 = sample_batch(tokens, 16, 8, seed=3, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sample_batch(tokens, 16, 8, seed=3, step=8)[0])
    assert not torch.equal(x, sample_batch(tokens, 16, 8, seed=4, step=7)[0])
    assert torch.equal(y, x + 1)  # contiguous windows of arange, y = next token
    assert torch.equal(x[:, 1:], y[:, :-1])
    # offsets follow the documented generator, so any process can recompute the global batch
    offsets = np.random.default_rng([3, 7]).integers(0, 1000 - 16 - 1, size=8, endpoint=True)
    assert torch.equal(x[:, 0], torch.from_numpy(offsets))


def test_sample_batch_uses_the_whole_range():
    tokens = np.arange(6, dtype=np.uint32)  # seq_len 4: offsets 0 or 1 only
    x, y = sample_batch(tokens, 4, 200, seed=0, step=0)
    assert set(x[:, 0].tolist()) == {0, 1} and int(y.max()) == 5
    with pytest.raises(DataError, match="too few"):
        sample_batch(tokens, 6, 1, seed=0, step=0)


def test_eval_windows():
    tokens = np.arange(101, dtype=np.uint16)
    x, y = eval_windows(tokens, 10)
    assert x.shape == (10, 10) and x.dtype == torch.int64
    assert torch.equal(x.flatten(), torch.arange(100)) and torch.equal(y.flatten(), torch.arange(1, 101))
    assert eval_windows(tokens, 10, max_tokens=25)[0].shape == (2, 10)
    assert eval_windows(tokens, 10, max_tokens=3)[0].shape == (1, 10)
    assert eval_windows(np.arange(100), 10)[0].shape == (9, 10)  # last window needs one more target
