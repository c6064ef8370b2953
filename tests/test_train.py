"""
train.py: the shared stage loss learns a hardness-aware policy; options; a smoke run end to end.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

import cee
import common
import generate
import rl
import report
import tasks
import train
from model import Config, Decoder, Encoder


N, L = 256, 4  # the synthetic policy tasks: inputs, layers


def synthetic(halves, guess):
    """A model, states that tell the two halves of the inputs apart, and one-hot logits (N, L, 2)
    of guess."""
    model = Encoder(Config(n_layer=L, n_head=2, n_embd=8, n_inner=16, vocab_size=10, block_size=8,
                           n_labels=2))
    s = torch.randn(N, L, 8) * 0.1
    s[:, :, 0] = halves.float()[:, None] * 2 - 1  # the state says which half (+1 or -1)
    # equally confident, right or wrong
    return model, s, torch.nn.functional.one_hot(guess, 2).float() * 3


def trained_exits(model, s, logits, labels, memorized, options, alpha=0.5):
    """
    Stage 2 on the synthetic task for 150 steps; then every input's exit layer at threshold 0.5.
    """
    opt = torch.optim.Adam(model.policies.parameters(), lr=1e-2)
    for step in range(150):
        i = torch.randint(0, N, (32,))
        loss, _ = cee.stage_loss(model, 2, s[i], logits[i], labels[i], memorized[i], alpha,
                                 **options)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return cee.exit_layers(cee.ExitRule("consistentee", 0.5), logits,
                               cee.policy_probs(model, s, logits))


@pytest.mark.parametrize("estimator", ["reinforce", "exact"])
@pytest.mark.parametrize("reward", ["correct", "ce"])
def test_policy_exits_easy_inputs_earlier_than_hard(estimator, reward):
    """Synthetic task of known hardness: easy inputs are decided by every head, hard ones only by
    the last."""
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (N,))
    easy = torch.arange(N) % 2 == 0
    # (N, L)
    right = torch.where(easy[:, None], torch.ones(N, L, dtype=torch.bool), torch.arange(L) == L - 1)
    guess = torch.where(right, labels[:, None], 1 - labels[:, None])  # each head's prediction
    model, s, logits = synthetic(easy, guess)
    memorized = cee.memorized_layer(guess, labels)
    assert memorized[easy].eq(1).all() and memorized[~easy].eq(L).all()
    exits = trained_exits(model, s, logits, labels, memorized,
                          dict(estimator=estimator, reward=reward))
    assert exits[easy].float().mean() < 1.2 and exits[~easy].float().mean() > L - 0.2
    with torch.no_grad():
        p = cee.policy_probs(model, s, logits)
    assert report.sweep("consistentee", [0.5], logits, labels, p)[0]["accuracy"] > 0.95


@pytest.mark.parametrize("target", ["label", "full"])
@pytest.mark.parametrize("reward", ["correct", "ce"])
def test_policy_target_label_learns_to_be_right_full_to_agree(target, reward):
    """On half the inputs every head is right; on the other half heads 1..L-1 are right and the
    last one is wrong. Scored against the label, the policy exits both halves at layer 1 (right
    is what pays); scored against the full depth's prediction, it runs the second half to layer L
    (agreeing with it is what pays)."""
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (N,))
    last_right = torch.arange(N) % 2 == 0
    guess = labels[:, None].repeat(1, L)
    guess[~last_right, -1] = 1 - labels[~last_right]
    model, s, logits = synthetic(last_right, guess)
    cfg = train.TrainConfig(estimator="exact", policy_target=target, reward=reward)
    memorized = train.memorized_of(logits, labels, cfg)
    # hard, either way
    assert memorized[last_right].eq(1).all() and memorized[~last_right].eq(L).all()
    exits = trained_exits(model, s, logits, labels, memorized, train.method_options(cfg))
    assert exits[last_right].float().mean() < 1.2
    if target == "label":
        assert exits[~last_right].float().mean() < 1.2
    else:
        assert exits[~last_right].float().mean() > L - 0.2


def test_memorized_layer_follows_the_policy_target():
    """Every head agrees on a wrong token: hard for the label (layer L), easy for the full depth
    (layer 1)."""
    # (2, 3, 4) all say 0
    logits = torch.nn.functional.one_hot(torch.zeros(2, 3, dtype=torch.long), 4).float()
    labels = torch.tensor([1, 0])
    for target, want in (("label", [3, 1]), ("full", [1, 1])):
        got = train.memorized_of(logits, labels, train.TrainConfig(policy_target=target))
        assert got.tolist() == want


def test_stage3_loss_is_taken_at_the_sampled_exits():
    torch.manual_seed(0)
    model = Encoder(Config(n_layer=3, n_head=2, n_embd=8, n_inner=16, vocab_size=10, block_size=8))
    s, logits = torch.randn(4, 3, 8), torch.randn(4, 3, 2, requires_grad=True)
    labels, memorized = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 2, 3, 3])
    with torch.no_grad():
        for pol in model.policies:  # exit at layer 1 always
            pol.net[-1].bias.fill_(30.0)
    loss, logs = cee.stage_loss(model, 3, s, logits, labels, memorized, 0.1, K=4)
    loss.backward()
    assert logs["exit/mean"] == pytest.approx(1.0)
    # CE only where they exit
    assert logits.grad[:, 1:].abs().sum() == 0 and logits.grad[:, 0].abs().sum() > 0
    ce1 = torch.nn.functional.cross_entropy(logits[:, 0], labels)
    assert logs["loss/cls"] == pytest.approx(ce1.item(), rel=1e-5)


@pytest.mark.parametrize("reward", ["correct", "ce"])
def test_stage3_losses_by_hand_with_mixed_sampled_exits(reward):
    """Stage 3's two losses written out by hand, input by input and trajectory by trajectory, for
    policies that send the K sampled trajectories of each input to different layers; the reward's
    accuracy term is 1 if the exit head is right ("correct") or its -CE ("ce", the paper's)."""
    torch.manual_seed(0)
    B, L, K, alpha = 3, 3, 6, 0.1
    model = Encoder(Config(n_layer=L, n_head=2, n_embd=8, n_inner=16, vocab_size=10, block_size=8))
    with torch.no_grad():
        for pol in model.policies:  # exit probabilities near 0.5: mixed exits
            pol.net[-1].weight.mul_(0)
            pol.net[-1].bias.normal_(0, 0.5)
    s, logits = torch.randn(B, L, 8), torch.randn(B, L, 2)
    labels, memorized = torch.tensor([0, 1, 1]), torch.tensor([1, 2, 3])
    torch.manual_seed(1)
    loss, logs = cee.stage_loss(model, 3, s, logits, labels, memorized, alpha, K=K, reward=reward)
    p = cee.policy_probs(model, s, logits).detach()  # (B, L)
    torch.manual_seed(1)
    exits, _ = rl.sample_exits(p, K)  # the same draws as inside stage_loss
    assert len(set(exits.flatten().tolist())) == L  # every layer is some trajectory's exit
    ce = -torch.log_softmax(logits, -1)  # (B, L, 2)
    cls, policy = 0.0, 0.0
    for b in range(B):
        rewards, log_probs = [], []
        for k in range(K):
            t = int(exits[k, b])
            cls += ce[b, t - 1, labels[b]].item() / (B * K)  # CE where this trajectory exits
            gain = (float(logits[b, t - 1].argmax() == labels[b]) if reward == "correct"
                    else -ce[b, t - 1, labels[b]].item())
            rewards.append(gain - alpha * t * (1 - memorized[b].item() / L))
            log_probs.append(sum(math.log(1 - p[b, j].item()) for j in range(t - 1))
                             + (math.log(p[b, t - 1].item()) if t < L else 0.0))
        mean = sum(rewards) / K  # the baseline: the mean reward of the input's K trajectories
        policy -= sum((r - mean) * lp for r, lp in zip(rewards, log_probs)) / (B * K)
    assert logs["loss/cls"] == pytest.approx(cls, rel=1e-5)
    assert logs["loss/policy"] == pytest.approx(policy, rel=1e-4, abs=1e-6)
    assert loss.item() == pytest.approx(cls + policy, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("estimator", ["reinforce", "exact"])
def test_policy_loss_sends_no_gradient_into_the_backbone_states(estimator):
    """The policy reads detached states: its loss moves the policies and nothing that made the
    states (README, step 4). Stage 3's classification loss does reach the states and heads."""
    torch.manual_seed(0)
    model = Encoder(Config(n_layer=3, n_head=2, n_embd=8, n_inner=16, vocab_size=10, block_size=8))
    s = torch.randn(4, 3, 8, requires_grad=True)  # stands for the backbone's exit states
    logits = torch.randn(4, 3, 2, requires_grad=True)
    labels, memorized = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 2, 3, 3])
    loss, _ = cee.stage_loss(model, 2, s, logits, labels, memorized, 0.1, estimator=estimator)
    loss.backward()
    assert s.grad is None and logits.grad is None  # nothing flows back into the backbone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.policies.parameters())
    loss, _ = cee.stage_loss(model, 3, s, logits, labels, memorized, 0.1, estimator=estimator)
    loss.backward()
    assert s.grad is None and logits.grad.abs().sum() > 0  # only the heads' CE reaches them


