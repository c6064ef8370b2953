"""
ConsistentEE on a frozen pretrained LLM, SmolLM2-135M-Instruct: python train.py --task=smollm2.

Its 135M weights never change; what learns is small and sits beside them. On the model's own
greedy replies to chat prompts (replies.py), and with exit heads over the shortlist of the
vocabulary that covers full depth's validation tokens (replies.pick_shortlist, FR-Spec):
  1. an adapter per layer before the shared head (a linear map, fit_exit_adapters), fitted in
     closed form on every layer's states at the replies' tokens
  2. the exit policies, one set per depth penalty alpha (and reward), on those cached states;
     alpha and the threshold picked on the validation prompts (the fastest whose tokens are full
     depth's at least --llm_agreement of the time)
  3. adapters and policies together: the adapters learn only at the exits taken (the consistent
     loss, taken_exits_loss), plus the policy loss
then the threshold for generation, the lowest at which the generated validation replies keep
full depth's judgement of them, and the drafts' threshold and length for speculative decoding,
the fastest on the clock (generation_defaults, draft_defaults), and the test report,
teacher-forced and generated, the prompts of kinds training never saw apart.
The reward and the memorized layer judge each head against the full depth's token (policy_target
full): what generation is judged by. A head of 49,152 tokens at every layer would not fit (6 GB per
1,000 tokens), so each head is read once per token and kept as a few numbers (HeadTables).
The checkpoint holds the adapters, policies and shortlist and the GGUF's path, not the backbone:
generate.py --ckpt=out_smollm2/stage3.pt --chat --exit=policy loads both.
"""
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cee
import data
import replies
import report
import tokenizer
from common import timed_runs, timer
from model import Decoder, confidence
from parallel import log

PROG = "train.py"

@dataclass
class HeadTables:
    """What the method reads of every exit head at N tokens, each (N, L): the head's token, its
    cross-entropy against the full depth's token, its top probability and its entropy."""
    preds: torch.Tensor
    ce: torch.Tensor
    top: torch.Tensor
    entropy: torch.Tensor

    def gain(self, reward):
        """cee.exit_gain from the tables, against the full depth's token."""
        return -self.ce if reward == "ce" else (self.preds == self.preds[:, -1:]).float()

    def memorized(self):
        return cee.memorized_layer(self.preds, self.preds[:, -1])


@torch.no_grad()
def head_tables(model, s, chunk=512):
    """HeadTables of the current exit heads on the states s (N, L, C), chunk tokens at a time. A
    shortlist head is read on its own columns (model.exit_head): the same numbers as on the whole
    vocabulary, where the other tokens' -inf add nothing, at a third of the work."""
    parts = []
    for x in s.split(chunk):
        full = model.exit_logits(x[:, -1]).argmax(-1)  # (n,)
        column = full  # full depth's token as a column of the shortlist, or -1
        if model.shortlist is not None:
            column = (full[:, None] == model.shortlist).float().argmax(-1)
            column[~model.in_shortlist(full)] = -1
        cols = []
        for l in range(s.size(1)):
            logits, ids = model.exit_head(x[:, l], l)  # (n, V')
            top, entropy = confidence(logits)
            pred, target = (logits.argmax(-1), full) if ids is None else (
                ids[logits.argmax(-1)], column)
            # full depth's token outside the shortlist costs what a uniform guess would
            ce = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
            ce = ce.where(target >= 0, torch.tensor(math.log(model.config.vocab_size)))
            cols.append(torch.stack([pred.float(), ce, top, entropy], 1))
        parts.append(torch.stack(cols, 1))  # (n, L, 4)
    t = torch.cat(parts)
    return HeadTables(t[..., 0].long(), t[..., 1], t[..., 2], t[..., 3])


