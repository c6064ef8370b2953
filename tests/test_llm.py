"""ConsistentEE on a frozen LLM (llm.py, train.py --task=smollm2): the sparse consistent loss, the
head tables and the exit rules read from them, folding the standardizer into the policies, the
checkpoint of adapters and policies, and one small run of the whole pipeline on SmolLM2."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import cee
import data
import llm
import replies
import report
from common import load_model
from model import Config, Decoder, confidence
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


@pytest.mark.parametrize("shortlist", [None, torch.arange(0, 50, 2)])
def test_taken_exits_loss_is_the_dense_consistent_loss_where_heads_learn(shortlist):
    """Each head run only on the inputs that exit at its layer gives the same loss and the same
    gradients as (share * CE).sum(1).mean() over every head, the frozen last head left out; with a
    shortlist, over the inputs whose label an exit can say (the others teach an exit nothing)."""
    model = tiny_llama()
    model.set_shortlist(shortlist)
    s, labels = torch.randn(6, 4, 16), torch.tensor([4, 7, 10, 13, 22, 30])  # odd: not in the list
    share = torch.tensor([[1, 0, 0, 0], [0, .5, .5, 0], [0, 0, 0, 1], [.25, 0, .25, .5],
                          [0, 1, 0, 0], [0, 0, 1, 0]])
    sparse = llm.taken_exits_loss(model, s, share, labels)
    sparse.backward()
    got = [a.weight.grad.clone() for a in model.adapters]
    model.zero_grad()
    logits = torch.stack([model.exit_logits(s[:, l], l) for l in range(4)], 1)
    ce = cee.exit_ce(logits, labels).nan_to_num(posinf=0.0)  # labels outside the list: 0
    dense = (share[:, :3] * ce[:, :3]).sum(1).mean()
    dense.backward()
    torch.testing.assert_close(sparse, dense)
    for g, a in zip(got, model.adapters):
        torch.testing.assert_close(g, a.weight.grad)


def test_prompts_are_disjoint_varied_seeded_and_hold_kinds_out_of_training():
    p, kinds = data.chat_prompts(240, 32, 40, 1337)
    assert [len(p[k]) for k in ("train", "validation", "test")] == [240, 32, 40]
    assert len(set(p["train"] + p["validation"] + p["test"])) == 312
    assert set(kinds["train"]) == set(data.TRAINING_KINDS)  # 48 of each, in turn
    assert set(kinds["test"]) == set(data.TRAINING_KINDS + data.HELD_OUT_KINDS)
    assert kinds["test"][:7] == list(data.TRAINING_KINDS + data.HELD_OUT_KINDS)
    assert sum("movie review" in text for text in p["test"]) == 6
    assert sum(text.startswith("Translate into") for text in p["train"]) == 0
    assert data.chat_prompts(240, 32, 40, 1337)[0] == p
    assert data.chat_prompts(240, 32, 40, 1)[0] != p
    with pytest.raises(ValueError, match="90 test prompts need 13 of kind fact, and 1 is left"):
        data.chat_prompts(240, 80, 90, 0)


def test_shortlist_head_is_the_full_head_on_its_rows():
    """An early exit's logits over the shortlist are the full head's there, -inf elsewhere; full
    depth keeps the whole head; the confidence rules read finite numbers."""
    model, x = tiny_llama(), torch.randn(3, 16)
    full = [model.exit_logits(x, l) for l in range(4)]
    ids = torch.tensor([1, 5, 9, 33, 49])
    model.set_shortlist(ids)
    for l in range(3):
        short = model.exit_logits(x, l)
        torch.testing.assert_close(short[:, ids], full[l][:, ids])
        assert torch.isinf(short).sum() == 3 * 45 and torch.isin(short.argmax(-1), ids).all()
        assert torch.isfinite(torch.stack(confidence(short))).all()
    assert torch.equal(model.exit_logits(x, 3), full[3])
    assert torch.equal(model.exit_logits(x), full[3])
    assert model.in_shortlist(torch.tensor([5, 6])).tolist() == [True, False]
    model.set_shortlist(None)
    assert torch.equal(model.exit_logits(x, 1), full[1])


@pytest.mark.parametrize("exit", ["policy", "speculative"])
def test_speculative_stays_full_depths_greedy_with_shortlist_drafts(exit):
    """Drafts from shortlist heads, verified by the whole head: still full depth's tokens; policy
    exits say only shortlist tokens where they exit."""
    import generate
    model = tiny_llama()
    with torch.no_grad():
        for pi in model.policies:  # exit often
            pi.net[2].bias.fill_(2.0)
    model.set_shortlist(torch.arange(0, 50, 3))
    idx = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(0))
    full, _ = generate.generate(model, idx, 10)
    new, stats = generate.generate(model, idx, 10, exit, kv="defer")
    assert stats["mean_exit_layer"] < 4
    if exit == "speculative":
        assert torch.equal(new, full)
    else:
        assert not torch.equal(new, full)


def test_pick_shortlist_by_hand():
    """Ranked by frequency, the end-of-turn token kept whatever its rank; the smallest size whose
    list holds the coverage asked of full depth's tokens."""
    freq = torch.arange(20000, 0, -1).double()  # token 0 the most frequent
    pairs = [([7], [0, 1, 2, 3000, 19999]), ([7], [5000, 9000, 10])]
    ids, held = replies.pick_shortlist(freq, pairs, [19999], 0.75)
    assert held == pytest.approx({2048: 5 / 8, 4096: 6 / 8, 8192: 7 / 8, 16384: 1.0})
    assert len(ids) == 4096 and 19999 in ids and 4095 not in ids and 4094 in ids
    assert len(replies.pick_shortlist(freq, pairs, [19999], 0.99)[0]) == 16384


