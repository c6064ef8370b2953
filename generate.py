"""
Generate text with a GPT-2 style Decoder, each token choosing its own exit layer.

    python generate.py --ckpt=PATH --prompt="The movie was" --exit=policy
    python generate.py --ckpt=PATH --prompt="..." --exit=speculative --json
    python generate.py --ckpt=PATH --prompt="The movie was" --exit=policy --show_exits
    python generate.py --ckpt=SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt="Hi!"

--ckpt is a Hugging Face GPT-2 or Llama folder, or a .gguf file of the Llama family such as
SmolLM2-135M-Instruct (their exit policies are then untrained), or a decoder checkpoint of
train.py --task=lm, or of train.py --task=smollm2 (its adapters and policies, beside the GGUF):

    python generate.py --ckpt=out_smollm2/stage3.pt --chat --prompt="Hi!" --exit=speculative
 --chat wraps the prompt in the model's chat template. --exit picks how deep
each generated token goes:
  none         every layer (plain greedy or sampled decoding with a KV cache)
  policy       the first layer whose exit policy says p > threshold (ConsistentEE, token level)
  confidence   the first layer whose exit head's top probability > threshold (CALM's softmax rule)
  speculative  draft draft_len tokens with policy exits (at --draft_threshold), verify them with
               the full model in one pass, keep the agreeing prefix (self-speculative decoding,
               LayerSkip, Elhoushi et al. 2024): greedy output identical to --exit=none, whatever
               the policy (in fp32; under CUDA's bf16 a near-tie may round differently in the
               batched verification); with --temperature > 0, speculative sampling: tokens
               distributed as full depth's.
A token that exits early leaves its skipped layers without keys/values, which later tokens attend
to. --kv picks how they are filled (a checkpoint of train.py --task=smollm2 brings its own
--threshold, --kv, --draft_threshold and --draft_len, picked on validation; given options win):
  copy   state copying (CALM, Schuster et al. 2022): at once, from the exited state
         (Decoder.copy_state_up)
  defer  deferred fill (FREE, Bae et al. 2023): the token's skipped layers run later, batched with
         the next token that goes deeper, just before it needs them; they get the keys and values
         full depth would have given them.
Generation stops when the model's context (its position table) is full, and says so.
"""
import codecs
import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cee
import tokenizer
from common import load_model, overrides, pick_device
from model import Decoder

PROG = "generate.py"


# -----------------------------------------------------------------------------
# options


@dataclass
class GenConfig:
    ckpt: str = ""               # a Hugging Face folder, a .gguf, or a decoder checkpoint (.pt)
    prompt: str = ""
    exit: str = "none"           # none | policy | confidence | speculative
    kv: str = "copy"             # copy | defer: how an early exit's skipped layers get keys/values
                                 # (speculative drafts always defer: verification completes them)
    max_new_tokens: int = 50
    temperature: float = 0.0     # 0 = greedy
    top_k: int = 0               # sample from the k most likely tokens only; 0 = all
    threshold: float = 0.5       # exit when the policy's probability (or the head's top
                                 # probability) exceeds it
    draft_len: int = 4           # speculative: tokens drafted per verification (the fastest of
                                 # 3..8 on the LM)
    draft_threshold: float = 0.0 # speculative: the drafts' exit threshold; 0 = --threshold
                                 # (train.py --task=smollm2 picks both for tokens/s)
    seed: int = 1337
    device: str = "auto"
    chat: bool = False           # the prompt is a user's message in the model's chat template,
                                 # and generation stops at the end of the reply (SmolLM2)
    json: bool = False           # print one JSON object instead of text and a statistics line
    show_exits: bool = False     # each token of the reply coloured by its exit layer (on a
                                 # terminal; in a pipe or file, the layer after it: The[3])


def parse_args(argv):
    cfg = overrides(GenConfig(), argv, PROG, __doc__)
    for ok, msg in [(cfg.exit in ("none", "policy", "confidence", "speculative"),
                     f"unknown --exit={cfg.exit}; use none, policy, confidence or speculative"),
                    (cfg.kv in ("copy", "defer"), f"unknown --kv={cfg.kv}; use copy or defer"),
                    (cfg.ckpt, "--ckpt is required"), (cfg.prompt, "the prompt is empty"),
                    (cfg.max_new_tokens > 0, "--max_new_tokens must be > 0"),
                    (cfg.temperature >= 0, "--temperature >= 0"),
                    (cfg.draft_len >= 1, "--draft_len >= 1"), (cfg.top_k >= 0, "--top_k >= 0"),
                    (0 <= cfg.draft_threshold <= 1, "--draft_threshold in [0, 1]")]:
        if not ok:
            raise SystemExit(f"{PROG}: {msg}")
    return cfg


