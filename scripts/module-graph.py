#!/usr/bin/env python3
"""The operator crate's import graph, checked against its rooms.

Reads every `.rs` file under `crates/operator/src`, resolves each `use` and
inline `crate::`/`super::`/`self::` path to the module it names, and checks
the rules of docs/architecture.md:

- a room imports only rooms below it (leaves < cache, tenants < offboard <
  nodes, ttl < runtime), never one above or beside it at its own rank;
- no circle between files inside a room.

Test modules count like any other code (an inline `mod tests`'s
`use super::*` names its own file and is skipped). Prints the room arrows and exits
non-zero on a back-up arrow or a circle. `--dot` prints the file graph in
Graphviz form. Written by hand: no packaged tool reads Rust module paths
without compiling the crate (cargo-modules needs rust-analyzer's toolchain).
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "crates" / "operator" / "src"
if "--root" in sys.argv:
    ROOT = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()

# The rank of each room: an arrow may only point to a lower rank (or stay
# inside its own room). Leaves are single files every room may use.
RANK = {
    "error": 0,
    "crd": 0,
    "metrics": 0,
    "telemetry": 0,
    "lease_clock": 0,
    "tasks": 0,
    "pages": 0,
    "test_kit": 0,
    "cache": 1,
    "tenants": 1,
    "offboard": 2,
    "nodes": 3,
    "ttl": 3,
    "runtime": 4,
    "lib": 5,
}


def module_of(path: Path) -> tuple:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


# One pass, so a `//` inside a string (a URL) or a quote inside a comment
# cannot start the wrong thing: raw strings, strings, char literals, comments.
TOKENS = re.compile(
    r'r(#*)".*?"\1|"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])\'|//[^\n]*|/\*.*?\*/',
    flags=re.S,
)


def strip_comments(text: str) -> str:
    """The code without comments, with every string and char literal emptied."""
    return TOKENS.sub(lambda m: "" if m.group(0).startswith("/") else '""', text)


def expand(tree: str) -> list:
    """`a::{b, c::{d, e}}` -> ["a::b", "a::c::d", "a::c::e"]."""
    tree = tree.strip()
    brace = tree.find("{")
    if brace < 0:
        return [tree]
    prefix, inner = tree[:brace], tree[brace + 1 : tree.rindex("}")]
    items, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    out = []
    for item in items:
        if item.strip():
            out.extend(prefix + sub for sub in expand(item))
    return out


def main() -> int:
    files = sorted(ROOT.rglob("*.rs"))
    modules = {module_of(f) for f in files}
    texts = {module_of(f): strip_comments(f.read_text()) for f in files}

    def walk(base: tuple, rest: str) -> tuple:
        """The deepest module `base::rest` names, through re-exports."""
        target = base
        for part in rest.split("::"):
            part = part.split(" as ")[0].strip()
            if target + (part,) in modules:
                target = target + (part,)
            elif part in reexports.get(target, {}):
                return reexports[target][part]
            else:
                break
        return target

    def targets(here: tuple, text: str, public: bool):
        """(path, module) for each path of `here`; `public`: `pub use` only."""
        pattern = r"\bpub\s+use\s+([^;]+);" if public else r"(?<!pub )\buse\s+([^;]+);"
        paths = []
        for stmt in re.findall(pattern, text, flags=re.S):
            paths.extend(expand(re.sub(r"\s+", " ", stmt)))
        if not public:
            paths.extend(re.findall(r"(?<![\w:])((?:crate|super|self)(?:::\w+)+)", text))
        for path in paths:
            path = path.strip()
            if path == "super::*":
                # An inline `mod tests` importing its own file.
                continue
            first = path.split("::")[0].strip()
            if path.startswith("super::"):
                count = len(re.match(r"^(super::)*", path).group(0)) // len("super::")
                yield path, walk(here[: len(here) - count], path[len("super::") * count :])
            elif first in ("crate", "self"):
                yield path, walk(() if first == "crate" else here, path.split("::", 1)[1])
            elif here + (first,) in modules:
                # A child module named without `self::` (`use ports::X`).
                yield path, walk(here, path)

    # A parent's `pub use child::X` is its face, not a dependency: whoever
    # imports `parent::X` depends on `child`. Resolved leaves first.
    reexports = defaultdict(dict)
    for here in sorted(modules, key=len, reverse=True):
        for path, target in targets(here, texts[here], public=True):
            name = path.split("::")[-1].split(" as ")[-1].strip()
            if target != here and name not in ("*", "self"):
                reexports[here][name] = target

    edges = defaultdict(set)
    for here, text in texts.items():
        for _, target in targets(here, text, public=False):
            if target != here and target != ():
                edges[here].add(target)
    if "--dot" in sys.argv:
        print("digraph operator {")
        for src, dsts in sorted(edges.items()):
            for dst in sorted(dsts):
                print(f'  "{"::".join(src)}" -> "{"::".join(dst)}";')
        print("}")
        return 0

    problems = []
    room_arrows = defaultdict(int)
    for src, dsts in edges.items():
        for dst in dsts:
            a, b = room(src), room(dst)
            if a == b:
                continue
            room_arrows[(a, b)] += 1
            # Leaves may use each other, and only each other (the circle
            # check still applies between them).
            leaf_to_leaf = RANK.get(a) == 0 and RANK.get(b) == 0
            if RANK.get(b, 99) >= RANK.get(a, 99) and not leaf_to_leaf:
                problems.append(
                    f"back-up arrow: {'::'.join(src)} -> {'::'.join(dst)} "
                    f"({a} rank {RANK.get(a)} may not import {b} rank {RANK.get(b)})"
                )
    for cycle in circles(edges):
        problems.append("circle: " + " -> ".join("::".join(m) for m in cycle))
    print("room arrows (importer -> imported: file imports):")
    for (a, b), n in sorted(room_arrows.items(), key=lambda kv: (RANK.get(kv[0][0], 99), kv[0])):
        print(f"  {a} -> {b}: {n}")
    print(f"files: {len(files)}, file arrows: {sum(len(d) for d in edges.values())}")
    for problem in problems:
        print("error:", problem)
    if not problems:
        print("no back-up arrow, no circle")
    return 1 if problems else 0


def room(module: tuple) -> str:
    return module[0] if module else "lib"


def circles(edges) -> list:
    """Every strongly connected group of more than one file (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