@torch.no_grad()
def fit_exit_adapters(model, states, ridge=1e-2):
    """
    Stage 1 for a frozen language model: each layer's adapter (A_l, b_l) fitted in closed form,
    least squares with a small ridge, so that A_l s_l + b_l comes as close as it can to the last
    layer's state s_L of the same token; the exit head of layer l, head(norm(A_l s_l + b_l)),
    then says what the whole model would. states (L, N, C): every layer's output at N tokens.
    """
    L, N, C = states.shape
    target = states[-1].double()  # (N, C)
    for l, adapter in enumerate(model.adapters):
        x = torch.cat([states[l], states.new_ones(N, 1)], 1).double()  # (N, C + 1)
        eye = torch.eye(C + 1, dtype=torch.double, device=x.device)
        w = torch.linalg.solve(x.T @ x + ridge * eye, x.T @ target)  # (C + 1, C)
        adapter.weight.copy_(w[:C].T)
        adapter.bias.copy_(w[C])


def standardizer(s):
    """Each layer's per-feature mean and standard deviation (L, C) over the tokens of s (N, L, C).
    SmolLM2's states hold a few features in the hundreds and most near 1 (massive activations): the
    policies learn on standardized states, (s - mean) / std, and fold_policies bakes it in after."""
    return s.mean(0), s.std(0).clamp(min=1e-3)


def fold_policies(policies, mean, std):
    """Policies that read raw states as the given ones read (s - mean) / std: each one's first
    layer W x + b becomes (W / std) s + (b - (W / std) mean). A new ModuleList; the old stay."""
    folded = copy.deepcopy(policies)
    with torch.no_grad():
        for pi, mu, sd in zip(folded, mean, std):
            fc = pi.net[0]
            fc.weight.div_(sd)
            fc.bias.sub_(fc.weight @ mu)
    return folded


def taken_exits_loss(model, s, share, labels):
    """
    The consistent loss (share * CE).sum(1).mean() of stage 3, for a language model whose heads
    are too costly to run at every layer (a 49,152-token head costs as much as 8 of SmolLM2's
    layers): each head runs only on the inputs that exit at its layer, and only where it can learn
    (a layer with an adapter; the last layer's head is the frozen model's own).
    s (B, L, C) exit states, share (B, L) from policy_gradient, labels (B,) -> scalar.
    """
    loss = s.new_zeros(())
    learnable = share * model.in_shortlist(labels)[:, None]  # an exit can only learn its list
    rows, layers = learnable[:, :len(model.adapters)].nonzero(as_tuple=True)
    for l in layers.unique().tolist():
        i = rows[layers == l]  # the inputs that exit at layer l + 1
        ce = F.cross_entropy(model.exit_logits(s[i, l], l), labels[i], reduction="none")
        loss = loss + (share[i, l] * ce).sum()
    return loss / len(s)


def stage_on_cache(model, stage, s, z, tables, alpha, cfg, name):
    """
    Stage 2 (the policies) or 3 (adapters and policies) on the cached states s (N, L, C), which
    the policies read standardized (z). The reward reads tables, the heads as they were when the
    stage began (stage 3 moves the adapters a little; reading every head again at each step would
    cost 8 layers' work per head).
    """
    epochs, lr = (cfg.epochs2, cfg.lr2) if stage == 2 else (cfg.epochs3, cfg.lr3)
    params = list(model.policies.parameters())
    if stage == 3:
        params += list(model.adapters.parameters())
    per_epoch = math.ceil(len(z) / cfg.batch_size)
    total = math.ceil(epochs * per_epoch)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / total)  # linear decay
    torch.manual_seed(cfg.seed + cfg.train_seed + stage)
    g = torch.Generator().manual_seed(cfg.seed + cfg.train_seed + stage)
    gain, memorized, target = tables.gain(cfg.reward), tables.memorized(), tables.preds[:, -1]
    batches = iter(())
    for step in tqdm(range(total), desc=name, dynamic_ncols=True, leave=stage == 3):
        i = next(batches, None)
        if i is None:  # a new epoch, shuffled
            batches = iter(torch.randperm(len(z), generator=g).split(cfg.batch_size))
            i = next(batches)
        loss, share, logs = cee.policy_gradient(model, z[i], None, gain[i], memorized[i], alpha,
                                                cfg.K, cfg.estimator)
        if stage == 3:
            consistent = taken_exits_loss(model, s[i], share, target[i])
            loss, logs["loss/cls"] = loss + consistent, consistent.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_interval == 0 or step + 1 == total:
            log(f"{name} step {step + 1}/{total} "
                + " ".join(f"{k} {v:.4f}" for k, v in logs.items()), console=cfg.verbose)


