#!/usr/bin/env python3
"""Finds import loops between the modules of each crate (issue 11: no loops inside a
crate). Usage: python3 scripts/import-cycles.py [--edges] [CRATE_DIR...] (default:
every workspace member). Exits 1 if some crate has a loop.

A module's imports are the `crate::`, `super::`, `self::` and child-module paths in
its code (comments and its `#[cfg(test)]` tail left out). A path through a
`pub use` re-export counts as an import of the module that defines the item, so a
crate root that only declares and re-exports modules is no hop of a loop. It reads
source text, not the compiler's view: good enough to keep the layering honest.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def members():
    text = open(os.path.join(ROOT, "Cargo.toml")).read()
    m = re.search(r"members\s*=\s*\[([^\]]*)\]", text)
    return [s.strip().strip('"') for s in m.group(1).split(",") if s.strip()]


def modules(src):
    """module path (tuple) -> file, for the library tree under src/ (bins left out)."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        if rel.split(os.sep)[0] in ("bin",):
            continue
        for f in files:
            if not f.endswith(".rs"):
                continue
            parts = [] if rel == "." else rel.split(os.sep)
            name = f[:-3]
            if name == "main" and not parts and "lib.rs" in files:
                # The binary beside a library uses it as another crate would.
                continue
            if name in ("lib", "main") and not parts:
                path = ()
            elif name == "mod":
                path = tuple(parts)
            else:
                path = tuple(parts + [name])
            mods[path] = os.path.join(dirpath, f)
    if () not in mods:
        return {}
    return mods


def code_of(path):
    text = open(path).read()
    # Leave out the unit tests at the end of the file.
    m = re.search(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{", text)
    if m:
        text = text[: m.start()]
    lines = []
    for line in text.splitlines():
        i = line.find("//")
        lines.append(line if i < 0 else line[:i])
    return "\n".join(lines)


def expand(tree):
    """`a::{b, c::{d, e}}` -> [[a, b], [a, c, d], [a, c, e]] (segments, `as` dropped)."""
    tree = tree.strip()
    depth = 0
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                prefix = tree[:i].rstrip(":").strip()
                inner = tree[i + 1 : tree.rindex("}")]
                pre = [s for s in prefix.split("::") if s]
                out = []
                for part in split_top(inner):
                    for tail in expand(part):
                        out.append(pre + tail)
                return out
            depth += 1
    tree = re.sub(r"\s+as\s+\w+$", "", tree)
    return [[s.strip() for s in tree.split("::") if s.strip()]]


def split_top(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


class Crate:
    def __init__(self, src):
        self.mods = modules(src)
        self.code = {m: code_of(f) for m, f in self.mods.items()}
        self.reexports = {m: {} for m in self.mods}
        for m, code in self.code.items():
            for stmt in re.findall(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", code, re.S):
                for segs in expand(stmt):
                    if segs and segs[-1] not in ("*", "self"):
                        self.reexports[m][segs[-1]] = segs

    def children(self, m):
        return {p[-1] for p in self.mods if len(p) == len(m) + 1 and p[: len(m)] == m}

    def resolve(self, base, segs, depth=0):
        """The module a path used in module `base` lands in, or None (not this crate)."""
        if not segs:
            return None
        first, rest = segs[0], segs[1:]
        if first == "crate":
            cur = ()
        elif first == "self":
            cur = base
        elif first == "super":
            cur = base[:-1]
            while rest and rest[0] == "super":
                cur, rest = cur[:-1], rest[1:]
        elif first in self.children(base):
            cur, rest = base + (first,), rest
        else:
            return None
        while rest and cur + (rest[0],) in self.mods:
            cur, rest = cur + (rest[0],), rest[1:]
        if rest and depth < 8 and rest[0] in self.reexports.get(cur, {}):
            target = self.resolve(cur, self.reexports[cur][rest[0]], depth + 1)
            if target is not None:
                return target
        return cur

    def edges(self):
        out = {m: set() for m in self.mods}
        for m, code in self.code.items():
            paths = []
            for stmt in re.findall(r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", code):
                paths.extend(expand(stmt))
            for hit in re.finditer(r"(?<![\w:])((?:crate|super|self)(?:::\w+)+)", code):
                paths.append(hit.group(1).split("::"))
            for child in self.children(m):
                for hit in re.finditer(r"(?<![\w:])(%s(?:::\w+)+)" % re.escape(child), code):
                    paths.append(hit.group(1).split("::"))
            reexported = set(map(tuple, self.reexports[m].values()))
            for segs in paths:
                if tuple(segs) in reexported:
                    continue
                t = self.resolve(m, segs)
                if t is not None and t != m:
                    out[m].add(t)
        return out


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def name(m):
    return "::".join(m) or "(root)"


def main():
    args = sys.argv[1:]
    show = "--edges" in args
    dirs = [a for a in args if a != "--edges"] or members()
    bad = False
    for d in dirs:
        crate = Crate(os.path.join(ROOT, d, "src"))
        if not crate.mods:
            continue
        edges = crate.edges()
        loops = cycles(edges)
        if show:
            print(f"{d}:")
            for m in sorted(edges):
                print(f"  {name(m)} -> {', '.join(sorted(name(t) for t in edges[m])) or '-'}")
        for comp in loops:
            bad = True
            print(f"{d}: import loop: {', '.join(sorted(name(m) for m in comp))}")
    if not bad:
        print("no import loops in: " + " ".join(dirs))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
