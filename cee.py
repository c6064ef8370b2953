"""
ConsistentEE (Zeng et al., AAAI 2024, arXiv 2312.11882): the method, from losses to inference.

- exit_ce, weighted_exit_loss: stage 1 trains every exit head, deeper ones weighted more (PABEE).
- memorized_layer: the per-input hardness that shapes the reward (paper Sec. "Memorized Layer").
- policy_probs, exit_gain, stage_loss: the loss of each training stage; 2 and 3 add the policy
  gradient (rl.py) with the hardness reward, whose accuracy term is -CE or 1 if the head is right.
- ExitRule: when to stop at inference; the learned policy, and the classic rules on the same model:
  a fixed layer, entropy (DeeBERT, Xin et al. 2020), patience (PABEE), max probability.
- early_exit: batched inference that runs one layer at a time and drops the rows that exited.
- exit_layers: the same rules applied to every layer's precomputed outputs, for cheap sweeps.
The policy-gradient maths is in rl.py, the backbones and the policy network in model.py, the
training loop in train.py; how sweeps are read and compared (report.py) and the frozen LLM's
helpers (llm.py) live elsewhere.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import rl
from model import confidence, unpack


def exit_ce(logits, labels):
    """Cross-entropy of every exit head on every input: logits (B, L, n), labels (B,) -> (B, L)."""
    B, L, n = logits.shape
    ce = F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(L), reduction="none")
    return ce.view(B, L)


def weighted_exit_loss(logits, labels):
    """
    sum_l l * CE_l / sum_l l over the L exit heads. logits (B, L, n), labels (B,) -> scalar.
    Example: L = 2 with CE_1 = 0.9 and CE_2 = 0.3 -> (1*0.9 + 2*0.3) / 3 = 0.5
    """
    ce = exit_ce(logits, labels)  # (B, L)
    w = torch.arange(1, ce.size(1) + 1, device=logits.device, dtype=ce.dtype)  # (L,) weights 1..L
    return (ce.mean(0) * w).sum() / w.sum()


def memorized_layer(preds, labels):
    """
    The smallest l such that the heads l, l+1, ..., L all predict the label; L when the last head
    is wrong.
    preds (B, L) long, labels (B,) -> (B,) long in 1..L.
    Example: labels [1, 1, 1], preds [[1, 1, 1], [0, 1, 1], [1, 0, 1]] -> [1, 2, 3];
             preds [[1, 1, 0]] -> [3]
    """
    L = preds.size(1)
    wrong = preds != labels[:, None]  # (B, L)
    layers = torch.arange(1, L + 1, device=preds.device)  # (L,)
    last_wrong = (wrong * layers).max(1).values  # (B,) deepest wrong head, 0 if none
    return (last_wrong + 1).clamp(max=L)


def policy_weights(model):
    """A copy of the exit policies' weights, to start from or come back to."""
    return {k: v.clone() for k, v in model.policies.state_dict().items()}


def policy_probs(model, s, logits):
    """p (B, L): each layer's exit probability from its policy; the last layer always exits
    (p_L = 1). logits may be None when the policy reads the states alone (no policy_conf)."""
    L = s.size(1)
    p = [model.policies[l](model.policy_input(s[:, l], None if logits is None else logits[:, l]))
         for l in range(L - 1)]
    return torch.stack(p + [s.new_ones(s.size(0))], 1)


REWARDS = ("correct", "ce")


def exit_gain(logits, target, reward):
    """
    The reward's accuracy term for exiting at each layer: logits (B, L, n), target (B,) -> (B, L).
    "ce" (the paper's): -CE of the head, which keeps paying for depth after the head is right;
    "correct": 1 if the head's argmax is the target, else 0, which pays only for being right.
    Example: the target's probability 0.6 at head 1 and 0.9 at head 2 of two classes (both right)
    -> ce [[-0.51, -0.11]], correct [[1, 1]]
    """
    if reward == "ce":
        return -exit_ce(logits, target)
    return (logits.argmax(-1) == target[:, None]).to(logits.dtype)