def test_replies_judged_by_full_depth_by_hand():
    """One pass gives full depth's NLL of the reply and how many of its tokens it would pick."""
    import generate
    assert replies.repeated_3grams([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)
    assert replies.repeated_3grams([1, 2]) == 0 and replies.repeated_3grams([4, 4, 4, 4]) == 0.5
    model = tiny_llama()
    idx = torch.tensor([[3, 4, 5]])
    greedy = model(idx)[0][0, -1].argmax().item()
    logits, _ = model(torch.tensor([[3, 4, 5, greedy]]))
    new = torch.tensor([[greedy, 7 if logits[0, 3].argmax() != 7 else 8]])  # full depth's, not
    logp = logits[0, 2:].log_softmax(-1)
    want = -(logp[0, new[0, 0]] + logp[1, new[0, 1]]) / 2
    nll, agreement = generate.judged_by_full(model, idx, new)
    assert nll == pytest.approx(want.item(), rel=1e-5) and agreement == 0.5
    assert replies.own_nll(model, [([3, 4, 5], new[0].tolist())]) == pytest.approx([nll])


def test_generation_threshold_is_found_by_bisection(monkeypatch):
    """The lowest threshold, from teacher forcing's up, whose validation replies keep the quality
    bound, found by bisection: replies at the others are never generated. None holds: the
    highest."""
    model, cfg = tiny_llama(), TrainConfig(llm_quality=1.3, llm_agreement=0.9)
    scale = (torch.zeros(4, 16), torch.ones(4, 16))  # (L, C) each
    for t, ratios, want, tried in [
            (0.9, {0.99: 1.1, 0.95: 1.2, 0.9: 1.4}, 0.95, [0.95, 0.9]),
            (0.9, {0.99: 1.1, 0.95: 1.4, 0.9: 1.2}, 0.99, [0.95, 0.99]),
            (0.95, {0.99: 1.5, 0.95: 1.6}, 0.99, [0.95, 0.99]),
            (0.4, {t: 1.0 for t in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)}, 0.4,
             [0.7, 0.5, 0.4])]:
        calls = []

        def quality(model, enc, pairs, own, threshold, cfg):
            calls.append(threshold)
            return {"nll_ratio": ratios[threshold], "agreement": 0.95, "mean_exit": 3.0}
        monkeypatch.setattr(replies, "own_nll", lambda model, pairs: [1.0])
        monkeypatch.setattr(replies, "reply_quality", quality)
        monkeypatch.setattr(replies, "quality_summary", lambda q: q)
        monkeypatch.setattr(llm, "draft_defaults", lambda *a: {"draft_threshold": 0.5})
        got = llm.generation_defaults(model, None, [([1], [2])], t, scale, cfg)
        assert got["threshold"] == want and calls == tried and got["draft_threshold"] == 0.5
        assert got["kv"] == "defer" and list(got["validation"]) == tried


def test_first_layer_and_point_by_hand():
    stop = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert llm.first_layer(stop).tolist() == [2, 3, 1]
    preds = torch.tensor([[1, 2, 2], [0, 0, 5], [3, 3, 3]])
    m = report.point("x", 0.5, torch.tensor([2, 1, 1]), preds, torch.tensor([2, 5, 0]))
    assert m["accuracy"] == pytest.approx(1 / 3) and m["agreement"] == pytest.approx(2 / 3)
    assert m["avg_layers"] == pytest.approx(4 / 3) and m["speedup"] == pytest.approx(9 / 4)


