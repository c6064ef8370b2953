"""
Reading a run's sweeps: each rule swept over its knob on precomputed outputs, which points to
compare and how sure a difference is, the table train.py prints and the figure it draws. The
points are sweep()'s dicts (name, param, accuracy, agreement, avg_layers, speedup), ConsistentEE's
with alpha, reward and stage (2: a policy of the stage-2 grid on the stage-1 model, 3: the final
model).
"""
import math

import torch

import cee

# -----------------------------------------------------------------------------
# sweeps: each rule at each value of its knob

def grids(L, n_labels, threshold=0.5):
    """The knob values swept for each rule (entropy in units of the uniform entropy log n); the
    policy's thresholds include the run's own, so that its operating point is among them."""
    frac = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    thresholds = {0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, threshold}
    return {"consistentee": sorted(thresholds),
            "static": list(range(1, L + 1)), "patience": list(range(1, L)),
            "entropy": [f * math.log(n_labels) for f in frac],
            "maxprob": [1 - f * (1 - 1 / n_labels) for f in frac]}


def sweep(name, params, logits, labels, p=None):
    """
    Accuracy and mean exit layer of one rule at each of its params, from precomputed layer
    outputs, and the agreement with the model's own full-depth prediction (for a language model:
    would greedy decoding at full depth have picked the same token?).
    logits (B, L, n), labels (B,), p (B, L)
    -> [{"name", "param", "accuracy", "agreement", "avg_layers", "speedup"}]
    """
    preds = logits.argmax(-1)  # (B, L) every head's answer
    return [point(name, v, cee.exit_layers(cee.ExitRule(name, v), logits, p), preds, labels)
            for v in params]


def point(name, param, exits, preds, labels):
    """One rule's figures at one knob value: exits (B,) in 1..L, preds (B, L) every head's answer,
    labels (B,) -> {"name", "param", "accuracy", "agreement", "avg_layers", "speedup"}."""
    answer = preds.gather(1, (exits - 1)[:, None])[:, 0]  # (B,) by the head each input exits at
    avg = exits.float().mean().item()
    return {"name": name, "param": param, "accuracy": (answer == labels).float().mean().item(),
            "agreement": (answer == preds[:, -1]).float().mean().item(),
            "avg_layers": avg, "speedup": preds.size(1) / avg}


def answered(point, logits, y, p=None):
    """Whether each input is answered right at the point's exits.
    logits (B, L, n) every head's output, y (B,), p (B, L) the policy's -> (B,) bool."""
    exits = cee.exit_layers(cee.ExitRule(point["name"], point["param"]), logits, p)  # (B,)
    return logits[torch.arange(len(y)), exits - 1].argmax(-1) == y


# -----------------------------------------------------------------------------
# reading sweeps: the best speed-ups, the front, the fair rival


def best_speedups(methods, full_accuracy):
    """Each method's best speed-up at no accuracy loss, within 1 point of full depth, and with at
    least 90% of its answers the full-depth model's."""
    out = {}
    for name in dict.fromkeys(m["name"] for m in methods):
        pts = [m for m in methods if m["name"] == name]
        out[name] = {regime: max((m["speedup"] for m in pts
                                  if m["accuracy"] >= full_accuracy - tol), default=None)
                     for regime, tol in (("no_loss", 1e-9), ("within_1_point", 0.01))}
        out[name]["agreement_0.9"] = max((m["speedup"] for m in pts if m["agreement"] >= 0.9),
                                         default=None)
    return out


def front(points):
    """
    The points no other point beats on both speed-up and accuracy (the upper-left envelope of a
    trade-off plot), fastest first.
    Example, as (speedup, accuracy): (1, .9), (2, .8), (2, .7), (3, .85) -> (3, .85), (1, .9):
    (2, .8) and (2, .7) are slower than (3, .85) and less accurate.
    """
    out = []
    for m in sorted(points, key=lambda m: (-m["speedup"], -m["accuracy"])):
        if not out or m["accuracy"] > out[-1]["accuracy"]:
            out.append(m)
    return out


def pick(points, full_accuracy, tol=0.01):
    """The fastest point within tol of full depth's accuracy; if there is none, the most
    accurate."""
    close = [m for m in points if m["accuracy"] >= full_accuracy - tol]
    if close:
        return max(close, key=lambda m: (m["speedup"], m["accuracy"]))
    return max(points, key=lambda m: (m["accuracy"], m["speedup"]))


def matched(point, others):
    """The most accurate of others at least as fast as point (None if none is): the fair rival."""
    faster = [m for m in others if m["speedup"] >= point["speedup"] - 1e-9]
    return max(faster, key=lambda m: (m["accuracy"], m["speedup"]), default=None)


# -----------------------------------------------------------------------------
# how sure a difference is


