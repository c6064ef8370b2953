"""Tests for rl.py: hand-computed cases, and REINFORCE against the exact gradient it estimates."""

import math

import pytest
import torch

from rl import (exit_distribution, expected_reward_loss, hardness_reward, reinforce_loss,
                reward_table, sample_exits)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_p(B, L, seed=0):
    return torch.rand(B, L, generator=gen(seed))


# ---------------------------------------------------------------- exit_distribution

def test_exit_distribution_hand_case():
    p = torch.tensor([[0.5, 0.5, 0.9]])
    torch.testing.assert_close(exit_distribution(p), torch.tensor([[0.5, 0.25, 0.25]]))


@pytest.mark.parametrize("B, L", [(1, 1), (3, 1), (2, 2), (4, 6), (5, 12)])
def test_exit_distribution_rows_sum_to_one(B, L):
    q = exit_distribution(random_p(B, L))
    assert q.shape == (B, L)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(B))


def test_exit_distribution_ignores_last_column():
    p = random_p(3, 5)
    other = p.clone()
    other[:, -1] = torch.tensor([0.0, 0.3, 1.0])
    torch.testing.assert_close(exit_distribution(p), exit_distribution(other))


def test_exit_distribution_gradient_is_exact():
    p = (0.05 + 0.9 * random_p(2, 4)).double().requires_grad_()
    assert torch.autograd.gradcheck(exit_distribution, (p,))


# ---------------------------------------------------------------- sample_exits

@pytest.mark.parametrize("B, L, k", [(1, 1, 1), (3, 1, 4), (2, 3, 1), (4, 6, 7)])
def test_sample_exits_shapes_and_range(B, L, k):
    exits, log_prob = sample_exits(random_p(B, L), k, generator=gen())
    assert exits.shape == (k, B) and log_prob.shape == (k, B)
    assert exits.dtype == torch.long
    assert exits.min() >= 1 and exits.max() <= L
    assert torch.isfinite(log_prob).all() and (log_prob <= 0).all()


def test_sample_exits_frequencies_match_exit_distribution():
    p = torch.tensor([[0.5, 0.5, 0.9], [0.1, 0.6, 0.3], [0.2, 0.2, 0.2]])
    k, L = 20000, p.shape[1]
    exits, _ = sample_exits(p, k, generator=gen())
    freq = torch.stack([(exits == l).float().mean(dim=0) for l in range(1, L + 1)], dim=1)  # (B, L)
    assert (freq - exit_distribution(p)).abs().max() < 0.01


def test_sample_exits_log_prob_is_log_of_exit_distribution():
    p = 0.05 + 0.9 * random_p(4, 5)
    exits, log_prob = sample_exits(p, 50, generator=gen())
    expected = torch.gather(exit_distribution(p).log().T, 0, exits - 1)  # (k, B)
    torch.testing.assert_close(log_prob, expected)


def test_sample_exits_log_prob_hand_case():
    p = torch.tensor([[0.5, 0.5, 0.9]])
    exits, log_prob = sample_exits(p, 100, generator=gen())
    assert set(exits.unique().tolist()) == {1, 2, 3}
    expected = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)])[exits - 1]
    torch.testing.assert_close(log_prob, expected)


def test_sample_exits_gradient_flows_to_p():
    p = random_p(3, 4).requires_grad_()
    _, log_prob = sample_exits(p, 16, generator=gen())
    log_prob.sum().backward()
    assert torch.isfinite(p.grad).all()
    assert p.grad[:, :-1].abs().sum() > 0
    assert (p.grad[:, -1] == 0).all()  # the last layer always exits: its p plays no part


def test_sample_exits_saturated_probabilities_are_finite():
    p = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    exits, log_prob = sample_exits(p, 64, generator=gen())
    assert torch.isfinite(log_prob).all()
    log_prob.sum().backward()
    assert torch.isfinite(p.grad).all()
    assert (exits[:, 0] == 2).all() and (exits[:, 1] == 1).all() and (exits[:, 2] == 3).all()


def test_sample_exits_first_layer_certain():
    p = random_p(5, 4)
    p[:, 0] = 1.0
    exits, log_prob = sample_exits(p, 1000, generator=gen())
    assert (exits == 1).all()
    assert log_prob.abs().max() < 1e-5