@pytest.mark.parametrize("shortlist", [None, torch.arange(0, 50, 3)])
def test_rules_on_head_tables_equal_sweeps_of_every_heads_logits(shortlist):
    """The tables keep what the exit rules read; exits and figures equal report.sweep's on the full
    logits, for every rule and knob; with a shortlist, read on its own columns, the same as on the
    logits spread over the vocabulary (full depth's token outside it: CE log V, not infinity)."""
    model = tiny_llama()
    model.set_shortlist(shortlist)
    s = 3 * torch.randn(200, 4, 16)
    t = llm.head_tables(model, s, chunk=64)
    with torch.no_grad():
        logits = torch.stack([model.exit_logits(s[:, l], l) for l in range(4)], 1)
    full = logits[:, -1].argmax(-1)
    ce = cee.exit_ce(logits, full).nan_to_num(posinf=math.log(50))
    assert shortlist is None or (ce == math.log(50)).any()
    assert torch.equal(t.preds, logits.argmax(-1))
    torch.testing.assert_close(t.ce, ce)
    torch.testing.assert_close(t.gain("ce"), -ce)
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
    r = run("train.py", "--task=smollm2", "--llm_train=6", "--llm_validation=2", "--llm_test=7",
            "--llm_new_tokens=8", "--alphas=0.02", "--epochs2=2", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["picked"]["alpha"] == 0.02 and rep["tokens"] > 0
    assert rep["agreement_by_layer"]["stage1"][-1] == 1.0
    assert rep["oracle"]["stage1"] >= 1.0 and len(rep["agreement_by_layer"]["plain"]) == 30
    assert os.path.getsize(os.path.join(out, "stage3.pt")) < 50e6
    assert rep["shortlist"]["size"] in replies.SHORTLISTS  # the exits' vocabulary, saved
    saved = torch.load(f"{out}/stage3.pt")
    assert len(saved["shortlist"]) == rep["shortlist"]["size"]
    picked = saved["generate"]  # the drafts' own settings, the fastest on validation
    assert picked["draft_threshold"] in llm.DRAFT_THRESHOLDS
    assert picked["draft_len"] in llm.DRAFT_LENS
    speed = picked["drafts_validation"]
    assert len(speed) == 6 and all(v > 0 for v in speed.values())
    assert speed[f"{picked['draft_threshold']}/{picked['draft_len']}"] == max(speed.values())
    held_out = rep["generated_test"]["held-out kinds"]
    assert held_out["prompts"] == 2 and held_out["nll_policy"] > 0 and held_out["nll_full"] > 0
    texts = {}
    for exit in ("none", "speculative", "policy"):
        r = run("generate.py", f"--ckpt={out}/stage3.pt", "--chat", "--prompt=Name a color.",
                f"--exit={exit}", "--max_new_tokens=12", "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        texts[exit] = json.loads(r.stdout)
    assert texts["speculative"]["text"] == texts["none"]["text"]
    r = run("generate.py", f"--ckpt={out}/stage3.pt", "--chat", "--prompt=Hi.",
            "--exit=speculative", "--max_new_tokens=2")
    assert (f"(adapters, policies; drafts: threshold {picked['draft_threshold']}, length "
            f"{picked['draft_len']})") in r.stderr
    r = run("generate.py", f"--ckpt={out}/stage3.pt", "--chat", "--prompt=Hi.",
            "--exit=speculative", "--max_new_tokens=1", "--threshold=0.42")  # a given one wins
    assert "drafts: threshold 0.42," in r.stderr
    assert 1 <= texts["policy"]["mean_exit_layer"] <= 30
    import bench  # its figures on the run's test prompts
    b = bench.smollm2_exits(f"{out}/stage3.pt", "cpu", 1, bench.timer("cpu"), new_tokens=8)
    assert b["smollm2_speculative_identical"] is True
    assert 0 <= b["smollm2_policy_agreement"] <= 1 and b["smollm2_oracle_speedup"] >= 1
    assert b["smollm2_policy_exit_speedup"] > 0 and b["smollm2_speculative_speedup"] > 0
    assert b["smollm2_policy_reply_nll"] > 0 and b["smollm2_full_reply_nll_held_out_kinds"] > 0
    assert 0 <= b["smollm2_policy_repeat_3gram"] <= 1
    assert b["smollm2_speculative_drafts"] == {"threshold": picked["draft_threshold"],
                                              "draft_len": picked["draft_len"]}
    curve = b["smollm2_threshold_curve"]
    assert [(p["threshold"], p["kv"]) for p in curve][:len(bench.CURVE)] == bench.CURVE
    assert all(p["speedup"] > 0 and p["nll_ratio"] > 0 and 0 <= p["agreement"] <= 1
               and 1 <= p["mean_exit_layer"] <= 30 for p in curve)
    rows = b["smollm2_rows_cost"]
    assert set(rows) == {1, 2, 4, 8} and rows[1] == 1.0 and all(v > 0 for v in rows.values())
    r = run("train.py", "--task=smollm2", "--stage=2", f"--out_dir={out}")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "train.py: --task=smollm2 runs its three stages in one process (--stage, --resume and "
        "torchrun are for the other tasks)"]


def test_first_agreeing_layer_hand_case():
    full = torch.tensor([3, 3, 5])
    preds = torch.tensor([[1, 3, 3], [3, 1, 3], [0, 0, 5]])
    assert llm.first_agreeing_layer(preds, full).tolist() == [2, 1, 3]