# -----------------------------------------------------------------------------
# one token at a time, each at its own exit layer


def probs(logits, temperature, top_k):
    """The distribution the next token is drawn from: logits (B, vocab) -> (B, vocab).
    Temperature 0 is greedy decoding: all the mass on the most likely token."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, -1)


def next_token(logits, temperature, top_k, generator):
    """Pick a token from the last position's logits (B, vocab) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(probs(logits, temperature, top_k), 1, generator=generator)


def step(model, tok, cache, pos, rule, pending=None, finished=None, folded=None):
    """
    Run one token (B, 1) at position pos layer by layer until `rule` lets it exit (rule None:
    never). Returns (logits (B, vocab), exit layer 1..L). Its skipped layers' keys/values: with
    pending None, state copying, now (folded: model.folded_kv() of the current weights; None
    computes it here, the cost of every layer's K/V weights). With a list (B = 1), deferred fill:
    the token waits in pending as (position, state (1, 1, C), next layer); when a later token
    reaches that layer, the waiting tokens due there join its rows and go on with it, until it
    stops (then they wait again) or ends at layer L.
    finished, a dict: every row that ends at layer L leaves there {position: full-depth logits
    (B, vocab)}.
    """
    L = model.config.n_layer
    x, positions = model.embed(tok, pos), [pos]  # of each row of x; the token's is the last
    for l in range(L):
        due = [w for w in pending or [] if w[2] == l]
        if due:  # deferred fill: their layer l runs in this token's batch, before attention
            pending[:] = [w for w in pending if w[2] != l]
            x, positions = torch.cat([w[1] for w in due] + [x], 1), [w[0] for w in due] + positions
        x = model.run_layer(l, x, cache, pos if len(positions) == 1 else positions)  # (B, rows, C)
        if rule is None or l == L - 1:
            continue
        state = x[:, -1]  # (B, C)
        # the C x vocab LM head, only when the rule needs it
        logits = model.exit_logits(state, l) if rule.needs_head(model.config) else None
        p = model.policies[l](model.policy_input(state, logits)) if rule.needs_policy else None
        stop, _ = rule.decide(l, logits, p, None)
        if stop.all():  # the one host synchronisation per layer
            if pending is None:
                model.copy_state_up(l, x, cache, pos, folded)
            else:
                pending += [(r, x[:, i:i + 1], l + 1) for i, r in enumerate(positions)]
            return (model.exit_logits(state, l) if logits is None else logits), l + 1
    if finished is None:
        return model.exit_logits(x[:, -1]), L
    logits = model.exit_logits(x)  # (B, rows, vocab)
    finished.update({r: logits[:, i] for i, r in enumerate(positions)})
    return logits[:, -1], L


def prefill(model, idx, cache):
    """Every layer over the prompt (B, T), filling the cache; the last position's logits
    (B, vocab)."""
    return model.exit_logits(model.run_layers(model.embed(idx), cache)[:, -1])


@torch.inference_mode()
def generate(model, idx, max_new_tokens, exit="none", threshold=0.5, temperature=0.0, top_k=0,
             draft_len=4, generator=None, kv="copy", stop=None):
    """
    Continue idx (1, T); kv = "copy" or "defer" fills the skipped layers (see step). Returns (new
    token ids (1, n), stats dict with mean_exit_layer, accepted_per_draft, context_full and exits).
    With exit="none", idx may hold B prompts of one length, (B, T) -> (B, n): a batch, which on a
    CPU costs less than B replies one by one; a row that has said stop says it again until every row
    has. exits: the layer each new token's distribution came from, n ints, L for full depth. The
    first new token comes from the prompt's full-depth pass (L); mean_exit_layer leaves it out, so
    it is the mean of exits[1:] (L if n = 1). --exit=speculative: an accepted draft's exit layer, L
    for the token each verification picks; its mean_exit_layer is the mean over all drafts, refused
    ones included (the drafting's depth), not over exits.
    Stops after the token stop (kept, as transformers keeps its end-of-sequence token), or early
    when the position table is full, and says so in stats["context_full"].
    """
    model.check_ids(idx)
    if idx.size(0) > 1 and exit != "none":
        raise ValueError("a batch of prompts generates at full depth only (exit='none')")
    if idx.size(1) >= model.config.block_size:
        raise ValueError(f"the prompt has {idx.size(1)} tokens; the model's context is "
                         f"{model.config.block_size}")
    room = model.config.block_size - idx.size(1)
    new, stats = _generate(model, idx, min(max_new_tokens, room), exit, threshold, temperature,
                           top_k, draft_len, generator, kv, stop)
    stopped = stop is not None and bool((new[:, -1] == stop).all())
    return new, stats | {"context_full": max_new_tokens > room and not stopped}


