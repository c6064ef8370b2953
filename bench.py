"""
Does early exit save time on the clock, not only layers? Ratios of timings taken in one run.

    python bench.py                  # a table; out/, out_lm/, out_smollm2/stage3.pt when there
    python bench.py --json           # one JSON object
    python bench.py --ckpt=PATH --repeats=15
    python bench.py --help           # every option

Each figure is a ratio of two timings of the same inputs, taken interleaved (A, B, A, B, ...) and
summarised by the median of the repeats, so that a noisy machine slows both sides alike. At batch 1
the two alternate input by input, and each input's medians are summed.
  realized_over_layer_speedup  (time at full depth / time with early exit) / (L / mean exit layer)
  realized_without_decisions_batch_1  the same at batch 1, each input's exit known in advance (no
                               decisions): the ceiling that the costs shared with full depth leave
  decision_overhead            share of early-exit time spent deciding: the policy vs the entropy
                               rule (batch 64; decision_overhead_batch_1 the same, one at a time)
  ours_over_hf_inference       transformers' BertModel time / ours, full depth (> 1: ours is faster)
  joint_step_over_stage1_step  a stage-3 step (K trajectories) / a stage-1 step, same batch
  ours_over_hf_generate        transformers' generate() time / ours, greedy, full depth, same
                               GPT-2 weights
  policy_exit_speedup          tokens/s with policy exits / tokens/s at full depth (trained LM,
                               greedy), with policy_agreement, the share of tokens full depth
                               would have picked
  speculative_speedup          tokens/s of self-speculative decoding / full depth;
                               speculative_identical
  smollm2_ours_over_hf_generate  transformers' generate() time / ours, greedy, full depth, the
                               same dequantised SmolLM2-135M weights, float32
  smollm2_policy_exit_speedup  with the exits of train.py --task=smollm2, on its 40 held-out chat
                               prompts: tokens/s with policy exits / full depth, greedy;
                               smollm2_policy_agreement, the share of tokens full depth would have
                               picked; smollm2_speculative_speedup and _identical, the same for
                               self-speculative decoding; smollm2_oracle_speedup, L / the mean
                               first layer whose head agrees with full depth (teacher forcing)
  smollm2_time_per_token       where a token's time goes (ms per generated token, by part: the
                               layers, the heads, the policies, state copying; drafts and
                               verification; other; total) at full depth, with policy exits (and
                               again without the shortlist) and speculative; smollm2_head_share
  smollm2_threshold_curve      policy exits at thresholds 0.9, 0.95, 0.99 with deferred fill, 0.9
                               and 0.99 with state copying: speed-up, full depth's NLL of the
                               replies over its own replies' (nll_ratio), agreement, exit layer
  smollm2_speculative_cost_model  c, a, gamma, v and the speed-up they predict (Leviathan et al.);
                               smollm2_speculative_drafts, the drafts' threshold and length
  smollm2_rows_cost            a block's matrix products on k rows / on one row, k = 1, 2, 4, 8:
                               what batching rows (deferred fill, verification) costs here
  smollm2_full_over_bandwidth_limit  full depth's tokens/s / (memory_bandwidth_gbs /
                               smollm2_bytes_per_token_mb): 1 = as fast as reading the weights
Without a checkpoint the model is all-MiniLM-L6-v2's shape with random weights, and policies scaled
so that the inputs spread over the exit layers.
"""
import json
import os
import statistics
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

import cee
import data
import tokenizer
from common import load_model, overrides, pick_device, timed_runs, timer
from model import Config, Decoder, Encoder, TransposedLinear, unpack

PROG = "bench.py"


# -----------------------------------------------------------------------------
# options


@dataclass
class BenchConfig:
    ckpt: str = ""         # a classifier of train.py, or "random" (MiniLM's shape, random
                           # weights); "" = out/stage3.pt if it is there, else random
    lm_ckpt: str = ""      # a language model of train.py --task=lm; "" = out_lm/stage3.pt if there
    smollm2_ckpt: str = ""  # exits of train.py --task=smollm2; "" = out_smollm2/stage3.pt if there
    repeats: int = 9       # timings per figure, interleaved; each figure is their median's ratio
    device: str = "auto"   # auto = cuda, then mps, then cpu
    json: bool = False     # print one JSON object instead of a table


def parse_args(argv):
    cfg = overrides(BenchConfig(), argv, PROG, __doc__)
    if cfg.repeats < 1:
        raise SystemExit(f"{PROG}: --repeats must be >= 1")
    return cfg