# -----------------------------------------------------------------------------
# the exit rules on the tables, as report.sweep reads them on every head's logits


def first_layer(stop):
    """
    Each row's first layer whose column is True, L when none is: stop (N, L) bool -> (N,) in 1..L.
    Example: [[False, True, True], [False, False, False]] -> [2, 3]
    """
    stop = stop.clone()
    stop[:, -1] = True  # the last layer always exits
    return stop.int().argmax(1) + 1


def table_exits(name, param, tables, p=None):
    """Each token's exit layer (N,) under a rule, from the tables (and the policy's p (N, L))."""
    L = tables.preds.size(1)
    stop = {"consistentee": lambda: p > param, "maxprob": lambda: tables.top > param,
            "entropy": lambda: tables.entropy < param,
            "static": lambda: (torch.arange(1, L + 1, device=tables.preds.device) >= param)
            .expand(len(tables.preds), L)}
    return first_layer(stop[name]())


def sweep_tables(name, params, tables, p=None, **keys):
    """cee.point of a rule at each of its params; accuracy is the agreement with full depth."""
    full = tables.preds[:, -1]
    return [{**report.point(name, v, table_exits(name, v, tables, p), tables.preds, full), **keys}
            for v in params]


@torch.no_grad()
def standardized_policy_probs(model, z):
    """cee.policy_probs of the standardized states z (N, L, C), in chunks."""
    return torch.cat([cee.policy_probs(model, x, None) for x in z.split(4096)])


def agreement_by_layer(tables):
    """The share of tokens whose head at each layer says what the full depth does: (L,)."""
    return (tables.preds == tables.preds[:, -1:]).float().mean(0)


def first_agreeing_layer(preds, full):
    """
    Each input's first layer whose exit head predicts what the full depth does: where an oracle
    that knew the full model's answer would exit. preds (N, L), full (N,) -> (N,) in 1..L.
    Example: full [3, 3], preds [[1, 3, 3], [3, 1, 3]] -> [2, 1]
    """
    return first_layer(preds == full[:, None])


def oracle_speedup(tables):
    L = tables.preds.size(1)
    return L / first_agreeing_layer(tables.preds, tables.preds[:, -1]).float().mean().item()


def start_deep(policies, L):
    """Policies that exit at each layer with probability 1/L whatever the state: a token then
    reaches every layer often enough for its policy to learn there. (At p = 1/2 it reaches layer
    l with probability 2^-(l-1): the deep layers of a 30-layer model would never learn.)"""
    with torch.no_grad():
        for pi in policies:
            pi.net[2].weight.zero_()
            pi.net[2].bias.fill_(-math.log(L - 1))


