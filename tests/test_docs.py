"""The repository's shape: every link in the README and docs resolves (files and #anchors), the README stays a
landing page, and the import graph has no circles and no arrow from a lower package to a higher one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LAYERS = ("models", "controller", "export", "runtime")  # each may import only those before it
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def test_every_doc_link_resolves():
    bad = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for m in LINK.finditer(text):
            target = m.group(1) or m.group(2)
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, bad
    assert len(PAGES) >= 9


def test_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for page in PAGES[2:]:
        assert f"docs/{page.name}" in text, f"the README's map lacks docs/{page.name}"


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in LAYERS:
            name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            mods[name] = p

    def known(n: str) -> str:
        while n and n not in mods:
            n = n.rsplit(".", 1)[0] if "." in n else ""
        return n

    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                t = known(n)
                if t and t != m:
                    graph[m].add(t)
    return graph


def test_imports_have_no_circles_and_only_go_down():
    graph = import_graph()
    up = sorted((a, b) for a, deps in graph.items() for b in deps
                if LAYERS.index(b.split(".")[0]) > LAYERS.index(a.split(".")[0]))
    assert not up, up
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_embeddable_core_loads_no_tool():
    import subprocess
    import sys

    code = ("import sys; from runtime import Reasoner; "
            "print(sorted(m for m in sys.modules if m.startswith(('runtime.eval', 'runtime.bench', 'runtime.watch', "
            "'runtime.demo', 'runtime.plot', 'runtime.live'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dependency_floors_are_the_real_ones():
    """torch >= 2.5: the GPU int4 packing hands uint8 to aten._convert_weight_to_int4pack, which earlier releases
    refuse; jinja2 >= 3.1.6: the 3.1.x releases before it have published sandbox escapes."""
    import re

    text = (ROOT / "pyproject.toml").read_text()
    deps = text[text.index("dependencies = ["): text.index("]", text.index("dependencies = ["))]
    floors = {name: tuple(int(x) for x in version.split("."))
              for name, version in re.findall(r'"([a-z0-9_-]+)>=([0-9.]+)"', deps)}
    assert floors["torch"] >= (2, 5) and floors["jinja2"] >= (3, 1, 6)
