"""report.py: sweeps, which points are compared and how sure a difference is."""
import math

import pytest
import torch

import report
from test_cee import layer_logits


def test_answered_follows_the_rule_exits():
    """Static exit at layer 1: the answers are head 1's, whatever the later heads say."""
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])  # (2, 2, 2)
    y = torch.tensor([1, 1])
    assert report.answered({"name": "static", "param": 1}, logits, y).tolist() == [True, False]
    assert report.answered({"name": "static", "param": 2}, logits, y).tolist() == [False, False]


def test_exits_by_memorized_worked_example():
    got = report.exits_by_memorized(torch.tensor([1, 1, 3]), torch.tensor([2, 2, 3]), 3)
    assert got["mean_exit"] == {1: 2.0, 3: 3.0} and got["count"] == {1: 2, 3: 1}
    assert got["histogram"] == {1: [0, 2, 0], 3: [0, 0, 1]}
    assert got["rank_correlation"] == pytest.approx(1.0)


def test_versus_baselines_pairs_points_at_matched_speed():
    """The operating point and the best point within 1 point each meet the most accurate baseline
    at least as fast; a baseline above ConsistentEE's front meets the front's point at least as
    fast."""
    def point(name, speedup, answers):
        return {"name": name, "param": 0.5, "speedup": speedup,
                "accuracy": sum(answers) / len(answers), "answers": answers}
    ours = [point("consistentee", 1.5, [1, 1, 1, 0]), point("consistentee", 2.0, [1, 1, 0, 0])]
    theirs = [point("maxprob", 1.6, [1, 1, 0, 0]), point("static", 1.2, [1, 1, 1, 1])]
    def right(m):
        return torch.tensor(m["answers"], dtype=torch.bool)
    rows = report.versus_baselines(ours + theirs, right, ours[0], full=0.76)
    what = ["operating point", "best within 1 point, chosen on test", "baseline above the front"]
    assert [r["what"] for r in rows] == what
    assert rows[0]["baseline"]["name"] == "maxprob" and rows[0]["difference"] == pytest.approx(0.25)
    assert rows[1]["consistentee"]["speedup"] == 1.5  # 0.75 is within 1 point of 0.76; 0.5 is not
    assert rows[2]["baseline"]["name"] == "static" and rows[2]["consistentee"]["speedup"] == 1.5
    assert rows[2]["difference"] == pytest.approx(-0.25)
    assert rows[2]["interval"][0] <= -0.25 <= rows[2]["interval"][1]


def test_sweep_reports_accuracy_and_speedup():
    logits = layer_logits([[0.9, 0.9], [0.4, 0.8]])  # input 2: wrong at layer 1, right at layer 2
    pts = report.sweep("static", [1, 2], logits, torch.tensor([1, 1]))
    assert ([(p["accuracy"], p["avg_layers"], p["speedup"]) for p in pts]
            == [(0.5, 1.0, 2.0), (1.0, 2.0, 1.0)])


@pytest.mark.parametrize("a,b,rho", [([1, 2, 3], [1, 2, 3], 1.0), ([1, 2, 3], [3, 2, 1], -1.0),
                                     # ranks [.5 .5 2] vs [0 1 2]
                                     ([1, 1, 2], [1, 2, 3], 1.5 / math.sqrt(3)),
                                     ([4, 4, 4], [1, 2, 3], 0.0)])  # a constant has no rank order
def test_rank_correlation(a, b, rho):
    assert report.rank_correlation(torch.tensor(a), torch.tensor(b)) == pytest.approx(rho)


def test_best_speedups_in_both_regimes():
    pts = [{"name": "x", "accuracy": 0.80, "agreement": 1.0, "speedup": 1.5},
           {"name": "x", "accuracy": 0.795, "agreement": 0.85, "speedup": 2.0},
           {"name": "x", "accuracy": 0.70, "agreement": 0.91, "speedup": 3.0},
           {"name": "y", "accuracy": 0.5, "agreement": 0.5, "speedup": 2.0}]
    assert report.best_speedups(pts, 0.80) == {
        "x": {"no_loss": 1.5, "within_1_point": 2.0, "agreement_0.9": 3.0},
        "y": {"no_loss": None, "within_1_point": None, "agreement_0.9": None}}


def pt(speedup, accuracy, **kw):
    return {"speedup": speedup, "accuracy": accuracy, **kw}


def test_front_keeps_the_upper_left_envelope():
    points = [pt(1, 0.9), pt(2, 0.8), pt(2, 0.7), pt(3, 0.85), pt(3, 0.6)]
    assert [(m["speedup"], m["accuracy"]) for m in report.front(points)] == [(3, 0.85), (1, 0.9)]
    assert report.front([]) == []


def test_pick_is_the_fastest_within_a_point_else_the_most_accurate():
    points = [pt(1.0, 0.866, a=1), pt(1.5, 0.860, a=2), pt(1.8, 0.856, a=3), pt(2.0, 0.850, a=4)]
    assert report.pick(points, 0.866)["a"] == 3  # 0.856 >= 0.866 - 0.01
    assert report.pick(points, 0.9)["a"] == 1  # none within 1 point: the most accurate


def test_matched_is_the_most_accurate_at_least_as_fast():
    others = [pt(1.2, 0.87), pt(1.6, 0.86), pt(1.9, 0.85), pt(2.5, 0.80)]
    assert report.matched(pt(1.5, 0.0), others) == pt(1.6, 0.86)
    assert report.matched(pt(1.6, 0.0), others) == pt(1.6, 0.86)  # equally fast counts
    assert report.matched(pt(3.0, 0.0), others) is None


def test_paired_bootstrap():
    """The difference is exact; its interval covers it, shrinks with more inputs, and is 0 wide when
    both answer alike."""
    a = torch.tensor([True] * 60 + [False] * 40)
    b = torch.tensor([True] * 50 + [False] * 50)
    d, lo, hi = report.paired_bootstrap(a, b)
    # a is right on 10 more inputs, never worse
    assert d == pytest.approx(0.1) and 0 < lo < 0.1 < hi < 0.2
    d, lo, hi = report.paired_bootstrap(a.repeat(10), b.repeat(10))
    assert hi - lo < 0.06
    assert report.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    flip = torch.arange(100) % 2 == 0  # a and b each right on half, never on the same inputs
    d, lo, hi = report.paired_bootstrap(flip, ~flip)
    assert d == 0 and lo < -0.1 and hi > 0.1  # the same accuracy, but much noise
