"""
Draws ConsistentEE on one made-up input: the layer stack with each layer's exit head f_l and
policy pi_l, one trajectory sampled from the policy, the exit probabilities, the memorized layer,
and the hardness reward of exiting at each layer split into its accuracy gain and depth penalty.
Every number comes from rl.py (and cee.memorized_layer) on the fixed input set in numbers().

Run from anywhere: `python docs/method.py` writes docs/method.png.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import cee
import rl

P = [0.05, 0.10, 0.30, 0.60, 0.80, 1.0]  # the policy's exit probability p_l, layers 1..6
PREDS, LABEL = [0, 0, 1, 1, 1, 1], 1  # heads 1-2 wrong, heads 3-6 right
ALPHA, SEED = 0.08, 2
GREEN, RED, ORANGE, GREY = "#2e8b57", "#c0392b", "#e67e22", "#bbbbbb"


def numbers():
    """Everything the figure draws, computed with the repository's functions."""
    p = torch.tensor([P])  # (1, L)
    L = p.shape[1]
    preds, labels = torch.tensor([PREDS]), torch.tensor([LABEL])
    gain = (preds == labels[:, None]).float()  # (1, L) 1 if head l is right
    m = cee.memorized_layer(preds, labels)  # (1,)
    exits, log_prob = rl.sample_exits(p, 1, generator=torch.Generator().manual_seed(SEED))
    layers = torch.arange(1, L + 1)
    return dict(L=L, alpha=ALPHA, seed=SEED, p=P, gain=gain[0].tolist(), m=int(m),
                exit_dist=rl.exit_distribution(p)[0].tolist(),
                penalty=rl.hardness_reward(0.0, layers, m, L, ALPHA).tolist(),  # gain 0 -> penalty
                reward=rl.reward_table(gain, m, ALPHA)[0].tolist(),
                exit=int(exits), log_prob=float(log_prob))


def draw_stack(ax, n):
    L, t, m = n["L"], n["exit"], n["m"]
    ax.set(xlim=(-1.3, 10), ylim=(0.2, L + 0.6))
    ax.axis("off")
    ax.set_title(f"One sampled trajectory (seed {n['seed']})", fontsize=13)
    for l in range(1, L + 1):
        c = GREY if l > t else "black"
        face = "#fde3c8" if l == t else ("#f4f4f4" if l > t else "#dce9f7")
        ax.add_patch(plt.Rectangle((3, l - 0.32), 3, 0.64, fc=face, ec=ORANGE if l == t else c,
                                   lw=2.5 if l == t else 1))
        ax.text(4.5, l, f"layer {l}", ha="center", va="center", fontsize=12, color=c)
        ok = n["gain"][l - 1] == 1
        ax.text(1.3, l, f"$f_{l}$ {'✓' if ok else '✗'}", ha="center", va="center", fontsize=12,
                color=(GREEN if ok else RED) if l <= t else GREY,
                bbox=dict(boxstyle="round", fc="white", ec=c))
        ax.plot([2, 3], [l, l], color=c, lw=1)
        ax.text(7.3, l, f"$\\pi_{l}$", ha="center", va="center", fontsize=12, color=c,
                bbox=dict(boxstyle="round", fc="white", ec=c))
        ax.plot([6, 6.85], [l, l], color=c, lw=1)
        act = "skipped" if l > t else ("EXIT" if l == t else "continue")
        ax.text(8.0, l, act, va="center", fontsize=12, color=ORANGE if l == t else c,
                weight="bold" if l == t else "normal")
        if l < t:
            ax.annotate("", (4.5, l + 0.68), (4.5, l + 0.32), arrowprops=dict(arrowstyle="->"))
    ax.annotate("", (4.5, 0.66), (4.5, 0.25), arrowprops=dict(arrowstyle="->", lw=1.5))
    ax.text(4.2, 0.42, "input x", ha="right", va="center", fontsize=11)
    ax.plot([-0.1, -0.1], [m - 0.35, L + 0.35], color=GREEN, lw=3)
    ax.text(-0.75, (m + L) / 2, f"m = {m}: heads right\nfrom layer {m} on", rotation=90,
            ha="center", va="center", fontsize=11, color=GREEN)


def draw_probs(ax, n):
    y = range(1, n["L"] + 1)
    ax.barh([l + 0.18 for l in y], n["p"], 0.34, color="#9dbbe0", label=r"$p_l = \pi_l(s_l)$")
    ax.barh([l - 0.18 for l in y], n["exit_dist"], 0.34, color="#2c5d8f",
            label=r"$P(\mathrm{exit\ at}\ l)$")
    for l in y:
        ax.text(n["p"][l - 1] + 0.02, l + 0.18, f"{n['p'][l - 1]:.2f}", va="center", fontsize=10)
        ax.text(n["exit_dist"][l - 1] + 0.02, l - 0.18, f"{n['exit_dist'][l - 1]:.3f}",
                va="center", fontsize=10, color="#2c5d8f")
    ax.set(xlim=(0, 1.2), xticks=[0, 0.5, 1])
    ax.set_title(r"$P(\mathrm{exit\ at}\ l) = p_l \cdot \Pi_{j<l}(1 - p_j)$", fontsize=12)


def draw_reward(ax, n):
    y = list(range(1, n["L"] + 1))
    ax.barh(y, n["gain"], 0.55, color=GREEN, label=r"$\mathrm{gain}_t$ = 1 if $f_t$ right")
    ax.barh(y, n["penalty"], 0.55, color=RED,
            label=rf"$-\alpha\,t\,(1 - m/L)$, $\alpha$ = {n['alpha']}, m = {n['m']}, L = {n['L']}")
    ax.plot(n["reward"], y, "kD", ms=6, label="R, the sum")
    for l, g, r in zip(y, n["gain"], n["reward"]):
        ax.text(g + 0.05, l, f"R = {r:+.2f}", va="center", fontsize=10,
                weight="bold" if l == n["exit"] else "normal")
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlim=(-0.3, 1.5), xticks=[0, 0.5, 1])
    ax.set_title(r"$R = \mathrm{gain}_t - \alpha\,t\,(1 - m/L)$", fontsize=12)


def draw(path):
    n = numbers()
    fig, axes = plt.subplots(1, 3, figsize=(10, 4.5), dpi=120,
                             gridspec_kw=dict(width_ratios=[1.45, 1, 1.15]))
    draw_stack(axes[0], n)
    for ax in axes[1:]:
        ax.set(ylim=axes[0].get_ylim(), yticks=range(1, n["L"] + 1))
        ax.set_yticklabels([f"layer {l}" for l in range(1, n["L"] + 1)], fontsize=10)
        ax.get_yticklabels()[n["exit"] - 1].set(color=ORANGE, weight="bold")
        ax.tick_params(labelsize=10)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    draw_probs(axes[1], n)
    draw_reward(axes[2], n)
    fig.suptitle("ConsistentEE on one input: the policy decides at each layer; "
                 "the reward shapes it", fontsize=14)
    (h1, _), (h2, _) = axes[1].get_legend_handles_labels(), axes[2].get_legend_handles_labels()
    handles = h1 + h2[1:] + h2[:1]  # the R marker last
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return n


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "method.png")
    draw(out)
    print("wrote", out)