def policy_grid_on_tables(model, z, tables, cfg):
    """
    Stage 2 for every reward and every alpha of --alphas, fresh policies each time; each swept
    over the threshold on the validation tokens. Leaves in model.policies those of cfg.reward
    picked on validation: the fastest alpha and threshold whose tokens agree with full depth at
    least --llm_agreement of the time (the most agreeing one if none does).
    Returns (alpha, threshold, the grid: a list of {reward, alpha, policies, validation points};
    its policies read standardized states, as in training: fold_policies before generating).
    """
    L = model.config.n_layer
    thresholds = report.grids(L, model.n_out, cfg.threshold)["consistentee"]
    init = cee.policy_weights(model)
    grid, ours = [], []
    for reward in cee.REWARDS:
        for alpha in [float(a) for a in cfg.alphas.split(",")]:
            model.policies.load_state_dict(init)
            stage_on_cache(model, 2, None, z["train"], tables["train"], alpha,
                      replace(cfg, reward=reward), f"stage 2 {reward} alpha {alpha}")
            p = standardized_policy_probs(model, z["validation"])
            points = sweep_tables("consistentee", thresholds, tables["validation"], p,
                                  alpha=alpha, reward=reward)
            best = report.pick(points, 1.0, tol=1 - cfg.llm_agreement)
            log(f"reward {reward} alpha {alpha}: on validation, {best['speedup']:.2f}x with "
                f"{best['agreement']:.3f} agreement (threshold {best['param']})")
            grid.append({"reward": reward, "alpha": alpha, "validation": points,
                         "policies": cee.policy_weights(model)})
            if reward == cfg.reward:
                ours += [{**m, "cell": len(grid) - 1} for m in points]
    chosen = report.pick(ours, 1.0, tol=1 - cfg.llm_agreement)
    model.policies.load_state_dict(grid[chosen["cell"]]["policies"])
    log(f"picked on validation: reward {cfg.reward} alpha {chosen['alpha']} threshold "
        f"{chosen['param']}: {chosen['speedup']:.2f}x with {chosen['agreement']:.3f} agreement")
    return chosen["alpha"], chosen["param"], grid


@torch.no_grad()
def generation_defaults(model, enc, full_pairs, threshold, scale, cfg):
    """
    What generate.py and bench.py take from the checkpoint: deferred fill (state copying puts a
    state of layer l, whose few massive features differ from deeper layers', into their keys and
    values: on 12 validation prompts at threshold 0.3, 0.60 of the tokens were full depth's with
    state copying, 0.88 with deferred fill), the lowest threshold at which greedy replies to the
    validation prompts keep full depth's judgement of them (their full-depth NLL at most
    --llm_quality times that of full depth's own replies, and at least --llm_agreement of their
    tokens full depth's), and the drafts' settings for --exit=speculative (draft_defaults).
    The thresholds from the one picked by teacher forcing up are searched by bisection, quality
    taken to grow with the threshold: from 0.9, replies at no more than 2 of 0.9, 0.95 and 0.99
    are generated; from 0.05, at no more than 4 of the 12.
    """
    policies, model.policies = model.policies, fold_policies(model.policies, *scale)  # raw states
    own, tried = replies.own_nll(model, full_pairs), {}

    def holds(t):  # the quality bound, at threshold t
        if t not in tried:
            tried[t] = replies.quality_summary(replies.reply_quality(model, enc, full_pairs, own,
                                                                     t, cfg))
            log(f"generating the validation replies at threshold {t}: full-depth NLL "
                f"{tried[t]['nll_ratio']:.2f}x full depth's own replies', agreement "
                f"{tried[t]['agreement']:.3f}, mean exit layer {tried[t]['mean_exit']:.1f}")
        return (tried[t]["nll_ratio"] <= cfg.llm_quality
                and tried[t]["agreement"] >= cfg.llm_agreement)

    grid = report.grids(model.config.n_layer, model.n_out, threshold)["consistentee"]
    ts = [x for x in grid if x >= threshold]
    lo, hi = 0, len(ts) - 1  # the lowest threshold that holds is ts[lo..hi], or none does
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(ts[mid]) else (mid + 1, hi)
    if not holds(ts[lo]):
        log(f"no threshold keeps the validation replies' quality; the highest, {ts[lo]}, is used")
    drafts = draft_defaults(model, enc, full_pairs, cfg)
    model.policies = policies
    return {"threshold": ts[lo], "kv": "defer", "validation": tried} | drafts


DRAFT_THRESHOLDS = (0.9, 0.99)  # the drafts' exit thresholds tried (0.3-0.7 were slower still)
DRAFT_LENS = (1, 2, 4)  # and their lengths


