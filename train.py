"""
Train ConsistentEE on a classification task or a language model, in the three stages of the paper
(Zeng et al. 2024, Sec. 3):
  1. backbone + every exit head, weighted loss; then each training input's memorized layer
  2. the exit policies alone, backbone frozen (its per-layer states computed once and reused),
     one set for each depth penalty alpha of a grid and each reward; alpha picked on validation
  3. everything: the classification loss only at each input's sampled exit, plus the policy loss
     (and, as a control, as many steps of stage 1's loss instead)
then evaluate ConsistentEE against the classic exit rules on the test split.

    python train.py                          # Rotten Tomatoes, all-MiniLM-L6-v2, 10.5 min, 2 cores
    python train.py --alphas=0.05 --stage=2  # rerun stage 2 (and 3) from out/stage1.pt, one alpha
    python train.py --task=lm                # a GPT-2 style decoder from scratch on IMDB, ~10 min
    python train.py --task=smollm2           # exits for the frozen SmolLM2-135M (llm.py), ~15 min
    python train.py --help                   # every option

With --task=lm every token position is one input: its exit state is its hidden state, its label the
next token. The options in LM_DEFAULTS then take other defaults (each can still be set); among
them policy_target=full: the reward and the memorized layer (the first layer from which every head
agrees) measure the heads against the full depth's own token rather than the text's.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

import cee
import data
import report
from common import load_model, overrides, pick_device
from parallel import (MASTER, RANK, WORLD, all_ok, check_replicas, gathered, log, log_to,
                      my_share, rng_states, start_processes, sum_gradients)
from tasks import Outputs, all_layers, build_task

PROG = "train.py"


# -----------------------------------------------------------------------------
# options


@dataclass
class TrainConfig:
    task: str = "rotten_tomatoes"  # rotten_tomatoes, imdb, a .csv/.json/.jsonl file with text and
                                   # label columns; lm (language modelling); smollm2: exits for
                                   # the frozen SmolLM2-135M-Instruct, see llm.py
    init: str = "minilm"         # "minilm" (all-MiniLM-L6-v2) or a Hugging Face BERT folder;
                                 # lm: "scratch" or a GPT-2 folder; smollm2: "smollm2" or a .gguf
    out_dir: str = "out"         # stage{1,2,3}.pt, control.pt, resume.pt, report.json, tradeoff.png
    seed: int = 1337             # the data split, the new weights and every random draw of training
    train_seed: int = 0          # added to seed for training's draws alone (shuffles, dropout,
                                 # sampled exits): --stage=2 --train_seed=1 repeats stages 2-3 on
                                 # the same stage-1 model
    stage: int = 1               # first stage to run; 2 and 3 start from the checkpoint before
    max_steps: int = 0           # cap on each stage's optimiser steps, 0 = none (for smoke runs)
    device: str = "auto"         # auto = cuda, then mps, then cpu
    max_len: int = 128           # tokens per input, [CLS] and [SEP] included
    batch_size: int = 32
    pool: str = "mean"           # exit state: "mean" of the tokens (as MiniLM was trained) or "cls"
    policy_conf: bool = False    # the policy also reads its head's confidence (max prob, entropy)
    # stage 1: backbone + exit heads
    epochs1: float = 2
    lr1: float = 5e-5
    # stage 2: policies only, on the frozen stage-1 model
    epochs2: float = 5
    lr2: float = 3e-4
    policy_target: str = "label"  # the reward and the memorized layer judge each head by the
                                  # "label", or by the "full" depth's argmax
    reward: str = "correct"      # the reward's accuracy term: "correct" (1 if the exit head is
                                 # right) or "ce" (-CE)
    # the depth penalties: stage 2 trains a set of policies for each alpha and each reward, and
    # stage 3 takes the alpha picked on the validation split
    alphas: str = "0.01,0.02,0.03,0.04,0.05,0.06,0.08,0.1,0.12,0.15,0.2"
    # stage 3: all parameters, consistent loss + policy loss (on the inputs of stage 2)
    epochs3: float = 1
    lr3: float = 2e-5
    control: bool = True         # also spend stage 3's steps on stage 1's loss: a fair comparison
    # the policy gradient
    K: int = 8                   # trajectories per input, sampled from one backbone pass
    estimator: str = "reinforce"  # "reinforce" (sampled, mean-of-K baseline) or "exact" (sum over
                                  # all exits)
    threshold: float = 0.5       # exit when the policy's probability exceeds this
    warmup: int = 0              # steps of linear lr warm-up in each stage (at most a tenth of it),
                                 # then linear decay
    beta2: float = 0.999         # AdamW's decay of the squared-gradient average
    log_interval: int = 50       # a step line every this many steps, to out_dir/train.log
    verbose: bool = False        # print the step lines on the console too
    ckpt_interval: int = 200     # write out_dir/resume.pt every this many optimiser steps (and at
                                 # each stage's end)
    resume: bool = False         # continue from out_dir/resume.pt where the last run stopped
    # language modelling (--task=lm): the decoder built from scratch, and the windows of IMDB text
    lm_layers: int = 8
    lm_width: int = 128
    lm_heads: int = 4
    lm_vocab: int = 257          # GPT-2's BPE stopped at this many tokens (257: bytes)
    lm_windows: int = 28800      # training windows of max_len tokens
    lm_rl_windows: int = 1024    # the first of them: their tokens' memorized layers are kept,
                                 # stages 2 and 3 train on them
    lm_test_windows: int = 64
    # --task=smollm2: SmolLM2-135M-Instruct, frozen, learns adapters and policies (llm.py)
    llm_train: int = 240         # chat prompts whose greedy replies train adapters and policies
    llm_validation: int = 32     # prompts whose replies pick alpha
    llm_test: int = 40           # prompts whose replies the report measures (and bench.py)
    llm_new_tokens: int = 48     # tokens per reply at most
    llm_agreement: float = 0.9   # alpha picked: the fastest on validation whose tokens are full
                                 # depth's this often
    llm_quality: float = 1.3     # and generating: full depth's NLL of the policy's validation
                                 # replies at most this times that of its own replies
    llm_coverage: float = 0.95   # the exits' vocabulary: the smallest shortlist holding this share
                                 # of full depth's validation tokens


# --task=lm: a small decoder learns from scratch, with a higher learning rate, a warm-up and beta2
# 0.95 (as nanoGPT); each batch holds 32 x 128 inputs (token positions); its policy learns to agree
# with the full depth (what generation is judged by), with -CE: on its validation split, at
# threshold 0.5, -CE's pick exits at 2.8 layers, 0/1's at 4.4; fewer alphas, as stage 2 has 131,072
# inputs
LM_DEFAULTS = {"out_dir": "out_lm", "init": "scratch", "lr1": 3e-3, "epochs1": 1, "lr3": 3e-4,
               "batch_size": 32, "epochs2": 10, "epochs3": 1, "warmup": 20, "beta2": 0.95,
               "policy_target": "full", "reward": "ce", "alphas": "0.02,0.03,0.05,0.07",
               "control": False}


# --task=smollm2: the frozen SmolLM2-135M-Instruct (llm.py); stage 2 sees every token of the
# training replies (about 7,700) in batches of 256, its policies learn when a head agrees with full
# depth (reward correct: on validation, 1.31x at 0.9 agreement against -CE's 1.10x); stage 3
# moves the adapters gently
SMOLLM2_DEFAULTS = {"out_dir": "out_smollm2", "init": "smollm2", "policy_target": "full",
                    "reward": "correct", "alphas": "0.03,0.05,0.08", "batch_size": 256,
                    "epochs2": 10, "lr2": 1e-3, "epochs3": 1, "lr3": 1e-4, "control": False}
TASK_DEFAULTS = {"lm": LM_DEFAULTS, "smollm2": SMOLLM2_DEFAULTS}


def parse_args(argv):
    cfg = overrides(TrainConfig(), argv, PROG, __doc__ + "".join(
        f"\n--task={k} defaults: {v}" for k, v in TASK_DEFAULTS.items()))
    given = {arg.removeprefix("--").partition("=")[0] for arg in argv}
    for key, value in TASK_DEFAULTS.get(cfg.task, {}).items():
        if key not in given:
            setattr(cfg, key, value)
    if cfg.task == "lm" and "lr1" not in given and cfg.init != "scratch":
        cfg.lr1 = 5e-5  # fine-tuning a pretrained GPT-2, not learning from scratch
    checks = [
        (cfg.K >= 1, "--K must be >= 1"), (cfg.stage in (1, 2, 3), "--stage must be 1, 2 or 3"),
        (cfg.max_steps >= 0, "--max_steps must be >= 0"),
        (cfg.estimator in ("reinforce", "exact"), "--estimator must be reinforce or exact"),
        (cfg.pool in ("mean", "cls"), "--pool must be mean or cls"),
        (cfg.batch_size >= 1, "--batch_size >= 1"),
        (cfg.reward in cee.REWARDS, f"--reward must be {' or '.join(cee.REWARDS)}"),
        (cfg.policy_target in ("label", "full"), "--policy_target must be label or full"),
        (0 <= cfg.threshold <= 1, "--threshold must lie in [0, 1]"),
        (cfg.log_interval >= 1, "--log_interval >= 1"),
        (cfg.ckpt_interval >= 1, "--ckpt_interval >= 1"), (cfg.warmup >= 0, "--warmup >= 0"),
        (0 < cfg.beta2 < 1, "--beta2 must lie in (0, 1)"),
        (not (cfg.resume and cfg.stage > 1), "--resume picks its stage"),
        (min(cfg.epochs1, cfg.epochs2, cfg.epochs3) > 0, "--epochs1/2/3 must be > 0"),
        (min(cfg.lr1, cfg.lr2, cfg.lr3) > 0, "--lr1/2/3 must be > 0"),
        (cfg.max_len >= 2, "--max_len >= 2"),
        (1 <= cfg.lm_rl_windows <= cfg.lm_windows, "--lm_rl_windows must lie in [1, lm_windows]"),
        (cfg.lm_test_windows >= 1, "--lm_test_windows >= 1"),
        (cfg.lm_layers >= 2, "--lm_layers >= 2"),
        (min(cfg.lm_heads, cfg.lm_width) >= 1, "--lm_heads and --lm_width must be >= 1"),
        (cfg.lm_width % max(cfg.lm_heads, 1) == 0, "--lm_width must be a multiple of --lm_heads"),
        (min(cfg.llm_train, cfg.llm_validation, cfg.llm_test, cfg.llm_new_tokens) >= 2,
         "--llm_train, --llm_validation, --llm_test and --llm_new_tokens must be >= 2"),
        (0 < cfg.llm_agreement <= 1, "--llm_agreement must lie in (0, 1]"),
        (cfg.llm_quality >= 1, "--llm_quality must be >= 1"),
        (0 < cfg.llm_coverage <= 1, "--llm_coverage must lie in (0, 1]"),
        (cfg.task != "smollm2" or not cfg.policy_conf,
         "--task=smollm2 needs --policy_conf=false: a 49,152-token head at every layer costs as "
         "much as 8 layers"),
        (cfg.task != "smollm2" or (cfg.stage == 1 and not cfg.resume and WORLD == 1),
         "--task=smollm2 runs its three stages in one process (--stage, --resume and torchrun "
         "are for the other tasks)")]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"{PROG}: {msg}")
    alpha_grid(cfg)
    return cfg


def alpha_grid(cfg):
    """--alphas as a list of floats: '0.01,0.1' -> [0.01, 0.1]."""
    try:
        alphas = [float(a) for a in cfg.alphas.split(",")]
    except ValueError:
        alphas = []
    if not alphas or not all(0 <= a < math.inf for a in alphas):
        raise SystemExit(f"{PROG}: --alphas must be numbers >= 0 separated by commas, "
                         f"got {cfg.alphas!r}")
    return alphas


def method_options(cfg):
    """What cee.stage_loss needs of the options."""
    return dict(K=cfg.K, estimator=cfg.estimator, reward=cfg.reward, target=cfg.policy_target)


# -----------------------------------------------------------------------------
# the task's inputs, as the stages need them

def check_memory(task, model, cfg):
    """Every layer's logits of a whole split are kept (stage 2, evaluation), and of a batch with
    its gradients: stop at once if they would not fit, not after an hour."""
    c, s = model.config, task.splits
    items = max(len(s["train_rl"]), 2 * len(s["test"]), 3 * cfg.batch_size)
    gib = items * task.inputs_per_item * c.n_layer * model.n_out * 4 / 2**30
    if gib > 8:
        raise SystemExit(f"{PROG}: every layer's logits of {items} items would take {gib:.0f} GiB; "
                         "lower --lm_rl_windows, --lm_test_windows, --batch_size or --max_len")
    if cfg.max_len > c.block_size:
        raise SystemExit(f"{PROG}: --max_len={cfg.max_len} exceeds the model's {c.block_size} "
                         "positions")


def gathered_layers(task, model, split, cfg):
    """all_layers of a whole split, each process computing a shard (parallel.py)."""
    return Outputs(*gathered(lambda part: all_layers(task, model, part, cfg.device), split,
                             cfg.device))


# -----------------------------------------------------------------------------
# checkpoints


def checkpoint(model, stage, memorized, cfg, alpha, **extra):
    """What a checkpoint holds: the weights, how to rebuild the model, the run's options, where it
    stands (resume.pt adds the optimiser and the place in the data, stage2.pt the grid)."""
    return {"model": model.state_dict(), "model_config": asdict(model.config),
            "config": asdict(cfg), "stage": stage, "memorized": memorized, "alpha": alpha, **extra}


def write(path, checkpoint):
    """torch.save to a temporary file, then rename: a killed run or a full disk never spoils path.
    Every process calls it; only rank 0 writes, and if it fails they all stop."""
    error = None
    if MASTER:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            torch.save(checkpoint, path + ".tmp")
            os.replace(path + ".tmp", path)
        except OSError as e:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            error = (f"{PROG}: cannot write {path} ({e.strerror or e}); "
                     "the previous file there is kept")
    if not all_ok(error is None):
        raise SystemExit(error or f"{PROG}: rank 0 could not write {path}")


def save(model, stage, memorized, cfg, alpha=0.0, **extra):
    path = os.path.join(cfg.out_dir, f"stage{stage}.pt")
    write(path, checkpoint(model, stage, memorized, cfg, alpha, **extra))


SAME_DATA_AND_MODEL = ("task", "init", "seed", "max_len", "pool", "policy_conf", "lm_vocab",
                       "lm_windows", "lm_rl_windows", "lm_test_windows")


def load(name, cfg, must_match=SAME_DATA_AND_MODEL):
    """A checkpoint in out_dir (stage1.pt .. stage3.pt, control.pt, resume.pt): (model, memorized,
    the checkpoint). It must have been trained with the same must_match options as cfg."""
    path = os.path.join(cfg.out_dir, name)
    if not os.path.isfile(path):
        raise SystemExit(f"{PROG}: {path} is missing; run the stages before it first")
    model, ckpt = load_model(path, PROG, cfg.device)
    if not isinstance(ckpt.get("config"), dict) or "memorized" not in ckpt:
        raise SystemExit(f"{PROG}: cannot load {path}: it holds no training options; "
                         "is it a checkpoint written by train.py?")
    saved = ckpt["config"]
    default = parse_args([f"--task={saved.get('task', TrainConfig.task)}"])  # its task's defaults
    for key in must_match:  # e.g. the memorized layers are indexed by position in this very split
        was = saved.get(key, getattr(default, key))  # an option newer than the file: its default
        if was != getattr(cfg, key):
            raise SystemExit(f"{PROG}: {path} was trained with --{key}={was}, "
                             f"not {getattr(cfg, key)}")
    return model, ckpt["memorized"], ckpt


# -----------------------------------------------------------------------------
# the training loop, the same for every stage


def lr_factor(step, total, warmup):
    """The learning rate's multiplier: linear warm-up over min(warmup, total // 10) steps, then
    linear decay to 0."""
    w = min(warmup, total // 10)
    return (step + 1) / (w + 1) if step < w else (total - step) / (total - w)


def stage_inputs(model, stage, task, memorized, train_pass, cfg, g):
    """
    What a stage trains on: (batches per epoch, epoch(e) -> that epoch's batches, forward(batch) ->
    the Outputs of its inputs and their memorized layers). Stage 2 reads the frozen backbone's
    states cached in train_pass (shuffled by g); stages 1 and 3 run the backbone on each batch,
    stage 3 on the inputs whose memorized layers are kept.
    """
    if stage == 2:
        rows = len(train_pass.labels)
        n = cfg.batch_size * (rows // len(task.splits["train_rl"]))  # a window gives T rows

        def epoch(e):
            return ({"index": i} for i in torch.randperm(rows, generator=g).split(n))

        def forward(b):
            i = b["index"]
            return Outputs(*(t[i] for t in train_pass)), memorized[i]
        return math.ceil(rows / n), epoch, forward
    split = task.splits["train" if stage == 1 else "train_rl"]
    seed = cfg.seed + cfg.train_seed + 1000 * stage

    def epoch(e):
        return data.batches(split, cfg.batch_size, shuffle=True, seed=seed + e, device=cfg.device)

    def forward(b):
        mem = None if memorized is None else memorized.view(len(split), -1)[b["index"]].flatten()
        return task.outputs(model, b), mem
    return math.ceil(len(split) / cfg.batch_size), epoch, forward


def optimizer(model, stage, per_epoch, cfg):
    """(parameters, AdamW, its schedule, number of steps): stage 2 trains the policies alone."""
    epochs, lr = {1: (cfg.epochs1, cfg.lr1), 2: (cfg.epochs2, cfg.lr2),
                  3: (cfg.epochs3, cfg.lr3)}[stage]
    params = list((model.policies if stage == 2 else model).parameters())
    total = math.ceil(epochs * per_epoch)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, cfg.beta2),
                            weight_decay=0.0 if stage == 2 else 0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, total, cfg.warmup))
    return params, opt, sched, total


def progress(opt, sched, step, epoch, batch, batch_rng, cfg):
    """Where a stage stands, for resume.pt: enough to continue bit for bit."""
    return dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step, epoch=epoch,
                batch=batch, rng=rng_states(cfg), batch_rng=batch_rng)


def restore(resume, opt, sched, g, cfg):
    """Continue from progress(): optimiser, schedule, random streams; returns (step, epoch, batches
    of that epoch already done)."""
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    if len(resume["rng"]) != WORLD:
        raise SystemExit(f"{PROG}: resume.pt was written by {len(resume['rng'])} processes, "
                         f"not {WORLD}")
    cpu_rng, cuda_rng = resume["rng"][RANK]
    torch.set_rng_state(cpu_rng.cpu())  # RNG states must be CPU tensors, wherever the model lives
    g.set_state(resume["batch_rng"].cpu())
    if cuda_rng is not None and cfg.device.startswith("cuda"):
        torch.cuda.set_rng_state(cuda_rng.cpu())
    return resume["step"], resume["epoch"], resume["batch"]


def batch_loss(model, stage, out, memorized, alpha, cfg):
    """cee.stage_loss of the batch's Outputs; when its logits hold a NaN or inf, no loss and a NaN
    to log (the run then stops)."""
    if not torch.isfinite(out.logits).all():
        return None, {"logits": math.nan}
    return cee.stage_loss(model, stage, out.states, out.logits, out.labels, memorized, alpha,
                          **method_options(cfg))


def log_step(name, step, total, logs, lr, seconds, cfg):
    """One greppable line: to out_dir/train.log, and to the console with --verbose."""
    kv = " ".join(f"{k} {v:.4f}" for k, v in logs.items())
    log(f"{name} step {step}/{total} {kv} lr {lr:.2e} s/step {seconds / step:.3f}",
        console=cfg.verbose)


def stop_unless_finite(logs, name, step):
    """A NaN or inf in the logits, losses or rewards, in any process, stops every process."""
    if not all_ok(all(math.isfinite(v) for v in logs.values())):
        bad = [k for k, v in logs.items() if not math.isfinite(v)] or "values in another process"
        raise SystemExit(f"{PROG}: non-finite {bad} at {name} step {step + 1}; stopped, "
                         "the saved checkpoints are kept")


def run_stage(model, stage, task, cfg, memorized=None, train_pass=None, alpha=0.0, resume=None,
              resumable=True, name=None, leave=True):
    """
    One optimiser loop for any stage; the stage decides the parameters, the inputs and the loss.
    memorized: the memorized layers of task's train_rl inputs (stages 2 and 3); train_pass:
    all_layers() of them by this model (stage 2); alpha: the reward's depth penalty; resume: a
    resume.pt of this stage, to continue from; resumable: write out_dir/resume.pt as it goes;
    leave: keep the progress bar on the console when done.
    """
    name = name or f"stage {stage}"
    torch.manual_seed(cfg.seed + cfg.train_seed + stage)  # each stage reproducible on its own
    g = torch.Generator().manual_seed(cfg.seed + cfg.train_seed + stage)  # stage 2's shuffles
    per_epoch, epoch_batches, forward = stage_inputs(model, stage, task, memorized, train_pass,
                                                     cfg, g)
    params, opt, sched, total = optimizer(model, stage, per_epoch, cfg)
    step, epoch, skip = restore(resume, opt, sched, g, cfg) if resume else (0, 0, 0)
    model.train()
    t0 = time.time()
    bar = tqdm(total=total, initial=step, desc=name, file=sys.stderr, dynamic_ncols=True,
               disable=not MASTER, leave=leave)
    while step < total:
        batch_rng = g.get_state()  # where this epoch's shuffle starts, for resume.pt
        for j, b in enumerate(epoch_batches(epoch)):
            b, fraction = my_share(b)  # this process's rows: all of them in a single process
            if j < skip or b is None:  # done before the run was stopped, or too small to share
                continue
            out, mem = forward(b)
            loss, logs = batch_loss(model, stage, out, mem, alpha, cfg)
            stop_unless_finite(logs, name, step)
            opt.zero_grad(set_to_none=True)
            (loss * fraction).backward()
            sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update()
            if resumable and (step % cfg.ckpt_interval == 0 or step == total):
                write(os.path.join(cfg.out_dir, "resume.pt"), checkpoint(
                    model, stage, memorized, cfg, alpha,
                    **progress(opt, sched, step, epoch, j + 1, batch_rng, cfg)))
            if step % cfg.log_interval == 0 or step == total:
                log_step(name, step, total, logs, sched.get_last_lr()[0], time.time() - t0, cfg)
            if step == total:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    return time.time() - t0


# -----------------------------------------------------------------------------
# the stages around the loop: hardness, the policy grid, the control


def memorized_of(logits, labels, cfg):
    """Each input's memorized layer, against what cfg.policy_target names (the label or the full
    depth's argmax)."""
    target = cee.reward_target(logits, labels, cfg.policy_target)
    return cee.memorized_layer(logits.argmax(-1), target)