def paired_bootstrap(a, b, n=2000, seed=0):
    """
    Accuracy of a minus accuracy of b on the same inputs, and its 95% interval over n resamplings of
    the inputs (both methods see the same resampled inputs, so what they share cancels).
    a, b (N,) bool, each input answered right -> (difference, low, high).
    """
    g = torch.Generator().manual_seed(seed)
    d = a.float().cpu() - b.float().cpu()  # (N,)
    i = torch.randint(0, len(d), (n, len(d)), generator=g)  # (n, N) resampled inputs
    lo, hi = torch.quantile(d[i].mean(1), torch.tensor([0.025, 0.975])).tolist()
    return d.mean().item(), lo, hi


def rank_correlation(a, b):
    """Spearman's rho: Pearson correlation of the ranks, ties given their mean rank."""
    def ranks(x):
        x = x.cpu().double()
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=torch.double)
        for v in x.unique():  # ties share the mean of their ranks
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return ((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12)).item()


# -----------------------------------------------------------------------------
# the comparisons, the table, the figure


def exits_by_memorized(memorized, exits, L):
    """How hardness steers depth: for each memorized layer m present, the mean exit layer, the
    number of inputs, how many exit at each layer 1..L, and the rank correlation of the two.
    memorized, exits (B,) long in 1..L.
    Example: memorized [1, 1, 3], exits [2, 2, 3], L = 3 -> mean_exit {1: 2.0, 3: 3.0},
             count {1: 2, 3: 1}, histogram {1: [0, 2, 0], 3: [0, 0, 1]}, rank_correlation 1.0"""
    buckets = [m for m in range(1, L + 1) if (memorized == m).any()]
    return {"mean_exit": {m: exits[memorized == m].float().mean().item() for m in buckets},
            "count": {m: int((memorized == m).sum()) for m in buckets},
            "histogram": {m: torch.bincount(exits[memorized == m], minlength=L + 1)[1:].tolist()
                          for m in buckets},
            "rank_correlation": rank_correlation(memorized, exits)}


def groups(methods):
    """Each baseline by name; ConsistentEE as a whole, after stage 3, and each reward's stage-2
    grid."""
    out = []
    for m in methods:
        out.append(m)
        if m["name"] == "consistentee":
            part = "stage3" if m["stage"] == 3 else f"stage2_{m['reward']}"
            out.append({**m, "name": f"consistentee_{part}"})
    return out


def versus_baselines(methods, right, operating, full):
    """
    Paired bootstrap intervals (resampling test inputs) of accuracy differences at matched speed:
    - the operating point (picked on validation), and ConsistentEE's fastest point within 1 point of
      full depth (chosen on test among every policy: it flatters ConsistentEE), each against the
      most accurate baseline point at least as fast;
    - every point of the baselines' front that lies above ConsistentEE's front, against the
      most accurate ConsistentEE point at least as fast.
    right(point) -> (B,) bool: which test inputs the point answers right.
    """
    ours = [m for m in methods if m["name"] == "consistentee"]
    theirs = [m for m in methods if m["name"] != "consistentee"]

    def pair(what, a, b):
        row = {"what": what, "consistentee": brief(a), "baseline": brief(b)}
        if a is not None and b is not None:
            d, lo, hi = paired_bootstrap(right(a), right(b))
            row |= {"difference": d, "interval": [lo, hi]}
        return row

    rows = [pair("operating point", operating, matched(operating, theirs))]
    best = pick(ours, full)
    close = best["accuracy"] >= full - 0.01
    what = "best within 1 point" if close else "most accurate (none within 1 point)"
    rows.append(pair(what + ", chosen on test", best, matched(best, theirs)))
    for b in front(theirs):
        a = matched(b, ours)
        if a is None or b["accuracy"] > a["accuracy"]:
            rows.append(pair("baseline above the front", a, b))
    return rows


def brief(m):
    """A point's name, knobs and figures, for the comparisons."""
    keys = ("name", "param", "alpha", "reward", "stage", "accuracy", "speedup")
    return None if m is None else {k: m[k] for k in keys if k in m}