def draft_defaults(model, enc, full_pairs, cfg, prompts=4):
    """
    The drafts' own exit threshold and length for --exit=speculative, picked for tokens/s: greedy
    self-speculative replies to the first `prompts` validation prompts (full depth's own replies
    whatever the drafts: the verification keeps them exact) timed beside full depth, every
    setting on a prompt before the next prompt (common.timed_runs). model: policies that read raw
    states. Returns {"draft_threshold", "draft_len", "drafts_validation": {"threshold/length":
    speed-up over full depth}}.
    """
    import generate
    fast, stop = model.for_decoding(), enc.encode_single_token("<|im_end|>")
    idxs = [torch.tensor([p], device=model.wte.weight.device) for p, _ in full_pairs[:prompts]]
    settings = [(t, k) for t in DRAFT_THRESHOLDS for k in DRAFT_LENS]
    runs = [[partial(generate.generate, fast, idx, cfg.llm_new_tokens, stop=stop) for idx in idxs]]
    runs += [[partial(generate.generate, fast, idx, cfg.llm_new_tokens, "speculative", t,
                      draft_len=k, stop=stop) for idx in idxs] for t, k in settings]
    for run in runs:  # warm-up, not timed
        run[0]()
    seconds, _ = timed_runs(runs, 1, timer(cfg.device), warmup=False)
    speed = {f"{t}/{k}": seconds[0] / s for (t, k), s in zip(settings, seconds[1:])}
    t, k = settings[min(range(len(settings)), key=lambda i: seconds[1 + i])]
    log("speculative decoding of the validation replies, speed-up over full depth by drafts' "
        "threshold/length: " + ", ".join(f"{key} {v:.2f}x" for key, v in speed.items())
        + f"; picked {t}/{k}")
    return {"draft_threshold": t, "draft_len": k, "drafts_validation": speed}


# -----------------------------------------------------------------------------
# main: the three stages, then the test report


def exits_checkpoint(model, stage, cfg, gguf, alpha, scale, **extra):
    """Adapters and policies only (the backbone is the GGUF's; the policies folded with scale, the
    standardizer, to read raw states), and how to rebuild the model."""
    state = {f"adapters.{k}": v for k, v in model.adapters.state_dict().items()}
    folded = fold_policies(model.policies, *scale)
    state |= {f"policies.{k}": v for k, v in folded.state_dict().items()}
    return {"model": state, "model_config": asdict(model.config), "gguf": os.path.abspath(gguf),
            "config": asdict(cfg), "stage": stage, "alpha": alpha, "memorized": None, **extra}


def save_exits(model, stage, cfg, gguf, scale, alpha=0.0, **extra):
    path = os.path.join(cfg.out_dir, f"stage{stage}.pt")
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.save(exits_checkpoint(model, stage, cfg, gguf, alpha, scale, **extra), path + ".tmp")
    os.replace(path + ".tmp", path)  # a killed run never spoils the previous file


