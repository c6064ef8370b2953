"""
What the three scripts (train.py, generate.py, bench.py) share: typed --key=value options, the
device, timing, and loading a model, from a checkpoint of ours or a Hugging Face folder, with one
clear line when it cannot be done.
"""
import inspect
import os
import statistics
import sys
import time
from dataclasses import fields

import torch

from model import Config, Decoder, Encoder
from weights import first_line


def overrides(cfg, argv, prog, doc):
    """
    Apply --key=value arguments to the dataclass cfg, each value checked against its field's type
    (a bare --flag sets a bool). --help prints doc and the dataclass with its comments.
    """
    if "--help" in argv or "-h" in argv:
        print(doc.strip() + "\n\n" + inspect.getsource(type(cfg)))
        sys.exit(0)
    types = {f.name: f.type for f in fields(cfg)}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not eq and types.get(key) is bool:
            value = "true"
        if not arg.startswith("--") or key not in types or not (eq or types[key] is bool):
            raise SystemExit(f"{prog}: unknown option {arg!r}; options are --key=value, see --help")
        t = types[key]
        try:
            if t is bool and value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            setattr(cfg, key, value.lower() in ("true", "1") if t is bool else t(value))
        except ValueError:
            raise SystemExit(f"{prog}: --{key} expects {t.__name__}, got {value!r}") from None
    return cfg


def pick_device(name, prog):
    """'auto' -> cuda, then mps, then cpu; a named device must be there."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if available[d])
    if not available.get(name.split(":")[0]):
        raise SystemExit(f"{prog}: device {name!r} is not available here; "
                         "use auto, cpu, cuda or mps")
    return name


def load_model(path, prog, device="cpu", kind=None):
    """
    (model, checkpoint dict) from a checkpoint file of ours (an Encoder or a Decoder, its weights
    tell which), a Hugging Face folder or a .gguf file (then the dict is empty, and kind says
    which class).
    kind: the class the caller needs (None: either). Anything missing, corrupt, foreign or of the
    other kind stops with one line (SystemExit) that names the file.
    """
    if os.path.isdir(path) or path.endswith(".gguf") and os.path.isfile(path):
        try:
            return (kind or Encoder).from_pretrained(path).to(device), {}
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise SystemExit(f"{prog}: cannot load {path}: {first_line(e)}") from None
    if not os.path.isfile(path):
        raise SystemExit(f"{prog}: {path} is missing")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        state, config = ckpt["model"], Config(**ckpt["model_config"])
    except Exception as e:  # not a torch file, truncated, or a dict of something else
        raise SystemExit(f"{prog}: cannot load {path}: {first_line(e)}; "
                         "is it a checkpoint written by train.py?") from None
    if "gguf" in ckpt:  # train.py --task=smollm2: adapters and policies beside a GGUF's backbone
        return frozen_llm(path, ckpt, prog, device, kind)
    found = Decoder if "ln_f.weight" in state else Encoder
    if kind is not None and found is not kind:
        what = {Encoder: "a classification encoder", Decoder: "a language model"}
        raise SystemExit(f"{prog}: {path} holds {what[found]}; {prog} needs {what[kind]}")
    try:
        model = found(config)
        model.load_state_dict(state)
    except Exception as e:  # the weights do not fit the configuration they came with
        raise SystemExit(f"{prog}: cannot load {path}: {first_line(e)}") from None
    return model.to(device), ckpt


def frozen_llm(path, ckpt, prog, device, kind):
    """A checkpoint of train.py --task=smollm2: the backbone from the GGUF file it names, its
    exit adapters and policies from the checkpoint. Says which GGUF, in one line."""
    if kind is Encoder:
        raise SystemExit(f"{prog}: {path} holds a language model; {prog} needs a classification "
                         "encoder")
    try:
        # quietly: its line would call the adapters and policies freshly initialised, and they
        # are loaded just below
        model = Decoder.from_pretrained(ckpt["gguf"], quiet=True, exit_adapters=True)
        mine = {k for k in model.state_dict() if k.startswith(("adapters.", "policies."))}
        if set(ckpt["model"]) != mine:
            raise ValueError(f"its adapters and policies do not fit {ckpt['gguf']}")
        model.load_state_dict(ckpt["model"], strict=False)
        if ckpt.get("shortlist") is not None:  # the exits' vocabulary it was trained with
            model.set_shortlist(ckpt["shortlist"].to(model.lm_head.weight.device))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SystemExit(f"{prog}: cannot load {path}: {first_line(e)}") from None
    print(f"model: {ckpt['gguf']} (the backbone, frozen)", file=sys.stderr)
    return model.to(device), ckpt


# -----------------------------------------------------------------------------
# timing (bench.py; train.py --task=smollm2 picks the drafts' settings by it)


def timer(device):
    """A clock that waits for queued device work, so a timing covers what it claims to."""
    def now():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()
    return now


def timed_runs(fs, repeats, now, warmup=True):
    """
    Several ways to do the same work, timed on the same inputs: fs, each a function or a list of one
    function per input, run input by input, side after side (after one warm-up each), so that a
    machine whose speed drifts slows every side alike (bench.interleaved: two sides). Returns (each
    side's sum over inputs of its median time, each side's outputs of the last repeat: a list, one
    per input).
    """
    fs = [[f] if callable(f) else list(f) for f in fs]
    times = [[[] for _ in side] for side in fs]
    outputs = [[None] * len(side) for side in fs]
    if warmup:
        for group in zip(*fs, strict=True):
            for f in group:
                f()
    for _ in range(repeats):
        for i, group in enumerate(zip(*fs, strict=True)):
            for j, f in enumerate(group):
                t0 = now()
                outputs[j][i] = f()
                times[j][i].append(now() - t0)
    return [sum(map(statistics.median, side)) for side in times], outputs
