"""Every command that writes (export, convert to every target, finetune --export, train's out_dir)
follows one rule (onebit.destination.check_destination): never the source or a folder holding it,
never files onebit did not write, an earlier onebit output only with --force; temps of killed
writes are cleaned; files get the user's umask; an unwritable destination is a one-line error."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from onebit.atomic import DestinationError, atomic_write_text, clean_stale, write_dir_atomic
from onebit.cli import main
from onebit.config import ModelConfig
from onebit.destination import check_destination, onebit_output
from onebit.engine import default_model_path
from onebit.engine.synth import write_random_model
from conftest import SHARED_DATA

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
GGUF = pytest.importorskip("gguf", reason="the gguf package (dev extra) writes the GGUF files")


def _train_args(corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "--model.preset=tiny", "--model.max_position_embeddings=64", f"--data.paths={corpus}",
            "--data.tokenizer=bpe:300", "--data.seq_len=32", "--data.val_fraction=0.25",
            f"--data.cache_dir={cache}", "--train.steps=2", "--train.ckpt_every=1", "--train.batch_size=4",
            "--train.eval_every=2", "--train.eval_tokens=256", "--train.progress=false",
            "--train.tensorboard=false", f"--train.out_dir={out}", "--train.threads=1", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny trained b1.58 run (2 steps, a checkpoint at each), trained under umask 022."""
    root = tmp_path_factory.mktemp("dest")
    corpus = root / "corpus"
    corpus.mkdir()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:40_000]
    for i in range(4):
        (corpus / f"p{i}.txt").write_text(text[i * 10_000:(i + 1) * 10_000], encoding="utf-8")
    old = os.umask(0o022)
    try:
        assert main(_train_args(corpus, root / "run", root / "cache")) == 0
    finally:
        os.umask(old)
    return {"root": root, "run": root / "run", "corpus": corpus, "cache": root / "cache"}


