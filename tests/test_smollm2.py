"""The Llama family in Decoder: random configs and the real SmolLM2-135M GGUF against
transformers, its tokenizer against transformers', and generation that reproduces transformers'
greedy decoding."""
import os

import numpy as np
import pytest
import torch

import data
import tokenizer
import generate
import llm
from model import Config, Decoder
from test_generate import DECODE_MODES, assert_decodes_as_plain

transformers = pytest.importorskip("transformers")


def random_llama(tmp_path, **kw):
    """A random LlamaForCausalLM saved as a Hugging Face folder, weights scaled up so that the
    layers matter."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   max_position_embeddings=64, rope_theta=500.0, **kw)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("kw", [
    dict(num_key_value_heads=2, tie_word_embeddings=True),   # grouped-query attention, tied
    dict(num_key_value_heads=4, tie_word_embeddings=False),  # one K/V head per query head
    dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
], ids=["gqa-tied", "mha-untied", "mqa-bias"])
def test_random_llama_matches_transformers(tmp_path, kw):
    hf = random_llama(tmp_path, **kw)
    ours = Decoder.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    print(f"random Llama {kw}: max abs logit difference {diff:.2e}")
    assert diff < 1e-4


def test_random_llama_greedy_generation_equals_transformers(tmp_path):
    hf = random_llama(tmp_path, num_key_value_heads=2)
    ours = Decoder.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    want = hf.generate(idx, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                       pad_token_id=0, attention_mask=torch.ones_like(idx))[:, 5:]
    got, _ = generate.generate(ours, idx, 20)
    assert torch.equal(got, want)
    with torch.no_grad():  # untrained policies that exit somewhere: the draft-and-verify loop
        for pol in ours.policies:
            pol.net[-1].bias.normal_(0, 3)
    spec, stats = generate.generate(ours, idx, 20, "speculative")
    assert torch.equal(spec, want) and stats["mean_exit_layer"] < 3


@pytest.mark.parametrize("kw", [dict(num_key_value_heads=2, tie_word_embeddings=True),
                                dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)],
                         ids=["gqa-tied", "mqa-bias"])
@pytest.mark.parametrize("exit,kv", DECODE_MODES)
def test_random_llama_decoding_layout_equals_the_plain_model(tmp_path, kw, exit, kv):
    random_llama(tmp_path, **kw)
    model = Decoder.from_pretrained(tmp_path, exit_adapters=True).eval()
    idx = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    assert_decodes_as_plain(model, idx, exit, kv)


# -----------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct, 4-bit GGUF, dequantised to float32

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain early exiting in one sentence.", "2 + 2 =",
           "The movie was long, but", "List three fruits.", "Translate 'good morning' to German.",
           "Why is the sky blue?"]


@pytest.fixture(scope="module")
def gguf_path():
    return data.smollm2_path()


@pytest.fixture(scope="module")
def smollm2(gguf_path):
    return Decoder.from_pretrained(gguf_path).eval()


@pytest.fixture(scope="module")
def hf_smollm2(gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
        dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def enc(gguf_path):
    return data.gguf_tokenizer(gguf_path)


def chat_ids(enc, text):
    return torch.tensor([enc.encode(tokenizer.chat_prompt(text), allowed_special="all")])


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.n_layer, c.n_embd, c.n_head, c.kv_heads, c.n_inner, c.vocab_size) == (
        30, 576, 9, 3, 1536, 49152)
    assert c.tie_lm_head and c.norm == "rms" and c.gated_mlp and c.rope_theta == 100000.0


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2, enc):
    worst = 0.0
    with torch.no_grad():
        for text in PROMPTS:
            idx = chat_ids(enc, text)
            worst = max(worst, (hf_smollm2(idx).logits - smollm2(idx)[0]).abs().max().item())
    print(f"SmolLM2-135M GGUF, 8 chat prompts: max abs logit difference {worst:.2e}")
    assert worst <= 1e-4


def test_smollm2_kv_cache_decoding_equals_the_whole_forward(smollm2, enc):
    idx = chat_ids(enc, PROMPTS[0])
    T = idx.size(1)
    cache = smollm2.new_cache(1, T)
    with torch.no_grad():
        full = smollm2(idx)[0]
        generate.prefill(smollm2, idx[:, :T - 4], cache)
        for t in range(T - 4, T):
            x = smollm2.run_layers(smollm2.embed(idx[:, t:t + 1], pos=t), cache, t)
            assert (smollm2.exit_logits(x)[0, 0] - full[0, t]).abs().max() < 1e-4


def test_smollm2_greedy_generation_equals_transformers(smollm2, hf_smollm2, enc):
    """Token for token, up to and with the end of the reply (<|im_end|>, which both keep)."""
    end = enc.encode_single_token("<|im_end|>")
    for text in PROMPTS:
        idx = chat_ids(enc, text)
        want = hf_smollm2.generate(idx, do_sample=False, max_new_tokens=16, eos_token_id=end,
                                   pad_token_id=end, attention_mask=torch.ones_like(idx))
        got, _ = generate.generate(smollm2, idx, 16, stop=end)
        assert torch.equal(got, want[:, idx.size(1):]), text


# -----------------------------------------------------------------------------
# exit adapters: stage 1 for a frozen language model

def tiny_llama(**kw):
    torch.manual_seed(0)
    return Decoder(Config(n_layer=3, n_head=2, n_kv_head=1, n_embd=16, n_inner=32, vocab_size=50,
                          block_size=16, rope_theta=100.0, norm="rms", gated_mlp=True, bias=False,
                          act="silu", ln_eps=1e-5, dropout=0.0, **kw)).eval()


def test_untrained_adapters_are_the_plain_exit_head():
    model = tiny_llama(exit_adapters=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        for l in range(3):
            assert torch.allclose(model.exit_logits(x, l), model.lm_head(model.ln_f(x)), atol=1e-6)


def test_fit_exit_adapters_recovers_a_linear_map():
    """When the last layer's state is a linear function of layer l's, the fit finds it."""
    model = tiny_llama(exit_adapters=True)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 500, 16, generator=g)
    M, c = torch.randn(16, 16, generator=g), torch.randn(16, generator=g)
    s[-1] = s[0] @ M + c
    llm.fit_exit_adapters(model, s)
    torch.testing.assert_close(model.adapters[0](s[0]), s[-1], atol=1e-3, rtol=1e-4)
    assert (model.adapters[1](s[1]) - s[-1]).abs().mean() > 0.5  # nothing to find from layer 2


def test_smollm2_adapters_raise_the_oracle_speedup(smollm2, enc):
    """Fitted on 36 IMDB windows of 128 tokens, measured on 12 others (teacher forcing): the
    layers' exit heads agree with the last far more often, and an oracle exits much earlier."""
    texts = data.movie_reviews("imdb")[0][-400:]
    windows = [ids[:128] for ids in map(enc.encode_ordinary, texts) if len(ids) >= 128][:48]
    model = Decoder.from_pretrained(data.smollm2_path(), exit_adapters=True).eval()
    with torch.no_grad():
        states = torch.cat([torch.stack(model.layer_states(torch.tensor(windows[i:i + 8]))[1:])
                            .flatten(1, 2) for i in range(0, 48, 8)], 1)  # (L, N, C)
        fit, held = states[:, :36 * 128], states[:, 36 * 128:]
        full = model.exit_logits(held[-1]).argmax(-1)
        speedups = []
        for adapted in (False, True):
            if adapted:
                llm.fit_exit_adapters(model, fit)
            preds = torch.stack([model.exit_logits(held[l], l).argmax(-1) for l in range(30)], 1)
            exits = llm.first_agreeing_layer(preds, full)
            speedups.append(30 / exits.float().mean().item())
            agree = (preds == full[:, None]).float().mean(0)
            print(f"adapters {adapted}: agreement with the last layer at layers 1, 10, 20, 25, 29 "
                  f"{agree[[0, 9, 19, 24, 28]].tolist()}; oracle speed-up {speedups[-1]:.2f}x")
    assert 1.2 < speedups[0] < 1.5 and speedups[1] > 1.8


