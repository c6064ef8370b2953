"""Backbones: parity with Hugging Face transformers, layer stepping, the KV cache, bad input."""
import json

import pytest
import torch

from model import Config, Decoder, Encoder, rotate, unpack

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def save_bert(tmp_path, **kw):
    cfg = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               intermediate_size=37, max_position_embeddings=40, type_vocab_size=3)
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**{**cfg, **kw})).eval()
    hf.save_pretrained(tmp_path)
    return hf


def save_gpt2(tmp_path, **kw):
    cfg = dict(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=48, bos_token_id=0,
               eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **kw})).eval()
    hf.save_pretrained(tmp_path)
    return hf


def bert_inputs(vocab, types, B=3, T=13):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0  # a padded row
    return ids, mask, torch.randint(0, types, (B, T), generator=g)


def max_diff(xs, ys, mask=None):
    """Largest difference of two lists of states; with a mask, at the real tokens only (ours are 0
    at padding)."""
    m = 1 if mask is None else mask[:, :, None]
    return max(((x - y) * m).abs().max().item() for x, y in zip(xs, ys))


@pytest.mark.parametrize("kw", [{}, {"hidden_act": "gelu_new"},
                                {"hidden_act": "relu", "layer_norm_eps": 1e-5},
                                {"num_hidden_layers": 1, "num_attention_heads": 1},
                                {"is_decoder": True}])
def test_encoder_matches_hf_bert(tmp_path, kw):
    hf = save_bert(tmp_path, **kw)
    ours = Encoder.from_pretrained(tmp_path).eval()
    ids, mask, types = bert_inputs(hf.config.vocab_size, hf.config.type_vocab_size)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types,
                  output_hidden_states=True).hidden_states
        got = ours.layer_states(ids, mask, types)
    assert len(got) == len(want) == hf.config.num_hidden_layers + 1
    print(f"BERT {kw}: max abs diff {max_diff(got, want, mask):.1e}")
    assert max_diff(got, want, mask) <= TOL
    assert all((h[1, 9:] == 0).all() for h in got)  # the padding of row 1 is skipped, left at zero


def test_encoder_cls_pool_loads_bert_pooler(tmp_path):
    hf = save_bert(tmp_path)
    ours = Encoder.from_pretrained(tmp_path, pool="cls").eval()
    ids, mask, types = bert_inputs(99, 3)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types).pooler_output
        got = ours.exit_state(ours.layer_states(ids, mask, types)[-1])
    assert (got - want).abs().max().item() <= TOL


def test_minilm_real_weights_match_hf():
    """all-MiniLM-L6-v2 on 64 padded Rotten Tomatoes test inputs, at their real tokens (45% are
    padding)."""
    import data
    import tokenizer
    path = data.minilm_path()
    hf = transformers.BertModel.from_pretrained(path).eval()
    ours = Encoder.from_pretrained(path).eval()
    task = data.load_task("rotten_tomatoes", tokenizer.WordPiece(f"{path}/vocab.txt"))
    b = next(data.batches(task["test"], 64))
    assert (b["attention_mask"] == 0).any()
    with torch.no_grad():
        want = hf(b["input_ids"], attention_mask=b["attention_mask"],
                  output_hidden_states=True).hidden_states
        got = ours.layer_states(b["input_ids"], b["attention_mask"])
    diff = max_diff(got, want, b["attention_mask"])
    print(f"all-MiniLM-L6-v2, 64 padded inputs: max abs diff {diff:.1e}")
    assert len(got) == 7 and diff <= TOL


@pytest.mark.parametrize("kw", [{}, {"activation_function": "gelu"},
                                {"scale_attn_by_inverse_layer_idx": True},
                                {"scale_attn_weights": False},
                                {"n_inner": 50, "layer_norm_epsilon": 1e-3},
                                {"tie_word_embeddings": False}])
def test_decoder_matches_hf_gpt2(tmp_path, kw):
    hf = save_gpt2(tmp_path, **kw)
    ours = Decoder.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, loss = ours(idx)
        assert loss is None
        print(f"GPT-2 {kw}: max abs diff {(logits - hf(idx).logits).abs().max().item():.1e}")
        assert (logits - hf(idx).logits).abs().max().item() <= TOL
        _, loss = ours(idx[:, :-1], idx[:, 1:])
        assert abs(loss.item() - hf(idx, labels=idx).loss.item()) <= TOL