def train_smollm2(cfg):
    t0, seconds = time.time(), {}
    gguf = cfg.init
    try:
        gguf = data.smollm2_path() if cfg.init == "smollm2" else cfg.init
        model = Decoder.from_pretrained(gguf, exit_adapters=True).to(cfg.device).eval()
        enc = tokenizer.gguf_tokenizer(gguf)
        enc.encode_single_token("<|im_end|>")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SystemExit(f"{PROG}: cannot use {gguf} for --task=smollm2: {e}") from None
    model.requires_grad_(False)
    model.policies.requires_grad_(True)
    model.adapters.requires_grad_(True)
    L = model.config.n_layer
    try:
        split, kinds = data.chat_prompts(cfg.llm_train, cfg.llm_validation, cfg.llm_test,
                                         cfg.seed)
    except (ValueError, RuntimeError) as e:  # too many prompts, or the texts could not be fetched
        raise SystemExit(f"{PROG}: the prompts: {e}") from None
    log(f"task smollm2: prompts train {cfg.llm_train}, validation {cfg.llm_validation}, "
        f"test {cfg.llm_test}; replies of at most {cfg.llm_new_tokens} tokens")
    pairs = replies.cached_replies(model, enc, split, gguf, cfg)
    s = {k: replies.reply_states(model, v) for k, v in pairs.items()}
    seconds["replies"] = time.time() - t0
    log("tokens: " + ", ".join(f"{k} {len(v)}" for k, v in s.items()))

    t = time.time()  # the exits' vocabulary: the most frequent tokens, sized on validation
    end = enc.encode_single_token("<|im_end|>")
    freq = replies.token_frequency(enc, pairs["train"], model.config.vocab_size)
    shortlist, held = replies.pick_shortlist(freq, pairs["validation"], [end], cfg.llm_coverage)
    test_held = replies.pick_shortlist(freq, pairs["test"], [end], cfg.llm_coverage)[1]
    model.set_shortlist(shortlist.to(cfg.device))
    seconds["shortlist"] = time.time() - t
    log("exit heads' vocabulary: share of full depth's tokens held, validation (test): "
        + ", ".join(f"{n} {held[n]:.3f} ({test_held[n]:.3f})" for n in replies.SHORTLISTS)
        + f"; picked {len(shortlist)}")

    t = time.time()  # stage 1: the adapters, in closed form
    plain = head_tables(model, s["test"])  # the heads before: the final norm and head as they are
    fit_exit_adapters(model, s["train"].transpose(0, 1))
    tables = {k: head_tables(model, v) for k, v in s.items()}
    seconds["stage1"] = time.time() - t
    for name, tb in (("plain heads", plain), ("adapters", tables["test"])):
        agree = " ".join(f"{a:.2f}" for a in agreement_by_layer(tb).tolist())
        log(f"{name}: agreement with full depth by layer (test) {agree}; "
            f"oracle speed-up {oracle_speedup(tb):.2f}x")
    memorized = tables["train"].memorized()
    scale = standardizer(s["train"])
    z = {k: (v - scale[0]) / scale[1] for k, v in s.items()}  # what the policies read
    log("memorized layer of the training tokens: "
        + " ".join(f"{l}:{(memorized == l).float().mean():.2f}" for l in range(1, L + 1)))

    t = time.time()  # stage 2: a set of policies per reward and alpha, one picked on validation
    start_deep(model.policies, L)
    alpha, threshold, grid = policy_grid_on_tables(model, z, tables, cfg)
    seconds["stage2"] = time.time() - t
    save_exits(model, 2, cfg, gguf, scale, alpha, threshold=threshold, grid=grid,
               generate={"threshold": threshold, "kv": "defer"}, shortlist=shortlist)

    t = time.time()  # stage 3: adapters at the exits taken, and the policies
    stage_on_cache(model, 3, s["train"], z["train"], tables["train"], alpha, cfg, "stage 3")
    seconds["stage3"] = time.time() - t

    t = time.time()  # the threshold for generation, picked generating replies to validation prompts
    gen = generation_defaults(model, enc, pairs["validation"], threshold, scale, cfg)
    seconds["generation_threshold"] = time.time() - t
    save_exits(model, 3, cfg, gguf, scale, alpha, threshold=threshold, generate=gen,
               shortlist=shortlist)
    t = time.time()  # the test replies, generated; the prompts of kinds training never saw apart
    policies, model.policies = model.policies, fold_policies(model.policies, *scale)
    q = replies.reply_quality(model, enc, pairs["test"], replies.own_nll(model, pairs["test"]),
                              gen["threshold"], cfg)
    model.policies = policies
    generated = {name: replies.quality_summary(q, kinds["test"], keep) for name, keep in
                 (("all", None), ("training kinds", data.TRAINING_KINDS),
                  ("held-out kinds", data.HELD_OUT_KINDS))}
    seconds["generation_test"] = time.time() - t

    t = time.time()
    t3 = head_tables(model, s["test"])  # the heads after stage 3
    out = evaluate_tables(model, grid, tables["test"], t3, z["test"], plain, alpha,
                          replace(cfg, threshold=threshold))
    seconds["eval"] = time.time() - t
    out["seconds"], out["generation"], out["generated_test"] = seconds, gen, generated
    out["shortlist"] = {"size": len(shortlist), "held_validation": held, "held_test": test_held}
    path = os.path.join(cfg.out_dir, "report.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    report.print_table(out)
    print("agreement with full depth by layer (test): plain heads "
          + " ".join(f"{a:.2f}" for a in out["agreement_by_layer"]["plain"]) + "; after stage 1 "
          + " ".join(f"{a:.2f}" for a in out["agreement_by_layer"]["stage1"]) + "; after stage 3 "
          + " ".join(f"{a:.2f}" for a in out["agreement_by_layer"]["stage3"]))
    print("oracle speed-up (test): " + ", ".join(f"{k} {v:.2f}x" for k, v in out["oracle"].items()))
    for name, g in ((k, v) for k, v in generated.items() if v["prompts"]):
        print(f"generated test replies, {name} ({g['prompts']} prompts), threshold "
              f"{gen['threshold']}: full-depth NLL {g['nll_policy']:.2f} against full depth's own "
              f"{g['nll_full']:.2f} ({g['nll_ratio']:.2f}x), repeated 3-grams "
              f"{g['repeat_policy']:.2f} ({g['repeat_full']:.2f}), agreement "
              f"{g['agreement']:.3f}, exit layer "
              f"{g['mean_exit']:.1f}")
    report.plot(out, os.path.join(cfg.out_dir, "tradeoff.png"))
    log(f"wrote {cfg.out_dir}/stage3.pt (adapters and policies, {gguf}) and report.json in "
        f"{time.time() - t0:.0f} s")


def evaluate_tables(model, grid, t1, t3, z3, plain, alpha, cfg):
    """
    The report on the test prompts' tokens, in train.py's format: the baselines on the stage-1
    heads t1, every stage-2 policy of the grid (on t1), stage 3's policies on its heads t3; the
    agreement of every head with full depth, the oracle; paired intervals against the baselines.
    """
    L = t1.preds.size(1)
    g = report.grids(L, model.n_out, cfg.threshold)
    methods, answers = [], {}  # answers: id of a point -> which tokens it answers as full depth

    def add(name, params, tables, p=None, **keys):
        for m in sweep_tables(name, params, tables, p, **keys):
            e = table_exits(name, m["param"], tables, p)
            answers[id(m)] = tables.preds.gather(1, (e - 1)[:, None])[:, 0] == tables.preds[:, -1]
            methods.append(m)
        return methods[-len(params):]

    for name in ("static", "entropy", "maxprob"):
        add(name, g[name], t1)
    policies = cee.policy_weights(model)
    for cell in grid:
        model.policies.load_state_dict(cell["policies"])
        add("consistentee", g["consistentee"], t1, standardized_policy_probs(model, z3),
            alpha=cell["alpha"], reward=cell["reward"], stage=2)
    model.policies.load_state_dict(policies)
    p3 = standardized_policy_probs(model, z3)
    ours = add("consistentee", g["consistentee"], t3, p3, alpha=alpha, reward=cfg.reward, stage=3)
    operating = next(m for m in ours if m["param"] == cfg.threshold)
    e3 = table_exits("consistentee", cfg.threshold, t3, p3)
    return {"full": {"accuracy": 1.0, "layers": L}, "methods": methods,
            "config": asdict(cfg), "final_full_depth_accuracy": 1.0, "tokens": len(z3),
            "picked": {"alpha": alpha, "reward": cfg.reward, "threshold": cfg.threshold},
            "best_speedup": report.best_speedups(report.groups(methods), 1.0),
            "exit_by_memorized_layer": {
                **report.exits_by_memorized(t1.memorized(), e3, L),
                "threshold": cfg.threshold, "target": "full"},
            "versus_baselines": report.versus_baselines(methods, lambda m: answers[id(m)],
                                                        operating, 1.0),
            "agreement_by_layer": {k: agreement_by_layer(v).tolist()
                                   for k, v in (("plain", plain), ("stage1", t1), ("stage3", t3))},
            "oracle": {k: oracle_speedup(v)
                       for k, v in (("plain", plain), ("stage1", t1), ("stage3", t3))}}