def _packed(folder: Path, vocab_size: int = 8192) -> Path:
    """A small random packed model with a tokenizer (GGUF-exportable: rows of 256)."""
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      hidden_act="silu", tie_word_embeddings=True, norm_placement="subln")
    out = write_random_model(folder, cfg, embedding="f16", seed=3)
    shutil.copy(default_model_path() / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    return _packed(tmp_path_factory.mktemp("packed") / "m")


def _snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and '<dir>' for folders) under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = ("<dir>" if p.is_dir() else
                                           hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _convert(src, dst, to, *extra) -> int:
    return main(["convert", str(src), str(dst), "--to", to, "--no-verify", *extra])


# --------------------------------------------------------------------------------------------
# Folders holding files onebit did not write
# --------------------------------------------------------------------------------------------

def test_user_files_beside_an_onebit_output_are_kept(run, packed, tmp_path, capsys):
    """An earlier export with a user file added is no longer onebit's: refused even with --force."""
    dst = tmp_path / "packed"
    assert main(["export", str(run["run"]), str(dst)]) == 0
    (dst / "notes.txt").write_text("my notes")
    before = _snapshot(dst)
    for force in ([], ["--force"]):
        assert main(["export", str(run["run"]), str(dst), *force]) == 2
        line = _err(capsys)
        assert "onebit did not write" in line and "notes.txt" in line, line
        assert _convert(packed, dst, "onebit", *force) == 2
        assert "notes.txt" in _err(capsys)
    assert _snapshot(dst) == before
    assert onebit_output(dst) is None


def test_unrelated_non_empty_folder_is_refused_and_intact(run, packed, tmp_path, capsys):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("a")
    (docs / "sub" / "b.bin").write_bytes(b"\0" * 10)
    before = _snapshot(docs)
    for argv in (["export", str(run["run"]), str(docs)], ["export", str(run["run"]), str(docs), "--force"],
                 ["convert", str(packed), str(docs), "--to", "hf", "--force"],
                 ["convert", str(packed), str(docs), "--to", "onebit"]):
        assert main(argv) == 2
        line = _err(capsys)
        assert f"'{docs}'" in line and "a.txt, sub/" in line and "nothing was written" in line, line
    assert _snapshot(docs) == before
    # train and finetune refuse it as out_dir before writing anything (finetune: before loading --from)
    assert main(_train_args(run["corpus"], docs, run["cache"])) == 2
    assert "not an onebit run" in _err(capsys)
    assert main(["finetune", "--from", str(run["run"]), f"--data.paths={run['corpus']}",
                 f"--train.out_dir={docs}"]) == 2
    assert "not an onebit run" in _err(capsys)
    assert _snapshot(docs) == before


def test_destination_equal_to_the_source_is_refused(run, packed, capsys):
    """The training run (weights and optimizer state) survives every spelling of itself."""
    r = run["run"]
    before = _snapshot(r)
    assert any(k.endswith("trainer_state.safetensors") for k in before)
    for dst in (str(r), str(r) + "/", str(r / ".." / r.name), str(r / "checkpoints" / "..")):
        for force in ([], ["--force"]):
            assert main(["export", str(r), dst, *force]) == 2
            assert "is the source" in _err(capsys)
    assert main(["export", str(r / "model"), str(r / "model"), "--force"]) == 2
    assert "is the source" in _err(capsys)
    assert _snapshot(r) == before
    # convert: a folder onto itself, a GGUF file onto itself
    p_before = _snapshot(packed)
    assert _convert(packed, str(packed) + "/", "onebit", "--force") == 2
    assert "is the source" in _err(capsys)
    assert _snapshot(packed) == p_before


def test_destination_holding_the_source_is_refused(run, packed, tmp_path, capsys):
    r = run["run"]
    before = _snapshot(r)
    assert main(["export", str(r / "model"), str(r), "--force"]) == 2
    assert "holds the source" in _err(capsys)
    assert _snapshot(r) == before
    par = tmp_path / "par"
    shutil.copytree(packed, par / "m")
    p_before = _snapshot(par)
    assert _convert(par / "m", par, "onebit", "--force") == 2
    assert "holds the source" in _err(capsys)
    assert _convert(par / "m", par / "m" / "..", "hf", "--force") == 2
    assert "holds the source" in _err(capsys)
    assert _snapshot(par) == p_before


def test_symlink_to_the_source_is_refused(run, packed, tmp_path, capsys):
    r = run["run"]
    before = _snapshot(r)
    link = tmp_path / "link"
    link.symlink_to(r, target_is_directory=True)
    assert main(["export", str(r), str(link), "--force"]) == 2
    assert "is the source" in _err(capsys)
    # a folder whose parent is a symlink to the source's parent
    up = tmp_path / "up"
    up.symlink_to(r.parent, target_is_directory=True)
    assert main(["export", str(r / "model"), str(up / r.name), "--force"]) == 2
    assert "holds the source" in _err(capsys)
    assert _snapshot(r) == before
    # a symlink to anything else is refused too: onebit would replace the link, not its target
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "olink").symlink_to(other, target_is_directory=True)
    assert _convert(packed, tmp_path / "olink", "onebit", "--force") == 2
    assert "symbolic link" in _err(capsys)
    assert (tmp_path / "olink").is_symlink()


def test_existing_files_are_refused(run, packed, tmp_path, capsys):
    mine = tmp_path / "model.gguf"
    mine.write_bytes(b"GGUF my own bytes")
    text = tmp_path / "notes.txt"
    text.write_text("keep")
    for force in ([], ["--force"]):
        assert _convert(packed, mine, "gguf-tq2_0", *force) == 2
        assert "existing file onebit did not write" in _err(capsys)
        for to in ("onebit", "hf"):
            assert _convert(packed, text, to, *force) == 2
            assert "is an existing file" in _err(capsys)
        assert main(["export", str(run["run"]), str(text), *force]) == 2
        assert "is an existing file" in _err(capsys)
    assert mine.read_bytes() == b"GGUF my own bytes" and text.read_text() == "keep"
    # a folder where a GGUF file goes
    (tmp_path / "dir").mkdir()
    assert _convert(packed, tmp_path / "dir", "gguf-i2_s") == 2
    assert "is a folder" in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "model.gguf", "notes.txt"]