def shares(layers, L):
    """'1:0.53 2:0.15 ...': the share of inputs at each layer."""
    return " ".join(f"{l}:{(layers == l).float().mean():.2f}" for l in range(1, L + 1))


def policy_grid(model, task, memorized, train_pass, cfg):
    """
    Stage 2 for every reward and every alpha of --alphas: fresh policies each time, trained on
    the cached states of the frozen stage-1 model, then swept over the threshold on the
    validation split. Leaves in model.policies those of cfg.reward at the alpha picked on
    validation: the best speed-up at cfg.threshold within 1 point of full depth (never picked on
    the test split).
    Returns (the picked alpha, the grid: a list of {reward, alpha, policies, validation points}).
    """
    init = cee.policy_weights(model)
    val = gathered_layers(task, model, task.splits["validation"], cfg)
    full_val = (val.logits[:, -1].argmax(-1) == val.labels).float().mean().item()
    logits = train_pass.logits
    target = cee.reward_target(logits, train_pass.labels, cfg.policy_target)
    L = model.config.n_layer
    thresholds = report.grids(L, logits.size(-1), cfg.threshold)["consistentee"]
    grid, ours = [], []  # ours: the validation point at cfg.threshold of each alpha of cfg.reward
    for reward in cee.REWARDS:
        for alpha in alpha_grid(cfg):
            best = cee.best_exits(logits, target, memorized, alpha, reward)
            log(f"reward {reward} alpha {alpha}: reward-optimal exit layer (knowing the targets) "
                + shares(best, L), console=False)
            model.policies.load_state_dict(init)
            run_stage(model, 2, task, replace(cfg, reward=reward), memorized, train_pass, alpha,
                      resumable=False, name=f"stage 2 {reward} alpha {alpha}", leave=False)
            with torch.no_grad():
                p = cee.policy_probs(model, val.states, val.logits)  # (B, L)
            points = report.sweep("consistentee", thresholds, val.logits, val.labels, p)
            grid.append({"reward": reward, "alpha": alpha, "validation": points,
                         "policies": cee.policy_weights(model)})
            at = next(m for m in points if m["param"] == cfg.threshold)
            log(f"reward {reward} alpha {alpha}: validation {at['accuracy']:.3f} at "
                f"{at['avg_layers']:.2f} layers (threshold {cfg.threshold}; "
                f"full depth {full_val:.3f})")
            if reward == cfg.reward:
                ours.append({**at, "cell": len(grid) - 1})
    for reward in cee.REWARDS:  # each reward's whole front on validation, every alpha and threshold
        points = [m for c in grid if c["reward"] == reward for m in c["validation"]]
        best = report.best_speedups(points, full_val)["consistentee"]
        log(f"reward {reward} on validation: best speed-up at no loss {best['no_loss'] or 0:.2f}x, "
            f"within 1 point {best['within_1_point'] or 0:.2f}x")
    chosen = report.pick(ours, full_val)
    alpha = grid[chosen["cell"]]["alpha"]
    model.policies.load_state_dict(grid[chosen["cell"]]["policies"])
    log(f"picked on validation (full depth {full_val:.3f}): reward {cfg.reward} alpha {alpha}, "
        f"{chosen['accuracy']:.3f} at {chosen['avg_layers']:.2f} layers "
        f"(threshold {cfg.threshold})")
    return alpha, grid


