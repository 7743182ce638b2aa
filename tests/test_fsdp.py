"""Training past one device: FSDP2 under torchrun (gloo, 2 CPU processes), sharded checkpoints
(DCP through safetensors, no pickle), resume on another number of ranks, consolidation + export,
activation checkpointing, and the bad input (fsdp without torchrun, a batch the ranks do not
divide, a checkpoint from the other layout, damaged shards)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onebit import checkpoint as ckpt
from onebit.config import ConfigError
from onebit.train import load_run_config, train
from conftest import SHARED_DATA

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
TESTS = Path(__file__).resolve().parent
STEPS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:160_000]
    for i in range(8):
        (d / f"part{i}.txt").write_text(text[i * len(text) // 8:(i + 1) * len(text) // 8], encoding="utf-8")
    return d


def run_args(corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--model.preset=tiny", "--model.max_position_embeddings=64",
            f"--data.paths={corpus}", "--data.tokenizer=bpe:320", "--data.seq_len=32",
            "--data.val_fraction=0.25", f"--data.cache_dir={cache}",
            f"--train.steps={STEPS}", "--train.batch_size=4", "--train.micro_batch_size=1",
            # 15 validation windows: rank 0 evaluates 8, rank 1 7 (plus one uncounted, as fsdp's
            # forwards are collective: without it the ranks would wait on each other forever)
            "--train.eval_every=8", "--train.eval_tokens=480", "--train.log_every=1", "--train.ckpt_every=4",
            "--train.progress=false", "--train.tensorboard=false", "--train.warmup_steps=2",
            f"--train.out_dir={out}", "--train.threads=1", *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def curve(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(out)]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        kids = [c for c, p in parent.items() if p == here]
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    """Equal within the tolerance of the DDP test (test_train.py): other ranks sum in another order."""
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- bad input (one process, fast)


def test_fsdp_without_torchrun_names_the_fix(corpus, tmp_path, monkeypatch, capsys):
    from onebit.cli import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    args = run_args(corpus, tmp_path / "run", tmp_path / "cache", "--train.parallel=fsdp")
    with pytest.raises(ConfigError, match=r"torchrun --nproc_per_node=N -m onebit train"):
        train(load_run_config(None, args))
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onebit train: error: train.parallel=fsdp") and "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(ConfigError, match="parallel='zero'.*auto, ddp or fsdp"):
        load_run_config(None, ["--train.parallel=zero"])


def test_batch_not_divisible_by_the_ranks_names_the_fix(corpus, tmp_path, monkeypatch):
    """Checked as soon as the world size is known, before the data or any collective."""
    import onebit.train as tr

    monkeypatch.setattr(tr, "init_distributed", lambda group=False: (tr.Dist(0, 3, 0), torch.device("cpu")))
    with pytest.raises(ConfigError, match=r"batch_size=4 is not divisible by the 3 processes: use a "
                                          r"batch_size that is a multiple of 3, or a --nproc_per_node "
                                          r"that divides 4"):
        train(load_run_config(None, run_args(corpus, tmp_path / "run", tmp_path / "cache")))


def test_unsharded_checkpoint_is_not_resumed_by_fsdp(corpus, tmp_path):
    out = tmp_path / "run"
    args = run_args(corpus, out, tmp_path / "cache", "--train.steps=4", "--train.eval_every=4")
    train(load_run_config(None, args))
    with pytest.raises(ConfigError, match=r"holds unsharded state .* --train.parallel=ddp \(or auto\)"):
        train(load_run_config(None, [*args, "--train.steps=8", "--train.parallel=fsdp"]), resume=True)


def test_auto_layout_choice():
    """auto: the checkpoint's layout; else no wrapper on one process, ddp where 16 B/parameter take
    under half a rank's memory, fsdp where not; an explicit choice is kept."""
    from onebit.parallel import choose_parallel, rank_memory_bytes

    cpu = torch.device("cpu")
    mem = rank_memory_bytes(cpu, 2)
    assert choose_parallel("auto", 1, None, 10**6, cpu, 1) == "single"
    assert choose_parallel("auto", 2, None, 10**6, cpu, 2) == "ddp"
    assert choose_parallel("auto", 2, None, mem // 16, cpu, 2) == "fsdp"   # 16 B/param = all of it
    assert choose_parallel("auto", 2, "full", mem, cpu, 2) == "ddp"
    assert choose_parallel("auto", 1, "sharded", 10**6, cpu, 1) == "fsdp"
    assert choose_parallel("fsdp", 1, None, 10**6, cpu, 1) == "fsdp"
    assert choose_parallel("ddp", 2, None, mem, cpu, 2) == "ddp"
    assert choose_parallel("ddp", 1, None, 10**6, cpu, 1) == "single"


# ---------------------------------------------------------------- FSDP2 itself (2 processes)


@pytest.mark.slow
def test_bitlinear_quantizes_the_gathered_weight_and_checkpointing_changes_nothing(tmp_path):
    """Inside the forward of a sharded model every BitLinear holds the all-gathered nn.Parameter
    (not a DTensor shard): its absmean scale, the loss and every gradient equal the unsharded
    model's bit for bit; with activation checkpointing too (the recompute gathers again)."""
    run_ok(torchrun(2, str(TESTS / "fsdp_worker.py"), str(tmp_path)))
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        ref = r["ref"]
        for ac in (False, True):
            got = r[f"fsdp_ac={ac}"]
            n = got["n_forward"]
            assert n == len(ref["seen"]) == 14                      # 2 layers x 7 projections
            assert got["seen"][:n] == ref["seen"]                   # full shapes, same scales γ
            assert all(s["type"] == "Parameter" for s in got["seen"])
            assert len(got["seen"]) == (2 * n if ac else n)         # checkpointing: recomputed forward
            layers = [ref["seen"][i:i + 7] for i in range(0, n, 7)]  # recomputed last block first
            assert got["seen"][n:] == ([s for lay in reversed(layers) for s in lay] if ac else [])
            assert got["loss"] == ref["loss"] and got["grads_equal"], got["grad_max_diff"]
            # and the model really is sharded: each rank holds half of every matrix's rows
            q = "model.layers.0.self_attn.q_proj.weight"
            assert got["full_shapes"][q] == [64, 64] and got["local_shapes"][q] == [32, 64]


@pytest.fixture(scope="module")
def fsdp_runs(corpus, tmp_path_factory):
    """The one-process reference, and the same run as 2-rank fsdp (uninterrupted)."""
    root = tmp_path_factory.mktemp("fsdp")
    cache = root / "cache"
    single = root / "single"
    train(load_run_config(None, run_args(corpus, single, cache)))
    fsdp = root / "fsdp"
    r = run_ok(torchrun(2, "-m", "onebit", "train", *run_args(corpus, fsdp, cache, "--train.parallel=fsdp")))
    assert "2 process(es) (fsdp)" in r.stdout
    return {"root": root, "cache": cache, "single": single, "fsdp": fsdp}


@pytest.mark.slow
def test_fsdp_equals_one_process(fsdp_runs):
    """Losses and final weights of 2-rank fsdp equal 1-process training within the DDP test's
    tolerance; the checkpoints are sharded (one safetensors file per rank, no model.safetensors)."""
    single, fsdp = fsdp_runs["single"], fsdp_runs["fsdp"]
    close(curve(single), curve(fsdp))
    ma, _, _ = ckpt.load_model(single)
    mb, _, _ = ckpt.load_model(fsdp)  # out_dir/model: gathered from the shards at the end
    for (k, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)
    last = ckpt.latest_checkpoint(fsdp / "checkpoints")
    assert last.name == f"step_{STEPS:08d}" and not (last / ckpt.MODEL_FILE).exists()
    assert sorted(p.name for p in (last / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["parallel"] == "fsdp" and state["world_size"] == 2


@pytest.mark.slow
def test_killed_fsdp_run_resumes_on_one_and_two_ranks(fsdp_runs, corpus):
    """SIGKILL a 2-rank fsdp run (activation checkpointing on) after a checkpoint; resume it on 2
    ranks: the loss curve is the uninterrupted run's, bit for bit; on 1 rank (DCP reshards the
    checkpoint): equal within the DDP tolerance. Activation checkpointing changes no loss."""
    root, cache, ref = fsdp_runs["root"], fsdp_runs["cache"], curve(fsdp_runs["fsdp"])
    killed = root / "killed"
    args = run_args(corpus, killed, cache, "--train.parallel=fsdp", "--train.activation_checkpointing=true",
                    "--train.ckpt_every=2")
    # niced, so that this process sees the first checkpoint and kills the run long before its end
    proc = subprocess.Popen(["nice", "-n", "19", *torchrun(2, "-m", "onebit", "train", *args)], env=env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.005)
    workers = descendants(proc.pid)  # torchrun starts each worker in a session of its own
    for pid in [*workers, proc.pid]:  # the whole job dies at once, mid-training
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    err = proc.communicate(timeout=60)[1]
    for pid in workers:  # dead (or a zombie) before the copies below
        while alive(pid) and time.time() < deadline:
            time.sleep(0.01)
    stopped = records(killed)[-1]["step"]
    assert 2 <= stopped < STEPS, f"the run ended at step {stopped} before it was killed: {err[-2000:]}"
    assert curve(killed) == ref[:stopped]  # activation checkpointing: the same losses, bit for bit
    for n in (2, 1):
        run = root / f"resumed{n}"
        shutil.copytree(killed, run)
        run_ok(torchrun(n, "-m", "onebit", "train", *run_args(corpus, run, cache), "--resume",
                        "--train.activation_checkpointing=true", "--train.ckpt_every=2"))
        if n == 2:
            assert curve(run) == ref
        else:
            close(ref, curve(run))
        assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # temps cleaned


@pytest.mark.slow
def test_ctrl_c_to_torchrun_checkpoints_every_rank_and_resumes_exactly(fsdp_runs, corpus):
    """A terminal's Ctrl-C reaches torchrun alone (its workers run in sessions of their own), which
    passes the SIGINT on: every rank finishes its step, the ranks agree to stop (the flag is
    all-reduced) and write the sharded checkpoint together; the resumed run repeats the
    uninterrupted loss curve bit for bit."""
    root, cache, ref = fsdp_runs["root"], fsdp_runs["cache"], curve(fsdp_runs["fsdp"])
    run = root / "ctrl_c"
    args = run_args(corpus, run, cache, "--train.parallel=fsdp")
    proc = subprocess.Popen(["nice", "-n", "19", *torchrun(2, "-m", "onebit", "train", *args)], env=env(),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "interrupted: checkpoint saved" in err, err[-3000:]
    stopped = records(run)[-1]["step"]
    assert 3 <= stopped < STEPS and ckpt.latest_checkpoint(run / "checkpoints").name == f"step_{stopped:08d}"
    run_ok(torchrun(2, "-m", "onebit", "train", *args, "--resume"))
    assert curve(run) == ref


# ---------------------------------------------------------------- sharded checkpoints: read, export, refuse


@pytest.mark.slow
def test_sharded_checkpoint_exports_and_loads_without_pickle(fsdp_runs, tmp_path, monkeypatch, capsys):
    """An interrupted fsdp run (no out_dir/model) exports like any other run: load_model
    consolidates its latest sharded checkpoint in this one process, never calling pickle/torch.load."""
    import pickle

    from onebit.cli import main

    run = tmp_path / "run"
    shutil.copytree(fsdp_runs["fsdp"], run)
    shutil.rmtree(run / "model")
    full, _, _ = ckpt.load_model(fsdp_runs["fsdp"] / "model")

    def boom(*a, **k):
        raise AssertionError("unpickling while reading a sharded checkpoint")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, boom)
    model, tok, folder = ckpt.load_model(run)
    assert folder == run / "checkpoints" / f"step_{STEPS:08d}" and tok is not None
    for (k, a), (_, b) in zip(full.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    monkeypatch.undo()
    assert main(["export", str(run), str(tmp_path / "packed")]) == 0
    assert main(["generate", "--model", str(folder), "To be", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()


@pytest.mark.slow
def test_checkpoint_of_the_other_layout_and_damaged_shards_are_refused(fsdp_runs, corpus, tmp_path, capsys):
    from onebit.cli import main

    run = tmp_path / "run"
    shutil.copytree(fsdp_runs["fsdp"], run)
    src = ckpt.latest_checkpoint(run / "checkpoints")
    args = [*run_args(corpus, run, fsdp_runs["cache"]), "--train.steps=20"]
    # the other layout: one line naming the fix (before any work); auto needs torchrun for it
    with pytest.raises(ConfigError, match=r"is sharded \(written by train.parallel=fsdp on 2 process\(es\)\); "
                                          r"resume it with --train.parallel=fsdp"):
        train(load_run_config(None, [*args, "--train.parallel=ddp"]), resume=True)
    assert main(["train", *args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sharded checkpoint" in err and "torchrun --nproc_per_node=N" in err and "\n" not in err

    def damaged(name: str, hurt) -> Path:
        d = tmp_path / name
        shutil.copytree(src, d)
        hurt(d / "sharded")
        return d

    def nan_shard(s: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file
        f = s / "shard-00002-model-00001-of-00001.safetensors"
        with safe_open(str(f), framework="pt") as h:
            meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
        tensors["model.model.norm.weight"][0] = float("nan")
        save_file(tensors, str(f), metadata=meta)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle
    cases = {
        "missing_rank0": (lambda s: (s / "shard-00001-model-00001-of-00001.safetensors").unlink(),
                          r"shards of model\.\S+ cover \d+ of its \d+ values"),
        "missing_rank1": (lambda s: (s / "shard-00002-model-00001-of-00001.safetensors").unlink(),
                          r"shards of model\.\S+ make a \(160, 64\) torch.float32 tensor, the model "
                          r"expects \(320, 64\).*incomplete"),
        "truncated": (lambda s: (s / "shard-00001-model-00001-of-00001.safetensors").write_bytes(
            (s / "shard-00001-model-00001-of-00001.safetensors").read_bytes()[:5000]), r"is corrupt"),
        "nan": (nan_shard, r"model\.model\.norm\.weight is not finite"),
        # DCP's own reader would unpickle this file; onebit's refuses the folder and never opens it
        "pickle": (lambda s: (s / ".metadata").write_bytes(pickle.dumps(Evil())),
                   r"holds \['\.metadata'\], which onebit does not write"),
    }
    for name, (hurt, needle) in cases.items():
        d = damaged(name, hurt)
        with pytest.raises(ckpt.CheckpointError, match=needle):
            ckpt.load_model(d)
        assert main(["export", str(d), str(tmp_path / f"packed_{name}")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("onebit export: error: ") and str(d) in err and "\n" not in err, err
        assert not (tmp_path / f"packed_{name}").exists()
    assert not marker.exists()


# ---------------------------------------------------------------- CUDA (nccl, bf16 gathers)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fsdp CUDA path: nccl, "
                                                          "bf16 parameters / fp32 reduction)")
def test_fsdp_two_steps_on_cuda(corpus, tmp_path):
    n = min(torch.cuda.device_count(), 2)
    out = tmp_path / "cuda"
    r = run_ok(torchrun(n, "-m", "onebit", "train", *run_args(corpus, out, tmp_path / "cache"),
                        "--train.parallel=fsdp", "--train.dtype=bf16", "--train.steps=2",
                        "--train.activation_checkpointing=true"))
    assert f"{n} process(es) (fsdp)" in r.stdout
    assert [s for s, _ in curve(out)] == [1, 2] and all(0 < loss < 10 for _, loss in curve(out))
    assert ckpt.latest_checkpoint(out / "checkpoints").joinpath("sharded").is_dir()
    model, _, _ = ckpt.load_model(out)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