def test_stage2_trains_the_policies_alone(tmp_path):
    """run_stage's stage 2 changes every policy and leaves every backbone and head weight as it
    was, bit for bit."""
    from datasets import Dataset
    torch.manual_seed(0)
    model = Encoder(Config(n_layer=3, n_head=2, n_embd=16, n_inner=32, vocab_size=50,
                           block_size=16))
    split = Dataset.from_dict({"input_ids": [[1, 5 + i % 7, 6, 2] for i in range(16)],
                               "label": [i % 2 for i in range(16)]})
    task = tasks.Task({"train_rl": split}, None, tasks.text_outputs, 1, 64, True)
    train_pass = tasks.all_layers(task, model, split, "cpu")
    memorized = train.memorized_of(train_pass.logits, train_pass.labels,
                                 train.TrainConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = train.TrainConfig(out_dir=str(tmp_path), device="cpu", batch_size=4, lr2=1e-2)
    train.run_stage(model, 2, task, cfg, memorized, train_pass, alpha=0.1, resumable=False)
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith("policies."), k


@pytest.mark.parametrize("argv,msg", [
    (["--nope=1"], "unknown option '--nope=1'"),
    (["--alphas=abc"], "--alphas must be numbers >= 0"),
    (["--alphas=0.1,-1"], "--alphas must be numbers >= 0"),
    (["--alphas="], "--alphas must be numbers"),
    (["--alphas=nan"], "--alphas must be numbers"),
    (["--reward=mse"], "--reward must be correct or ce"),
    (["--K=abc"], "--K expects int, got 'abc'"), (["--K=0"], "--K must be >= 1"),
    (["--estimator=ppo"], "--estimator must be"),
    (["--policy_conf=maybe"], "--policy_conf expects bool"),
    (["--policy_target=gold"], "--policy_target must be label or full"),
    (["alphas=1"], "unknown option"), (["--alpha=0.1"], "unknown option"),
    (["--epochs2=0"], "--epochs1/2/3 must be > 0"),
    (["--log_interval=0"], "--log_interval >= 1"), (["--lr1=-1e-5"], "--lr1/2/3 must be > 0"),
    (["--task=lm", "--lm_heads=0"], "--lm_heads and --lm_width must be >= 1"),
    (["--task=lm", "--lm_width=100", "--lm_heads=3"],
     "--lm_width must be a multiple of --lm_heads"),
])
def test_bad_options_stop_with_one_line(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        train.parse_args(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_one_line():
    with pytest.raises(SystemExit, match="device 'cuda' is not available"):
        common.pick_device("cuda", "train.py")
    assert common.pick_device("auto", "train.py") in ("cpu", "mps")


def test_options_are_typed():
    cfg = train.parse_args(["--alphas=0.05,0.1", "--K=4", "--policy_conf=true", "--task=x.csv",
                            "--reward=ce"])
    assert ((cfg.alphas, cfg.K, cfg.policy_conf, cfg.task, cfg.reward)
            == ("0.05,0.1", 4, True, "x.csv", "ce"))
    assert train.alpha_grid(cfg) == [0.05, 0.1]


def run(args, cwd):
    return subprocess.run([sys.executable, train.__file__, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def write_task(folder, n=120):
    """A small task file of the user's kind: n rows of text,label."""
    words = ["good", "great", "fine", "bad", "awful", "dull"]
    rows = [f"{words[i % 6]} film number {i},{'pos' if i % 6 < 3 else 'neg'}" for i in range(n)]
    (folder / "task.csv").write_text("text,label\n" + "\n".join(rows) + "\n")


def test_smoke_run_writes_report_and_reruns_a_stage(tmp_path):
    """MiniLM on a small task file, two optimiser steps per stage, the full evaluation."""
    write_task(tmp_path)
    out = tmp_path / "out"
    r = run(["--task=task.csv", "--max_steps=2", f"--out_dir={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["full"]["layers"] == 6 and 0 <= report["full"]["accuracy"] <= 1
    names = {m["name"] for m in report["methods"]}
    assert names == {"consistentee", "static", "entropy", "patience", "maxprob"}
    for m in report["methods"]:
        assert m["speedup"] == pytest.approx(6 / m["avg_layers"]) and 1 <= m["avg_layers"] <= 6
    static = {m["param"]: m for m in report["methods"] if m["name"] == "static"}
    assert static[6]["accuracy"] == pytest.approx(report["full"]["accuracy"])
    assert static[1]["speedup"] == 6
    assert (out / "tradeoff.png").stat().st_size > 0
    assert "rank correlation" in r.stdout and "cee-stage3" in r.stdout
    # the step lines go to the run's log, not the console (--verbose=true prints them too)
    assert "stage 1 step 2/2 loss/cls" in (out / "train.log").read_text()
    assert "stage 1 step" not in r.stdout + r.stderr
    ours = [m for m in report["methods"] if m["name"] == "consistentee"]
    alphas = [float(a) for a in train.TrainConfig().alphas.split(",")]
    assert ({(m["reward"], m["alpha"]) for m in ours if m["stage"] == 2}
            == {(r, a) for r in cee.REWARDS for a in alphas})
    assert ({m["alpha"] for m in ours if m["stage"] == 3}
            == {report["picked"]["alpha"]} <= set(alphas))
    assert report["versus_baselines"][0]["what"] == "operating point"
    for row in report["versus_baselines"]:
        if "interval" in row:
            assert row["interval"][0] <= row["difference"] <= row["interval"][1]
    control = report["stage3_vs_control"]
    assert len(control["stage3"]["heads"]) == len(control["control"]["heads"]) == 6
    assert control["stage3"]["full"] == pytest.approx(report["final_full_depth_accuracy"])
    e = report["exit_by_memorized_layer"]
    assert sum(sum(h) for h in e["histogram"].values()) == sum(e["count"].values())
    r = run(["--task=task.csv", "--max_steps=1", "--stage=3", f"--out_dir={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "train.log").read_text()  # the rerun of stage 3 starts the log anew
    assert "stage 1 step" not in log and "stage 3 step 1/1" in log
    r = run(["--task=task.csv", "--stage=3", "--seed=7", f"--out_dir={out}"], tmp_path)
    assert r.returncode == 1 and "was trained with --seed=1337, not 7" in r.stderr
    assert "Traceback" not in r.stderr
    r = run(["--task=task.csv", "--stage=3", "--reward=ce", f"--out_dir={out}"], tmp_path)
    assert r.returncode == 1 and "was trained with --reward=correct, not ce" in r.stderr


def test_missing_checkpoint_is_one_line(tmp_path):
    r = run(["--stage=2", f"--out_dir={tmp_path}"], tmp_path)
    assert r.returncode == 1 and "stage1.pt is missing" in r.stderr and "Traceback" not in r.stderr


# --- language modelling (--task=lm) ---------------------------------------------------------------

def test_lm_takes_its_own_defaults_unless_given():
    cfg = train.parse_args(["--task=lm", "--batch_size=4"])
    assert (cfg.init, cfg.lr1, cfg.batch_size, cfg.policy_conf) == ("scratch", 3e-3, 4, False)
    assert (cfg.policy_target, cfg.reward, cfg.control) == ("full", "ce", False)
    # fine-tuning, not from scratch
    assert train.parse_args(["--task=lm", "--init=some/gpt2"]).lr1 == 5e-5
    assert train.parse_args([]).lr1 == train.TrainConfig().lr1  # classification keeps its own
    with pytest.raises(SystemExit, match="--lm_rl_windows must lie in"):
        train.parse_args(["--task=lm", "--lm_rl_windows=99999"])


def test_lm_rows_are_token_positions():
    torch.manual_seed(0)
    model = Decoder(Config(n_layer=3, n_head=2, n_embd=16, n_inner=32, vocab_size=50, block_size=8,
                           dropout=0.0))
    w = torch.randint(0, 50, (2, 9))
    logits, s, labels = tasks.token_outputs(model, {"input_ids": w[:, :-1], "labels": w[:, 1:]})
    assert (logits.shape == (16, 3, 50) and s.shape == (16, 3, 16)
            and torch.equal(labels, w[:, 1:].flatten()))
    states = model.layer_states(w[:, :-1])
    assert torch.equal(s[9, 1], states[2][1, 1])  # row 9 = window 1, position 1; layer 2
    # the last exit is the LM
    assert torch.allclose(logits[:, -1], model(w[:, :-1])[0].flatten(0, 1))


def lm_args(out):
    return ["--task=lm", "--lm_windows=16", "--lm_rl_windows=4", "--lm_test_windows=2",
            "--max_len=16", "--max_steps=2", f"--out_dir={out}"]


def test_lm_smoke_run_then_generate(tmp_path):
    out = tmp_path / "out"
    r = run(lm_args(out) + ["--lm_layers=3", "--lm_width=32", "--lm_heads=2"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["full"]["layers"] == 3 and 0 <= report["full"]["accuracy"] <= 1
    assert all(0 <= m["agreement"] <= 1 and 1 <= m["avg_layers"] <= 3 for m in report["methods"])
    static = {m["param"]: m for m in report["methods"] if m["name"] == "static"}
    assert (static[3]["agreement"] == 1
            and static[3]["accuracy"] == pytest.approx(report["full"]["accuracy"]))
    # every test token is an input
    assert sum(report["exit_by_memorized_layer"]["count"].values()) == 2 * 16
    ckpt = torch.load(out / "stage3.pt", weights_only=True)
    assert ckpt["memorized"].shape == (4 * 16,) and ckpt["model_config"]["vocab_size"] == 257
    small = ["--lm_layers=3", "--lm_width=32", "--lm_heads=2"]
    # memorized layers again
    r = run(lm_args(out) + small + ["--stage=2", "--policy_target=label"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("memorized layer of the training inputs" in r.stdout
            and "stage 2 correct alpha 0.02 step 2/2" in (out / "train.log").read_text())
    assert (json.loads((out / "report.json").read_text())["exit_by_memorized_layer"]["target"]
            == "label")
    r = run(lm_args(out) + small + ["--stage=3"], tmp_path)
    assert r.returncode == 1 and "was trained with --policy_target=label, not full" in r.stderr
    g = subprocess.run([sys.executable, generate.__file__, f"--ckpt={out / 'stage3.pt'}",
                        "--prompt=Hi", "--exit=policy", "--max_new_tokens=5", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr[-2000:]
    assert json.loads(g.stdout)["tokens"] == 5


def test_lm_from_a_gpt2_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32)
    ).save_pretrained(tmp_path / "gpt2")
    r = run(lm_args(tmp_path / "out") + [f"--init={tmp_path / 'gpt2'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "freshly initialised: policies" in r.stderr
    ckpt = torch.load(tmp_path / "out" / "stage1.pt", weights_only=True)
    assert ckpt["model_config"]["vocab_size"] == 50257 and ckpt["config"]["lr1"] == 5e-5


def test_lm_refuses_logits_that_would_not_fit(tmp_path):
    r = run(["--task=lm", "--lm_vocab=4096", "--lm_windows=20000", "--lm_rl_windows=20000",
             f"--out_dir={tmp_path}"], tmp_path)
    assert r.returncode == 1 and "would take 312 GiB" in r.stderr and "Traceback" not in r.stderr


def test_checkpoint_of_another_task_or_version_is_one_line(tmp_path):
    model = Encoder(Config(n_layer=2, n_head=2, n_embd=16, n_inner=32, vocab_size=50, block_size=8))
    # before --task=lm
    old = {k: v for k, v in vars(train.TrainConfig()).items() if not k.startswith("lm_")}
    torch.save({"model": model.state_dict(), "model_config": vars(model.config), "config": old,
                "stage": 1, "memorized": None}, tmp_path / "stage1.pt")
    cfg = train.TrainConfig(out_dir=str(tmp_path), device="cpu")
    # options newer than the file count as their defaults
    loaded, _, _ = train.load("stage1.pt", cfg)
    assert torch.equal(loaded.wte.weight, model.wte.weight)
    with pytest.raises(SystemExit, match="was trained with --task=rotten_tomatoes, not lm"):
        train.load("stage1.pt",
                   train.parse_args(["--task=lm", "--device=cpu", f"--out_dir={tmp_path}"]))


def test_learning_rate_warms_up_then_decays():
    # no warm-up: linear decay
    assert [train.lr_factor(i, 100, 0) for i in (0, 50, 99)] == [1.0, 0.5, 0.01]
    f = [train.lr_factor(i, 100, 5) for i in range(100)]
    assert f[:6] == [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0] and f[-1] == 1 / 95
    assert all(a > b for a, b in zip(f[5:], f[6:]))  # the peak is 1, then it only falls
    # warm-up: at most a tenth of the stage
    assert [train.lr_factor(i, 20, 50) for i in (0, 2)] == [1 / 3, 1.0]
