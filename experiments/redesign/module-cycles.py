#!/usr/bin/env python3
"""Import cycles between the top-level modules of each library crate.

A module `m` of a crate (a file `src/m.rs` or a folder `src/m/`) depends on
module `n` when any of its files names `crate::n` (in a `use` or a path) or
`super::n` from a file directly under `src/`. Prints each crate's
dependency lists and every cycle (a strongly connected set of more than
one module); exits 1 when there is one.

    python3 experiments/redesign/module-cycles.py [CRATE_DIR ...]
"""
import re
import sys
from pathlib import Path

CRATES = ["melora-kernels", "melora-core", "melora-llama", "melora-cli", "melora-bench"]


def top_module(src: Path, file: Path) -> str:
    rel = file.relative_to(src)
    if len(rel.parts) == 1:
        return rel.stem if rel.stem not in ("lib", "main") else "(root)"
    return rel.parts[0]


def graph(src: Path) -> dict:
    deps = {}
    for file in sorted(src.rglob("*.rs")):
        module = top_module(src, file)
        deps.setdefault(module, set())
        text = file.read_text()
        # Comments and strings name modules without depending on them.
        text = re.sub(r"//[^\n]*", "", text)
        names = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
        # `use crate::{a, b::c}`: the braces' first components.
        for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
            names |= {p.strip().split("::")[0] for p in group.split(",") if p.strip()}
        for name in names:
            if name != module and ((src / f"{name}.rs").exists() or (src / name).is_dir()):
                deps[module].add(name)
    return deps


def cycles(deps: dict) -> list:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in deps.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    crates = sys.argv[1:] or CRATES
    found = False
    for crate in crates:
        src = root / crate / "src"
        deps = graph(src)
        print(f"{crate}:")
        for module in sorted(deps):
            print(f"  {module} -> {', '.join(sorted(deps[module])) or '-'}")
        for comp in cycles(deps):
            found = True
            print(f"  CYCLE: {' <-> '.join(comp)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