def stage_loss(model, stage, s, logits, labels, memorized, alpha, K=8, estimator="reinforce",
               reward="correct", target="label"):
    """
    The loss of one batch in training stage 1, 2 or 3 (one function, so the stages cannot drift
    apart). s (B, L, C) exit states, logits (B, L, n) every head's output, labels (B,), memorized
    (B,) the inputs' memorized layers, alpha the depth penalty; K trajectories per input with
    estimator "reinforce", or "exact"; the reward's accuracy term ("correct" or "ce", see
    exit_gain), judged against the "label" or the "full" depth's prediction (target).
    Returns (loss, {name: value} to log).
    """
    if stage == 1:
        loss = weighted_exit_loss(logits, labels)
        return loss, {"loss/cls": loss.item()}
    ce = exit_ce(logits, labels)  # (B, L)
    # The reward scores each head against reward_target: the label, or the full depth's prediction
    # (target "full": the policy learns when a head agrees with the last one, the consistency
    # CALM asks of generation)
    gain = exit_gain(logits.detach(), reward_target(logits, labels, target), reward)  # (B, L)
    policy_loss, share, logs = policy_gradient(model, s, logits, gain, memorized, alpha, K,
                                               estimator)
    if stage == 2:
        return policy_loss, logs
    cls_loss = (share * ce).sum(1).mean()  # consistent: CE only where the input exits
    logs["loss/cls"] = cls_loss.item()
    return cls_loss + policy_loss, logs


def policy_gradient(model, s, logits, gain, memorized, alpha, K=8, estimator="reinforce"):
    """
    The policy's loss with the hardness reward (stages 2 and 3), and share (B, L): the weight of
    each exit in the consistent loss, the fraction of the K sampled trajectories that exit there
    (estimator "reinforce"), or the probability of exiting there ("exact").
    s (B, L, C) exit states, logits (B, L, n) the heads' outputs (None when the policy does not
    read them: see policy_probs), gain (B, L) the reward's accuracy term of each exit (exit_gain).
    Returns (policy loss, share, {name: value} to log).
    """
    L = s.size(1)
    # The policy learns from the reward only: it reads detached states, so no noisy REINFORCE
    # gradient reaches the backbone; in stage 3 the backbone learns from the loss at the exits
    # actually taken.
    p = policy_probs(model, s.detach(), None if logits is None else logits.detach())  # (B, L)
    rewards = rl.reward_table(gain, memorized, alpha)  # (B, L) reward of exiting at each layer
    if estimator == "exact":
        share = rl.exit_distribution(p).detach()  # (B, L) probability of exiting at l
        policy_loss = rl.expected_reward_loss(p, rewards)
    else:
        exits, log_prob = rl.sample_exits(p, K)  # (K, B): K trajectories from this one pass
        share = F.one_hot(exits - 1, L).float().mean(0)  # (B, L) share of the K exiting at l
        policy_loss = rl.reinforce_loss(log_prob, rewards.T.gather(0, exits - 1))
    layers = torch.arange(1, L + 1, device=p.device)  # (L,)
    logs = {"loss/policy": policy_loss.item(), "exit/mean": (share * layers).sum(1).mean().item()}
    return policy_loss, share, logs


def reward_target(logits, labels, target):
    """What the reward and the memorized layer measure the heads against: the labels (target
    "label"), or the last head's argmax ("full")."""
    return labels if target == "label" else logits[:, -1].detach().argmax(-1)


def best_exits(logits, target, memorized, alpha, reward):
    """The exit layer (B,) with the highest hardness reward: what a policy that knew the target
    would pick."""
    return rl.reward_table(exit_gain(logits, target, reward), memorized, alpha).argmax(1) + 1


@dataclass
class ExitRule:
    """
    Decides, after layer l (0-based here), which rows stop. `name` picks the rule, `param` its knob:
      consistentee: the policy's exit probability > param (the paper uses 0.5)
      static:       exit at layer param (1-based)
      entropy:      entropy of the head's distribution < param (DeeBERT)
      patience:     the prediction has not changed for param layers in a row (PABEE)
      maxprob:      the head's top probability > param
    decide() sees one layer's head logits (B, n) (None when needs_head is False), the policy's
    probabilities (B,) when needs_policy, and a per-row memory (B, ...) it returns updated; callers
    keep the memory's rows with the inputs'.
    """
    name: str
    param: float

    NAMES = ("consistentee", "static", "entropy", "patience", "maxprob")

    def __post_init__(self):
        if self.name not in self.NAMES:
            raise ValueError(f"unknown exit rule {self.name!r}; known: {', '.join(self.NAMES)}")

    @property
    def needs_policy(self):
        return self.name == "consistentee"

    def needs_head(self, config):
        """
        Whether deciding needs the exit head's output at every layer. The policy reads the exit
        state only (pi_l(s_l), a C x 32 MLP, far cheaper than a layer), so the head runs only at the
        layers where some rows stop. A confidence rule, or a policy that reads the head's
        confidence (config.policy_conf), needs the head's whole output distribution: a C x n matmul
        for a classifier, but for a language model the C x vocab LM head, as costly as several
        layers.
        """
        return not self.needs_policy or config.policy_conf

    def decide(self, l, logits, p, memory):
        if self.name == "consistentee":
            return p > self.param, memory
        if self.name == "static":
            return torch.full(logits.shape[:1], l + 1 >= self.param, device=logits.device), memory
        if self.name == "patience":  # memory (B, 2): previous prediction, layers it has held
            pred = logits.argmax(-1)
            count = (torch.zeros_like(pred) if memory is None
                     else (memory[:, 1] + 1) * (pred == memory[:, 0]))
            return count >= self.param, torch.stack([pred, count], 1)
        top, entropy = confidence(logits)  # needs the whole head output at every layer
        return (entropy < self.param if self.name == "entropy" else top > self.param), memory