def test_sample_exits_generator_is_reproducible():
    p = random_p(3, 6)
    a, _ = sample_exits(p, 32, generator=gen(7))
    b, _ = sample_exits(p, 32, generator=gen(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("p, k", [(torch.rand(4), 2), (torch.rand(2, 3, 4), 2),
                                  (torch.rand(2, 3), 0)])
def test_sample_exits_bad_arguments(p, k):
    with pytest.raises(ValueError):
        sample_exits(p, k)


def test_exit_distribution_bad_shape():
    with pytest.raises(ValueError):
        exit_distribution(torch.rand(4))


# ---------------------------------------------------------------- losses

def test_reinforce_loss_hand_case():
    a = torch.tensor(-0.7, requires_grad=True)
    b = torch.tensor(-1.3, requires_grad=True)
    log_prob = torch.stack([a, b]).view(2, 1)  # (k=2, B=1)
    reward = torch.tensor([[1.0], [3.0]])  # baseline 2, advantages -1 and +1
    loss = reinforce_loss(log_prob, reward)
    torch.testing.assert_close(loss, torch.tensor(-((-1) * -0.7 + 1 * -1.3) / 2))
    loss.backward()
    torch.testing.assert_close(a.grad, torch.tensor(0.5))  # d/da of -(-a + b)/2
    torch.testing.assert_close(b.grad, torch.tensor(-0.5))


def test_reinforce_loss_constant_reward_gives_zero_gradient():
    log_prob = torch.randn(8, 3, generator=gen()).requires_grad_()
    # same reward for all k trajectories of an input
    reward = torch.tensor([[1.0, -2.0, 0.5]]).expand(8, 3)
    reinforce_loss(log_prob, reward).backward()
    assert (log_prob.grad == 0).all()


def test_expected_reward_loss_hand_case():
    # exit distributions [.5, .25, .25] and [1, 0, 0]
    p = torch.tensor([[0.5, 0.5, 0.9], [1.0, 0.0, 0.0]])
    reward = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    # rows: 0.5*1 + 0.25*2 + 0.25*3 = 1.75 and 1*1 = 1 -> -(1.75 + 1) / 2
    torch.testing.assert_close(expected_reward_loss(p, reward), torch.tensor(-1.375))
    torch.testing.assert_close(expected_reward_loss(p[:1], torch.tensor([[4.0, 0.0, -8.0]])),
                               torch.tensor(0.0))


# ---------------------------------------------------------------- rewards

def test_hardness_reward_worked_example():
    r = hardness_reward(torch.tensor(-0.2), torch.tensor(3), torch.tensor(2), 6, 0.1)
    torch.testing.assert_close(r, torch.tensor(-0.4))


@pytest.mark.parametrize("exit_layer", [1, 3, 6])
def test_hardness_reward_hard_input_pays_no_depth_penalty(exit_layer):
    gain = torch.tensor([-0.3, 1.0])
    r = hardness_reward(gain, torch.tensor(exit_layer), torch.tensor([6, 6]), 6, 0.5)
    torch.testing.assert_close(r, gain)


def test_reward_table_hand_case():
    r = reward_table(torch.tensor([[-0.4, -0.1]]), torch.tensor([1]), 0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.65, -0.6]]))
    r = reward_table(torch.tensor([[1.0, 1.0]]), torch.tensor([1]), 0.5)
    torch.testing.assert_close(r, torch.tensor([[0.75, 0.5]]))


def test_reward_table_matches_hardness_reward():
    B, L, alpha = 3, 5, 0.08
    ce = torch.rand(B, L, generator=gen())
    memorized = torch.tensor([1, 3, 5])
    r = reward_table(ce, memorized, alpha)
    for l in range(1, L + 1):
        torch.testing.assert_close(r[:, l - 1], hardness_reward(ce[:, l - 1], torch.tensor(l),
                                                                memorized, L, alpha))


# ----------------------------------------------------------- REINFORCE estimates the exact gradient

def test_reinforce_gradient_points_along_exact_gradient():
    B, L, k = 3, 4, 20000
    logits = torch.randn(B, L, generator=gen(1)).requires_grad_()
    reward = reward_table(torch.rand(B, L, generator=gen(2)) * 2, torch.tensor([1, 2, 4]),
                          alpha=0.3)

    expected_reward_loss(torch.sigmoid(logits), reward).backward()
    exact = logits.grad.clone()
    logits.grad = None

    exits, log_prob = sample_exits(torch.sigmoid(logits), k, generator=gen(3))
    sampled_reward = torch.gather(reward.T, 0, exits - 1)  # (k, B)
    reinforce_loss(log_prob, sampled_reward).backward()
    estimate = logits.grad

    cosine = torch.nn.functional.cosine_similarity(exact.flatten(), estimate.flatten(), dim=0)
    print(f"REINFORCE vs exact gradient: cosine {cosine:.5f}")
    assert cosine >= 0.95, f"cosine {cosine:.4f}"
    assert (estimate[:, -1] == 0).all() and (exact[:, -1] == 0).all()