# -----------------------------------------------------------------------------
# the tokenizer from the GGUF's own vocabulary and merges

HOSTILE = ["", " ", "  ", "\n\n\t ", "café naïve Ελληνικά русский", "日本語の文章です。中文",
           "emoji 😀👍🏽 family 👨‍👩‍👧", "1234567890 a  5  66   777", "x1.5e-10, $3,000.00 (2024)",
           "½ ² ٣ Ⅻ", "  leading and trailing  ", "tabs\tand\r\nnewlines\n\n",
           "it's we'll they've I'M", "a\x04b \x00", "\U000f0000z \U0004ffff",
           "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ", "a" * 300, " " * 50 + "9" * 20]


@pytest.fixture(scope="module")
def hf_tokenizers(gguf_path):
    """transformers' tokenizer from the same GGUF as it comes, and with the pre-tokenizer the
    file names (tokenizer.ggml.pre = smollm: every digit on its own, then GPT-2's pattern; SmolLM2's
    own tokenizer.json has the same), which transformers leaves out."""
    from tokenizers import pre_tokenizers
    kw = dict(gguf_file=os.path.basename(gguf_path))
    plain = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), **kw)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), **kw)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok, plain


def test_gguf_tokenizer_ids_equal_transformers(enc, hf_tokenizers):
    tok, plain = hf_tokenizers
    texts = data.movie_reviews("rotten_tomatoes")[0] + data.movie_reviews("imdb")[0][:2000]
    # the 21 bytes with no token of their own (a few control characters, bytes UTF-8 never uses
    # or that start code points past U+3FFFF) are dropped; every other text decodes back whole
    no_token = {b for b in range(256) if enc.encode_single_token(bytes([b])) >= enc.n_vocab}
    assert len(no_token) == 21 and ord("\n") not in no_token
    differ_from_plain = []
    for text in texts + HOSTILE:
        ids = enc.encode_ordinary(text)
        assert ids == tok.encode(text, add_special_tokens=False), repr(text[:80])
        assert enc.decode(ids) == text or no_token & set(text.encode())
        if ids != plain.encode(text, add_special_tokens=False):
            differ_from_plain.append(text)
    # without the digit split, only texts with numbers (after a run of spaces) come out otherwise
    print(f"{len(differ_from_plain)} of {len(texts) + len(HOSTILE)} texts differ from "
          "transformers' GGUF tokenizer as it comes")
    assert all(any(c.isdigit() for c in t) for t in differ_from_plain)