def exit_layers(rule, logits, p=None):
    """
    Where each input would exit under `rule`, from every layer's outputs computed in one full pass.
    logits (B, L, n), p (B, L) policy probabilities -> exits (B,) long in 1..L. The same decide() as
    early_exit, so the two agree exactly; a sweep over thresholds then costs no extra forward
    passes.
    """
    B, L, _ = logits.shape
    exits = torch.full((B,), L, dtype=torch.long, device=logits.device)
    running, memory = torch.ones(B, dtype=torch.bool, device=logits.device), None
    for l in range(L - 1):
        stop, memory = rule.decide(l, logits[:, l], None if p is None else p[:, l], memory)
        exits[running & stop] = l + 1
        running &= ~stop
    return exits


@torch.inference_mode()
def early_exit(model, input_ids, attention_mask, rule):
    """
    Batched early-exit inference with an Encoder in eval mode: run layer after layer, and after
    each one remove the rows that exit (compaction), so deeper layers only compute the inputs still
    running, and of those only their real tokens (Encoder.real_tokens).
    Returns preds (B,) and exit layers (B,) 1..L in the original row order.
    """
    model.check_ids(input_ids)
    cuda = input_ids.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # bf16 matmuls on CUDA only
        return _early_exit(model, input_ids, attention_mask, rule)


def _early_exit(model, input_ids, attention_mask, rule):
    L, T = model.config.n_layer, input_ids.size(1)
    # The host keeps the books (who runs, which tokens are real), so that a layer needs one transfer
    # from the device at most; on the CPU .cpu() and .to() return the tensor itself.
    mask = None if attention_mask is None else attention_mask.cpu()
    # the layers skip the padding, see real_tokens
    tokens = to_device(model.real_tokens(mask), input_ids.device)
    x = model.embed(input_ids, tokens=tokens)  # (B, T, C), or the real tokens (N, C)
    bias, weights = model.attn_bias(attention_mask), model.pool_weights(attention_mask)
    rows = torch.arange(input_ids.size(0), device=x.device)  # original index of each running row
    preds, exits = torch.empty_like(rows), torch.empty_like(rows)
    memory, head_every_layer = None, rule.needs_head(model.config)
    for l in range(L):
        x = model.run_layer(l, x, bias, tokens)
        h = x if tokens is None else unpack(x, tokens, len(rows), T)  # (b, T, C), b rows running
        s = model.exit_state(h, weights)  # (b, C)
        logits = model.exit_logits(s, l) if head_every_layer else None  # (b, n), see needs_head
        if l < L - 1:
            p = model.policies[l](model.policy_input(s, logits)) if rule.needs_policy else None
            stop, memory = rule.decide(l, logits, p, memory)
            leaving = stop.tolist()  # the one host synchronisation per layer: who stops
            n_stop = sum(leaving)
            if n_stop == 0:  # nobody: nothing to record, nothing to drop
                continue
        logits = model.exit_logits(s, l) if logits is None else logits
        if l == L - 1 or n_stop == len(rows):  # every row left stops here
            preds[rows], exits[rows] = logits.argmax(-1), l + 1
            break
        # Record the rows that stop without asking the device again which they are: write every
        # running row, keeping the old value where the row goes on.
        preds[rows] = torch.where(stop, logits.argmax(-1), preds[rows])
        exits[rows] = torch.where(stop, l + 1, exits[rows])
        go = torch.tensor(leaving).logical_not().nonzero().squeeze(1)  # on the host, as is mask
        keep = go.to(x.device)
        h, rows = h[keep], rows[keep]
        memory = None if memory is None else memory[keep]
        if mask is not None:
            mask, bias, weights = mask[go], bias[keep], weights[keep]
            tokens = to_device(model.real_tokens(mask), x.device)
        x = h if tokens is None else h.flatten(0, 1)[tokens]
    return preds, exits


def to_device(t, device):
    """t on the device, None stays None."""
    return None if t is None else t.to(device, non_blocking=True)