# -----------------------------------------------------------------------------
# timing: ratios of interleaved medians


def interleaved(fa, fb, repeats, now):
    """
    Median time of fa / median time of fb, the two run alternately after one warm-up each. fa and
    fb may also be lists (one function per input, as each() makes): each pair alternates on its own
    input, and the ratio is of the sums of their medians. A pair then runs within milliseconds,
    not within the time of all inputs, so that a machine whose speed drifts slows both sides alike.
    """
    (ta, tb), _ = timed_runs([fa, fb], repeats, now)
    return ta / tb


# -----------------------------------------------------------------------------
# the classifier: early exit against full depth, deciding, transformers


def classifier(ckpt, device):
    """(model in eval mode, where it came from): a checkpoint of train.py, or random weights of
    MiniLM's shape (ckpt "random", or "" when out/stage3.pt is not there)."""
    ckpt = ckpt or ("out/stage3.pt" if os.path.isfile("out/stage3.pt") else "random")
    if ckpt != "random":
        return load_model(ckpt, PROG, device, kind=Encoder)[0].eval(), ckpt
    torch.manual_seed(0)
    model = Encoder(Config(dropout=0.0))
    with torch.no_grad():
        for pol in model.policies:  # exit probabilities spread around the 0.5 threshold
            pol.net[-1].weight.normal_(0, 3.0)
    return model.to(device).eval(), "random-init MiniLM shape"


def full_depth(model, ids, mask, layers=None):
    """
    What one runs without early exit, for the same answer: the input checks, every layer (skipping
    the padding), then the last exit head's prediction. With layers=n: the first n layers and exit
    head n, an early exit known in advance, so with no decisions to pay for.
    """
    model.check_ids(ids)
    tokens, bias, L = model.real_tokens(mask), model.attn_bias(mask), layers or model.config.n_layer
    x = model.run_layers(model.embed(ids, tokens=tokens), bias, tokens, n=L)
    h = x if tokens is None else unpack(x, tokens, *ids.shape)
    return model.exit_logits(model.exit_state(h, model.pool_weights(mask)), L - 1).argmax(-1)


class TimedRule(cee.ExitRule):
    """An exit rule that adds up the seconds spent in its decisions and in the policy network."""

    def clock(self, model, now):
        self.seconds, self.now = 0.0, now
        for l, pol in enumerate(model.policies):
            model.policies[l] = Clocked(pol, self)
        # the policy's view (with the head's confidence if policy_conf)
        model.policy_input = Clocked(model.policy_input, self)
        return self

    def unclock(self, model):
        for l, pol in enumerate(model.policies):
            model.policies[l] = pol.module
        del model.policy_input

    def decide(self, l, logits, p, memory):
        t0 = self.now()
        out = super().decide(l, logits, p, memory)
        self.seconds += self.now() - t0
        return out


class Clocked(torch.nn.Module):
    """Calls module (a module or a function) and adds the seconds it took to rule.seconds."""

    def __init__(self, module, rule):
        super().__init__()
        self.module, self.rule = module, rule

    def forward(self, *args):
        t0 = self.rule.now()
        out = self.module(*args)
        self.rule.seconds += self.rule.now() - t0
        return out


# -----------------------------------------------------------------------------
# generation: ours against transformers, policy exits and speculative decoding


def generation(device, repeats, now):
    """
    Greedy decoding of 32 tokens with a random-init GPT-2 (6 layers, width 256, GPT-2's vocabulary):
    ours at full depth vs transformers' generate() on the same weights, and whether self-speculative
    decoding returns exactly the same tokens.
    """
    import tempfile
    import transformers
    import generate
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=256, n_layer=6, n_head=8,
                                                              n_positions=256))
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = Decoder.from_pretrained(path).to(device).for_decoding()  # as generate.py runs it
    hf = hf.to(device).eval()
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0,
              attention_mask=torch.ones_like(idx))
    with torch.inference_mode():
        full, _ = generate.generate(ours, idx, 32)
        spec, _ = generate.generate(ours, idx, 32, "speculative")
        ratio = interleaved(partial(hf.generate, idx, **kw),
                            partial(generate.generate, ours, idx, 32), repeats, now)
    return {"ours_over_hf_generate": ratio,
            "speculative_identical_random_gpt2": torch.equal(full, spec)}


