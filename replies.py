"""
The frozen LLM's replies (llm.py, train.py --task=smollm2): its own greedy replies to chat
prompts, every layer's state at their tokens, the exits' vocabulary ranked from them and from text
it reads (a shortlist, as FR-Spec), and generated replies judged as a reader would, by what full
depth thinks of them: its negative log-likelihood of each reply, and how often a reply repeats
itself.
"""
import math
import os

import numpy as np
import torch
from tqdm import tqdm

import data
import tokenizer


def encode_chat(enc, text, device="cpu"):
    """A user's message in the chat template, as ids (1, T)."""
    return torch.tensor([enc.encode(tokenizer.chat_prompt(text), allowed_special="all")],
                        device=device)


@torch.no_grad()
def replies(model, enc, texts, new_tokens, desc, batch=32):
    """The model's own greedy reply (full depth, at most new_tokens) to each prompt: a list of
    (prompt ids, reply ids), each a list of ints. Prompts of one length in tokens run as one batch
    (up to `batch` of them, no padding needed): on 2 CPU cores the 240 training prompts took 339 s
    in batches against about 694 s one by one, and gave the same replies. The bar counts batches."""
    import generate  # the generation loop lives there; it imports nothing of this file
    stop = enc.encode_single_token("<|im_end|>")
    fast, device = model.for_decoding(), model.wte.weight.device  # the same tokens, sooner
    prompts = [encode_chat(enc, text)[0].tolist() for text in texts]
    by_length = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    batches = [ids[j:j + batch] for ids in by_length.values() for j in range(0, len(ids), batch)]
    out = [None] * len(texts)
    for ids in tqdm(batches, desc=desc, dynamic_ncols=True):
        idx = torch.tensor([prompts[i] for i in ids], device=device)
        new, _ = generate.generate(fast, idx, new_tokens, stop=stop)
        for i, reply in zip(ids, new.tolist()):  # each up to its first stop
            out[i] = (prompts[i], reply[:reply.index(stop) + 1] if stop in reply else reply)
    return out


@torch.no_grad()
def reply_states(model, pairs):
    """
    Every layer's state at the replies' tokens (teacher forcing): the method's inputs are the
    token positions whose next token generation decides, each reply's tokens but its last.
    pairs: replies() -> (N, L, C), N tokens in all.
    """
    out = []
    for prompt, reply in pairs:
        seq = torch.tensor([prompt + reply], device=model.wte.weight.device)
        states = model.layer_states(seq)[1:]  # L x (1, T, C)
        out.append(torch.stack(states, 2)[0, len(prompt):seq.size(1) - 1])  # (n, L, C)
    return torch.cat(out)


