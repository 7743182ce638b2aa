"""Trainer: config files/overrides, schedules, checkpoints, exact resume, Ctrl-C, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onebit import checkpoint as ckpt
from onebit.atomic import DestinationError
from onebit.config import ConfigError, ModelConfig
from onebit.train import TrainConfig, load_run_config, lr_wd_at, train
from conftest import SHARED_DATA

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Eight small 'documents' cut from tinyshakespeare."""
    d = tmp_path_factory.mktemp("corpus")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:160_000]
    n = 8
    for i in range(n):
        (d / f"part{i}.txt").write_text(text[i * len(text) // n:(i + 1) * len(text) // n], encoding="utf-8")
    return d


def tiny_args(corpus: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--model.preset=tiny", "--model.max_position_embeddings=64",
        f"--data.paths={corpus}", "--data.tokenizer=bpe:320", "--data.seq_len=32",
        "--data.val_fraction=0.25", f"--data.cache_dir={cache}",
        "--train.steps=8", "--train.batch_size=4", "--train.eval_every=4", "--train.eval_tokens=512",
        "--train.log_every=1", "--train.ckpt_every=4", "--train.progress=false",
        "--train.tensorboard=false", "--train.warmup_steps=2", f"--train.out_dir={out}",
        "--train.threads=1", *extra,
    ]


def losses(out: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs]


# ---------------------------------------------------------------- config


def test_toml_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\npreset = "tiny"\nhidden_size = 96\n[train]\nsteps = 7\nlr = 2e-3\n')
    rc = load_run_config(f, ["--model.num_hidden_layers=3", "--train.dtype=bf16", "--data.seq_len=64"])
    assert rc.model.hidden_size == 96 and rc.model.num_hidden_layers == 3 and rc.model.vocab_size == 512
    assert rc.train.steps == 7 and rc.train.lr == 2e-3 and rc.train.dtype == "bf16"
    assert rc.data.seq_len == 64


@pytest.mark.parametrize("override, needle", [
    (["--model.hiden_size=3"], "hiden_size"),
    (["--train.steps=many"], "steps"),
    (["--model.num_attention_heads=5"], "num_attention_heads"),
    (["--train.schedule=wavy"], "schedule"),
    (["--optim.lr=1"], "optim"),
    (["train.steps=3"], "--section.key=value"),
    (["--train.lr=3"], "lr"),
])
def test_bad_config_names_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_run_config(None, override)


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nx=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_run_config(bad)
    bad.write_text("[optimizer]\nlr=1\n")
    with pytest.raises(ConfigError, match="unknown config table"):
        load_run_config(bad)


def test_builtin_demo_config_loads():
    rc = load_run_config("demo")
    assert rc.model.linear == "bitnet" and rc.train.steps > 0


# ---------------------------------------------------------------- schedules


def test_two_stage_schedule_matches_faq_shape():
    tc = TrainConfig(steps=1000, warmup_steps=100, lr=1.5e-3)
    mc = ModelConfig.preset("tiny")
    lrs = [lr_wd_at(s, tc, mc) for s in range(1000)]
    assert lrs[99][0] == pytest.approx(1.5e-3)                    # end of warm-up = peak
    assert all(a[0] < b[0] for a, b in zip(lrs[:99], lrs[1:100]))  # warm-up increases
    assert lrs[499][1] == 0.1 and lrs[500][1] == 0.0                # WD 0.1 -> 0 at the split
    drop = lrs[500][0] / lrs[499][0]
    assert drop == pytest.approx(2 / 3, rel=1e-2)                   # 1.5e-3 -> 1e-3 peak: a cut by a third
    assert all(b[0] <= a[0] for a, b in zip(lrs[100:], lrs[101:]))  # monotone decay after warm-up
    assert lrs[-1][0] < 2e-5


def test_fp_twin_gets_cosine_and_lower_lr():
    tc = TrainConfig(steps=100, warmup_steps=10)
    mc = ModelConfig.preset("tiny", linear="fp")
    lr_peak = lr_wd_at(9, tc, mc)[0]
    assert lr_peak == pytest.approx(3e-4)
    assert lr_wd_at(99, tc, mc)[0] == pytest.approx(3e-5, rel=0.05)  # floor min_lr_ratio * lr
    assert lr_wd_at(99, tc, mc)[1] == 0.1


# ---------------------------------------------------------------- training, checkpoints, resume


def test_train_learns_and_writes_artifacts(corpus, tmp_path):
    out = tmp_path / "run"
    rc = load_run_config(None, tiny_args(corpus, out, tmp_path / "cache", "--train.steps=30",
                                         "--train.lr=3e-3", "--train.eval_every=30",
                                         "--train.tensorboard=true"))
    summary = train(rc)
    ls = [l for _, l in losses(out)]
    assert ls[-1] < ls[0] - 0.5, ls  # it learns
    assert summary["val_loss"] is not None and summary["val_ppl"] > 1
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "latest").is_file()
    assert list((out / "tb").iterdir()), "tensorboard event file missing"
    model, tok, folder = ckpt.load_model(out)
    assert tok is not None and model.config.vocab_size == tok.get_vocab_size()
    # the exported model reproduces the training-time validation loss
    from onebit.data import eval_windows, prepare_data
    data = prepare_data(rc.data)
    x, y = eval_windows(data.val, 32, 512)
    with torch.no_grad():
        _, loss = model(x, y)
    assert loss.item() == pytest.approx(summary["val_loss"], rel=1e-4)


def test_refuses_to_overwrite_a_run(corpus, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(corpus, out, tmp_path / "cache", "--train.steps=4")
    train(load_run_config(None, args))
    before = (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        train(load_run_config(None, args))
    assert (out / "model" / "model.safetensors").read_bytes() == before


def test_exact_resume_reproduces_uninterrupted_curve(corpus, tmp_path):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    train(load_run_config(None, tiny_args(corpus, full, cache)))
    # Same run, stopped after the step-4 checkpoint (as if killed), then resumed to step 8.
    part = tmp_path / "part"
    train(load_run_config(None, tiny_args(corpus, part, cache, "--train.steps=8")))
    # Simulate the kill: roll the run back to its step-4 checkpoint.
    (part / "checkpoints" / "latest").write_text("step_00000004\n")
    summary = train(load_run_config(None, tiny_args(corpus, part, cache)), resume=True)
    assert summary["step"] == 8
    assert losses(part) == losses(full)  # bitwise-identical loss curve, no duplicate steps
    a, _, _ = ckpt.load_model(full)
    b, _, _ = ckpt.load_model(part)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


def test_resume_with_other_config_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    train(load_run_config(None, tiny_args(corpus, out, cache, "--train.steps=4")))
    with pytest.raises(ConfigError, match="different model config"):
        train(load_run_config(None, tiny_args(corpus, out, cache, "--model.num_hidden_layers=3")), resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(load_run_config(None, tiny_args(corpus, tmp_path / "empty", cache)), resume=True)
    # a checkpoint written before a ModelConfig field existed (here qkv_bias) resumes with its default
    cfg_file = ckpt.latest_checkpoint(out / "checkpoints") / "config.json"
    raw = json.loads(cfg_file.read_text())
    del raw["model"]["qkv_bias"]
    cfg_file.write_text(json.dumps(raw))
    assert train(load_run_config(None, tiny_args(corpus, out, cache, "--train.steps=6")), resume=True)["step"] == 6


def test_corrupt_and_mismatched_checkpoints(corpus, tmp_path):
    out = tmp_path / "run"
    train(load_run_config(None, tiny_args(corpus, out, tmp_path / "cache", "--train.steps=2")))
    model_dir = out / "model"
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_model(tmp_path / "nowhere")
    # weights of another shape
    other = ckpt.read_model_config(model_dir).replace(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    from onebit.model import CausalLM
    with pytest.raises(ckpt.CheckpointError, match="different"):
        ckpt.load_state_into(CausalLM(other), model_dir / "model.safetensors")
    # truncated file
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_model(bad)
    (bad / "model.safetensors").write_bytes(data)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.load_model(bad)


def test_interrupted_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    from onebit.model import CausalLM
    model = CausalLM(ModelConfig.preset("tiny"))
    ckpt.save_model(tmp_path / "m", model, model.config)
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(DestinationError, match=r"cannot write '.*m': disk full"):  # one line, the path
        ckpt.save_model(tmp_path / "m", model, model.config)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before  # old model intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]            # no temp leftovers


# ---------------------------------------------------------------- processes: Ctrl-C and DDP


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_is_exact(corpus, tmp_path):
    cache = tmp_path / "cache"
    # uninterrupted reference, in a subprocess like the interrupted one
    ref = tmp_path / "ref"
    args = tiny_args(corpus, ref, cache, "--train.steps=40", "--train.ckpt_every=1000")
    subprocess.run([sys.executable, "-m", "onebit", "train", *args], check=True, env=_env(),
                   capture_output=True)
    out = tmp_path / "run"
    args = tiny_args(corpus, out, cache, "--train.steps=40", "--train.ckpt_every=1000")
    proc = subprocess.Popen([sys.executable, "-m", "onebit", "train", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err
    stopped = json.loads(log.read_text().splitlines()[-1])["step"]
    assert 3 <= stopped < 40
    assert not (out / "model").exists()  # no final export for an interrupted run
    subprocess.run([sys.executable, "-m", "onebit", "train", *args, "--resume"], check=True,
                   env=_env(), capture_output=True)
    assert losses(out) == losses(ref)


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(corpus, tmp_path):
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    args = lambda out: tiny_args(corpus, out, cache, "--train.steps=6", "--train.batch_size=4",
                                 "--train.micro_batch_size=1")
    subprocess.run([sys.executable, "-m", "onebit", "train", *args(single)], check=True, env=_env(),
                   capture_output=True)
    ddp = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "onebit", "train", *args(ddp)], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(single), losses(ddp)
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    ma, _, _ = ckpt.load_model(single)
    mb, _, _ = ckpt.load_model(ddp)
    for (k, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)


def test_bf16_autocast_and_grad_accumulation_run(corpus, tmp_path):
    out = tmp_path / "bf16"
    summary = train(load_run_config(None, tiny_args(corpus, out, tmp_path / "cache", "--train.steps=2",
                                                    "--train.dtype=bf16", "--train.micro_batch_size=2")))
    assert summary["step"] == 2 and all(l == l and l < 20 for _, l in losses(out))  # finite losses


# ---------------------------------------------------------------- a4.8 two-stage recipe

A48 = ("--model.activation_scheme=a4.8", "--model.hidden_act=relu2")


@pytest.mark.parametrize("override, needle", [
    (["--train.a48_switch=1.5", *A48], "a48_switch"),
    (["--train.a48_switch=0", *A48], "a48_switch"),
    (["--train.a48_switch=0.05", "--train.steps=8", *A48], "a48_switch"),      # no A8 step left
    (["--train.a48_switch=0.95"], "a48_switch"),                               # an a8 model
    (["--train.a48_switch=0.95", "--model.linear=fp"], "a48_switch"),          # an fp model
    (["--model.activation_scheme=a4.8", "--model.hidden_act=silu"], "hidden_act"),
    (["--model.activation_scheme=a4.8", "--model.linear=fp"], "activation_scheme"),
])
def test_a48_config_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_run_config(None, ["--model.preset=tiny", *override])


def test_a48_two_stage_switches_in_place_and_keeps_optimizer(corpus, tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    two = tmp_path / "two"
    train(load_run_config(None, tiny_args(corpus, two, cache, *A48, "--train.a48_switch=0.375")))
    recs = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    # steps 0-2 (logged as 1-3) run A8, steps 3-7 run a4.8
    assert [r["act"] for r in recs] == ["a8"] * 3 + ["a4.8"] * 5
    # before the switch it is exactly the A8 model (same init, same batches) ...
    a8 = tmp_path / "a8"
    train(load_run_config(None, tiny_args(corpus, a8, cache, "--model.hidden_act=relu2")))
    la, lt = losses(a8), losses(two)
    assert lt[:3] == la[:3]
    assert lt[3][1] != la[3][1]      # ... and the a4.8 forward of step index 3 changes its loss
    # one optimizer all along: Adam's step count is the run's, not the stage's
    last = two / "checkpoints" / "step_00000008"
    assert load_file(str(last / ckpt.STATE_FILE))["optim.0.step"].item() == 8
    assert json.loads((last / ckpt.STATE_JSON).read_text())["activation_scheme"] == "a4.8"
    model, _, _ = ckpt.load_model(two)
    assert model.config.activation_scheme == "a4.8" and model.activation_scheme == "a4.8"
    assert model.model.layers[0].self_attn.o_proj.act == "topk_int8"


@pytest.mark.parametrize("switch, scheme_at_4", [(0.375, "a4.8"), (0.625, "a8")])
def test_a48_resume_across_the_switch_is_exact(corpus, tmp_path, switch, scheme_at_4):
    cache = tmp_path / "cache"
    args = (*A48, f"--train.a48_switch={switch}")
    full = tmp_path / "full"
    train(load_run_config(None, tiny_args(corpus, full, cache, *args)))
    part = tmp_path / "part"
    train(load_run_config(None, tiny_args(corpus, part, cache, *args)))
    state = json.loads((part / "checkpoints" / "step_00000004" / ckpt.STATE_JSON).read_text())
    assert state["activation_scheme"] == scheme_at_4
    (part / "checkpoints" / "latest").write_text("step_00000004\n")
    summary = train(load_run_config(None, tiny_args(corpus, part, cache, *args)), resume=True)
    assert summary["step"] == 8
    assert losses(part) == losses(full)
    a, _, _ = ckpt.load_model(full)
    b, _, _ = ckpt.load_model(part)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    if scheme_at_4 == "a4.8":  # a checkpoint past the switch cannot resume under a later switch
        (part / "checkpoints" / "latest").write_text("step_00000004\n")
        with pytest.raises(ConfigError, match="a48_switch"):
            train(load_run_config(None, tiny_args(corpus, part, cache, *A48, "--train.a48_switch=0.75")),
                  resume=True)