def test_chat_template_as_transformers_applies_it(enc, hf_tokenizers):
    tok, _ = hf_tokenizers
    for text in PROMPTS[:3]:
        want = tok.apply_chat_template([{"role": "user", "content": text}],
                                       add_generation_prompt=True, tokenize=False)
        assert tokenizer.chat_prompt(text) == want
        assert chat_ids(enc, text)[0].tolist() == tok.encode(want, add_special_tokens=False)


# -----------------------------------------------------------------------------
# files that cannot be loaded: one clear error naming the file, nothing half-loaded

def tiny_gguf(path, arch="llama", dtype=np.float32):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "llama":
        for key, value in (("block_count", 1), ("embedding_length", 8),
                           ("feed_forward_length", 16), ("context_length", 32),
                           ("attention.head_count", 2)):
            w.add_uint32(f"llama.{key}", value)
        w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", np.ones((10, 8), dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_gguf_files_are_one_clear_error(tmp_path, gguf_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as f:
        cut.write_bytes(f.read(os.path.getsize(gguf_path) // 2))
    with pytest.raises(ValueError, match="cut.gguf: not a readable GGUF file"):
        Decoder.from_pretrained(cut)
    tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="gpt2.gguf: a GGUF of architecture 'gpt2'"):
        Decoder.from_pretrained(tmp_path / "gpt2.gguf")
    tiny_gguf(tmp_path / "ints.gguf", dtype=np.int32)
    with pytest.raises(ValueError, match="ints.gguf: tensor token_embd.weight is I32, which "
                                         "cannot be dequantised"):
        Decoder.from_pretrained(tmp_path / "ints.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ValueError, match="text.gguf: not a readable GGUF file"):
        Decoder.from_pretrained(tmp_path / "text.gguf")
    with pytest.raises(ValueError, match="text.gguf: no tokenizer can be read"):
        data.gguf_tokenizer(str(tmp_path / "text.gguf"))