def control(task, memorized, alpha, policies, cfg):
    """
    The fair test of stage 3: from the stage-1 model, as many steps of stage 1's weighted loss as
    stage 3 takes (same inputs, learning rate and schedule), then stage 2 at the same alpha,
    starting from the same policies, on the new backbone's states. Written to out_dir/control.pt.
    Being a stage-1 run, it takes stage 1's random draws (the order of stage 1's first epoch),
    stage 3 its own.
    """
    t0 = time.time()
    model, _, _ = load("stage1.pt", cfg)
    on_stage3_inputs = replace(task, splits=task.splits | {"train": task.splits["train_rl"]})
    run_stage(model, 1, on_stage3_inputs, replace(cfg, epochs1=cfg.epochs3, lr1=cfg.lr3),
              resumable=False, name="control")
    model.policies.load_state_dict(policies)
    train_pass = gathered_layers(task, model, task.splits["train_rl"], cfg)
    run_stage(model, 2, task, cfg, memorized, train_pass, alpha, resumable=False,
              name="control policy")
    write(os.path.join(cfg.out_dir, "control.pt"),
          checkpoint(model, "control", memorized, cfg, alpha))
    return time.time() - t0


# -----------------------------------------------------------------------------
# evaluation: ConsistentEE against the classic exit rules, on the test split


