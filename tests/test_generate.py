"""
generate.py: parity with transformers, lossless speculative decoding, state copying, bad input.
"""
import json
import subprocess
import sys

import pytest
import torch

import cee
import generate
import tokenizer
from common import load_model
from model import Config, Decoder, Encoder, TransposedLinear

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random-init GPT-2 with the real vocabulary, whose deeper layers change the prediction."""
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4,
                                                              n_positions=64))
    with torch.no_grad():
        for block in hf.transformer.h[1:]:
            block.mlp.c_proj.weight.mul_(30)
    hf.eval().save_pretrained(path)
    return path


def prompt():
    return torch.randint(0, 50257, (1, 7), generator=torch.Generator().manual_seed(1))


def test_greedy_equals_transformers_generate(gpt2_dir):
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    idx = prompt()
    want = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=24,
                       pad_token_id=0)[:, 7:]
    new, stats = generate.generate(Decoder.from_pretrained(gpt2_dir).eval(), idx, 24)
    assert torch.equal(new, want) and stats["mean_exit_layer"] == 4


def test_a_batch_of_prompts_gives_each_prompts_own_reply(gpt2_dir):
    """Prompts of one length run as one batch (exit none): each row is the prompt's reply alone,
    up to its stop, then says stop again until every row has; other exits refuse a batch."""
    model = Decoder.from_pretrained(gpt2_dir).eval()
    idx = torch.randint(0, 50257, (3, 5), generator=torch.Generator().manual_seed(2))
    alone = [generate.generate(model, row[None], 12)[0][0] for row in idx]
    stop = alone[1][4].item()  # row 1 stops after 5 tokens; the others may not
    batch, stats = generate.generate(model, idx, 12, stop=stop)
    for row, want in zip(batch, alone):
        n = (want == stop).nonzero()[0, 0].item() + 1 if stop in want else len(want)
        assert torch.equal(row[:n], want[:n]) and (row[n:] == stop).all()
    assert stats["context_full"] is False
    assert generate.generate(model, idx, 100)[1]["context_full"] is True  # 59 of 64 positions left
    with pytest.raises(ValueError, match="full depth only"):
        generate.generate(model, idx, 4, "policy")


# policies that never exit, untrained ones, always exit
@pytest.mark.parametrize("bias", [-30.0, 0.0, 30.0])
@pytest.mark.parametrize("draft_len", [1, 3, 5])
def test_speculative_is_identical_to_full_depth(gpt2_dir, bias, draft_len):
    model = Decoder.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        for pol in model.policies:
            pol.net[-1].bias.add_(bias)
    idx = prompt()
    want, _ = generate.generate(model, idx, 30)
    got, stats = generate.generate(model, idx, 30, "speculative", draft_len=draft_len)
    assert torch.equal(got, want)
    if bias > 0:  # drafts from layer 1 of 4 are often wrong here: the verification must reject them
        assert stats["mean_exit_layer"] == 1 and stats["accepted_per_draft"] < draft_len


def test_exited_token_leaves_copied_state_in_skipped_layers(gpt2_dir):
    model = Decoder.from_pretrained(gpt2_dir).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        # a LayerNorm gain and bias, and a K/V bias, for the folding to get right
        for block in model.blocks:
            for p in (block.ln_1.weight, block.ln_1.bias, block.attn.qkv.bias):
                p.copy_(torch.randn_like(p))
        model.policies[0].net[-1].bias.fill_(30.0)  # every token exits after layer 1
        idx = prompt()
        cache = model.new_cache(1, 16)
        generate.prefill(model, idx, cache)
        before = cache.clone()
        tok = torch.tensor([[42]])
        logits, exit_layer = generate.step(model, tok, cache, 7, cee.ExitRule("consistentee", 0.5))
        # its layer-1 state; writes before's layer 0 as step did
        h = model.run_layer(0, model.embed(tok, 7), before, 7)
        assert exit_layer == 1 and torch.allclose(logits, model.exit_logits(h[:, -1]), atol=1e-5)
        for l in (1, 2, 3):
            # (1, 1, C) each
            k, v = model.blocks[l].attn.qkv(model.blocks[l].ln_1(h))[..., 32:].split(32, -1)
            assert torch.allclose(cache[l][0][0, :, 7], k.view(4, 8), atol=1e-5)
            assert torch.allclose(cache[l][1][0, :, 7], v.view(4, 8), atol=1e-5)
        # nothing written past its position
        assert torch.equal(cache[:, :, :, :, 8:], before[:, :, :, :, 8:])
        assert torch.equal(cache[0], before[0])  # nor in the layer it ran


def mixed_exits(model):
    """Policies whose decisions depend on the token, so tokens exit at different layers."""
    g = torch.Generator().manual_seed(4)  # a seed whose policies exit tokens at layers 1 to 4 here
    with torch.no_grad():
        for p in model.policies.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_deferred_fill_gives_the_keys_and_values_of_full_depth(gpt2_dir):
    model = mixed_exits(Decoder.from_pretrained(gpt2_dir).eval())
    idx, rule, pending = prompt(), cee.ExitRule("consistentee", 0.5), []
    cache = model.new_cache(1, 32)
    logits, toks, exits = generate.prefill(model, idx, cache), [], []
    for pos in range(7, 19):
        toks.append(logits.argmax(-1, keepdim=True))
        logits, e = generate.step(model, toks[-1], cache, pos, rule, pending)
        exits.append(e)
    assert len(set(exits)) > 1 and min(exits) < 4 and pending  # some layers are still waiting
    toks.append(logits.argmax(-1, keepdim=True))
    # one token at full depth...
    logits, e = generate.step(model, toks[-1], cache, 19, None, pending)
    assert e == 4 and pending == []  # ...took every waiting layer along
    seq = torch.cat([idx] + toks, 1)  # (1, 20)
    states = model.layer_states(seq)
    assert torch.allclose(logits, model.exit_logits(states[-1][:, -1]), atol=1e-4)
    # every position, every layer: what a full-depth pass computes
    for l, (k, v) in enumerate(cache):
        # (T, qkv, H, D)
        want = model.blocks[l].attn.qkv(model.blocks[l].ln_1(states[l]))[0].view(20, 3, 4, 8)
        assert torch.allclose(k[0, :, :20], want[:, 1].transpose(0, 1), atol=1e-5)
        assert torch.allclose(v[0, :, :20], want[:, 2].transpose(0, 1), atol=1e-5)


@pytest.mark.parametrize("exit", ["policy", "speculative"])
def test_deferred_fill_generates(gpt2_dir, exit):
    model = mixed_exits(Decoder.from_pretrained(gpt2_dir).eval())
    full, _ = generate.generate(model, prompt(), 20)
    new, stats = generate.generate(model, prompt(), 20, exit, kv="defer")
    copied, _ = generate.generate(model, prompt(), 20, exit, kv="copy")
    assert new.shape == (1, 20) and 1 < stats["mean_exit_layer"] < 4
    if exit == "speculative":
        assert torch.equal(new, full) and torch.equal(copied, full)


# full depth, state copying, deferred fill, self-speculative
DECODE_MODES = [("none", "copy"), ("policy", "copy"), ("policy", "defer"), ("speculative", "defer")]


def assert_decodes_as_plain(model, idx, exit, kv):
    """
    model.for_decoding() against model, a Decoder with exit adapters, whose adapters and policies
    this first sets to random values (mixed_exits): logits within 1e-4 (the full forward, and the
    exit head of a middle layer), greedy generation token for token the same, and model untouched.
    """
    mixed_exits(model)
    with torch.no_grad():  # adapters off the identity, so that each layer's exit head differs
        for a in model.adapters:
            a.weight.add_(0.3 * torch.randn_like(a.weight))
            a.bias.normal_(0, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = model.for_decoding()
    assert isinstance(fast.lm_head, TransposedLinear) and isinstance(fast.adapters[0],
                                                                     TransposedLinear)
    assert not any(isinstance(m, TransposedLinear) for m in model.modules())
    l = (model.config.n_layer - 1) // 2  # a middle layer, 0-based, with its adapter
    with torch.no_grad():
        torch.testing.assert_close(fast(idx)[0], model(idx)[0], atol=1e-4, rtol=0)
        state, fast_state = model.layer_states(idx)[l + 1], fast.layer_states(idx)[l + 1]
        torch.testing.assert_close(fast.exit_logits(fast_state, l), model.exit_logits(state, l),
                                   atol=1e-4, rtol=0)
    want, stats = generate.generate(model, idx, 12, exit, kv=kv)
    got, fast_stats = generate.generate(fast, idx, 12, exit, kv=kv)
    assert torch.equal(got, want) and fast_stats["mean_exit_layer"] == stats["mean_exit_layer"]
    if exit != "none":  # tokens did exit early: the exit paths ran on the decode layout
        assert stats["mean_exit_layer"] < model.config.n_layer
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if model.config.tie_lm_head:  # still one tensor in model; fast's head has its own copy
        assert model.lm_head.weight is model.wte.weight
        assert fast.lm_head.wt.data_ptr() != fast.wte.weight.data_ptr()


@pytest.mark.parametrize("exit,kv", DECODE_MODES)
def test_decoding_layout_equals_the_plain_model(gpt2_dir, exit, kv):
    model = Decoder.from_pretrained(gpt2_dir, exit_adapters=True).eval()
    assert_decodes_as_plain(model, prompt(), exit, kv)


def test_policy_and_confidence_exits_report_depth(gpt2_dir):
    model = Decoder.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        model.policies[1].net[-1].bias.fill_(30.0)  # layer 2 always exits
        for pol in (model.policies[0], model.policies[2]):
            pol.net[-1].bias.fill_(-30.0)
    new, stats = generate.generate(model, prompt(), 10, "policy")
    assert stats["mean_exit_layer"] == 2 and new.shape == (1, 10)
    # any head is confident
    _, stats = generate.generate(model, prompt(), 10, "confidence", threshold=0.0)
    assert stats["mean_exit_layer"] == 1


def test_policy_that_reads_the_head_confidence():
    torch.manual_seed(0)
    model = Decoder(Config(n_layer=3, n_head=2, n_embd=16, n_inner=32, vocab_size=60, block_size=32,
                           policy_conf=True)).eval()
    idx = torch.randint(0, 60, (1, 5), generator=torch.Generator().manual_seed(0))
    want, _ = generate.generate(model, idx, 12)
    assert torch.equal(generate.generate(model, idx, 12, "speculative")[0], want)
    new, stats = generate.generate(model, idx, 12, "policy")
    assert new.shape == (1, 12) and 1 <= stats["mean_exit_layer"] <= 3


def test_sampling_is_seeded_and_respects_top_k(gpt2_dir):
    model = Decoder.from_pretrained(gpt2_dir).eval()

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate.generate(model, prompt(), 12, temperature=1.0, top_k=1, generator=g)[0]
    assert torch.equal(sample(1), sample(2))  # top_k = 1 is greedy whatever the seed
    assert torch.equal(sample(1), generate.generate(model, prompt(), 12)[0])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = generate.generate(model, prompt(), 12, temperature=2.0, generator=g1)[0]
    assert torch.equal(a, generate.generate(model, prompt(), 12, temperature=2.0, generator=g2)[0])


def test_speculative_sampling_draws_from_the_full_model():
    """At temperature 1, the tokens speculative decoding emits follow full-depth sampling's
    distribution, although the drafts (from layer 1) follow a very different one."""
    torch.manual_seed(0)
    model = Decoder(Config(n_layer=2, n_head=2, n_embd=16, n_inner=32, vocab_size=4, block_size=16,
                           dropout=0.0, tie_lm_head=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        model.blocks[1].mlp.proj.weight.mul_(30)  # layer 2 changes the prediction a lot
        model.policies[0].net[-1].bias.fill_(30.0)  # every draft exits at layer 1
    model.eval()
    idx = torch.tensor([[1, 2]])

    def histogram(exit, n=600):  # the 2nd and 3rd new tokens, over n seeds
        counts = torch.zeros(2, 4)
        for seed in range(n):
            g = torch.Generator().manual_seed(seed)
            new, _ = generate.generate(model, idx, 3, exit, temperature=1.0, draft_len=3,
                                       generator=g)
            counts[0, new[0, 1]] += 1
            counts[1, new[0, 2]] += 1
        return counts / n
    full, spec = histogram("none"), histogram("speculative")
    draft = histogram("policy")  # what the drafts alone would emit
    assert (full - draft).abs().sum(1).max() / 2 > 0.3  # total variation: the drafts are far off...
    assert (full - spec).abs().sum(1).max() / 2 < 0.06  # ...speculative sampling is not


@pytest.mark.parametrize("exit,kv,threshold", [
    ("none", "copy", 0.5), ("policy", "copy", 0.5), ("policy", "defer", 0.5),
    ("confidence", "copy", 0.0), ("speculative", "defer", 0.5)])  # 0.0: any head is confident
def test_exits_one_per_new_token(gpt2_dir, exit, kv, threshold):
    model = mixed_exits(Decoder.from_pretrained(gpt2_dir).eval())
    new, stats = generate.generate(model, prompt(), 20, exit, threshold, kv=kv)
    exits = stats["exits"]
    assert len(exits) == new.size(1) == 20 and exits[0] == 4 and all(1 <= e <= 4 for e in exits)
    if exit == "none":
        assert exits == [4] * 20
    elif exit == "speculative":  # an accepted draft's layer, or 4 for the verification's token
        assert len(set(exits)) > 1
    else:  # mean_exit_layer leaves out the first token, which the prompt's pass gives
        assert sum(exits[1:]) / 19 == stats["mean_exit_layer"] and len(set(exits)) > 1
    stop = new[0, 9].item()  # generation ends at a stop token: exits end with it
    new, stats = generate.generate(model, prompt(), 20, exit, threshold, kv=kv, stop=stop)
    assert new[0, -1] == stop and len(stats["exits"]) == new.size(1) <= 10


def test_mark_exits_plain_and_colour():
    pieces, exits = ["The", " movie", " was", ""], [3, 12, 1, 7]
    assert generate.mark_exits(pieces, exits, 12, False) == "The[3] movie[12] was[1][7]"
    line, legend = generate.mark_exits(pieces, exits, 12, True).split("\n")
    # layers 1-3 green, 11-12 red (24-bit backgrounds), in five ranges of layers
    assert line.startswith("\x1b[38;2;0;0;0;48;2;0;200;0mThe\x1b[0m")
    assert "\x1b[38;2;0;0;0;48;2;230;0;0m movie\x1b[0m" in line
    assert legend.startswith("exit layer: ") and legend.endswith(" of 12")
    for r in (" 1-3 ", " 4-5 ", " 6-8 ", " 9-10 ", " 11-12 "):
        assert f"m{r}\x1b[0m" in legend
    assert " 4 " in generate.mark_exits(["a"], [4], 4, True)  # one layer per colour


def test_token_pieces_keep_split_characters_whole():
    enc = tokenizer.gpt2_tokenizer()
    ids = enc.encode("I 🤗 café")  # 🤗 is f0 9f a4 97: " \xf0\x9f", "\xa4", "\x97"
    assert ids == [40, 12520, 97, 245, 40304]
    assert generate.token_pieces(enc, ids) == ["I", " ", "", "🤗", " café"]
    assert [enc.decode([t]) for t in ids][1:4] == [" \ufffd", "\ufffd", "\ufffd"]  # one at a time


def tiny_llama_gguf(path):
    """A one-layer Llama GGUF (C = 8, 2 heads, 10 tokens, tied head) of random weights."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16),
                       ("context_length", 32), ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    shapes = {"token_embd": (10, 8), "output_norm": (8,), "blk.0.attn_norm": (8,),
              "blk.0.attn_q": (8, 8), "blk.0.attn_k": (8, 8), "blk.0.attn_v": (8, 8),
              "blk.0.attn_output": (8, 8), "blk.0.ffn_norm": (8,), "blk.0.ffn_gate": (16, 8),
              "blk.0.ffn_up": (16, 8), "blk.0.ffn_down": (8, 16)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", torch.randn(shape).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_exits_checkpoint_load_says_what_it_loaded(tmp_path, capsys):
    """A checkpoint of train.py --task=smollm2 (adapters and policies beside a GGUF): one line for
    the GGUF, none calling the adapters and policies fresh, and the checkpoint's are loaded."""
    tiny_llama_gguf(tmp_path / "tiny.gguf")
    trained = Decoder.from_pretrained(tmp_path / "tiny.gguf", exit_adapters=True)
    state = {k: torch.randn_like(v) for k, v in trained.state_dict().items()
             if k.startswith(("adapters.", "policies."))}
    torch.save({"model": state, "model_config": vars(trained.config),
                "gguf": str(tmp_path / "tiny.gguf")}, tmp_path / "stage3.pt")
    capsys.readouterr()
    model, _ = load_model(str(tmp_path / "stage3.pt"), "generate.py", kind=Decoder)
    assert capsys.readouterr().err == f"model: {tmp_path / 'tiny.gguf'} (the backbone, frozen)\n"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def run(*args):
    return subprocess.run([sys.executable, generate.__file__, *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_json(gpt2_dir):
    r = run(f"--ckpt={gpt2_dir}", "--prompt=The film was", "--exit=speculative",
            "--max_new_tokens=8", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)  # the whole output is one JSON object
    assert set(out) == {"text", "tokens", "tokens_per_s", "mean_exit_layer", "agreement_with_full",
                        "accepted_per_draft", "exits", "tokens_text"}
    assert out["tokens"] == 8 and out["agreement_with_full"] == 1.0 and out["tokens_per_s"] > 0
    assert len(out["exits"]) == len(out["tokens_text"]) == 8 and out["exits"][-1] == 4
    assert "".join(out["tokens_text"]) == out["text"] and "exit policies untrained" in r.stderr


def test_cli_show_exits_piped(gpt2_dir, tmp_path):
    """Not a terminal: each token of the reply with its exit layer in brackets, no colours; the
    same layers and pieces as --json gives."""
    model = mixed_exits(Decoder.from_pretrained(gpt2_dir))
    ckpt = tmp_path / "lm.pt"
    torch.save({"model": model.state_dict(), "model_config": vars(model.config)}, ckpt)
    args = [f"--ckpt={ckpt}", "--prompt=The film was", "--exit=policy", "--max_new_tokens=8"]
    shown, js = run(*args, "--show_exits"), run(*args, "--json")
    assert shown.returncode == 0 and js.returncode == 0, shown.stderr[-2000:] + js.stderr[-2000:]
    out = json.loads(js.stdout)
    assert len(out["exits"]) == len(out["tokens_text"]) == out["tokens"] == 8
    assert out["exits"][0] == 4 and len(set(out["exits"])) > 1  # the first: the prompt's pass
    marked = "".join(f"{p}[{e}]" for p, e in zip(out["tokens_text"], out["exits"]))
    assert shown.stdout.startswith("The film was" + marked + "\n") and "\x1b[" not in shown.stdout


@pytest.mark.parametrize("args,msg", [
    (["--prompt="], "the prompt is empty"),
    (["--prompt=hi", "--max_new_tokens=0"], "--max_new_tokens must be > 0"),
    (["--prompt=hi", "--exit=fast"], "unknown --exit=fast"),
    (["--prompt=" + " word" * 80], "the prompt has 80 tokens, the context is 64"),
    (["--prompt=hi", "--kv=later"], "unknown --kv=later"),
    (["--prompt=hi", "--exit=speculative", "--draft_threshold=2"], "--draft_threshold in [0, 1]"),
])
def test_cli_bad_input_is_one_line(gpt2_dir, args, msg):
    r = run(f"--ckpt={gpt2_dir}", *args)
    assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr


def test_cli_refuses_an_encoder_checkpoint(tmp_path):
    enc = Encoder(Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=8))
    torch.save({"model": enc.state_dict(), "model_config": vars(enc.config)}, tmp_path / "enc.pt")
    r = run(f"--ckpt={tmp_path / 'enc.pt'}", "--prompt=hi")
    assert (r.returncode == 1 and "classification encoder" in r.stderr
            and "Traceback" not in r.stderr)


@pytest.mark.parametrize("content", [b"not a checkpoint", b"PK\x03\x04 truncated zip", None])
def test_cli_corrupt_or_foreign_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a torch file, but not one of ours
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    r = run(f"--ckpt={path}", "--prompt=hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"generate.py: cannot load {path}")


def test_cli_says_when_the_context_is_full(gpt2_dir):
    """The model holds 64 positions: 100 new tokens after a 3-token prompt cannot fit, and the
    user is told, not cut short silently."""
    r = run(f"--ckpt={gpt2_dir}", "--prompt=The film was", "--max_new_tokens=100", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["tokens"] == 64 - 3
    assert ("stopped after 61 of --max_new_tokens=100: the model's context holds 64 tokens"
            in r.stderr)
    r = run(f"--ckpt={gpt2_dir}", "--prompt=The film was", "--max_new_tokens=61", "--json")
    assert "stopped" not in r.stderr and json.loads(r.stdout)["tokens"] == 61


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("exit,kv", [("none", "copy"), ("policy", "copy"), ("policy", "defer"),
                                     ("speculative", "copy")])
def test_generation_on_cuda(gpt2_dir, exit, kv):
    """bf16 autocast on CUDA: the same code runs; full depth matches the CPU's greedy tokens for a
    while."""
    cpu = mixed_exits(Decoder.from_pretrained(gpt2_dir).eval())
    gpu = mixed_exits(Decoder.from_pretrained(gpt2_dir).eval()).to("cuda")
    want, _ = generate.generate(cpu, prompt(), 16)
    got, stats = generate.generate(gpu, prompt().to("cuda"), 16, exit, kv=kv)
    assert got.device.type == "cuda" and got.shape == (1, 16) and 1 <= stats["mean_exit_layer"] <= 4
    # bf16 may flip a near-tie later on: compare the first tokens
    if exit in ("none", "speculative"):
        assert torch.equal(got[:, :4].cpu(), want[:, :4])