def test_layer_stepping_equals_full_forward():
    torch.manual_seed(0)
    enc = Encoder(Config(n_layer=3, n_head=2, n_embd=16, n_inner=24, vocab_size=50,
                         block_size=20)).eval()
    ids, mask, _ = bert_inputs(50, 1, T=10)
    with torch.no_grad():
        states = enc.layer_states(ids, mask)
        tokens, bias = enc.real_tokens(mask), enc.attn_bias(mask)
        assert len(tokens) == mask.sum()
        # the real tokens only, and all of the grid
        x, padded = enc.embed(ids, tokens=tokens), enc.embed(ids)
        for l in range(3):
            x, padded = enc.run_layer(l, x, bias, tokens), enc.run_layer(l, padded, bias)
            assert (x.shape == (mask.sum(), 16)
                    and torch.allclose(unpack(x, tokens, 3, 10), states[l + 1], atol=1e-6))
            # the same at the real tokens
            assert torch.allclose(padded * mask[:, :, None], states[l + 1], atol=1e-6)
        logits, s = enc(ids, mask)
        assert logits.shape == (3, 3, 2) and s.shape == (3, 3, 16)
        s3 = enc.exit_state(states[3], enc.pool_weights(mask))
        assert torch.allclose(logits[:, 2], enc.exit_logits(s3, 2), atol=1e-6)
        assert torch.allclose(s3, (states[3] * mask[:, :, None]).sum(1)
                              / mask.sum(1, keepdim=True), atol=1e-6)


def test_skipping_the_padding_changes_no_loss_or_gradient():
    """Training runs the padding-free layers: the same logits and gradients as running the whole
    grid."""
    torch.manual_seed(0)
    enc = Encoder(Config(n_layer=2, n_head=2, n_embd=16, n_inner=24, vocab_size=50, block_size=20,
                         dropout=0.0))
    ids, mask, _ = bert_inputs(50, 1, T=10)
    logits, _ = enc(ids, mask)  # real_tokens: the layers skip row 1's padding
    loss = logits.logsumexp(-1).sum()
    grads = torch.autograd.grad(loss, list(enc.parameters()), allow_unused=True)
    # the whole (B, T) grid
    x, bias, weights = enc.embed(ids), enc.attn_bias(mask), enc.pool_weights(mask)
    padded = []
    for l in range(2):
        x = enc.run_layer(l, x, bias)
        padded.append(enc.exit_logits(enc.exit_state(x, weights), l))
    padded_loss = torch.stack(padded, 1).logsumexp(-1).sum()
    padded_grads = torch.autograd.grad(padded_loss, list(enc.parameters()), allow_unused=True)
    assert torch.allclose(loss, padded_loss, atol=1e-5)
    for g, h in zip(grads, padded_grads):
        assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, atol=1e-5))


def tiny_decoder(**kw):
    torch.manual_seed(0)
    return Decoder(Config(**{"n_layer": 3, "n_head": 2, "n_embd": 16, "n_inner": 32,
                             "vocab_size": 60, "block_size": 24, "act": "gelu_new",
                             "ln_eps": 1e-5, **kw})).eval()


# the Llama family: rotary positions, RMSNorm, SwiGLU, grouped-query attention (2 heads, 1 K/V)
LLAMA = dict(rope_theta=100.0, norm="rms", gated_mlp=True, n_kv_head=1, bias=False, act="silu")


@pytest.mark.parametrize("kw", [{}, LLAMA], ids=["gpt2", "llama"])
def test_kv_cache_one_token_at_a_time_equals_recompute(kw):
    dec = tiny_decoder(**kw)
    idx = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(3))
    cache = dec.new_cache(2)
    with torch.no_grad():
        full = dec.layer_states(idx)
        for t in range(12):
            x = dec.embed(idx[:, t:t + 1], pos=t)
            for l in range(3):
                x = dec.run_layer(l, x, cache, pos=t)
                assert torch.allclose(x[:, 0], full[l + 1][:, t], atol=1e-5)


