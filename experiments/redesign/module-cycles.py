#!/usr/bin/env python3
"""Import cycles between the modules of each crate, level by level.

A module `m` of a crate (a file `src/m.rs` or a folder `src/m/`) depends on
module `n` when any of its files names `crate::n` (in a `use` or a path).
Inside a folder module `src/a/` the same holds for its children: `src/a/m.rs`
or `src/a/m/` depends on its sibling `n` when one of its files names
`crate::a::n`, or `super::n` from a file directly in `src/a/`. Prints each
crate's top-level dependency lists and every cycle at any level (a strongly
connected set of more than one module); exits 1 when there is one.

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


def named(text: str, prefix: str) -> set:
    """The first path components after `prefix` (`crate::`, `super::`)."""
    names = set(re.findall(r"\b" + re.escape(prefix) + r"([a-z_][a-z0-9_]*)", text))
    # `use crate::{a, b::c}`: the braces' first components.
    for group in re.findall(r"\b" + re.escape(prefix) + r"\{([^}]*)\}", text):
        names |= {p.strip().split("::")[0] for p in group.split(",") if p.strip()}
    return names


def graph(src: Path, path: tuple = ()) -> dict:
    """The dependencies between the children of the module at `path`
    (the folder `src/<path>`)."""
    folder = src.joinpath(*path)
    prefix = "crate::" + "".join(f"{p}::" for p in path)
    deps = {}
    for file in sorted(folder.rglob("*.rs")):
        module = top_module(folder, file)
        if module == "mod":
            module = "(root)"
        deps.setdefault(module, set())
        # Comments name modules without depending on them.
        text = re.sub(r"//[^\n]*", "", file.read_text())
        names = named(text, prefix)
        if path and file.parent == folder:
            names |= named(text, "super::")
        for name in names:
            if name != module and ((folder / f"{name}.rs").exists() or (folder / name).is_dir()):
                deps[module].add(name)
    return deps


def folders(src: Path):
    """Every folder module's path, the crate root's `()` first."""
    yield ()
    for d in sorted(p for p in src.rglob("*") if p.is_dir()):
        yield d.relative_to(src).parts


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
        print(f"{crate}:")
        for path in folders(src):
            deps = graph(src, path)
            if not path:
                for module in sorted(deps):
                    print(f"  {module} -> {', '.join(sorted(deps[module])) or '-'}")
            where = "::".join(path) + "::" if path else ""
            for comp in cycles(deps):
                found = True
                print(f"  CYCLE: {' <-> '.join(where + c for c in comp)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
