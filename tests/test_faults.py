"""Faults: bad checkpoints, code in pickles, a full disk, NaN losses, and the same seed giving the
same report."""
import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset

import tasks
import train
from model import Config, Encoder
from weights import read_checkpoint
from test_train import run, write_task


class Evil:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return os.system, ("touch pwned",)


def tiny_cfg(tmp_path, **kw):
    return train.TrainConfig(out_dir=str(tmp_path), device="cpu", max_steps=2, **kw)


def tiny_model():
    torch.manual_seed(0)
    return Encoder(Config(n_layer=2, n_head=2, n_embd=16, n_inner=32, vocab_size=50, block_size=16))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": Evil()}, tmp_path / "stage1.pt")
    with pytest.raises(SystemExit, match="cannot load .*stage1.pt"):
        train.load("stage1.pt", tiny_cfg(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot read .*pytorch_model.bin"):
        read_checkpoint(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    model = tiny_model()
    cfg = tiny_cfg(tmp_path)
    train.save(model, 1, torch.ones(3, dtype=torch.long), cfg)
    data = (tmp_path / "stage1.pt").read_bytes()
    (tmp_path / "stage1.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="cannot load"):
        train.load("stage1.pt", cfg)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, cfg = tiny_model(), tiny_cfg(tmp_path)
    train.save(model, 1, torch.ones(3, dtype=torch.long), cfg)
    before = (tmp_path / "stage1.pt").read_bytes()

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="No space left on device.*previous file there is kept"):
        train.save(model, 1, torch.ones(3, dtype=torch.long), cfg)
    assert ((tmp_path / "stage1.pt").read_bytes() == before
            and not (tmp_path / "stage1.pt.tmp").exists())


def test_non_finite_loss_stops_at_the_step(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.heads[1].weight.fill_(float("nan"))
    split = Dataset.from_dict({"input_ids": [[1, 5, 6, 2]] * 8, "label": [0, 1] * 4})
    with pytest.raises(SystemExit, match=r"non-finite \['logits'\] at stage 1 step 1"):
        task = tasks.Task({"train": split}, None, tasks.text_outputs, 1, 64, True)
        train.run_stage(model, 1, task, tiny_cfg(tmp_path, batch_size=4))


def test_same_seed_same_report(tmp_path):
    write_task(tmp_path)
    reports = []
    for out in ("a", "b"):
        r = run(["--task=task.csv", "--max_steps=3", f"--out_dir={out}"], tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads((tmp_path / out / "report.json").read_text())
        report.pop("seconds"), report["config"].pop("out_dir")
        reports.append(report)
    assert reports[0] == reports[1]


# 3 optimiser steps per stage: stage 1 takes steps 1-3; stage 2, 2 rewards x 2 alphas, 4-15 (not
# written to resume.pt: it is run again); stage 3, 16-18; the control, 19-24 (also run again)
@pytest.mark.parametrize("kill_at,stage,missing", [(2, 1, "stage1.pt"), (5, 1, "stage2.pt"),
                                                   (17, 3, "stage3.pt"), (20, 3, "control.pt")])
def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path, monkeypatch, kill_at, stage,
                                                        missing):
    """Kill a run at an optimiser step, resume it: the same final weights, bit for bit."""
    monkeypatch.chdir(tmp_path)
    write_task(tmp_path)
    args = ["--task=task.csv", "--max_steps=3", "--ckpt_interval=1", "--alphas=0.05,0.2"]
    train.main(args + ["--out_dir=whole"])
    steps, real_step = 0, torch.optim.AdamW.step

    def killed(self, *a, **kw):
        nonlocal steps
        steps += 1
        if steps == kill_at:
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out_dir=killed"])
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert torch.load("killed/resume.pt", weights_only=True)["stage"] == stage
    assert not os.path.exists(f"killed/{missing}")
    train.main(args + ["--out_dir=killed", "--resume=true"])
    for name in ("stage3.pt", "control.pt"):
        want = torch.load(f"whole/{name}", weights_only=True)["model"]
        got = torch.load(f"killed/{name}", weights_only=True)["model"]
        assert all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(SystemExit, match="was trained with --reward=correct, not ce"):
        train.main(args + ["--out_dir=killed", "--resume=true", "--reward=ce"])


def test_two_processes_train_identical_replicas(tmp_path):
    """torchrun with 2 CPU processes (gloo): every stage keeps the replicas identical, and the
    result is the one process's within noise (only dropout draws differ). 97 training rows in
    batches of 8: the last batch has 1 row, too few for 2 processes, and is skipped by both."""
    write_task(tmp_path, n=121)
    args = [str(train.__file__), "--task=task.csv", "--epochs1=1", "--epochs2=1", "--epochs3=1",
            "--batch_size=8", "--device=cpu"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", *args, "--out_dir=two"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(f"replicas identical after stage {s} (2 processes)" in r.stdout for s in (1, 2, 3))
    assert r.stdout.count("full depth (stage 1)") == 1  # one report, from rank 0
    r = subprocess.run([sys.executable, *args, "--out_dir=one"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (torch.load(tmp_path / d / "stage1.pt", weights_only=True)["model"]
                for d in ("one", "two"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-2


def test_two_processes_train_a_language_model(tmp_path):
    """torchrun --task=lm: the windows are sharded like texts, and the replicas stay identical."""
    args = [str(train.__file__), "--task=lm", "--lm_windows=16", "--lm_rl_windows=8",
            "--lm_test_windows=2", "--max_len=16", "--batch_size=4", "--lm_layers=2",
            "--lm_width=16", "--lm_heads=2", "--out_dir=two", "--device=cpu"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(f"replicas identical after stage {s} (2 processes)" in r.stdout for s in (1, 2, 3))
    assert (torch.load(tmp_path / "two" / "stage3.pt", weights_only=True)["memorized"].shape
            == (8 * 16,))
