"""
Draws one generated reply with each token on a box coloured by its exit layer (green: an early
exit, red: layer L), as CALM (Schuster et al. 2022) shows its token-level exits, and the full-depth
reply below it in grey: which tokens are easy. generate.py runs twice, --exit=policy and
--exit=none (--chat --json); a newline token is drawn as a box holding "↵".

    python docs/exits.py --ckpt=out_smollm2/stage3.pt --prompt="What is the capital of France?" \
        --out=docs/exits.png

--layers=L sets the colour scale's deepest layer (default: the deepest exit of the full run).
"""
import argparse
import json
import os
import subprocess
import sys
import textwrap

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import BoundaryNorm
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import text_to_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, SIZE, INCHES, MARGIN = 88, 12, 10.0, 0.4  # characters a line, font points, figure inches
FONT = FontProperties(family="DejaVu Sans Mono", size=SIZE)
CHAR = text_to_path.get_text_width_height_descent("x" * 40, FONT, False)[0] / 40 / 72  # inches
LINE = 2.0 * SIZE / 72  # inches from one line to the next
STOP = "<|im_end|>"  # the end of a chat reply: generated, not shown


def layout(pieces, width=WIDTH):
    """
    Where each token's text goes: a list of (token index, row, column, text). A newline ends its
    row after a "↵" cell; a piece that does not fit goes to the next row without its leading
    spaces, and one longer than a row is cut, so no row holds more than width characters.
    """
    cells, row, col = [], 0, 0
    for i, piece in enumerate(pieces):
        segments = piece.replace("\t", "    ").split("\n")
        for k, seg in enumerate(segments):
            seg += "↵" if k < len(segments) - 1 else ""
            if col and col + len(seg) > width:
                row, col, seg = row + 1, 0, seg.lstrip(" ")
            while len(seg) > width:
                cells.append((i, row, 0, seg[:width]))
                row, seg = row + 1, seg[width:]
            if seg:
                cells.append((i, row, col, seg))
                col += len(seg)
            if k < len(segments) - 1:
                row, col = row + 1, 0
    return cells


def rows(cells):
    """The text of each row of a layout, spaces where nothing stands."""
    out = [""] * (max((r for _, r, _, _ in cells), default=0) + 1)
    for _, r, c, text in cells:
        out[r] = out[r].ljust(c) + text
    return out


def draw(prompt, policy, full, L, path):
    """One PNG at path: the prompt, policy's tokens coloured by exit layer (1..L), full depth's."""
    pieces, exits = policy["tokens_text"], policy["exits"]
    if pieces and pieces[-1] == STOP:
        pieces, exits = pieces[:-1], exits[:-1]
    cells, title = layout(pieces), textwrap.wrap(f"Prompt: {prompt}", WIDTH) or ["Prompt:"]
    grey = rows(layout([p for p in full["tokens_text"] if p != STOP]))
    n = len(rows(cells)) if cells else 0
    height = 2 * MARGIN + LINE * (len(title) + n + len(grey) + 5.5)
    fig = plt.figure(figsize=(INCHES, height), dpi=110)
    ax = fig.add_axes([0, 0, 1, 1], xlim=(0, INCHES), ylim=(height, 0))
    ax.axis("off")
    cmap, norm = plt.get_cmap("RdYlGn_r", L), BoundaryNorm([l + 0.5 for l in range(L + 1)], L)
    y = MARGIN + LINE / 2

    def line(text, **kw):
        nonlocal y
        ax.text(MARGIN, y, text, va="center", fontproperties=FONT, parse_math=False, **kw)
        y += LINE
    for t in title:
        line(t, weight="bold")
    line("ConsistentEE exits (--exit=policy), each token on its exit layer's colour:", color="#444")
    for i, r, c, text in cells:
        rgb = cmap(norm(exits[i]))
        dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
        ax.add_patch(plt.Rectangle((MARGIN + c * CHAR, y + r * LINE - 0.42 * LINE),
                                   len(text) * CHAR, 0.84 * LINE, fc=rgb, ec="white", lw=1))
        ax.text(MARGIN + c * CHAR, y + r * LINE, text, va="center", fontproperties=FONT,
                parse_math=False, color="white" if dark else "black")
    y += n * LINE
    speed = policy["tokens_per_s"] / max(full["tokens_per_s"], 1e-9)
    line(f"mean exit layer {policy['mean_exit_layer']:.2f} of {L}, "
         f"{policy['tokens_per_s']:.1f} tokens/s ({speed:.2f}x full depth)")
    bar = fig.add_axes([MARGIN / INCHES, 1 - (y + 0.25 * LINE) / height, 0.5, 0.4 * LINE / height])
    cb = fig.colorbar(plt.cm.ScalarMappable(norm, cmap), cax=bar, orientation="horizontal",
                      ticks=range(1, L + 1, max(1, L // 12)))
    cb.set_label("exit layer", fontproperties=FONT)
    y += 2.5 * LINE
    line(f"full depth (--exit=none, every token at layer {L}): "
         f"{full['tokens_per_s']:.1f} tokens/s", color="#444")
    for text in grey:
        line(text, color="#888888")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args, mode):
    """generate.py's JSON report for one --exit mode."""
    cmd = [sys.executable, "generate.py", f"--ckpt={args.ckpt}", f"--prompt={args.prompt}",
           f"--exit={mode}", "--chat", "--json", f"--max_new_tokens={args.max_new_tokens}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"docs/exits.py: generate.py --exit={mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "exits.png"))
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--layers", type=int, default=0, help="L (default: the full run's deepest)")
    a = p.parse_args()
    policy, full = run(a, "policy"), run(a, "none")
    draw(a.prompt, policy, full, a.layers or max(full["exits"]), a.out)
    print(f"wrote {a.out}")
