"""docs/exits.py: the token-exit figure is written from two of generate.py's JSON reports, and its
layout wraps, breaks and cuts token pieces where it should (no model needed)."""

import os
import struct

import pytest

from test_method_figure import doc_script


@pytest.fixture(scope="module")
def exits():
    return doc_script("exits")


def report(pieces, exits, tokens_per_s):
    return {"text": "".join(pieces), "tokens_text": pieces, "exits": exits,
            "mean_exit_layer": sum(exits) / len(exits), "tokens_per_s": tokens_per_s}


def test_draw_writes_a_png(exits, tmp_path):
    pieces = ["The", " capital", " is", " Paris", ".\n", "It", " costs", " $5", ",", " "
              + "extraordinarily" * 8, "!", "<|im_end|>"]
    policy = report(pieces, [1, 3, 2, 6, 4, 1, 5, 6, 2, 3, 1, 6], 40.0)
    full = report(pieces, [6] * len(pieces), 20.0)
    path = tmp_path / "exits.png"
    exits.draw("What is the capital of France?", policy, full, 6, str(path))
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])  # the IHDR chunk: 10 inches at 110 dpi
    assert width == 1100 and 300 < height < 2000
    assert 10_000 < os.path.getsize(path) < 1_000_000


def test_layout_wraps_breaks_and_cuts(exits):
    cells = exits.layout(["ab", " cd", " efg", "\n", "x", "y" * 9], width=8)
    assert cells == [(0, 0, 0, "ab"), (1, 0, 2, " cd"),      # "ab cd" fits in 8
                     (2, 1, 0, "efg"),                       # " efg" does not: next row, no space
                     (3, 1, 3, "↵"),                         # a newline: a cell, then a new row
                     (4, 2, 0, "x"),
                     (5, 3, 0, "yyyyyyyy"), (5, 4, 0, "y")]  # too long for any row: cut
    assert exits.rows(cells) == ["ab cd", "efg↵", "x", "yyyyyyyy", "y"]
    assert all(c + len(t) <= 8 for _, _, c, t in cells)


def test_layout_keeps_newlines_inside_a_piece(exits):
    assert exits.rows(exits.layout(["a\n\nb", "\tc"])) == ["a↵", "↵", "b    c"]
    assert exits.layout([""]) == [] and exits.rows([]) == [""]
