#!/usr/bin/env python3
"""Summarise py-spy raw (collapsed-stack) output: where the server's samples go.

    .venv/bin/python benchmarks/profile_summary.py PROFILE.txt [--top 25] [--filter collab_server]

Prints the share of samples per function, "self" (the frame on top of the stack) and "inclusive"
(anywhere on the stack), skipping idle samples (the event loop waiting in select/epoll).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

IDLE = re.compile(r"\b(select|poll|epoll_wait|_run_once \(asyncio/base_events|run_forever)\b")


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py:123)"
    m = re.match(r"(.*) \((.*?)(?::(\d+))?\)$", frame)
    if not m:
        return frame
    func, path, line = m.groups()
    parts = path.split("/")
    where = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{func} ({where}{':' + line if line else ''})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--filter", default="", help="only count inclusive frames whose text contains this")
    args = parser.parse_args()
    stacks = parse(args.profile)
    total = sum(c for _, c in stacks)
    busy = [(s, c) for s, c in stacks if not IDLE.search(s[-1])]
    busy_total = sum(c for _, c in busy)
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    for stack, count in busy:
        # py-spy line numbers differ per sample; strip them for aggregation by function
        frames = [re.sub(r":\d+\)$", ")", short(f)) for f in stack]
        self_c[frames[-1]] += count
        for f in set(frames):
            if args.filter in f:
                incl_c[f] += count
    print(f"{args.profile}: {total} samples, {busy_total} busy ({busy_total / max(total, 1):.0%})")
    print(f"\nself (top of stack), % of busy samples:")
    for f, c in self_c.most_common(args.top):
        print(f"  {c / busy_total:6.1%}  {f}")
    print(f"\ninclusive, % of busy samples:")
    for f, c in incl_c.most_common(args.top):
        print(f"  {c / busy_total:6.1%}  {f}")


if __name__ == "__main__":
    main()
