"""The method's non-RL pieces: weighted loss, memorized layer, exit rules, batched early exit."""
import copy
import math

import pytest
import torch

import cee
import rl
from model import Config, Encoder


def test_weighted_exit_loss_hand_case():
    # head 1: p(label) = 0.5 -> CE log 2; head 2: p(label) = e/(e+1) -> CE log(1 + 1/e)
    logits = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])  # (B=1, L=2, n=2)
    want = (1 * math.log(2) + 2 * math.log(1 + math.exp(-1))) / 3
    assert cee.weighted_exit_loss(logits, torch.tensor([1])).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("preds,want", [
    ([[1, 1, 1]], [1]), ([[0, 1, 1]], [2]), ([[1, 0, 1]], [3]), ([[1, 1, 0]], [3]),
    ([[0, 0, 0]], [3]),
    ([[1, 1, 1], [0, 1, 1], [1, 0, 1]], [1, 2, 3]),
])
def test_memorized_layer(preds, want):
    preds = torch.tensor(preds)
    assert cee.memorized_layer(preds, torch.ones(len(preds), dtype=torch.long)).tolist() == want


def layer_logits(probs):
    """(B, L) probability of class 1 at each layer -> binary logits (B, L, 2)."""
    p = torch.tensor(probs)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], -1)


@pytest.mark.parametrize("rule,want", [
    (("static", 2), [2, 2, 2]),
    (("maxprob", 0.85), [1, 4, 2]),        # top probs [.9 ..], [.6 .6 .7 .55] (never), [.8 .9 ..]
    (("entropy", 0.4), [1, 4, 2]),         # entropy < 0.4 needs top prob > ~0.88
    (("patience", 1), [2, 3, 2]),          # same prediction two layers in a row
    (("patience", 2), [3, 4, 3]),
])
def test_exit_rules_hand_cases(rule, want):
    logits = layer_logits([[0.9, 0.9, 0.9, 0.9], [0.6, 0.4, 0.3, 0.45], [0.8, 0.9, 0.95, 0.95]])
    assert cee.exit_layers(cee.ExitRule(*rule), logits).tolist() == want


def test_policy_rule_and_last_layer():
    logits = layer_logits([[0.6, 0.6, 0.6]] * 3)
    # the last column is never read
    p = torch.tensor([[0.7, 0.9, 0.0], [0.2, 0.6, 0.0], [0.1, 0.1, 0.0]])
    assert cee.exit_layers(cee.ExitRule("consistentee", 0.5), logits, p).tolist() == [1, 2, 3]


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown exit rule 'deebert'"):
        cee.ExitRule("deebert", 0.1)


def test_exit_gain_worked_example():
    """
    The docstring's case: the target's probability 0.6 at head 1 and 0.9 at head 2, both right.
    """
    logits = torch.log(torch.tensor([[[0.4, 0.6], [0.1, 0.9]]]))  # (1, 2, 2)
    target = torch.tensor([1])
    torch.testing.assert_close(cee.exit_gain(logits, target, "ce"),
                               torch.log(torch.tensor([[0.6, 0.9]])))
    assert cee.exit_gain(logits, target, "correct").tolist() == [[1.0, 1.0]]
    assert cee.exit_gain(logits, torch.tensor([0]), "correct").tolist() == [[0.0, 0.0]]


def test_correct_reward_exits_at_the_first_right_layer_and_ce_goes_deeper():
    """Knowing the target: 0/1 pays only for being right, so the best exit is the first right head;
    -CE keeps paying as the heads grow surer, so at a small alpha the best exit is deeper."""
    # (1, 3, 2) right everywhere, surer deeper
    probs = torch.tensor([[[0.3, 0.7], [0.1, 0.9], [0.01, 0.99]]])
    logits, target, memorized = torch.log(probs), torch.tensor([1]), torch.tensor([1])
    assert cee.best_exits(logits, target, memorized, 0.05, "correct").tolist() == [1]
    assert cee.best_exits(logits, target, memorized, 0.05, "ce").tolist() == [3]


def test_best_exits_hand_case():
    """Rewards written out (alpha 0.3, L = 3, 0/1 gain): input 1 is wrong at head 1 and easy
    (m = 1): [0 - 0.2, 1 - 0.4, 1 - 0.6] -> layer 2; input 2, right everywhere but hard (m = 3),
    pays no depth penalty: [1, 1, 1] -> the first, layer 1; input 3, right only at head 3:
    m = 3, [0, 0, 1] -> layer 3."""
    right = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    logits = torch.nn.functional.one_hot(right, 2).float()  # class 1 where the head is right
    target, memorized = torch.ones(3, dtype=torch.long), torch.tensor([1, 3, 3])
    table = rl.reward_table(cee.exit_gain(logits, target, "correct"), memorized, 0.3)
    torch.testing.assert_close(table, torch.tensor([[-0.2, 0.6, 0.4], [1.0, 1, 1], [0, 0, 1]]))
    assert cee.best_exits(logits, target, memorized, 0.3, "correct").tolist() == [2, 1, 3]