def smollm2_generation(device, repeats, now, new_tokens=32):
    """
    SmolLM2-135M-Instruct from its 4-bit GGUF, dequantised to float32 for both: greedy decoding of
    32 tokens after a chat prompt, ours at full depth vs transformers' generate() on the same
    weights (fewer repeats: a pair takes seconds).
    """
    import transformers
    import generate
    path = data.smollm2_path()
    ours = Decoder.from_pretrained(path).to(device).for_decoding()  # as generate.py runs it
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    hf = hf.to(device).eval()
    enc = tokenizer.gguf_tokenizer(path)
    text = tokenizer.chat_prompt("Give me three tips for sleeping well.")
    idx = torch.tensor([enc.encode(text, allowed_special="all")], device=device)
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              pad_token_id=2, attention_mask=torch.ones_like(idx))
    with torch.inference_mode():
        ratio = interleaved(partial(hf.generate, idx, **kw),
                            partial(generate.generate, ours, idx, new_tokens),
                            max(1, repeats // 3), now)
    return {"smollm2_ours_over_hf_generate": ratio}


# smollm2_threshold_curve: policy exits at these thresholds and ways of filling the
# skipped layers (deferred fill, state copying)
CURVE = [(0.9, "defer"), (0.95, "defer"), (0.99, "defer"), (0.9, "copy"), (0.99, "copy")]


def smollm2_exits(ckpt, device, repeats, now, new_tokens=32):
    """
    The exits of train.py --task=smollm2 on its held-out (test) prompts: greedy replies of at most
    32 tokens at full depth, with policy exits at the checkpoint's threshold and kv and at each
    (threshold, kv) of CURVE (the speed against the quality), and self-speculative with the
    checkpoint's drafts, each prompt run by all of them in turn (timed_runs); the replies judged by
    full depth (agreement: the share of all the replies' tokens, not a mean over prompts); the
    oracle's layer speed-up by teacher forcing on full depth's replies, each token at the first
    layer whose head says what full depth does.
    """
    import generate
    import llm
    import replies
    keys = ("smollm2_policy_exit_speedup", "smollm2_policy_agreement",
            "smollm2_speculative_speedup", "smollm2_speculative_identical",
            "smollm2_oracle_speedup", "smollm2_policy_reply_nll", "smollm2_full_reply_nll",
            "smollm2_policy_repeat_3gram", "smollm2_full_repeat_3gram",
            "smollm2_threshold_curve", "memory_bandwidth_gbs", "smollm2_bytes_per_token_mb",
            "smollm2_full_over_bandwidth_limit", "smollm2_time_per_token",
            "smollm2_head_share", "smollm2_speculative_cost_model", "smollm2_rows_cost",
            "smollm2_speculative_drafts")
    if not ckpt and not os.path.isfile("out_smollm2/stage3.pt"):
        return {"smollm2_model": "out_smollm2/stage3.pt missing: run python train.py "
                                 "--task=smollm2"} | dict.fromkeys(keys)
    ckpt = ckpt or "out_smollm2/stage3.pt"
    model, state = load_model(ckpt, PROG, device, kind=Decoder)
    if "gguf" not in state:
        raise SystemExit(f"{PROG}: {ckpt} is not a checkpoint of train.py --task=smollm2")
    model, saved = model.for_decoding(), state["config"]  # as generate.py runs it
    texts, kinds = data.chat_prompts(saved["llm_train"], saved["llm_validation"],
                                     saved["llm_test"], saved["seed"])
    enc = tokenizer.gguf_tokenizer(state["gguf"])
    stop = enc.encode_single_token("<|im_end|>")
    idxs = [replies.encode_chat(enc, text, device) for text in texts["test"]]
    picked = state["generate"]  # on validation; a checkpoint before the drafts' pick: generate.py's
    drafts = dict(threshold=picked.get("draft_threshold", picked["threshold"]),
                  draft_len=picked.get("draft_len", generate.GenConfig.draft_len))
    curve = CURVE + [(picked["threshold"], picked["kv"])] * ((picked["threshold"],
                                                              picked["kv"]) not in CURVE)
    modes = [{}, dict(exit="speculative", **drafts)]
    modes += [dict(exit="policy", threshold=t, kv=kv) for t, kv in curve]
    runs = [[partial(generate.generate, model, idx, new_tokens, stop=stop, **kw) for idx in idxs]
            for kw in modes]
    for run in runs:  # warm-up, not timed
        run[0]()
    seconds, results = timed_runs(runs, max(1, repeats // 9), now, warmup=False)
    ours = 2 + curve.index((picked["threshold"], picked["kv"]))  # the picked policy exits
    (t_full, t_spec, t_policy), (full, spec, policy) = zip(*[(seconds[j], results[j])
                                                              for j in (0, 1, ours)])
    judged = [[generate.judged_by_full(model, idx, new) for idx, (new, _) in zip(idxs, side)]
              for side in results]  # (NLL, agreement) of each reply, by full depth
    tokens = [[new.size(1) for new, _ in side] for side in results]
    agreement = [sum(a * n for (_, a), n in zip(j, ns)) / sum(ns) for j, ns in zip(judged, tokens)]
    nll = [statistics.mean(x for x, _ in j) for j in judged]
    points = [{"threshold": t, "kv": kv, "speedup": t_full / s, "nll_ratio": n / nll[0],
               "agreement": a, "mean_exit_layer": statistics.mean(st["mean_exit_layer"]
                                                                  for _, st in r)}
              for (t, kv), s, n, a, r in zip(curve, seconds[2:], nll[2:], agreement[2:],
                                             results[2:])]
    pairs = [(idx[0].tolist(), new[0].tolist()) for idx, (new, _) in zip(idxs, full)]
    tables = llm.head_tables(model, replies.reply_states(model, pairs))
    quality = {}  # the replies judged by full depth: its NLL of them, their repeated 3-grams
    for side, replied, j in (("policy", policy, judged[ours]), ("full", full, judged[0])):
        for part, keep in (("", None), ("_held_out_kinds", data.HELD_OUT_KINDS)):
            i = [k for k, kind in enumerate(kinds["test"]) if keep is None or kind in keep]
            if not i:  # a run too small to hold prompts of the held-out kinds
                continue
            quality[f"smollm2_{side}_reply_nll{part}"] = statistics.mean(j[k][0] for k in i)
            quality[f"smollm2_{side}_repeat_3gram{part}"] = statistics.mean(
                replies.repeated_3grams(replied[k][0][0].tolist()) for k in i)
    accepted = statistics.mean(st["accepted_per_draft"] for _, st in spec)
    # full depth's tokens/s of the timed runs above (each reply's prompt pass included)
    full_per_s = sum(tokens[0]) / t_full
    quality |= smollm2_memory_limit(model, full_per_s, device, now)
    quality |= smollm2_time_split(model, idxs[:3], new_tokens, now, stop,
                                  [modes[0], modes[ours], modes[1]], accepted)
    quality["smollm2_rows_cost"] = rows_cost(model, now)
    return quality | {"smollm2_model": ckpt, "smollm2_policy_exit_speedup": t_full / t_policy,
            "smollm2_policy_agreement": agreement[ours],
            "smollm2_policy_mean_exit_layer": statistics.mean(st["mean_exit_layer"]
                                                              for _, st in policy),
            "smollm2_speculative_speedup": t_full / t_spec,
            "smollm2_speculative_identical": all(torch.equal(a, b)
                                                 for (a, _), (b, _) in zip(full, spec)),
            "smollm2_speculative_accepted_per_draft": accepted,
            "smollm2_speculative_drafts": drafts,
            "smollm2_threshold_curve": points,
            "smollm2_oracle_speedup": llm.oracle_speedup(tables)}


# -----------------------------------------------------------------------------
# where a SmolLM2 token's time goes, against what memory allows


@contextmanager
def timed_parts(model, now, speculative=False):
    """
    While inside, generate.generate on model adds up the seconds of each part of a token's work,
    by part name, in the dicts it yields: (seconds, calls). The functions are wrapped where they
    are looked up (model's bound methods and each policy's forward as instance attributes,
    generate's prefill and step as module functions) and unwrapped on the way out. A call made
    inside another timed call counts in the outer one only, so no second is counted twice:
      prefill        generate.prefill: the prompt's pass (its layers and its head)
      layers         model.run_layer: one layer of the token, with the rows of the deferred fill
                     that wait for that layer (they run inside it, in the same batch)
      head_full      model.exit_logits at the last layer (l None or L - 1): the whole head
      head_exits     model.exit_logits at an earlier layer: an exit's head (its shortlist, if set)
      policies       the forward of model.policies[l]
      state_copying  model.copy_state_up, and model.folded_kv: the folded K/V weights it reads,
                     made once per reply (generate's _generate)
    speculative=True also wraps generate.step, whose calls then hold the parts above:
      drafts         step with a rule: a drafted token, its exits and its deferred fill
      verification   step with rule None: the last draft through every layer, with the fill of
                     the layers the drafts skipped
    On CUDA now() waits for the device, at every timed call: the parts are right, and their sum
    is slower than an unbroken run.
    """
    import generate
    seconds, calls, busy = {}, {}, [False]

    def timed(f, part):  # part(*args) names the part a call counts in
        def call(*args, **kw):
            if busy[0]:  # inside another timed call: counted there
                return f(*args, **kw)
            busy[0] = True
            t0 = now()
            out = f(*args, **kw)
            name = part(*args, **kw)
            seconds[name] = seconds.get(name, 0.0) + now() - t0
            calls[name] = calls.get(name, 0) + 1
            busy[0] = False
            return out
        return call

    last = model.config.n_layer - 1
    parts = [(generate, "prefill", lambda *a: "prefill"),
             (model, "run_layer", lambda *a: "layers"),
             (model, "exit_logits",
              lambda x, l=None: "head_full" if l is None or l == last else "head_exits"),
             (model, "copy_state_up", lambda *a, **kw: "state_copying"),
             (model, "folded_kv", lambda: "state_copying")]
    parts += [(pol, "forward", lambda *a: "policies") for pol in model.policies]
    if speculative:
        parts.append((generate, "step",
                      lambda m, tok, cache, pos, rule, *a, **kw: "verification" if rule is None
                      else "drafts"))
    saved = [(obj, name, vars(obj).get(name)) for obj, name, _ in parts]
    for obj, name, part in parts:
        setattr(obj, name, timed(getattr(obj, name), part))
    try:
        yield seconds, calls
    finally:
        for obj, name, f in saved:  # generate's own functions back; the instances' wrappers gone
            if f is None:
                delattr(obj, name)
            else:
                setattr(obj, name, f)


def time_split(model, idxs, new_tokens, now, **kw):
    """
    generate.generate(model, idx, new_tokens, **kw) on each prompt of idxs, inside timed_parts.
    Returns (seconds by part, with "other", the whole minus the parts, and "total", the whole;
    calls by part; the tokens generated).
    """
    import generate
    with timed_parts(model, now, kw.get("exit") == "speculative") as (seconds, calls):
        t0 = now()
        tokens = sum(generate.generate(model, idx, new_tokens, **kw)[0].size(1) for idx in idxs)
        total = now() - t0
    return seconds | {"other": total - sum(seconds.values()), "total": total}, calls, tokens


def speculative_cost_model(c, a, gamma, v):
    """
    Self-speculative decoding's expected speed-up over full depth (Leviathan et al. 2023; LayerSkip,
    Elhoushi et al. 2024). A round drafts gamma tokens, each taking c times a full-depth token's
    time, and verifies them in one pass taking v times it. Each draft is kept with probability a,
    independently, up to the first refusal, and the verification adds a token of its own, so a
    round gives 1 + a + ... + a^gamma = (1 - a^(gamma+1)) / (1 - a) tokens (gamma + 1 if a = 1):
        speculative_cost_model(c=0.5, a=0.5, gamma=2, v=1.0)
        -> tokens_per_round 1.75, time 2 * 0.5 + 1.0 = 2.0: predicted_speedup 0.875
    """
    tokens = gamma + 1 if a == 1 else (1 - a ** (gamma + 1)) / (1 - a)
    return {"c": c, "a": a, "gamma": gamma, "v": v, "tokens_per_round": tokens,
            "predicted_speedup": tokens / (gamma * c + v)}


def smollm2_time_split(model, idxs, new_tokens, now, stop, modes, accepted):
    """
    Where a token's time goes (timed_parts), on the prompts idxs, for the three modes of
    smollm2_exits (full, policy, speculative) and for policy exits with the whole head at every
    exit (the shortlist set aside, then put back): ms per generated token, the prompt's pass
    included. The head's share of a token's time, and the cost model of speculative decoding
    with c and v measured here against a full-depth step (full's time outside the prompt's pass,
    over its steps: a reply of n tokens takes n - 1, its first comes from the prompt's pass) and
    a = accepted (accepted per draft, of smollm2_exits's timed runs) / gamma; beside it the
    speed-up measured here after the prompt's pass, which the model leaves out.
    """
    names = ("full", "policy", "speculative")
    runs = {name: time_split(model, idxs, new_tokens, now, stop=stop, **kw)
            for name, kw in zip(names, modes)}
    kept = model.shortlist, model.short_head
    model.set_shortlist(None)
    runs["policy_without_shortlist"] = time_split(model, idxs, new_tokens, now, stop=stop,
                                                  **modes[1])
    model.shortlist, model.short_head = kept
    ms = {name: {part: 1000 * s / tokens for part, s in seconds.items()}
          for name, (seconds, _, tokens) in runs.items()}
    share = {name: (ms[name].get("head_full", 0) + ms[name].get("head_exits", 0))
             / ms[name]["total"] for name in ("full", "policy", "policy_without_shortlist")}
    full, _, tokens = runs["full"]
    step = (full["total"] - full["prefill"]) / (tokens - len(idxs))  # a full-depth token
    spec, calls, _ = runs["speculative"]
    gamma = modes[2]["draft_len"]
    cost = speculative_cost_model(spec["drafts"] / calls["drafts"] / step, accepted / gamma,
                                  gamma, spec["verification"] / calls["verification"] / step)
    # what the model predicts, measured on these prompts: the time after the prompt's pass
    cost["measured_speedup_after_prompt"] = ((full["total"] - full["prefill"])
                                             / (spec["total"] - spec["prefill"]))
    return {"smollm2_time_per_token": ms, "smollm2_head_share": share,
            "smollm2_speculative_cost_model": cost}


def weight_bytes_per_token(model):
    """
    Bytes of weights a full-depth token reads: every block's parameters, the final norm and the
    LM head (a tied head counted once, as the head; the embedding row the token reads is
    negligible), at the dtype they are stored in.
    """
    params = [*model.blocks.parameters(), *model.ln_f.parameters(), model.lm_head.weight]
    return sum(p.numel() * p.element_size() for p in params)


def memory_bandwidth_gbs(device, now, mb=512, repeats=5):
    """GB/s of reading memory: summing a float32 array of mb megabytes, the best of repeats."""
    x = torch.ones(mb * 10 ** 6 // 4, device=device)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = now()
        x.sum().item()
        times.append(now() - t0)
    return x.numel() * 4 / min(times[1:]) / 1e9


def rows_cost(model, now, rows=(1, 2, 4, 8), repeats=20):  # rows: 1 among them
    """
    What k rows through a block's matrix products cost against one row, here: the time of every
    linear layer of the first block on k rows over its time on one, in float32, {k: ratio} (median
    of 5 timings of `repeats` passes, after a warm-up). Products bound by memory traffic read the
    weights once for any k (a ratio near 1, as on a GPU); deferred fill and the verification of
    speculative decoding run several rows at once and gain only as much as this is below k.
    """
    linears = [m for m in model.blocks[0].modules() if isinstance(m, (nn.Linear, TransposedLinear))]
    device = model.wte.weight.device

    def seconds(k):
        xs = [torch.randn(1, k, m.weight.size(1), device=device) for m in linears]
        times = []
        for _ in range(5):
            t0 = now()
            for _ in range(repeats):
                for m, x in zip(linears, xs):
                    m(x)
            times.append(now() - t0)
        return statistics.median(times)
    with torch.inference_mode():
        seconds(1)  # warm-up
        times = {k: seconds(k) for k in rows}
    return {k: t / times[1] for k, t in times.items()}


def smollm2_memory_limit(model, full_tokens_per_s, device, now):
    """
    The physical limit of full depth at batch 1: every token reads all the weights once, so
    memory allows at most bandwidth / bytes per token tokens/s. full_over_bandwidth_limit is the
    measured tokens/s over that (1 = as fast as memory allows).
    """
    gbs, per_token = memory_bandwidth_gbs(device, now), weight_bytes_per_token(model)
    return {"memory_bandwidth_gbs": gbs, "smollm2_bytes_per_token_mb": per_token / 1e6,
            "smollm2_full_over_bandwidth_limit": full_tokens_per_s / (gbs * 1e9 / per_token)}


def lm_generation(ckpt, device, repeats, now, new_tokens=96):
    """
    The trained language model (python train.py --task=lm): greedy continuations, 96 tokens each,
    of 4 test prompts of 16 tokens; full depth vs policy exits (state copying, the default, and
    deferred fill) vs self-speculative decoding, each with generate.py's defaults (threshold 0.5,
    draft_len 4). Also the share of a token's multiply-adds spent in the layers rather than the LM
    head.
    """
    import generate
    if not ckpt and not os.path.isfile("out_lm/stage3.pt"):
        return {"lm_model": "out_lm/stage3.pt missing: run python train.py --task=lm",
                "policy_exit_speedup": None, "policy_agreement": None, "speculative_speedup": None}
    ckpt = ckpt or "out_lm/stage3.pt"
    model, state = load_model(ckpt, PROG, device, kind=Decoder)
    model, c, saved = model.for_decoding(), model.config, state.get("config")  # as generate.py
    if not saved:
        raise SystemExit(f"{PROG}: {ckpt} holds no training options: give a checkpoint of "
                         "train.py --task=lm, whose test windows give the prompts")
    # the test windows of its training run; the first 16 tokens of 4 of them
    test = data.lm_task(c.vocab_size, saved["max_len"], 1, saved["lm_test_windows"], saved["seed"])
    prompts = [p[None].to(device) for p in test["test"][:4, :16]]

    def run(**kw):
        return lambda: [generate.generate(model, p, new_tokens, **kw) for p in prompts]
    full = [new for new, _ in run()()]
    out = {"lm_model": ckpt}
    for name, kw in (("policy_exit", dict(exit="policy")),
                     ("policy_exit_defer", dict(exit="policy", kv="defer")),
                     ("speculative", dict(exit="speculative"))):
        results = run(**kw)()
        out[f"{name}_speedup"] = interleaved(run(), run(**kw), repeats, now)
        out[f"{name}_mean_exit_layer"] = statistics.mean(st["mean_exit_layer"] for _, st in results)
        if name.startswith("policy"):
            out[name.replace("exit", "agreement")] = statistics.mean(
                generate.judged_by_full(model, p, new)[1] for p, (new, _) in zip(prompts, results))
        else:
            out["speculative_identical_lm"] = all(torch.equal(a, b)
                                                  for a, (b, _) in zip(full, results))
            out[f"{name}_accepted_per_draft"] = statistics.mean(st["accepted_per_draft"]
                                                                for _, st in results)
    T = 16 + new_tokens / 2  # mean context while generating
    # multiply-adds of a layer: q, k, v and the projection, the MLP, attention over T positions
    per_layer = 4 * c.n_embd ** 2 + 2 * c.n_embd * c.n_inner + 2 * T * c.n_embd
    layers = c.n_layer * per_layer
    out["lm_layer_share"] = layers / (layers + c.n_embd * c.vocab_size)
    return out


# -----------------------------------------------------------------------------
# main


def each(batches, f):
    """One function of no arguments per batch, running f(input_ids, attention_mask) on it."""
    return [partial(f, b["input_ids"], b["attention_mask"]) for b in batches]


def over(batches, f):
    """A function of no arguments that runs f(input_ids, attention_mask) on every batch."""
    runs = each(batches, f)
    return lambda: [run() for run in runs]


def main(argv):
    cfg = parse_args(argv)
    device = pick_device(cfg.device, PROG)
    repeats = cfg.repeats
    now = timer(device)
    model, source = classifier(cfg.ckpt, device)
    L = model.config.n_layer
    path = data.minilm_path()
    vocab = tokenizer.WordPiece(os.path.join(path, "vocab.txt"))
    test = data.load_task("rotten_tomatoes", vocab)["test"]
    b64 = next(data.batches(test, 64, device=device))
    singles = [next(data.batches(test.select([i]), 1, device=device)) for i in range(16)]
    policy = cee.ExitRule("consistentee", 0.5)
    out = {"model": source, "device": device, "repeats": repeats, "realized_over_layer_speedup": {},
           "ours_over_hf_inference": {}, "mean_exit_layer": {}}

    import transformers  # what users would otherwise pick, on the same (MiniLM) weights
    hf = transformers.BertModel.from_pretrained(path).to(device).eval()
    minilm = Encoder.from_pretrained(path).to(device).eval()
    with torch.inference_mode():
        # One input at a time is the shortest timing (16 x ~10 ms on 2 CPU cores) and the
        # noisiest: 3x the repeats.
        for name, batches, reps in (("batch_1", singles, 3 * repeats),
                                    ("batch_64", [b64], repeats)):
            policy_exit = partial(cee.early_exit, model, rule=policy)
            exits = torch.cat([e for _, e in over(batches, policy_exit)()])
            mean_exit = exits.float().mean().item()
            out["mean_exit_layer"][name] = mean_exit
            ratio = interleaved(each(batches, partial(full_depth, model)),
                                each(batches, policy_exit), reps, now)
            out["realized_over_layer_speedup"][name] = ratio / (L / mean_exit)
            if name == "batch_1":  # the same exits known in advance: the cost without decisions
                known = [(b["input_ids"], b["attention_mask"], int(e))
                         for b, e in zip(singles, exits)]
                free = interleaved(each(batches, partial(full_depth, model)),
                                   [partial(full_depth, model, *k) for k in known], reps, now)
                out["realized_without_decisions_batch_1"] = free / (L / mean_exit)
            out["ours_over_hf_inference"][name] = interleaved(
                each(batches, hf), each(batches, minilm.layer_states), repeats, now)

        for key, batches in (("decision_overhead", [b64]), ("decision_overhead_batch_1", singles)):
            out[key] = {}
            for name, rule in (("policy", policy), ("entropy", cee.ExitRule("entropy", 0.5))):
                timed = TimedRule(rule.name, rule.param).clock(model, now)
                total = 0.0
                for _ in range(repeats):
                    t0 = now()
                    over(batches, partial(cee.early_exit, model, rule=timed))()
                    total += now() - t0
                timed.unclock(model)
                out[key][name] = timed.seconds / total

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = next(data.batches(test, 32, shuffle=True, device=device))
    memorized = torch.full((32,), L // 2, device=device)
    def step(stage):  # K = 8 trajectories; a step costs the same whatever alpha
        logits, s = model(batch["input_ids"], batch["attention_mask"])
        loss, _ = cee.stage_loss(model, stage, s, logits, batch["labels"], memorized, 0.02, K=8)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out["joint_step_over_stage1_step"] = interleaved(partial(step, 3), partial(step, 1),
                                                     max(3, repeats // 3), now)
    out.update(generation(device, repeats, now))
    out.update(lm_generation(cfg.lm_ckpt, device, repeats, now))
    out.update(smollm2_generation(device, repeats, now))
    out.update(smollm2_exits(cfg.smollm2_ckpt, device, repeats, now))
    out["speculative_identical"] = (out["speculative_identical_random_gpt2"]
                                    and out.get("speculative_identical_lm", True))

    if cfg.json:
        print(json.dumps(out))
        return
    print(f"model: {source}; device {device}; median of {repeats} interleaved repeats")
    for key in ("realized_over_layer_speedup", "ours_over_hf_inference", "decision_overhead",
                "decision_overhead_batch_1", "mean_exit_layer"):
        print(f"{key:<32}" + "  ".join(f"{k} {v:.3f}" for k, v in out[key].items()))
    for key in ("realized_without_decisions_batch_1", "joint_step_over_stage1_step",
                "ours_over_hf_generate", "speculative_identical", "lm_model", "lm_layer_share",
                "policy_exit_speedup", "policy_agreement", "policy_exit_mean_exit_layer",
                "policy_exit_defer_speedup", "policy_agreement_defer", "speculative_speedup",
                "speculative_identical_lm", "speculative_accepted_per_draft",
                "smollm2_ours_over_hf_generate", "smollm2_model", "smollm2_policy_exit_speedup",
                "smollm2_policy_agreement", "smollm2_policy_mean_exit_layer",
                "smollm2_speculative_speedup", "smollm2_speculative_identical",
                "smollm2_speculative_accepted_per_draft", "smollm2_oracle_speedup",
                "memory_bandwidth_gbs", "smollm2_bytes_per_token_mb",
                "smollm2_full_over_bandwidth_limit"):
        if key in out:
            v = out[key]
            print(f"{key:<32}{v:.3f}" if isinstance(v, float) else f"{key:<32}{v}")
    for point in out.get("smollm2_threshold_curve") or []:  # policy exits: speed and quality
        print(f"smollm2 threshold {point['threshold']} kv {point['kv']:<6}"
              + "  ".join(f"{k} {v:.3f}" for k, v in point.items() if k not in ("threshold", "kv")))
    for key in ("smollm2_head_share", "smollm2_speculative_cost_model", "smollm2_rows_cost",
                "smollm2_speculative_drafts"):
        if out.get(key):
            print(f"{key:<32}" + "  ".join(f"{k} {v:.3f}" for k, v in out[key].items()))
    for mode, parts in (out.get("smollm2_time_per_token") or {}).items():  # ms per token
        print(f"smollm2 ms/token {mode:<15}" + "  ".join(f"{k} {v:.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