def _generate(model, idx, max_new_tokens, exit, threshold, temperature, top_k, draft_len,
              generator, kv, stop):
    cuda = idx.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        if exit == "speculative":
            rule = cee.ExitRule("consistentee", threshold)
            return speculative(model, idx, max_new_tokens, rule, draft_len, temperature, top_k,
                               generator, stop)
        rule = {"none": None, "policy": cee.ExitRule("consistentee", threshold),
                "confidence": cee.ExitRule("maxprob", threshold)}[exit]
        cache = model.new_cache(idx.size(0), idx.size(1) + max_new_tokens)
        logits, out, exits = prefill(model, idx, cache), [], []
        pending = [] if kv == "defer" else None
        folded = model.folded_kv() if rule and kv == "copy" else None
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)  # said stop
        for pos in range(idx.size(1), idx.size(1) + max_new_tokens):
            tok = next_token(logits, temperature, top_k, generator)  # (B, 1)
            if stop is not None:
                tok = tok.masked_fill(done, stop)
                done |= tok == stop
            out.append(tok)
            if stop is not None and done.all():
                break
            if pos + 1 < idx.size(1) + max_new_tokens:
                logits, e = step(model, tok, cache, pos, rule, pending, folded=folded)
                exits.append(e)
    L = model.config.n_layer
    mean_exit = sum(exits) / len(exits) if exits else float(L)
    return torch.cat(out, 1), {"mean_exit_layer": mean_exit, "accepted_per_draft": None,
                               "exits": [L] + exits}


# -----------------------------------------------------------------------------
# self-speculative decoding


def speculative(model, idx, max_new_tokens, rule, draft_len, temperature=0.0, top_k=0,
                generator=None, stop=None):
    """
    Self-speculative decoding. The last accepted token `last` sits at position q, every token
    before it has full-depth K/V. Draft k tokens from `last` with early exits, each drawn from its
    exit head's distribution q_i; then verify: run d_k through every layer, and with it (deferred
    fill) the layers that [last, d_1..d_{k-1}] skipped. The drafts' first layers are not run again
    (as in LayerSkip), and every draft ends with its full-depth K/V and the full model's
    distribution p_1..p_{k+1}. Keep d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
    refusal draw from max(0, p_i - q_i), normalised; if all are kept, draw from p_{k+1}. Every
    token is then distributed exactly as full-depth sampling would draw it (speculative sampling,
    Leviathan et al. 2023; Chen et al. 2023). Greedy (temperature 0): p and q put all their mass
    on one token, so d_i is kept while it is the full model's choice, and the output is
    token for token full-depth greedy decoding.
    The drafts always use deferred fill: it is what the verification completes, and state copying
    would be wasted work (before the verification reused the drafts: 1.14x instead of 1.44x).
    """
    cache = model.new_cache(idx.size(0), idx.size(1) + max_new_tokens + draft_len)
    if idx.size(1) > 1:
        prefill(model, idx[:, :-1], cache)
    last, q, out, exits, accepted, pending = idx[:, -1:], idx.size(1) - 1, [], [], [], []
    L, out_exits = model.config.n_layer, []  # the exit layer of each token in out
    while len(out) < max_new_tokens:
        k = min(draft_len, max_new_tokens - len(out) - 1, model.config.block_size - q - 1)
        drafts, q_draft, tok, finished = [], [], last, {}
        for i in range(k):
            logits, e = step(model, tok, cache, q + i, rule, pending, finished)
            q_draft.append(probs(logits, temperature, top_k)[0])  # (vocab,)
            tok = next_token(logits, temperature, top_k, generator)  # (1, 1)
            drafts.append(tok)
            exits.append(e)
        step(model, tok, cache, q + k, None, pending, finished)  # verify: nothing is left pending
        full = torch.cat([finished[q + i] for i in range(k + 1)])  # (k+1, vocab): after last, d_1..
        p_full = probs(full, temperature, top_k)
        n = 0
        for d, q_i, p_i in zip(drafts, q_draft, p_full):
            u = torch.rand(1, generator=generator, device=p_i.device)
            if not u * q_i[d] < p_i[d]:  # refused, with probability 1 - min(1, p/q)
                break
            n += 1
        rest = p_full[n] if n == k else (p_full[n] - q_draft[n]).clamp(min=0)
        tok = torch.multinomial(rest / rest.sum(), 1, generator=generator).view(1, 1)
        out += drafts[:n] + [tok]
        out_exits += exits[len(exits) - k:][:n] + [L]
        accepted.append(n)
        last, q = tok, q + n + 1
        if stop is not None and stop in torch.cat(out[-n - 1:], 1):
            break
    mean_exit = sum(exits) / len(exits) if exits else float(L)
    new = until(torch.cat(out[:max_new_tokens], 1), stop)
    return new, {"mean_exit_layer": mean_exit, "accepted_per_draft": sum(accepted) / len(accepted),
                 "exits": out_exits[:new.size(1)]}