@pytest.mark.parametrize("to", ["onebit", "hf", "gguf-tq2_0"])
def test_earlier_onebit_output_needs_force(packed, tmp_path, capsys, to):
    dst = tmp_path / ("out.gguf" if to.startswith("gguf") else "out")
    if dst.suffix != ".gguf":
        dst.mkdir()  # an empty folder is written without --force
    assert _convert(packed, dst, to) == 0
    capsys.readouterr()
    kind = onebit_output(dst)
    assert kind == {"onebit": "packed", "hf": "hf", "gguf-tq2_0": "gguf"}[to]
    before = _snapshot(tmp_path)
    assert _convert(packed, dst, to) == 2
    line = _err(capsys)
    assert "pass --force" in line, line
    if dst.is_dir():
        assert "config.json, model.safetensors" in line, line  # what would be replaced
    assert _snapshot(tmp_path) == before
    assert _convert(packed, dst, to, "--force") == 0
    out = capsys.readouterr().out
    assert f"replaced the earlier onebit output at {dst} (" in out and (
        dst.is_file() or "model.safetensors" in out), out
    assert onebit_output(dst) == kind
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name]  # no temp or .old left


def test_export_replaces_its_own_output_only_with_force(run, packed, tmp_path, capsys):
    dst = tmp_path / "packed"
    assert main(["export", str(run["run"]), str(dst)]) == 0
    first = _snapshot(dst)
    assert main(["export", str(run["run"]), str(dst), "--layout", "t1_6"]) == 2
    assert "pass --force" in _err(capsys)
    assert _snapshot(dst) == first
    assert main(["export", str(run["run"]), str(dst), "--layout", "t1_6", "--force"]) == 0
    assert "replaced the earlier onebit output" in capsys.readouterr().out
    assert json.loads((dst / "config.json").read_text())["packed"]["layout"] == "t1_6"
    # convert may replace an export (both are onebit model folders), never a training run
    assert _convert(packed, dst, "hf", "--force") == 0
    assert onebit_output(dst) == "hf"
    before = _snapshot(run["run"])
    assert _convert(packed, run["run"], "onebit", "--force") == 2
    assert "training run" in _err(capsys)
    assert _snapshot(run["run"]) == before


