"""ConsistentEE on a frozen LLM (llm.py, train.py --task=smollm2): the sparse consistent loss, the
head tables and the exit rules read from them, folding the standardizer into the policies, the
checkpoint of adapters and policies, and one small run of the whole pipeline on SmolLM2."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cee
import data
import llm
import report
from common import load_model
from model import Config, Decoder
from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_llama():
    torch.manual_seed(0)
    model = Decoder(Config(n_layer=4, n_head=2, n_kv_head=1, n_embd=16, n_inner=32, vocab_size=50,
                           block_size=16, rope_theta=100.0, norm="rms", gated_mlp=True, bias=False,
                           act="silu", ln_eps=1e-5, dropout=0.0, exit_adapters=True)).eval()
    with torch.no_grad():
        for a in model.adapters:  # adapters away from the identity, so that each layer differs
            a.weight.add_(0.3 * torch.randn_like(a.weight))
    return model


def test_taken_exits_loss_is_the_dense_consistent_loss_where_heads_learn():
    """Each head run only on the inputs that exit at its layer gives the same loss and the same
    gradients as (share * CE).sum(1).mean() over every head, the frozen last head left out."""
    model = tiny_llama()
    s, labels = torch.randn(6, 4, 16), torch.randint(0, 50, (6,))
    share = torch.tensor([[1, 0, 0, 0], [0, .5, .5, 0], [0, 0, 0, 1], [.25, 0, .25, .5],
                          [0, 1, 0, 0], [0, 0, 1, 0]])
    sparse = llm.taken_exits_loss(model, s, share, labels)
    sparse.backward()
    got = [a.weight.grad.clone() for a in model.adapters]
    model.zero_grad()
    logits = torch.stack([model.exit_logits(s[:, l], l) for l in range(4)], 1)
    ce = cee.exit_ce(logits, labels)
    dense = (share[:, :3] * ce[:, :3]).sum(1).mean()
    dense.backward()
    torch.testing.assert_close(sparse, dense)
    for g, a in zip(got, model.adapters):
        torch.testing.assert_close(g, a.weight.grad)


def test_prompts_are_disjoint_varied_and_seeded():
    p = data.chat_prompts(240, 32, 40, 1337)
    assert [len(p[k]) for k in ("train", "validation", "test")] == [240, 32, 40]
    assert len(set(p["train"] + p["validation"] + p["test"])) == 312
    assert sum("movie review" in text for text in p["test"]) == 20  # half of them, in turn
    assert data.chat_prompts(240, 32, 40, 1337) == p and data.chat_prompts(240, 32, 40, 1) != p
    with pytest.raises(ValueError, match="577 prompts asked for; there are 576 at most"):
        data.chat_prompts(500, 40, 37, 0)


def test_first_layer_and_point_by_hand():
    stop = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert llm.first_layer(stop).tolist() == [2, 3, 1]
    preds = torch.tensor([[1, 2, 2], [0, 0, 5], [3, 3, 3]])
    m = report.point("x", 0.5, torch.tensor([2, 1, 1]), preds, torch.tensor([2, 5, 0]))
    assert m["accuracy"] == pytest.approx(1 / 3) and m["agreement"] == pytest.approx(2 / 3)
    assert m["avg_layers"] == pytest.approx(4 / 3) and m["speedup"] == pytest.approx(9 / 4)


def test_rules_on_head_tables_equal_sweeps_of_every_heads_logits():
    """The tables keep what the exit rules read; exits and figures equal report.sweep's on the full
    logits, for every rule and knob."""
    model = tiny_llama()
    s = 3 * torch.randn(200, 4, 16)
    t = llm.head_tables(model, s, chunk=64)
    with torch.no_grad():
        logits = torch.stack([model.exit_logits(s[:, l], l) for l in range(4)], 1)
    full = logits[:, -1].argmax(-1)
    assert torch.equal(t.preds, logits.argmax(-1))
    torch.testing.assert_close(t.ce, cee.exit_ce(logits, full))
    torch.testing.assert_close(t.gain("ce"), cee.exit_gain(logits, full, "ce"))
    assert torch.equal(t.gain("correct"), cee.exit_gain(logits, full, "correct"))
    assert torch.equal(t.memorized(), cee.memorized_layer(logits.argmax(-1), full))
    p = torch.rand(200, 4)
    g = report.grids(4, 50)
    for name in ("consistentee", "static", "entropy", "maxprob"):
        ours = llm.sweep_tables(name, g[name], t, p)
        theirs = report.sweep(name, g[name], logits, full, p)
        assert len(ours) == len(g[name])
        for a, b in zip(ours, theirs):
            assert a == pytest.approx(b, abs=1e-6), name


def test_folded_policies_read_raw_states_as_the_policies_read_standardized_ones():
    model = tiny_llama()
    s = torch.randn(100, 4, 16) * torch.linspace(0.1, 50, 16) + 7  # features of any scale
    mean, std = llm.standardizer(s)
    z = (s - mean) / std
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1).abs().max() < 1e-4
    folded = llm.fold_policies(model.policies, mean, std)
    for l in range(3):
        torch.testing.assert_close(folded[l](s[:, l]), model.policies[l](z[:, l]),
                                   atol=1e-5, rtol=1e-4)


def test_frozen_llm_checkpoint_loads_beside_its_gguf(tmp_path):
    """A checkpoint of adapters and policies names its GGUF; load_model puts the two together,
    and a checkpoint whose weights do not fit the GGUF is one clear line."""
    import data
    gguf = data.smollm2_path()
    model = Decoder.from_pretrained(gguf, exit_adapters=True)
    with torch.no_grad():
        model.adapters[3].bias.fill_(0.5)
        model.policies[7].net[2].bias.fill_(-2.0)
    scale = (torch.zeros(30, 576), torch.ones(30, 576))
    path = str(tmp_path / "stage3.pt")
    ckpt = llm.exits_checkpoint(model, 3, TrainConfig(), gguf, 0.02, scale)
    assert set(k.split(".")[0] for k in ckpt["model"]) == {"adapters", "policies"}
    torch.save(ckpt, path)
    assert os.path.getsize(path) < 50e6  # not the 135M backbone
    loaded, saved = load_model(path, "x", kind=Decoder)
    assert saved["gguf"] == os.path.abspath(gguf)
    assert torch.equal(loaded.adapters[3].bias, model.adapters[3].bias)
    assert torch.equal(loaded.policies[7].net[2].bias, model.policies[7].net[2].bias)
    assert torch.equal(loaded.blocks[5].mlp.fc.weight, model.blocks[5].mlp.fc.weight)
    ckpt["model"].pop("adapters.3.bias")
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match="stage3.pt: its adapters and policies do not fit"):
        load_model(path, "x", kind=Decoder)


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_smollm2_pipeline_end_to_end(tmp_path):
    """train.py --task=smollm2 on a few prompts writes a checkpoint of adapters and policies and a
    report; generate.py chats with it, and speculative decoding there is full depth's greedy;
    bench.py measures it."""
    out = str(tmp_path / "sm")
    r = run("train.py", "--task=smollm2", "--llm_train=6", "--llm_validation=2", "--llm_test=2",
            "--llm_new_tokens=8", "--alphas=0.02", "--epochs2=2", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["picked"]["alpha"] == 0.02 and rep["tokens"] > 0
    assert rep["agreement_by_layer"]["stage1"][-1] == 1.0
    assert rep["oracle"]["stage1"] >= 1.0 and len(rep["agreement_by_layer"]["plain"]) == 30
    assert os.path.getsize(os.path.join(out, "stage3.pt")) < 50e6
    texts = {}
    for exit in ("none", "speculative", "policy"):
        r = run("generate.py", f"--ckpt={out}/stage3.pt", "--chat", "--prompt=Name a color.",
                f"--exit={exit}", "--max_new_tokens=12", "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        texts[exit] = json.loads(r.stdout)
    assert texts["speculative"]["text"] == texts["none"]["text"]
    assert 1 <= texts["policy"]["mean_exit_layer"] <= 30
    import bench  # its figures on the run's test prompts
    b = bench.smollm2_exits(f"{out}/stage3.pt", "cpu", 1, bench.timer("cpu"), new_tokens=8)
    assert b["smollm2_speculative_identical"] is True
    assert 0 <= b["smollm2_policy_agreement"] <= 1 and b["smollm2_oracle_speedup"] >= 1
    assert b["smollm2_policy_exit_speedup"] > 0 and b["smollm2_speculative_speedup"] > 0
    r = run("train.py", "--task=smollm2", "--stage=2", f"--out_dir={out}")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "train.py: --task=smollm2 runs its three stages in one process (--stage, --resume and "
        "torchrun are for the other tasks)"]


def test_first_agreeing_layer_hand_case():
    full = torch.tensor([3, 3, 5])
    preds = torch.tensor([[1, 3, 3], [3, 1, 3], [0, 0, 5]])
    assert llm.first_agreeing_layer(preds, full).tolist() == [2, 1, 3]