def cached_replies(model, enc, split, gguf, cfg):
    """replies() of every split, kept in out_dir/replies.pt: a run with other options of the
    method (alphas, learning rates) does not generate them again."""
    key = {"gguf": os.path.basename(gguf), "seed": cfg.seed, "new_tokens": cfg.llm_new_tokens,
           "prompts": split}
    path = os.path.join(cfg.out_dir, "replies.pt")
    if os.path.isfile(path):
        try:
            saved = torch.load(path, weights_only=True)
            if saved["key"] == key:
                return saved["replies"]
        except Exception:  # unreadable: made again below
            pass
    out = {k: replies(model, enc, v, cfg.llm_new_tokens, f"replies {k}") for k, v in split.items()}
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.save({"key": key, "replies": out}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return out


SHORTLISTS = (2048, 4096, 8192, 16384)  # the exit heads' vocabulary sizes tried


def token_frequency(enc, pairs, vocab):
    """
    How often each token occurs in text the model reads and writes, (vocab,): half the weight
    from the movie reviews and BBC news (7.9M and 0.1M tokens), half from the model's own
    prompts and replies (pairs: replies()): too few alone to rank a vocabulary.
    """
    texts = (data.movie_reviews("imdb")[0] + data.movie_reviews("rotten_tomatoes")[0]
             + data.bbc_news())
    read = np.concatenate([np.asarray(ids) for ids in enc.encode_ordinary_batch(texts)])
    written = np.concatenate([np.asarray(p + r) for p, r in pairs])
    freq = [torch.from_numpy(np.bincount(ids, minlength=vocab)[:vocab]).double()
            for ids in (read, written)]
    return freq[0] / freq[0].sum() + freq[1] / freq[1].sum()


def pick_shortlist(freq, pairs, always, coverage):
    """
    The most frequent tokens as the exits' vocabulary (FR-Spec): the smallest size of SHORTLISTS
    that holds at least `coverage` of the tokens full depth wrote in pairs (validation replies),
    the largest if none does. always: token ids kept in whatever their rank (end of turn).
    Returns (ids (V',) sorted, {size: the share of the replies' tokens it holds}).
    """
    freq = freq.clone()
    freq[always] = math.inf
    order = freq.argsort(descending=True)
    tokens = torch.tensor([t for _, r in pairs for t in r])
    held = {n: torch.isin(tokens, order[:n]).float().mean().item() for n in SHORTLISTS}
    n = next((n for n in SHORTLISTS if held[n] >= coverage), SHORTLISTS[-1])
    return order[:n].sort().values, held


def repeated_3grams(ids):
    """The share of a reply's 3-grams that it said before: [1, 2, 3, 1, 2, 3] -> 1/4."""
    grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
    return sum(g in grams[:i] for i, g in enumerate(grams)) / max(len(grams), 1)


@torch.no_grad()
def own_nll(model, full_pairs):
    """Full depth's NLL per token of its own replies (generate.judged_by_full), one per pair."""
    import generate
    device = model.wte.weight.device
    return [generate.judged_by_full(model, torch.tensor([p], device=device),
                                    torch.tensor([r], device=device))[0] for p, r in full_pairs]


@torch.no_grad()
def reply_quality(model, enc, full_pairs, own, threshold, cfg):
    """
    Greedy replies with policy exits (deferred fill) to the prompts of full_pairs (replies() at
    full depth), each beside full depth's own (own: own_nll() of full_pairs): {"nll": [policy,
    full], "repeat_3gram": [policy, full], "agreement": share of the policy's tokens full depth
    would pick after the same text, "exit": mean exit layer}, each a list over the prompts.
    model: policies that read raw states.
    """
    import generate
    stop = enc.encode_single_token("<|im_end|>")
    model = model.for_decoding()  # the same numbers, sooner
    out = {"nll": [], "repeat_3gram": [], "agreement": [], "exit": []}
    for (prompt, full), full_nll in zip(full_pairs, own, strict=True):
        idx = torch.tensor([prompt], device=model.wte.weight.device)
        new, stats = generate.generate(model, idx, cfg.llm_new_tokens, "policy", threshold,
                                       kv="defer", stop=stop)
        nll, agreement = generate.judged_by_full(model, idx, new)
        out["nll"].append([nll, full_nll])
        out["repeat_3gram"].append([repeated_3grams(x) for x in (new[0].tolist(), full)])
        out["agreement"].append(agreement)
        out["exit"].append(stats["mean_exit_layer"])
    return out


def quality_summary(q, kinds=None, keep=None):
    """reply_quality's lists as means over the prompts whose kind is in keep (all if None):
    {nll_policy, nll_full, nll_ratio, repeat_policy, repeat_full, agreement, mean_exit}."""
    i = [j for j, k in enumerate(kinds or [None] * len(q["nll"])) if keep is None or k in keep]
    if not i:
        return {"prompts": 0}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    nll = [mean([q["nll"][j][side] for j in i]) for side in (0, 1)]
    rep = [mean([q["repeat_3gram"][j][side] for j in i]) for side in (0, 1)]
    return {"prompts": len(i), "nll_policy": nll[0], "nll_full": nll[1],
            "nll_ratio": nll[0] / nll[1], "repeat_policy": rep[0], "repeat_full": rep[1],
            "agreement": mean([q["agreement"][j] for j in i]),
            "mean_exit": mean([q["exit"][j] for j in i])}
