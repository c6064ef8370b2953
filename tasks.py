"""
Tasks for train.py: what differs between classifying texts and modelling language is decided here,
once: the splits, the model, and how a batch becomes the method's inputs (a text, or a token
position) with every exit's logits and states.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

import data
import tokenizer
from model import Config, Decoder, Encoder


class Outputs(NamedTuple):
    """Every exit's outputs at R inputs, in this one order everywhere: read them by name."""
    logits: torch.Tensor  # (R, L, n) each exit head's output
    states: torch.Tensor  # (R, L, C) each exit state s_l
    labels: torch.Tensor  # (R,)


@dataclass
class Task:
    """
    A task's splits and how its model and inputs are made. An input is a text for a classifier and
    a token position for a language model (each window of max_len tokens gives max_len inputs).
    """
    splits: dict                 # train (stage 1), train_rl (stages 2 and 3: the inputs whose
                                 # memorized layers are kept), validation, test
    new_model: Callable          # () -> the stage-1 model, with fresh exit policies
    outputs: Callable            # (model, batch) -> Outputs of the batch's R inputs
    inputs_per_item: int         # inputs in one item of a split: 1 text, or max_len token positions
    eval_batch: int              # items per batch when every layer's outputs are kept
    timed: bool                  # time inference on the test split (a language model's is timed
                                 # generating: generate.py, bench.py)


def text_outputs(model, b):
    """Task.outputs of a classifier: R = B texts, each one input."""
    logits, s = model(b["input_ids"], b["attention_mask"])
    return Outputs(logits, s, b["labels"])


def token_outputs(model, b):
    """Task.outputs of a language model: R = B x T token positions, each labelled with the next
    token, its state the hidden state at that position."""
    s = torch.stack(model.layer_states(b["input_ids"])[1:], 2).flatten(0, 1)  # (B*T, L, C)
    logits = torch.stack([model.exit_logits(s[:, l], l) for l in range(s.size(1))], 1)
    return Outputs(logits, s, b["labels"].flatten())


def build_task(cfg):
    """The task of the options: its splits (a classifier's texts, a language model's windows of
    tokens) and its model."""
    if cfg.task != "lm":
        path = data.minilm_path() if cfg.init == "minilm" else cfg.init
        splits = data.load_task(cfg.task, tokenizer.WordPiece(os.path.join(path, "vocab.txt")),
                                cfg.max_len, cfg.seed)

        def new_model():
            return Encoder.from_pretrained(path, n_labels=len(splits["label_names"]), pool=cfg.pool,
                                           policy_conf=cfg.policy_conf)
        return Task(splits | {"train_rl": splits["train"]}, new_model, text_outputs, 1, 64, True)
    if cfg.init == "scratch":
        C, vocab = cfg.lm_width, cfg.lm_vocab

        def new_model():
            return Decoder(Config(n_layer=cfg.lm_layers, n_head=cfg.lm_heads, n_embd=C,
                                  n_inner=4 * C, vocab_size=vocab, block_size=cfg.max_len,
                                  act="gelu", ln_eps=1e-5, dropout=0.0,
                                  policy_conf=cfg.policy_conf))
    else:  # a GPT-2 folder, with its own vocabulary
        with open(os.path.join(cfg.init, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]

        def new_model():
            return Decoder.from_pretrained(cfg.init, policy_conf=cfg.policy_conf)
    splits = data.lm_task(vocab, cfg.max_len, cfg.lm_windows, cfg.lm_test_windows, cfg.seed)
    splits["train_rl"] = splits["train"][:cfg.lm_rl_windows]
    return Task(splits, new_model, token_outputs, cfg.max_len, 8, False)


@torch.no_grad()
def all_layers(task, model, split, device):
    """Outputs of a whole split's inputs, in eval mode."""
    was_training = model.training
    model.eval()
    out = [task.outputs(model, b) for b in data.batches(split, task.eval_batch, device=device)]
    model.train(was_training)
    return Outputs(*[torch.cat(parts) for parts in zip(*out)])
