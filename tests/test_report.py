"""report.py: which points are compared, and a point's per-input answers."""
import pytest
import torch

import report


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
