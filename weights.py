"""
The reader of pretrained weights, for model.py's backbones: local files in, plain data out, with
explicit key maps (as nanoGPT's GPT.from_pretrained does). It reads a Hugging Face folder
(config.json + model.safetensors or pytorch_model.bin) of BERT, GPT-2 or the Llama family, or a
llama.cpp GGUF file of the Llama family, dequantised by the gguf package. read() gives the family,
our Config's fields as a plain dict and the tensors by name; model.py builds the model from them
and fills it with load_weights and the family's key map (our parameter name -> the file's
tensors). This file does not import model.py.
"""
import json
import os
import sys

import torch


def read(path):
    """
    (family, fields, tensors) of a Hugging Face folder or a .gguf file: Hugging Face's model_type,
    our Config's fields as a dict (None for a family we do not support) and the tensors by name.
    """
    hf, keys = read_gguf(path) if str(path).endswith(".gguf") else read_checkpoint(path)
    kind = hf.get("model_type")
    return kind, CONFIGS[kind](hf) if kind in CONFIGS else None, keys


# -----------------------------------------------------------------------------
# each family: its config fields, and its key map of the built model's config

def bert_config(hf):
    """Our Config's fields (a dict) of a Hugging Face BertConfig (as a dict)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} "
                         "is not supported")
    return dict(n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                n_embd=hf["hidden_size"], n_inner=hf["intermediate_size"],
                vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                type_vocab_size=hf.get("type_vocab_size", 2),
                act=hf.get("hidden_act", "gelu"), ln_eps=hf.get("layer_norm_eps", 1e-12),
                dropout=hf.get("hidden_dropout_prob", 0.1), causal=hf.get("is_decoder", False))


def bert_key_map(cfg):
    """Our parameter name -> (Hugging Face names, concatenated along dim 0; transpose?)."""
    m = {"wte.weight": ["embeddings.word_embeddings.weight"],
         "wpe.weight": ["embeddings.position_embeddings.weight"],
         "wtt.weight": ["embeddings.token_type_embeddings.weight"],
         "ln_e.weight": ["embeddings.LayerNorm.weight"],
         "ln_e.bias": ["embeddings.LayerNorm.bias"]}
    for l in range(cfg.n_layer):
        b, h = f"blocks.{l}.", f"encoder.layer.{l}."
        for p in ("weight", "bias"):
            m[b + "attn.qkv." + p] = [h + f"attention.self.{n}.{p}"
                                      for n in ("query", "key", "value")]
            m[b + "attn.proj." + p] = [h + "attention.output.dense." + p]
            m[b + "ln_1." + p] = [h + "attention.output.LayerNorm." + p]
            m[b + "mlp.fc." + p] = [h + "intermediate.dense." + p]
            m[b + "mlp.proj." + p] = [h + "output.dense." + p]
            m[b + "ln_2." + p] = [h + "output.LayerNorm." + p]
    if cfg.pool == "cls":
        m["pooler.weight"], m["pooler.bias"] = ["pooler.dense.weight"], ["pooler.dense.bias"]
    return {k: (v, False) for k, v in m.items()}


def gpt2_config(hf):
    """Our Config's fields (a dict) of a Hugging Face GPT2Config (as a dict)."""
    C = hf["n_embd"]
    return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=C,
                n_inner=hf.get("n_inner") or 4 * C, vocab_size=hf["vocab_size"],
                block_size=hf["n_positions"], act=hf.get("activation_function", "gelu_new"),
                ln_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=hf.get("resid_pdrop", 0.1),
                attn_scale=hf.get("scale_attn_weights", True),
                attn_scale_by_layer=hf.get("scale_attn_by_inverse_layer_idx", False),
                tie_lm_head=hf.get("tie_word_embeddings", True))


