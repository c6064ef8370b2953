"""bench.py runs end to end and prints the JSON that checks outside this repository read."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import cee
from model import Config, Decoder, Encoder


def run(args, cwd):
    return subprocess.run([sys.executable, str(Path(bench.__file__)), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_bench_json_shape(tmp_path):
    r = run(["--json", "--repeats=1"], tmp_path)  # no out/ nor out_lm/ there: random weights
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)  # the whole output is one JSON object
    assert out["model"] == "random-init MiniLM shape"
    for key in ("realized_over_layer_speedup", "ours_over_hf_inference"):
        assert set(out[key]) == {"batch_1", "batch_64"} and all(v > 0 for v in out[key].values())
    assert set(out["decision_overhead"]) == {"policy", "entropy"}
    assert all(0 < v < 1 for v in out["decision_overhead"].values())
    assert out["joint_step_over_stage1_step"] > 0 and out["realized_without_decisions_batch_1"] > 0
    assert 1 < out["mean_exit_layer"]["batch_64"] < 6  # the random policies spread the exits
    assert out["ours_over_hf_generate"] > 0 and out["speculative_identical"] is True
    assert out["smollm2_ours_over_hf_generate"] > 0
    assert out["policy_exit_speedup"] is None and "run python train.py --task=lm" in out["lm_model"]


@pytest.mark.parametrize("args,msg", [
    (["--repets=3"], "bench.py: unknown option '--repets=3'"),
    (["--repeats=many"], "bench.py: --repeats expects int, got 'many'"),
    (["--repeats=0"], "bench.py: --repeats must be >= 1"),
    (["--ckpt=missing.pt"], "bench.py: missing.pt is missing"),
    (["--ckpt=bad.pt"], "bench.py: cannot load bad.pt"),
    (["--ckpt=lm.pt"], "bench.py: lm.pt holds a language model; bench.py needs a classification"),
])
def test_bad_options_and_checkpoints_are_one_line(tmp_path, args, msg):
    (tmp_path / "bad.pt").write_bytes(b"half a checkpoint")
    lm = Decoder(Config(n_layer=2, n_head=2, n_embd=16, n_inner=32, vocab_size=50, block_size=8))
    torch.save({"model": lm.state_dict(), "model_config": vars(lm.config)}, tmp_path / "lm.pt")
    r = run(args, tmp_path)
    assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr


def test_help_lists_the_options(tmp_path):
    r = run(["--help"], tmp_path)
    assert r.returncode == 0 and "realized_over_layer_speedup" in r.stdout
    assert all(f"{key}:" in r.stdout for key in ("ckpt", "lm_ckpt", "repeats", "device", "json"))


def test_lm_generation_figures(tmp_path):
    """The language-model half of bench.py on a small random decoder saved as train.py saves one."""
    torch.manual_seed(0)
    model = Decoder(Config(n_layer=3, n_head=2, n_embd=32, n_inner=64, vocab_size=257,
                           block_size=128, dropout=0.0))
    with torch.no_grad():
        for pol in model.policies:
            pol.net[-1].weight.mul_(40)  # decisive policies: tokens exit at different layers
    torch.save({"model": model.state_dict(), "model_config": vars(model.config),
                "config": {"max_len": 128, "seed": 1337, "lm_test_windows": 4}}, tmp_path / "lm.pt")
    out = bench.lm_generation(str(tmp_path / "lm.pt"), "cpu", 1, bench.timer("cpu"), new_tokens=8)
    assert out["speculative_identical_lm"] is True and 0 <= out["policy_agreement"] <= 1
    assert 1 <= out["policy_exit_mean_exit_layer"] <= 3 and out["policy_exit_speedup"] > 0
    assert out["speculative_speedup"] > 0 and 0 <= out["speculative_accepted_per_draft"] <= 8
    assert 0.5 < out["lm_layer_share"] < 1


def test_timed_rule_decides_like_the_rule_and_counts_time():
    torch.manual_seed(0)
    model = Encoder(Config(n_layer=3, n_head=2, n_embd=16, n_inner=32, vocab_size=40,
                           block_size=16)).eval()
    ids, mask = torch.randint(0, 40, (5, 8)), torch.ones(5, 8, dtype=torch.long)
    rule = cee.ExitRule("consistentee", 0.5)
    want = cee.early_exit(model, ids, mask, rule)
    timed = bench.TimedRule("consistentee", 0.5).clock(model, bench.timer("cpu"))
    got = cee.early_exit(model, ids, mask, timed)
    timed.unclock(model)
    assert all(torch.equal(a, b) for a, b in zip(want, got)) and timed.seconds > 0
    assert (not any(isinstance(p, bench.Clocked) for p in model.policies)
            and "policy_input" not in vars(model))


def test_full_depth_baseline_answers_as_early_exit():
    """
    The bench's baselines compute the same predictions as early exit told to run 3 layers (all)
    or 2.
    """
    torch.manual_seed(0)
    model = Encoder(Config(n_layer=3, n_head=2, n_embd=16, n_inner=32, vocab_size=40, block_size=16,
                           n_labels=5)).eval()
    ids, mask = torch.randint(0, 40, (6, 8)), torch.ones(6, 8, dtype=torch.long)
    mask[1, 5:] = mask[4, 2:] = 0  # (exits at layers 1, 2 and 3 predict differently here)
    preds, exits = cee.early_exit(model, ids, mask, cee.ExitRule("static", 3))
    with torch.inference_mode():
        assert torch.equal(bench.full_depth(model, ids, mask), preds) and exits.tolist() == [3] * 6
        # an exit known in advance
        preds, _ = cee.early_exit(model, ids, mask, cee.ExitRule("static", 2))
        assert torch.equal(bench.full_depth(model, ids, mask, layers=2), preds)


def test_interleaved_pairs_each_input_and_sums_its_medians():
    """On a fake clock: the pairs alternate input by input, and a slow repeat of each input (in
    different rounds, so that the median of the per-round sums would move) does not move the
    result."""
    clock, calls = [0.0], []

    def work(name, seconds):
        def f():
            calls.append(name)
            clock[0] += seconds.pop(0) if isinstance(seconds, list) else seconds
        return f
    # the warm-up, then 3 repeats, one slow
    fa = [work("a0", [1, 1, 100, 1]), work("a1", [3, 3, 3, 100])]
    fb = [work("b0", 2), work("b1", 4)]
    assert bench.interleaved(fa, fb, 3, lambda: clock[0]) == pytest.approx((1 + 3) / (2 + 4))
    assert calls == ["a0", "b0", "a1", "b1"] * 4
    assert bench.interleaved(work("a", 3), work("b", 2), 2, lambda: clock[0]) == pytest.approx(1.5)
