"""
The reinforcement-learning maths of ConsistentEE, as small pure functions.

Zeng et al., "ConsistentEE: A Consistent and Hardness-Guided Early Exiting Method for Accelerating
Language Models Inference", AAAI 2024, arXiv 2312.11882. A policy looks at the state after each
layer l = 1..L and decides whether to exit there (probability p_l, the last layer always exits); it
is trained with REINFORCE and a mean-of-K baseline, the way cleanrl and nanochat's chat_rl.py do it.
Layers are numbered 1..L everywhere: exit layers, memorized layers, the columns of a reward table.
"""

import torch
from torch.distributions import Bernoulli

# Smallest probability we take a log of. A sigmoid saturates to exactly 0.0 or 1.0 in float32
# (|logit| > ~17 or ~104), and log(0) = -inf would make the loss and its gradient inf/nan. Clamping
# p into [EPS, 1 - EPS] leaves unsaturated probabilities alone; a saturated one scores log(EPS)
# instead of -inf, and gets no gradient through the clamp.
EPS = 1e-6


def _check_probs(p):
    if p.dim() != 2:
        raise ValueError(f"p must be (B, L), one exit probability per input and layer; "
                         f"got shape {tuple(p.shape)}")
    return p.shape


def exit_distribution(p):
    """
    P(exit at l) = p_l * prod_{j<l} (1 - p_j), with p_L := 1 (the last column of p is ignored).
    p (B, L) -> (B, L), each row sums to 1. Differentiable (no in-place ops).
    Example: p = [[0.5, 0.5, 0.9]] -> [[0.5, 0.5*0.5, 1*0.5*0.5]] = [[0.5, 0.25, 0.25]]
    """
    B, L = _check_probs(p)
    ones = p.new_ones(B, 1)
    # (B, L) prod_{j<l} (1 - p_j)
    reach = torch.cumprod(torch.cat([ones, 1 - p[:, :-1]], dim=1), dim=1)
    exit_p = torch.cat([p[:, :-1], ones], dim=1)  # (B, L) with p_L := 1
    return exit_p * reach


def sample_exits(p, k, generator=None, eps=EPS):
    """
    Draw k trajectories per row: at each layer l < L the policy takes an action, 1 = exit with
    probability p_l, 0 = go on; the trajectory exits at its first 1, or at layer L if there is none.
    All k trajectories share the one set of probabilities (one backbone pass).
    p (B, L) -> exits (k, B) long in 1..L, log_prob (k, B) = log p_t + sum_{j<t} log(1 - p_j)
    (no term for t = L, which always exits), differentiable with respect to p.
    Example: p = [[0.5, 0.5, 0.9]]; actions (1, .) -> exit 1, log_prob log 0.5;
    actions (0, 1) -> exit 2, log(1-0.5) + log 0.5 = log 0.25;
    actions (0, 0) -> exit 3, log(1-0.5) + log(1-0.5) = log 0.25.
    """
    B, L = _check_probs(p)
    if k < 1:
        raise ValueError(f"k, the number of trajectories per input, must be >= 1; got {k}")
    act_p = p[:, :-1]  # (B, L-1) the layers where the policy has a choice
    # Sample from the exact probabilities (torch.bernoulli, since Distribution.sample takes no
    # generator); the clamp is only for scoring, so p = 1 always exits and p = 0 never does.
    # (k, B, L-1)
    actions = torch.bernoulli(act_p.detach().expand(k, B, L - 1), generator=generator)
    # (k, B) layers passed before the first exit, + 1
    exits = 1 + (actions.cumsum(dim=-1) == 0).sum(dim=-1)
    policy = Bernoulli(probs=act_p.clamp(eps, 1 - eps))
    # (k, B, L-1) actions up to the exit
    taken = torch.arange(1, L, device=p.device) <= exits.unsqueeze(-1)
    log_prob = (policy.log_prob(actions) * taken).sum(dim=-1)  # (k, B)
    return exits, log_prob


def reinforce_loss(log_prob, reward):
    """
    REINFORCE with the mean reward of the k trajectories of the same input as baseline.
    log_prob, reward (k, B) -> scalar loss to minimise.
    Example: log_prob = [[a], [b]], reward = [[1], [3]] -> baseline 2, adv [[-1], [1]],
             loss = -(-a + b) / 2
    """
    # The baseline removes what all k trajectories of an input share (how easy the input is), which
    # cuts the variance without biasing the gradient. detach: the advantage is a fixed weight on
    # log_prob, gradients must flow only through the log-probability of the actions taken.
    adv = (reward - reward.mean(dim=0, keepdim=True)).detach()  # (k, B)
    return -(adv * log_prob).mean()


def expected_reward_loss(p, reward):
    """
    The exact objective REINFORCE estimates: with L possible exits, sum them all.
    p (B, L), reward (B, L) the reward of exiting at each layer
    -> -mean_b sum_l P(exit at l) * reward[b, l].
    Example: p = [[0.5, 0.5, 0.9]], reward = [[4, 0, -8]] -> -(0.5*4 + 0.25*0 + 0.25*(-8)) = 0
    """
    return -(exit_distribution(p) * reward).sum(dim=1).mean()


def hardness_reward(gain, exit_layer, memorized, n_layer, alpha):
    """
    R = gain - alpha * t * (1 - m / L): an input that exits at layer t earns its head's gain (the
    paper's -CE, or 1 if the head is right and 0 if not) minus a depth penalty that is full for easy
    inputs (small memorized layer m) and zero for hard ones (m = L). Each layer deeper costs
    alpha * (1 - m / L), so the whole penalty grows with the depth L: a deeper backbone asks for a
    smaller alpha. Elementwise, broadcasting; exit_layer and memorized are 1-based layer numbers.
    Example: gain=-0.2 (CE 0.2), t=3, m=2, L=6, alpha=0.1
             -> -0.2 - 0.1*3*(1 - 2/6) = -0.2 - 0.2 = -0.4
    """
    return gain - alpha * exit_layer * (1 - memorized / n_layer)


def reward_table(gain_per_layer, memorized, alpha):
    """
    The hardness reward of exiting at every layer:
    gain_per_layer (B, L), memorized (B,) -> reward (B, L).
    Index it with sampled exits via torch.gather(reward.T, 0, exits - 1) -> (k, B).
    Example: gain = [[1, 1]] (both heads right), m = [1], alpha = 0.5
             -> [[1 - 0.5*1*0.5, 1 - 0.5*2*0.5]] = [[0.75, 0.5]]: right at layer 1, so exit there
    """
    L = gain_per_layer.shape[1]
    layers = torch.arange(1, L + 1, device=gain_per_layer.device)  # (L,) exit layer of each column
    return hardness_reward(gain_per_layer, layers, memorized.unsqueeze(1), L, alpha)  # (B, L)