def timed_exits(model, split, rule, cfg):
    """Wall-clock seconds of early-exit inference over a split, batches of 64 built beforehand."""
    model.eval()
    bs = list(data.batches(split, 64, device=cfg.device))
    cee.early_exit(model, bs[0]["input_ids"], bs[0]["attention_mask"], rule)  # warm-up, not timed
    t0 = time.time()
    for b in bs:
        cee.early_exit(model, b["input_ids"], b["attention_mask"], rule)
    return time.time() - t0


def evaluate_and_report(task, cfg, seconds):
    """
    On the test split: the baselines on the stage-1 model; ConsistentEE's grid (stage-2 policies of
    every reward and alpha, on the stage-1 model) and its stage-3 model, swept over the threshold;
    paired bootstrap intervals against the baselines; stage 3 against its control.
    Writes report.json and tradeoff.png (report.py), and prints the table.
    """
    t0 = time.time()
    test = task.splits["test"]
    m1, _, _ = load("stage1.pt", cfg)
    grid = load("stage2.pt", cfg)[2]["grid"]
    m3, _, ck3 = load("stage3.pt", cfg)
    lg1, s1, y = all_layers(task, m1, test, cfg.device)  # stage 2's backbone is stage 1's
    L, n = lg1.shape[1:]
    g = report.grids(L, n, cfg.threshold)
    methods, source = [], {}  # source: id of a point -> the outputs it was swept on

    def add(name, params, logits, p=None, **keys):
        points = [{**m, **keys} for m in report.sweep(name, params, logits, y, p)]
        source.update({id(m): (logits, p) for m in points})
        methods.extend(points)
        return points

    def right(m):  # which test inputs a point answers right, for the paired bootstrap
        logits, p = source[id(m)]
        return report.answered(m, logits, y, p)

    for name in ("static", "entropy", "patience", "maxprob"):
        add(name, g[name], lg1)
    with torch.no_grad():
        for cell in grid:
            m1.policies.load_state_dict(cell["policies"])
            add("consistentee", g["consistentee"], lg1, cee.policy_probs(m1, s1, lg1),
                alpha=cell["alpha"], reward=cell["reward"], stage=2)
        lg3, s3, _ = all_layers(task, m3, test, cfg.device)
        p3 = cee.policy_probs(m3, s3, lg3)
    ours = add("consistentee", g["consistentee"], lg3, p3, alpha=ck3["alpha"], reward=cfg.reward,
               stage=3)
    operating = next(m for m in ours if m["param"] == cfg.threshold)  # the final model's default
    exits = cee.exit_layers(cee.ExitRule("consistentee", cfg.threshold), lg3, p3)  # (B,)
    full = (lg1[:, -1].argmax(-1) == y).float().mean().item()
    memorized = memorized_of(lg1, y, cfg)  # hardness of the test inputs, by the stage-1 heads
    final = (lg3[:, -1].argmax(-1) == y).float().mean().item()
    out = {"full": {"accuracy": full, "layers": L}, "methods": methods, "seconds": seconds,
           "config": asdict(cfg), "final_full_depth_accuracy": final,
           "picked": {"alpha": ck3["alpha"], "reward": cfg.reward, "threshold": cfg.threshold},
           "best_speedup": report.best_speedups(report.groups(methods), full),
           "exit_by_memorized_layer": {**report.exits_by_memorized(memorized, exits, L),
                                       "threshold": cfg.threshold, "target": cfg.policy_target},
           "versus_baselines": report.versus_baselines(methods, right, operating, full)}
    if cfg.control:
        out["stage3_vs_control"] = against_control(task, m3, p3, lg3, y, g["consistentee"], cfg)
    if task.timed:
        seconds["test_full_depth"] = timed_exits(m3, test, cee.ExitRule("static", L), cfg)
        policy = cee.ExitRule("consistentee", cfg.threshold)
        seconds["test_consistentee"] = timed_exits(m3, test, policy, cfg)
    seconds["eval"] = time.time() - t0
    path = os.path.join(cfg.out_dir, "report.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)  # a failed write never clobbers the previous report
    report.print_table(out)
    report.plot(out, os.path.join(cfg.out_dir, "tradeoff.png"))
    return out


def against_control(task, m3, p3, lg3, y, thresholds, cfg):
    """Stage 3 against the control (stage 1's loss for as many steps, then stage 2): each one's full
    depth, every exit head, the policy's operating point and best speed-ups; paired differences."""
    mc, _, _ = load("control.pt", cfg)
    lgc, sc, _ = all_layers(task, mc, task.splits["test"], cfg.device)
    with torch.no_grad():
        pc = cee.policy_probs(mc, sc, lgc)
    out, right = {}, {}
    for name, logits, p in (("stage3", lg3, p3), ("control", lgc, pc)):
        heads = (logits.argmax(-1) == y[:, None]).float().mean(0).tolist()  # (L,) each head alone
        points = report.sweep("consistentee", thresholds, logits, y, p)
        op = next(m for m in points if m["param"] == cfg.threshold)
        right[name] = (logits[:, -1].argmax(-1) == y, report.answered(op, logits, y, p))
        out[name] = {"full": heads[-1], "heads": heads, "operating": op,
                     "best_speedup": report.best_speedups(points, heads[-1])["consistentee"]}
    for i, what in enumerate(("full", "operating")):
        d, lo, hi = report.paired_bootstrap(right["stage3"][i], right["control"][i])
        out[f"{what}_difference"] = {"difference": d, "interval": [lo, hi]}
    return out


# -----------------------------------------------------------------------------
# main: the stages in order, then the evaluation


def starting_point(task, cfg):
    """(model, memorized layers of the train_rl inputs or None, first stage to run, its alpha,
    the resume.pt to continue from or None)."""
    if cfg.resume:  # the run must be the one that wrote resume.pt, but for where it writes and logs
        free = ("out_dir", "resume", "stage", "device", "log_interval", "ckpt_interval")
        same = [f.name for f in fields(TrainConfig) if f.name not in free]
        model, memorized, resume = load("resume.pt", cfg, same)
        return model, memorized, resume["stage"], resume.get("alpha"), resume
    if cfg.stage == 2:  # the memorized layers are computed again: they depend on --policy_target
        return load("stage1.pt", cfg)[0], None, 2, None, None
    if cfg.stage == 3:
        same_policies = SAME_DATA_AND_MODEL + ("policy_target", "reward", "alphas")
        model, memorized, ckpt = load("stage2.pt", cfg, same_policies)
        if ckpt.get("alpha") is None:
            raise SystemExit(f"{PROG}: that checkpoint predates the alpha grid; rerun --stage=2")
        return model, memorized, 3, ckpt["alpha"], None
    try:
        return task.new_model().to(cfg.device), None, 1, None, None
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{PROG}: {e}") from None


def main(argv):
    cfg = parse_args(argv)
    cfg.device = pick_device(cfg.device, PROG)
    log_to(os.path.join(cfg.out_dir, "train.log"), fresh=not cfg.resume)
    if cfg.task == "smollm2":  # a frozen pretrained LLM: its own short pipeline
        import llm
        return llm.train_smollm2(cfg)
    start_processes(cfg)
    torch.manual_seed(cfg.seed)
    try:
        task = build_task(cfg)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SystemExit(f"{PROG}: {e}") from None
    log(f"task {cfg.task}: " + ", ".join(f"{k} {len(task.splits[k])}"
                                         for k in ("train", "validation", "test")))
    if not cfg.resume and MASTER and os.path.exists(os.path.join(cfg.out_dir, "resume.pt")):
        os.remove(os.path.join(cfg.out_dir, "resume.pt"))  # an earlier run's: never resume into it
    model, memorized, first, alpha, resume = starting_point(task, cfg)
    check_memory(task, model, cfg)
    seconds = {}
    for stage in range(first, 4):
        t0, extra = time.time(), {}
        if stage == 2:  # one set of policies per reward and alpha, on states computed once
            train_pass = gathered_layers(task, model, task.splits["train_rl"], cfg)
            if memorized is None:  # after stage 1, or from stage1.pt (--stage=2)
                memorized = memorized_of(train_pass.logits, train_pass.labels, cfg)
                log("memorized layer of the training inputs: "
                    + shares(memorized, model.config.n_layer))
            alpha, extra["grid"] = policy_grid(model, task, memorized, train_pass, cfg)
        else:
            run_stage(model, stage, task, cfg, memorized, None, alpha,
                      resume if stage == first else None)
        seconds[f"stage{stage}"] = time.time() - t0
        save(model, stage, memorized, cfg, alpha or 0.0, **extra)
        check_replicas(model, stage)
    if cfg.control:
        policies = load("stage2.pt", cfg)[0].policies.state_dict()
        seconds["control"] = control(task, memorized, alpha, policies, cfg)
    if MASTER:
        evaluate_and_report(task, cfg, seconds)
    if WORLD > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