@pytest.fixture(scope="module", params=[False, True],
                ids=["policy_reads_state", "policy_reads_confidence"])
def encoder(request):
    torch.manual_seed(0)
    model = Encoder(Config(n_layer=4, n_head=2, n_embd=16, n_inner=32, vocab_size=40, block_size=16,
                           n_labels=3, policy_conf=request.param))
    with torch.no_grad():  # confident heads, so that the confidence rules spread their exits
        for h in model.heads:
            h.weight.mul_(40)
    return model.eval()


@pytest.mark.parametrize("name,param", [("consistentee", 0.5), ("static", 2), ("entropy", 0.5),
                                        ("patience", 1), ("maxprob", 0.8)])
def test_batched_early_exit_equals_each_input_alone(encoder, name, param):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (12, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0  # some padded rows
    with torch.no_grad():  # every layer's outputs from one full pass
        logits, s = encoder(ids, mask)
        p = torch.stack([encoder.policies[l](encoder.policy_input(s[:, l], logits[:, l]))
                         for l in range(3)]
                        + [torch.ones(12)], 1)
    if name == "consistentee":  # a threshold halfway between two inputs' layer-1 probabilities
        v = p[:, 0].sort().values
        param = (v[5] + v[6]).item() / 2
    rule = cee.ExitRule(name, param)
    preds, exits = cee.early_exit(encoder, ids, mask, rule)
    alone = [cee.early_exit(encoder, ids[i:i + 1, :int(mask[i].sum())],
                            mask[i:i + 1, :int(mask[i].sum())], rule)
             for i in range(12)]
    assert preds.tolist() == [q.item() for q, _ in alone]
    assert exits.tolist() == [e.item() for _, e in alone]
    # and the same as the rule applied to the full pass
    want = cee.exit_layers(rule, logits, p)
    assert exits.tolist() == want.tolist()
    assert preds.tolist() == logits[torch.arange(12), want - 1].argmax(-1).tolist()
    assert len(set(exits.tolist())) > 1 or name == "static", exits  # the test exercises compaction


def test_policy_exit_runs_the_head_only_where_rows_stop(encoder):
    """A policy that reads the state only needs no exit head until rows stop; one that reads the
    head's confidence needs it at every layer the rows run."""
    model = copy.deepcopy(encoder)
    with torch.no_grad():
        model.policies[0].net[-1].bias.fill_(-100.0)  # nobody exits at layer 1
    ids = torch.randint(0, 40, (12, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a threshold halfway between two inputs' layer-2 probabilities
        logits, s = model(ids)
        v = model.policies[1](model.policy_input(s[:, 1], logits[:, 1])).sort().values
    rule = cee.ExitRule("consistentee", (v[5] + v[6]).item() / 2)
    calls = []
    head = model.exit_logits
    model.exit_logits = lambda s, l: calls.append((l + 1, len(s))) or head(s, l)
    _, exits = cee.early_exit(model, ids, torch.ones_like(ids), rule)
    running = [(l, int((exits >= l).sum())) for l in range(1, 5) if (exits >= l).any()]
    stopping = [(l, n) for l, n in running if (exits == l).any()]
    assert calls == (running if model.config.policy_conf else stopping)
    # layer 1 has no exits, others do
    assert len(stopping) < len(running) and len(stopping) > 1, exits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_early_exit_on_cuda_agrees_with_cpu(encoder):
    """On CUDA early_exit runs in bf16: the exits may differ near a threshold, but rarely."""
    ids = torch.randint(0, 40, (64, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0  # padded rows: the real tokens are kept on the host and moved over
    gpu = copy.deepcopy(encoder).to("cuda")
    for rule in (cee.ExitRule("static", 3), cee.ExitRule("maxprob", 0.8)):
        preds, exits = cee.early_exit(encoder, ids, mask, rule)
        preds_gpu, exits_gpu = cee.early_exit(gpu, ids.to("cuda"), mask.to("cuda"), rule)
        assert exits_gpu.device.type == "cuda"
        assert (exits_gpu.cpu() == exits).float().mean() >= 0.9
        assert (preds_gpu.cpu() == preds).float().mean() >= 0.9
