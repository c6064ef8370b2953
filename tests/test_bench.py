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


def tiny_llama_for_decoding():
    """A small random Llama-style decoder as generate.py runs it: a shortlist head, policies that
    send tokens out at different layers."""
    torch.manual_seed(0)
    model = Decoder(Config(n_layer=4, n_head=2, n_kv_head=1, n_embd=64, n_inner=128,
                           vocab_size=512, block_size=64, rope_theta=100.0, norm="rms",
                           gated_mlp=True, bias=False, act="silu", ln_eps=1e-5, dropout=0.0,
                           exit_adapters=True)).eval()
    with torch.no_grad():
        for pol in model.policies:
            pol.net[-1].weight.normal_(0, 3.0)
    model.set_shortlist(torch.arange(0, 512, 3))
    return model.for_decoding()


@pytest.mark.parametrize("kw,parts", [
    ({}, {"prefill", "layers", "head_full"}),
    (dict(exit="policy"), {"prefill", "layers", "head_exits", "policies", "state_copying"}),
    (dict(exit="policy", kv="defer"), {"prefill", "layers", "head_exits", "policies"}),
    (dict(exit="speculative"), {"prefill", "drafts", "verification"}),
])
def test_time_split_parts_add_up_to_the_total(kw, parts):
    """The parts and "other" make the whole, each part is a real share of it; how much "other"
    is, is a timing: bench.py reports it (a test asserts no speed)."""
    model = tiny_llama_for_decoding()
    idxs = [torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(i))
            for i in range(3)]
    seconds, calls, tokens = bench.time_split(model, idxs, 12, bench.timer("cpu"), **kw)
    named = {k: v for k, v in seconds.items() if k not in ("other", "total")}
    assert parts <= set(named) and tokens == 3 * 12 and calls["prefill"] == 3
    assert sum(named.values()) + seconds["other"] == pytest.approx(seconds["total"], rel=1e-12)
    assert all(v > 0 for v in named.values()) and seconds["other"] >= 0


def test_timed_parts_leave_generation_alone_and_unwrap():
    import generate
    model = tiny_llama_for_decoding()
    idx = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    functions = generate.step, generate.prefill
    want = [generate.generate(model, idx, 10, exit)[0] for exit in ("policy", "speculative")]
    with bench.timed_parts(model, bench.timer("cpu"), speculative=True) as (seconds, _):
        got = [generate.generate(model, idx, 10, exit)[0] for exit in ("policy", "speculative")]
    assert all(torch.equal(a, b) for a, b in zip(want, got)) and seconds["drafts"] > 0
    for name in ("run_layer", "exit_logits", "copy_state_up", "folded_kv"):  # the class's again
        assert name not in vars(model) and getattr(model, name).__func__ is getattr(Decoder, name)
    assert not any("forward" in vars(pol) for pol in model.policies)
    assert (generate.step, generate.prefill) == functions


@pytest.mark.parametrize("c,a,gamma,v,tokens,speedup", [
    (0.5, 0.5, 2, 1.0, 1 + 0.5 + 0.25, 1.75 / (2 * 0.5 + 1.0)),
    (0.25, 0.8, 4, 1.1, (1 - 0.8 ** 5) / 0.2, 3.3616 / 2.1),
    (0.2, 1.0, 4, 1.2, 5, 5 / 2.0),  # every draft kept: gamma + 1 tokens a round
    (0.3, 0.0, 3, 1.0, 1, 1 / 1.9),  # none kept: the verification's token alone
])
def test_speculative_cost_model_by_hand(c, a, gamma, v, tokens, speedup):
    got = bench.speculative_cost_model(c, a, gamma, v)
    assert got["tokens_per_round"] == pytest.approx(tokens)
    assert got["predicted_speedup"] == pytest.approx(speedup)
    assert (got["c"], got["a"], got["gamma"], got["v"]) == (c, a, gamma, v)


def test_weight_bytes_per_token_by_hand():
    """GPT-2 shape, width 16, 2 layers, 50 tokens, tied head; float32."""
    model = Decoder(Config(n_layer=2, n_head=2, n_embd=16, n_inner=32, vocab_size=50,
                           block_size=8))
    # a block: ln_1 and ln_2 (16 + 16 each), qkv 16 x 48 + 48, proj 16 x 16 + 16,
    # fc 16 x 32 + 32, proj 32 x 16 + 16; then ln_f 16 + 16 and the head 50 x 16 (once)
    block = 2 * 32 + (16 * 48 + 48) + (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16)
    want = 4 * (2 * block + 32 + 50 * 16)
    assert bench.weight_bytes_per_token(model) == want == 21_120
    assert bench.weight_bytes_per_token(model.for_decoding()) == want  # the same weights
