"""docs/method.py: the method figure is written, and the numbers it draws (rl.py's) are right."""

import importlib.util
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def doc_script(name):
    """A script of docs/ (docs/NAME.py), imported as a module: docs/ is no package."""
    spec = importlib.util.spec_from_file_location(f"{name}_figure",
                                                  os.path.join(ROOT, "docs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def method():
    return doc_script("method")


def test_draw_writes_a_png(method, tmp_path):
    path = tmp_path / "method.png"
    n = method.draw(str(path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert n == method.numbers()


def test_numbers_by_hand(method):
    n = method.numbers()
    p = [0.05, 0.10, 0.30, 0.60, 0.80, 1.0]
    assert n["L"] == 6 and n["p"] == p and n["alpha"] == 0.08
    # P(exit at l) = p_l * prod_{j<l} (1 - p_j), the last layer always exits
    by_hand = [0.05, 0.95 * 0.10, 0.95 * 0.90 * 0.30, 0.95 * 0.90 * 0.70 * 0.60,
               0.95 * 0.90 * 0.70 * 0.40 * 0.80, 0.95 * 0.90 * 0.70 * 0.40 * 0.20]
    assert n["exit_dist"] == pytest.approx(by_hand, abs=1e-6)
    assert sum(n["exit_dist"]) == pytest.approx(1.0, abs=1e-6)
    # heads 1-2 wrong, 3-6 right: the smallest l with heads l..L all right is 3
    assert n["gain"] == [0, 0, 1, 1, 1, 1]
    assert n["m"] == 3
    # R_t = gain_t - alpha * t * (1 - 3/6) = gain_t - 0.04 t
    assert n["penalty"] == pytest.approx([-0.04 * t for t in range(1, 7)], abs=1e-6)
    assert n["reward"] == pytest.approx([-0.04, -0.08, 0.88, 0.84, 0.80, 0.76], abs=1e-6)
    # seed 2 continues at layers 1-3 and exits at 4: log 0.95 + log 0.9 + log 0.7 + log 0.6
    assert n["exit"] == 4
    assert n["log_prob"] == pytest.approx(math.log(0.95 * 0.9 * 0.7 * 0.6), abs=1e-5)