def interval(d):
    """'+0.004 [-0.008, +0.017]' from {"difference", "interval"}."""
    lo, hi = d["interval"]
    return f"{d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def print_table(r):
    """The report of evaluate_and_report as a table and a few lines."""
    print(f"full depth (stage 1): accuracy {r['full']['accuracy']:.3f} at {r['full']['layers']} "
          f"layers; after stage 3: {r['final_full_depth_accuracy']:.3f}")
    print(f"{'method':<14}{'reward':>8}{'alpha':>7}{'param':>7}{'accuracy':>10}{'agreement':>11}"
          f"{'layers':>8}{'speedup':>9}")
    baselines = [m for m in r["methods"] if m["name"] != "consistentee"]
    stage3 = [m for m in r["methods"] if m.get("stage") == 3]
    grid = [m for m in r["methods"] if m.get("stage") == 2]
    fronts = [m for rew in cee.REWARDS
              for m in front([m for m in grid if m["reward"] == rew])[::-1]]
    seen = set()
    for m in baselines + stage3 + fronts:
        name = m["name"] if m["name"] != "consistentee" else f"cee-stage{m['stage']}"
        point = (name, m.get("reward"), round(m["accuracy"], 4), round(m["avg_layers"], 3))
        if point in seen:  # a knob value that changed nothing: listed in report.json only
            continue
        seen.add(point)
        print(f"{name:<14}{m.get('reward', ''):>8}{m.get('alpha', ''):>7}{m['param']:>7.3g}"
              f"{m['accuracy']:>10.3f}{m['agreement']:>11.3f}{m['avg_layers']:>8.2f}"
              f"{m['speedup']:>8.2f}x")
    print("(cee-stage2 rows: the front of each reward's grid of stage-2 policies on the stage-1 "
          "model)")
    e = r["exit_by_memorized_layer"]
    print(f"mean exit layer by memorized layer ({e['target']}; threshold {e['threshold']}): "
          + ", ".join(f"m={l}: {v:.2f} (n={e['count'][l]})" for l, v in e["mean_exit"].items())
          + f"; rank correlation {e['rank_correlation']:.3f}")
    print("best speed-up at no accuracy loss / within 1 point / agreeing with full depth >= 90%: "
          + ", ".join(f"{k} {v['no_loss'] or 0:.2f}x / {v['within_1_point'] or 0:.2f}x / "
                      f"{v['agreement_0.9'] or 0:.2f}x" for k, v in r["best_speedup"].items()))
    for row in r["versus_baselines"]:
        text = " vs ".join("none" if m is None else f"{m['name']} {m['param']:.3g}: "
                           f"{m['accuracy']:.3f} at {m['speedup']:.2f}x"
                           for m in (row["consistentee"], row["baseline"]))
        if "difference" in row:
            text += "; difference " + interval(row)
        print(f"{row['what']}: {text}")
    if "stage3_vs_control" in r:
        c = r["stage3_vs_control"]
        for name in ("stage3", "control"):
            op = c[name]["operating"]
            heads = " ".join(f"{a:.3f}" for a in c[name]["heads"])
            print(f"{name}: full depth {c[name]['full']:.3f}, heads {heads}; "
                  f"policy {op['accuracy']:.3f} at {op['speedup']:.2f}x")
        print(f"stage 3 minus control: full {interval(c['full_difference'])}, "
              f"operating {interval(c['operating_difference'])}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))


def plot(r, path):
    """Left: accuracy against layer speed-up for every rule, ConsistentEE's fronts as curves.
    Right: where the test inputs of each memorized layer exit at the operating point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    grid = [m for m in r["methods"] if m.get("stage") == 2]
    ax.scatter([m["speedup"] for m in grid], [m["accuracy"] for m in grid], s=4, color="lightgray",
               label="consistentee policies, every alpha")
    curves = {f"consistentee front, reward {rew} (stage 2)":
              front([m for m in grid if m["reward"] == rew]) for rew in cee.REWARDS}
    curves["consistentee after stage 3"] = [m for m in r["methods"] if m.get("stage") == 3]
    for name in ("static", "entropy", "patience", "maxprob"):
        curves[name] = [m for m in r["methods"] if m["name"] == name]
    for name, pts in curves.items():
        xy = sorted((m["speedup"], m["accuracy"]) for m in pts)
        ax.plot(*zip(*xy), marker="o", ms=3, lw=2 if "consistentee" in name else 1, label=name)
    full = r["full"]["accuracy"]
    ax.axhline(full, color="gray", ls="--", lw=0.8, label="full depth")
    near = [m["speedup"] for m in r["methods"] if m["accuracy"] >= full - 0.08]  # curves differ
    ax.set_xlim(0.95, max(near) * 1.05)
    ax.set_ylim(full - 0.08, full + 0.01)
    ax.set_xlabel("layer speed-up (L / mean exit layer)")
    ax.set_ylabel("test accuracy (within 8 points of full depth)")
    ax.legend(fontsize=7, loc="lower left")
    e = r["exit_by_memorized_layer"]
    L, bottom = r["full"]["layers"], [0.0] * len(e["histogram"])
    for t in range(L):  # stacked: the share of each memorized layer's inputs exiting at t + 1
        share = [h[t] / max(sum(h), 1) for h in e["histogram"].values()]
        hx.bar([str(m) for m in e["histogram"]], share, bottom=bottom, label=f"exit {t + 1}",
               color=plt.cm.viridis(t / max(L - 1, 1)))
        bottom = [b + s for b, s in zip(bottom, share)]
    hx.set_xlabel(f"memorized layer (test inputs; rank correlation {e['rank_correlation']:.2f})")
    hx.set_ylabel(f"share exiting at each layer (threshold {e['threshold']})")
    hx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
