"""bench.py runs end to end and prints the JSON that checks outside this repository read."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import cee
from model import Config, Encoder


def test_bench_json_shape(tmp_path):
    r = subprocess.run([sys.executable, str(Path(bench.__file__)), "--json", "--repeats=1",
                        f"--ckpt={tmp_path / 'none.pt'}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model"] == "random-init MiniLM shape"
    for key in ("realized_over_layer_speedup", "ours_over_hf_inference"):
        assert set(out[key]) == {"batch_1", "batch_64"} and all(v > 0 for v in out[key].values())
    assert set(out["decision_overhead"]) == {"policy", "entropy"}
    assert all(0 < v < 1 for v in out["decision_overhead"].values())
    assert out["joint_step_over_stage1_step"] > 0
    assert 1 < out["mean_exit_layer"]["batch_64"] < 6  # the random policies spread the exits


def test_timed_rule_decides_like_the_rule_and_counts_time():
    torch.manual_seed(0)
    model = Encoder(Config(n_layer=3, n_head=2, n_embd=16, n_inner=32, vocab_size=40, block_size=16)).eval()
    ids, mask = torch.randint(0, 40, (5, 8)), torch.ones(5, 8, dtype=torch.long)
    rule = cee.ExitRule("consistentee", 0.5)
    want = cee.early_exit(model, ids, mask, rule)
    timed = bench.TimedRule("consistentee", 0.5).clock(model, bench.timer("cpu"))
    got = cee.early_exit(model, ids, mask, timed)
    timed.unclock(model)
    assert all(torch.equal(a, b) for a, b in zip(want, got)) and timed.seconds > 0
    assert not any(isinstance(p, bench.Clocked) for p in model.policies) and "policy_input" not in vars(model)


def test_bench_rejects_unknown_option():
    with pytest.raises(SystemExit, match="unknown option --fast"):
        bench.main(["--fast"])
