"""Summarize py-spy collapsed stacks (`bench.py --py-spy DIR` writes them).

    .venv/bin/python simulations/stacks.py DIR/lifecycle-E8-node.txt [--top 25]

Prints the share of samples per layer (the package a sample's innermost frame belongs to),
the functions with the most self time, and the project functions with the most inclusive
time (a function counted once per sample, wherever it is on the stack).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")
PROJECT = ("node/", "consensus/", "protocol/", "cli/", "simulations/")


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for row in path.read_text().splitlines():
        if not row.strip():
            continue
        stack, _, count = row.rpartition(" ")
        frames = []
        for f in stack.split(";"):
            m = _FRAME.match(f)
            frames.append((m["func"], m["file"]) if m else (f, "?"))
        stacks.append((frames, int(count)))
    return stacks


def layer(file: str) -> str:
    for p in PROJECT:
        if file.startswith(p) or f"/{p}" in file:
            return p.rstrip("/")
    if "site-packages/" in file or "/" in file:
        top = file.split("site-packages/")[-1].split("/")[0]
        return top.removesuffix(".py") or "?"
    if file.startswith("<frozen") or file.endswith(".py"):
        return "stdlib"
    return file or "?"


def report(path: Path, top: int) -> str:
    stacks = parse(path)
    total = sum(c for _, c in stacks) or 1
    layers: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, c in stacks:
        func, file = frames[-1]
        layers[layer(file)] += c
        self_time[f"{func} ({file})"] += c
        seen = set()
        for func, file in frames:
            if layer(file) in {p.rstrip("/") for p in PROJECT}:
                key = f"{func} ({file})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += c
    out = [f"{path}: {total} samples"]
    out.append("  by layer (innermost frame):")
    out += [f"    {100 * c / total:5.1f}%  {name}" for name, c in layers.most_common(top)]
    out.append("  self time:")
    out += [f"    {100 * c / total:5.1f}%  {name}" for name, c in self_time.most_common(top)]
    out.append("  project functions, inclusive:")
    out += [f"    {100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    for f in args.files:
        print(report(f, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