@pytest.mark.parametrize("kw", [{}, LLAMA], ids=["gpt2", "llama"])
def test_kv_cache_fills_skipped_positions_in_one_later_pass(kw):
    """A token that skipped layers 2..L gets its K/V there later, batched with the next token
    (deferred fill)."""
    dec = tiny_decoder(**kw)
    idx = torch.randint(0, 60, (1, 8), generator=torch.Generator().manual_seed(4))
    cache = dec.new_cache(1)
    with torch.no_grad():
        full = dec.layer_states(idx)
        x = dec.embed(idx[:, :6])  # prompt: all layers
        for l in range(3):
            x = dec.run_layer(l, x, cache)
        # token 6 exits after layer 1
        h6 = dec.run_layer(0, dec.embed(idx[:, 6:7], pos=6), cache, pos=6)
        x = dec.run_layer(0, dec.embed(idx[:, 7:8], pos=7), cache, pos=7)
        x = torch.cat([full[1][:, 6:7], x], 1)  # token 6's true layer-1 state, then token 7
        assert torch.allclose(h6, full[1][:, 6:7], atol=1e-5)
        for l in (1, 2):
            x = dec.run_layer(l, x, cache, pos=6)  # positions 6 and 7 together
        assert torch.allclose(x, full[3][:, 6:8], atol=1e-5)


@pytest.mark.parametrize("kw", [{}, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("l", [0, 1])
def test_state_copying_writes_each_skipped_layers_kv(l, kw):
    """copy_state_up (one batched matmul, norms folded in) = ln_1 then the K/V projection, layer
    by layer, for 2 sequences x 2 positions (keys rotated to them, with rotary positions); the
    layers up to l and the other positions are left alone."""
    dec = tiny_decoder(**kw)
    torch.manual_seed(0)
    with torch.no_grad():
        for block in dec.blocks:
            for p in (block.ln_1.weight, getattr(block.ln_1, "bias", None), block.attn.qkv.bias):
                if p is not None:
                    p.copy_(torch.randn_like(p))
        cache = dec.new_cache(2)
        before = cache.clone()
        x = torch.randn(2, 2, dec.config.n_embd)
        dec.copy_state_up(l, x, cache, 5)
        B, T, C = x.shape
        H, D = dec.config.kv_heads, dec.config.head_size
        for j in range(dec.config.n_layer):
            if j <= l:
                assert torch.equal(cache[j], before[j])
                continue
            qkv = dec.blocks[j].attn.qkv(dec.blocks[j].ln_1(x))
            _, k, v = qkv.split([C, H * D, H * D], -1)
            k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (k, v))  # (B, H, T, D)
            if dec.rope is not None:
                k = rotate(k, dec.rope, range(5, 7))
            for got, want in ((cache[j, 0], k), (cache[j, 1], v)):
                assert torch.allclose(got[:, :, 5:7], want, atol=1e-5)
                assert not got[:, :, :5].any() and not got[:, :, 7:].any()


def test_untrained_parts_are_reported(tmp_path, capsys):
    save_bert(tmp_path)
    Encoder.from_pretrained(tmp_path)
    assert "freshly initialised: heads, policies" in capsys.readouterr().err


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Encoder.from_pretrained(tmp_path)
    save_gpt2(tmp_path)
    with pytest.raises(ValueError, match="use Decoder.from_pretrained"):
        Encoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="only BERT, GPT-2 and Llama"):
        Decoder.from_pretrained(tmp_path)


def edit_weights(path, edit):
    from safetensors.torch import load_file, save_file
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors")


@pytest.mark.parametrize("edit,error,match", [
    (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"), KeyError,
     "missing 'h.1.mlp.c_fc.weight'"),
    (lambda sd: sd.update({"transformer.h.0.attn.extra": torch.zeros(2)}), ValueError,
     "unexpected key 'h.0.attn.extra'"),
    (lambda sd: sd.update({"transformer.wpe.weight": torch.zeros(47, 32)}), ValueError,
     r"'wpe.weight' has shape \(47, 32\), expected \(48, 32\)"),
])
def test_bad_weights(tmp_path, edit, error, match):
    save_gpt2(tmp_path)
    edit_weights(tmp_path, edit)
    with pytest.raises(error, match=match):
        Decoder.from_pretrained(tmp_path)


def test_bad_inputs():
    dec, enc = tiny_decoder(), Encoder(Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50,
                                              block_size=8))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 60\)"):
        dec(torch.tensor([[1, 60]]))
    with pytest.raises(ValueError, match="token ids"):
        enc.layer_states(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="longer than the position table"):
        enc.layer_states(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple"):
        Config(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="activation"):
        Config(act="mish")