def test_finetune_export_is_checked_before_training(run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x.txt").write_text("x")
    out = tmp_path / "ft"
    assert main(["finetune", "--from", str(run["run"]), f"--data.paths={run['corpus']}",
                 f"--train.out_dir={out}", "--export", str(taken), "--force"]) == 2
    assert "onebit did not write" in _err(capsys)
    assert not out.exists()  # refused before anything (source_tokenizer.json) was written
    assert main(["finetune", "--from", str(run["run"]), f"--data.paths={run['corpus']}",
                 f"--train.out_dir={out}", "--export", str(run["run"])]) == 2
    assert "is the source" in _err(capsys)
    # the run's own model/ (written at the end of training) is no export destination
    assert main(["finetune", "--from", str(run["run"]), f"--data.paths={run['corpus']}",
                 f"--train.out_dir={out}", "--export", str(out / "model" / "packed")]) == 2
    assert f"lies in '{out / 'model'}'" in _err(capsys)
    assert not out.exists()


def test_another_ranks_tokenizer_write_in_flight_is_a_run(tmp_path):
    """Under torchrun every finetune rank writes out_dir/source_tokenizer.json (atomically, the same
    bytes): rank 0's check may see rank 1's temp of it, alone or beside the finished file (CI
    caught rank 0 refusing its own out_dir this way)."""
    out = tmp_path / "ft"
    out.mkdir()
    assert onebit_output(out) is None  # an empty folder is nobody's output
    live = f".source_tokenizer.json.tmp.{os.getpid()}.0123abcd"
    (out / live).write_text("{}")
    assert onebit_output(out) == "run"
    assert check_destination(out, "run", label="train.out_dir") == []
    (out / "source_tokenizer.json").write_text("{}")
    assert onebit_output(out) == "run"
    assert check_destination(out, "run", label="train.out_dir") == []
    assert (out / live).exists()  # a live writer's temp is left alone
    (out / ".notes.txt.tmp.1.0123abcd").write_text("x")  # a temp of something a run never writes
    assert onebit_output(out) is None
    with pytest.raises(DestinationError, match="not an onebit run"):
        check_destination(out, "run", label="train.out_dir")


# --------------------------------------------------------------------------------------------
# Leftovers of killed writes, modes, unwritable destinations
# --------------------------------------------------------------------------------------------

_KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from onebit.atomic import write_dir_atomic, atomic_write_text
def fill(d):
    (Path(d) / "model.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
write_dir_atomic(Path(sys.argv[1]), fill)
"""


def _killed_write(final: Path) -> None:
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(final)], capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr


def test_stale_temps_are_removed_on_the_next_start(run, packed, tmp_path, capsys):
    r = tmp_path / "run"
    shutil.copytree(run["run"], r)
    ckpts = r / "checkpoints"
    _killed_write(ckpts / "step_00000003")  # a checkpoint write killed half-way
    stale = [p for p in ckpts.iterdir() if p.name.startswith(".step_00000003.tmp.")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").read_bytes() == b"half"
    legacy = ckpts / ".step_00000004.tmp.ab12cd_9"  # older onebit: tempfile names, no pid
    legacy.mkdir()
    (r / ".model.old").mkdir()  # a swap that died after the new model/ was in place
    live = ckpts / f".step_00000009.tmp.{os.getpid()}.0123abcd"  # a write in progress: kept
    live.mkdir()
    assert main(_train_args(run["corpus"], r, run["cache"], "--train.steps=3")) == 2
    assert "--resume" in _err(capsys)  # a run with checkpoints still needs --resume ...
    assert not stale[0].exists() and not legacy.exists() and not (r / ".model.old").exists()  # ... cleaned
    assert live.exists()
    live.rmdir()
    _killed_write(ckpts / "step_00000003")
    assert main(_train_args(run["corpus"], r, run["cache"], "--train.steps=3", "--resume")) == 0
    capsys.readouterr()  # train's progress lines: not part of the export's error below
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert not [p for p in r.iterdir() if p.name.startswith(".")]
    # export / convert destinations: the temps beside them (and only theirs)
    dst = tmp_path / "packed"
    _killed_write(dst)
    (tmp_path / ".other.tmp.1.0123abcd").mkdir()  # another name: not ours to judge
    assert main(["export", str(run["run"]), str(dst)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp.1.0123abcd", "packed", "run"]
    # a .X.old whose swap died before X was back is the previous output: restored, not deleted
    shutil.move(dst, tmp_path / ".packed.old")
    assert main(["export", str(run["run"]), str(dst)]) == 2
    assert "pass --force" in _err(capsys)
    assert onebit_output(dst) == "packed" and not (tmp_path / ".packed.old").exists()


def _modes(folder: Path) -> set[tuple[str, int]]:
    out = {("d", stat.S_IMODE(folder.stat().st_mode))}
    for p in folder.rglob("*"):
        out.add(("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)))
    return out


def test_files_get_the_users_umask(run, packed, tmp_path):
    # the run was trained under umask 022: run_config.json, summary.json, latest, checkpoints...
    r = run["run"]
    for name in ("run_config.json", "summary.json", "log.jsonl", "checkpoints/latest",
                 "checkpoints/step_00000002/trainer_state.safetensors", "model/model.safetensors"):
        assert stat.S_IMODE((r / name).stat().st_mode) == 0o644, name
    assert _modes(r) == {("d", 0o755), ("f", 0o644)}
    old = os.umask(0o022)
    try:
        assert main(["export", str(r), str(tmp_path / "a")]) == 0
        assert _convert(packed, tmp_path / "a.gguf", "gguf-tq1_0") == 0
        atomic_write_text(tmp_path / "t.txt", "x")
        assert _modes(tmp_path / "a") == {("d", 0o755), ("f", 0o644)}
        assert stat.S_IMODE((tmp_path / "a.gguf").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "t.txt").stat().st_mode) == 0o644
        os.umask(0o077)
        assert _convert(packed, tmp_path / "b", "onebit") == 0
        assert _convert(packed, tmp_path / "b.gguf", "gguf-i2_s") == 0
        assert _modes(tmp_path / "b") == {("d", 0o700), ("f", 0o600)}
        assert stat.S_IMODE((tmp_path / "b.gguf").stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.fixture
def read_only_folder(tmp_path):
    """An empty folder no write can go into: mode 0555 for a normal user; root ignores modes, so
    for root a read-only tmpfs is mounted there."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        os.chmod(ro, 0o555)
        yield ro, "choose a folder you can write to"
        os.chmod(ro, 0o755)
        return
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"running as root without the right to mount a read-only tmpfs ({p.stderr.strip()}): "
                    f"no folder can be made read-only for root here")
    try:
        yield ro, "the file system is read-only"
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_read_only_destination_is_a_one_line_error(run, packed, read_only_folder, tmp_path, capsys):
    """Every writer exits 2 with one line naming the path and the fix, before any work, and
    writes nothing."""
    ro, fix = read_only_folder
    argvs = [["convert", str(packed), str(ro / "out"), "--to", "onebit", "--no-verify"],
             ["convert", str(packed), str(ro / "x" / "out.gguf"), "--to", "gguf-tq2_0", "--no-verify"],
             ["export", str(run["run"]), str(ro / "packed")],
             _train_args(run["corpus"], ro / "run", run["cache"]),
             ["finetune", "--from", str(run["run"]), f"--data.paths={run['corpus']}",
              f"--train.out_dir={ro / 'ft'}"],
             ["finetune", "--from", str(run["run"]), f"--data.paths={run['corpus']}",
              f"--train.out_dir={tmp_path / 'ft'}", "--export", str(ro / "packed")]]
    for argv in argvs:
        assert main(argv) == 2, argv
        line = _err(capsys)
        assert f"cannot write '{ro}/" in line and fix in line and "nothing was written" in line, line
    assert list(ro.iterdir()) == [] and not (tmp_path / "ft").exists()


def test_os_error_while_writing_is_one_line_and_leaves_the_old_output(packed, tmp_path):
    """Disk full / a vanished folder half-way through: DestinationError naming the destination,
    no temp left, an earlier output untouched."""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("old")

    def fill(d: Path) -> None:
        (d / "a").write_text("partial")
        raise OSError(28, "No space left on device", str(d / "a"))

    with pytest.raises(DestinationError, match=r"cannot write '.*out': No space left on device; the "
                                               r"disk is full") as e:
        write_dir_atomic(dst, fill)
    assert "\n" not in str(e.value) and ".tmp." not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dst / "keep").read_text() == "old"
    # a file where a folder of the path should be
    (tmp_path / "f").write_text("x")
    with pytest.raises(DestinationError, match="a part of the path is a file"):
        check_destination(tmp_path / "f" / "out", "model")
    with pytest.raises(DestinationError, match="a part of the path is a file"):
        atomic_write_text(tmp_path / "f" / "t.txt", "x")


def test_import_cache_replaces_only_its_own_entries(packed, tmp_path, monkeypatch):
    from onebit.formats.convert import cached_import, convert

    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "m.gguf"
    convert(packed, g, "gguf-tq2_0", verify=False)
    first = cached_import(g)
    assert onebit_output(first) == "packed" and cached_import(g) == first
    # an entry half-replaced by a killed import: its old copy is back, the temp is gone
    _killed_write(first)
    shutil.move(first, first.with_name(f".{first.name}.old"))
    assert "model.safetensors" in check_destination(first, "model", force=True)
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]
    assert cached_import(g) == first
    assert clean_stale(first.parent) == []