# -----------------------------------------------------------------------------
# main


def until(new, stop):
    """new (1, n) cut after its first token stop (kept), if there is one."""
    hits = [] if stop is None else (new[0] == stop).nonzero()
    return new if len(hits) == 0 else new[:, :hits[0, 0] + 1]


def token_pieces(enc, ids):
    """
    The text of each token id: the characters its bytes complete, so "".join(pieces) is
    enc.decode(ids). A character split over tokens belongs to the one that ends it: GPT-2 writes
    "🤗" as three tokens, [8582, 97, 245] -> ["", "", "🤗"] (each alone decodes to "\ufffd").
    """
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [utf8.decode(enc.decode_single_token_bytes(t), final=i == len(ids) - 1)
            for i, t in enumerate(ids)]


def exit_colour(b, n):
    """The RGB background of colour b of n: green (shallow) through yellow to red (deep)."""
    f = b / max(n - 1, 1)
    return round(230 * min(1, 2 * f)), round(200 * min(1, 2 - 2 * f)), 0


def mark_exits(pieces, exits, L, color):
    """
    The reply with each token's exit layer (1..L). Plain: the layer after each token in brackets,
        mark_exits(["The", " movie"], [3, 12], 12, False) -> "The[3] movie[12]"
    color: each token on an ANSI 24-bit background, green for shallow to red for deep, in up to
    5 colours of a range of layers each, then a legend line (L = 12: 1-3, 4-5, 6-8, 9-10, 11-12).
    """
    if not color:
        return "".join(f"{p}[{e}]" for p, e in zip(pieces, exits))
    n = min(L, 5)

    def paint(text, b):  # black text on colour b
        r, g, bl = exit_colour(b, n)
        return f"\x1b[38;2;0;0;0;48;2;{r};{g};{bl}m{text}\x1b[0m"
    ranges = [[e for e in range(1, L + 1) if (e - 1) * n // L == b] for b in range(n)]
    legend = " ".join(paint(f" {r[0]} " if len(r) == 1 else f" {r[0]}-{r[-1]} ", b)
                      for b, r in enumerate(ranges))
    return ("".join(paint(p, (e - 1) * n // L) for p, e in zip(pieces, exits))
            + f"\nexit layer: {legend} of {L}")


@torch.no_grad()
def judged_by_full(model, idx, new):
    """
    What full depth thinks of the new tokens (1, n) after idx (1, T), from one pass over the text:
    (its mean negative log-likelihood per token of them, the share of them that full-depth greedy
    decoding would pick itself after the same prefix: the agreement).
    """
    logits, _ = model(torch.cat([idx, new], 1)[:, :-1])
    logits = logits[0, idx.size(1) - 1:].float()  # (n, vocab): its prediction of each new token
    nll = F.cross_entropy(logits, new[0]).item()
    return nll, (logits.argmax(-1) == new[0]).float().mean().item()


def main(argv):
    cfg = parse_args(argv)
    device = pick_device(cfg.device, PROG)
    model, ckpt = load_model(cfg.ckpt, PROG, device, kind=Decoder)
    model.eval()
    model = model.for_decoding()  # the same weights laid out for one-row products (model.py)
    gguf = cfg.ckpt if cfg.ckpt.endswith(".gguf") else ckpt.get("gguf")  # or train.py's smollm2
    given = {a.removeprefix("--").partition("=")[0] for a in argv}
    for key, value in ckpt.get("generate", {}).items():  # train.py --task=smollm2 picks them
        # a given --threshold also sets the drafts' unless --draft_threshold is given too
        if hasattr(cfg, key) and key not in given and not (key == "draft_threshold"
                                                            and "threshold" in given):
            setattr(cfg, key, value)
    threshold = cfg.threshold
    if cfg.exit == "speculative":  # the drafts exit by their own threshold, if one is set
        threshold = cfg.draft_threshold or cfg.threshold
    if "gguf" in ckpt:  # common.frozen_llm has said which GGUF; these are the checkpoint's parts
        mode = (f"drafts: threshold {threshold}, length {cfg.draft_len}"
                if cfg.exit == "speculative" else f"threshold {threshold}, kv {cfg.kv}")
        print(f"exits: {cfg.ckpt} (adapters, policies; {mode})", file=sys.stderr)
    elif not ckpt:  # a Hugging Face folder or a GGUF alone
        print("exit policies untrained", file=sys.stderr)
    try:  # a GGUF's own tokenizer; else GPT-2's BPE, or the shorter one of a train.py LM
        enc = (tokenizer.gguf_tokenizer(gguf) if gguf
               else tokenizer.gpt2_tokenizer(min(model.config.vocab_size, tokenizer.EOT + 1)))
    except ValueError as e:
        raise SystemExit(f"{PROG}: the model's vocabulary does not fit: {e}") from None
    stop = None
    if cfg.chat:  # the reply ends with the model's end-of-turn token
        if "<|im_end|>" not in enc.special_tokens_set:
            raise SystemExit(f"{PROG}: --chat needs a model with a chat template (a SmolLM2 "
                             f"GGUF); {cfg.ckpt} has none")
        idx = torch.tensor([enc.encode(tokenizer.chat_prompt(cfg.prompt), allowed_special="all")])
        stop = enc.encode_single_token("<|im_end|>")
    else:
        idx = torch.tensor([enc.encode_ordinary(cfg.prompt)])
    idx = idx.to(device)
    T = model.config.block_size
    if idx.size(1) >= T:
        raise SystemExit(f"{PROG}: the prompt has {idx.size(1)} tokens, the context is {T}")
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    new, stats = generate(model, idx, cfg.max_new_tokens, cfg.exit, threshold, cfg.temperature,
                          cfg.top_k, cfg.draft_len, g, cfg.kv, stop)
    seconds = time.perf_counter() - t0
    if stats["context_full"]:  # never cut silently
        print(f"{PROG}: stopped after {new.size(1)} of --max_new_tokens={cfg.max_new_tokens}: "
              f"the model's context holds {T} tokens, {idx.size(1)} of them the prompt's",
              file=sys.stderr)
    ids = new[0].tolist()
    text = enc.decode([t for t in ids if t != stop])
    pieces = token_pieces(enc, ids)
    report = {"text": text, "tokens": new.size(1),
              "tokens_per_s": new.size(1) / seconds, "mean_exit_layer": stats["mean_exit_layer"],
              "agreement_with_full": judged_by_full(model, idx, new)[1],
              "accepted_per_draft": stats["accepted_per_draft"], "exits": stats["exits"],
              "tokens_text": pieces}
    if cfg.json:
        print(json.dumps(report))
        return
    if cfg.show_exits:
        shown = len(ids) - (ids[-1] == stop)  # the stop token, always the last, is not shown
        text = mark_exits(pieces[:shown], stats["exits"][:shown], model.config.n_layer,
                          sys.stdout.isatty())
    print(text if cfg.chat else cfg.prompt + text)
    drafts = report["accepted_per_draft"]
    print(f"tokens {report['tokens']}, {report['tokens_per_s']:.1f} tokens/s, mean exit layer "
          f"{report['mean_exit_layer']:.2f} of {model.config.n_layer}, agreement with full depth "
          f"{report['agreement_with_full']:.3f}"
          + ("" if drafts is None else f", accepted per draft {drafts:.2f}"))


if __name__ == "__main__":
    main(sys.argv[1:])