def gpt2_key_map(cfg):
    """GPT-2 stores its linear layers as Conv1D, (in, out): those are transposed."""
    m = {"wte.weight": (["wte.weight"], False), "wpe.weight": (["wpe.weight"], False),
         "ln_f.weight": (["ln_f.weight"], False), "ln_f.bias": (["ln_f.bias"], False)}
    for l in range(cfg.n_layer):
        b, h = f"blocks.{l}.", f"h.{l}."
        for ours, theirs in (("ln_1", "ln_1"), ("attn.qkv", "attn.c_attn"),
                             ("attn.proj", "attn.c_proj"), ("ln_2", "ln_2"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            m[b + ours + ".weight"] = ([h + theirs + ".weight"], not ours.startswith("ln"))
            m[b + ours + ".bias"] = ([h + theirs + ".bias"], False)
    if not cfg.tie_lm_head:
        m["lm_head.weight"] = (["lm_head.weight"], False)
    return m


def llama_config(hf):
    """Our Config's fields (a dict) of a Hugging Face LlamaConfig (as a dict)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not "
                         "supported")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise ValueError("biases in the attention but not the MLP (or the other way) are not "
                         "supported")
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", C // H) != C // H:
        raise ValueError(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads")
    return dict(n_layer=hf["num_hidden_layers"], n_head=H, n_embd=C,
                n_kv_head=hf.get("num_key_value_heads") or H, n_inner=hf["intermediate_size"],
                vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                act=hf.get("hidden_act", "silu"), ln_eps=hf.get("rms_norm_eps", 1e-6),
                dropout=0.0, rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                norm="rms", gated_mlp=True, bias=hf.get("attention_bias", False),
                tie_lm_head=hf.get("tie_word_embeddings", False))


def llama_key_map(cfg):
    """Hugging Face's Llama names (q, k, v fused into qkv; gate and up into fc); none
    transposed. A third entry gives each piece's rows where they differ."""
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_size
    m = {"wte.weight": (["embed_tokens.weight"], False), "ln_f.weight": (["norm.weight"], False)}
    for l in range(cfg.n_layer):
        b, h = f"blocks.{l}.", f"layers.{l}."
        qkv = [h + f"self_attn.{n}_proj" for n in "qkv"]
        parts = {"ln_1": [h + "input_layernorm"], "attn.qkv": qkv,
                 "attn.proj": [h + "self_attn.o_proj"], "ln_2": [h + "post_attention_layernorm"],
                 "mlp.fc": [h + "mlp.gate_proj", h + "mlp.up_proj"],
                 "mlp.proj": [h + "mlp.down_proj"]}
        for ours, theirs in parts.items():
            rows = [H * D, Hkv * D, Hkv * D] if ours == "attn.qkv" else None
            m[b + ours + ".weight"] = ([t + ".weight" for t in theirs], False, rows)
            if cfg.bias and not ours.startswith("ln"):
                m[b + ours + ".bias"] = ([t + ".bias" for t in theirs], False, rows)
    if not cfg.tie_lm_head:
        m["lm_head.weight"] = (["lm_head.weight"], False)
    return m

CONFIGS = {"bert": bert_config, "gpt2": gpt2_config, "llama": llama_config}
KEY_MAPS = {"bert": bert_key_map, "gpt2": gpt2_key_map, "llama": llama_key_map}


# -----------------------------------------------------------------------------
# reading the files

# Keys a Hugging Face checkpoint may hold that are not part of the backbone: task heads and buffers.
IGNORED = ("cls.", "classifier.", "qa_outputs.", "embeddings.position_ids",
           "embeddings.token_type_ids")


def read_checkpoint(path):
    """
    config.json as a dict, and the weights with the 'bert.' / 'transformer.' prefix and old names
    undone.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder: no config.json")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    st, bin_ = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        sd = load_file(st)
    elif os.path.isfile(bin_):
        try:  # weights_only: a pickle that would run code is refused, not executed
            sd = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read {bin_}: {str(e).splitlines()[0]}") from None
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors or pytorch_model.bin")
    keys = {}
    for k, v in sd.items():
        for prefix in ("bert.", "transformer.", "model."):
            k = k.removeprefix(prefix)
        k = (k.replace("LayerNorm.gamma", "LayerNorm.weight")
             .replace("LayerNorm.beta", "LayerNorm.bias"))
        keys[k] = v
    return hf, keys


# llama.cpp's tensor names -> Hugging Face's (blk.{l}. -> layers.{l}.)
GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def read_gguf(path):
    """
    A llama.cpp GGUF file of the Llama family as read_checkpoint gives a folder: a LlamaConfig
    dict and float32 weights under Hugging Face's names, dequantised by the gguf package.
    llama.cpp stores the rows of q and k permuted for its RoPE layout (the two halves of each
    head interleaved); they are put back. Anything missing, malformed or unsupported raises
    ValueError naming the file.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize
    try:
        reader = GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()
                if not k.startswith("tokenizer.")}
    except Exception as e:  # truncated, not a GGUF file, or of a version it cannot read
        raise ValueError(f"{path}: not a readable GGUF file ({first_line(e)})") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: a GGUF of architecture {arch!r}; only llama is supported")
    try:
        hf = {"model_type": "llama", "num_hidden_layers": meta["llama.block_count"],
              "hidden_size": meta["llama.embedding_length"],
              "intermediate_size": meta["llama.feed_forward_length"],
              "num_attention_heads": meta["llama.attention.head_count"],
              "num_key_value_heads": meta.get("llama.attention.head_count_kv"),
              "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
              "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
              "max_position_embeddings": meta["llama.context_length"],
              "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors}}
    except KeyError as e:
        raise ValueError(f"{path}: the GGUF metadata has no {e.args[0]}") from None
    if "llama.rope.scaling.type" in meta:
        raise ValueError(f"{path}: rope scaling {meta['llama.rope.scaling.type']!r} is not "
                         "supported")
    H, Hkv = hf["num_attention_heads"], hf["num_key_value_heads"] or hf["num_attention_heads"]
    keys = {}
    for t in reader.tensors:
        where, _, kind = t.name.rpartition(".")  # blk.3.attn_q, weight
        block, _, part = where.rpartition(".")
        if part not in GGUF_NAMES:
            raise ValueError(f"{path}: unexpected tensor {t.name!r}")
        name = (block.replace("blk.", "layers.") + "." if block else "") + GGUF_NAMES[part]
        try:
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which cannot be "
                             f"dequantised ({first_line(e)})") from None
        if w.numel() != t.n_elements:
            raise ValueError(f"{path}: tensor {t.name} is cut short (truncated file?)")
        if part in ("attn_q", "attn_k"):  # rows (heads, D/2, 2) -> (heads, 2, D/2), as HF's
            n = H if part == "attn_q" else Hkv
            w = w.view(n, -1, 2, w.size(-1)).transpose(1, 2).reshape(w.shape)
        keys[f"{name}.{kind}"] = w
    hf["vocab_size"] = keys["embed_tokens.weight"].size(0) if "embed_tokens.weight" in keys else 0
    return hf, keys


def first_line(e):
    """An exception as one line, for an error message."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def load_weights(model, keys, key_map, path, quiet=False):
    """
    Copy checkpoint tensors into model by key_map; name any missing, unexpected or mis-shaped key.
    Unless quiet, says in one line how many it copied and which parts it left freshly initialised.
    """
    params = model.state_dict()
    used = set()
    for ours, (theirs, transpose, *rows) in key_map.items():
        target = params[ours]
        # each checkpoint tensor fills a slice of rows: equal ones, or as many as rows says
        rows = (rows and rows[0]) or [target.size(0) // len(theirs)] * len(theirs)
        pieces = []
        for k, n in zip(theirs, rows):
            part = (n, *target.shape[1:])
            want = part[::-1] if transpose else part
            if k not in keys:
                raise KeyError(f"{path}: checkpoint is missing {k!r} (for {ours})")
            if tuple(keys[k].shape) != tuple(want):
                raise ValueError(f"{path}: {k!r} has shape {tuple(keys[k].shape)}, "
                                 f"expected {tuple(want)}")
            pieces.append(keys[k].t() if transpose else keys[k])
            used.add(k)
        with torch.no_grad():
            target.copy_(torch.cat(pieces, 0))
    skipped = ("lm_head.weight", "attn.bias", "attn.masked_bias", "pooler.dense.weight",
               "pooler.dense.bias", "rotary_emb.inv_freq")
    unexpected = [k for k in keys
                  if k not in used and not k.startswith(IGNORED) and not k.endswith(skipped)]
    if unexpected:
        raise ValueError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all) for "
                         f"{type(model).__name__}")
    fresh = sorted({k.split(".")[0] for k in params if k not in key_map and k != "lm_head.weight"})
    if not quiet:
        print(f"loaded {len(key_map)} tensors from {path}; "
              f"freshly initialised: {', '.join(fresh) or 'nothing'}", file=sys.stderr)
