"""The README and docs/: short README, links that resolve, a node map equal to the registered nodes.

Pure file reading (no ComfyUI): the node ids and display names are read from nodes/*.py with ast.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
NODES = ROOT / "nodes"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_LINK = re.compile(r"""(?:href|src)=["']([^"']+)["']""")
NODE_ROW = re.compile(r"^\|\s*([^|`]+?)\s*\|\s*`(OmniIdentity\w+)`\s*\|", re.M)


def prose(path: Path) -> str:
    """The page without its fenced code blocks (code may hold brackets that are not links)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = prose(path)
    return [*MD_LINK.findall(text), *HTML_LINK.findall(text)]


# ---- the registered nodes, read from the source -------------------------------------------------

def _constant(value: ast.expr, cls: ast.ClassDef, classes: dict[str, ast.ClassDef]):
    """A string keyword of io.Schema: a literal, or a class attribute (``cls.NODE_ID``) of the class or
    a base defined in the same module."""
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return value.value
    if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id == "cls":
        return _class_attribute(cls, value.attr, classes)
    raise AssertionError(f"{cls.name}: cannot read {ast.unparse(value)} without running the code")


def _class_attribute(cls: ast.ClassDef, name: str, classes: dict[str, ast.ClassDef]):
    for statement in cls.body:
        if not isinstance(statement, ast.Assign):
            continue
        for target in statement.targets:
            if isinstance(target, ast.Name) and target.id == name:
                return ast.literal_eval(statement.value)
            if isinstance(target, ast.Tuple) and isinstance(statement.value, ast.Tuple):
                for element, value in zip(target.elts, statement.value.elts):
                    if isinstance(element, ast.Name) and element.id == name:
                        return ast.literal_eval(value)
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            return _class_attribute(classes[base.id], name, classes)
    raise AssertionError(f"{cls.name}: no class attribute {name}")


def _schema(node_class: ast.ClassDef, classes: dict[str, ast.ClassDef], cls: ast.ClassDef | None = None):
    """(node_id, display_name) of ``node_class``; ``define_schema`` may be inherited, ``cls`` is the node."""
    cls = cls or node_class
    for statement in node_class.body:
        if isinstance(statement, ast.FunctionDef) and statement.name == "define_schema":
            for node in ast.walk(statement):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "Schema":
                    keywords = {k.arg: k.value for k in node.keywords}
                    return (_constant(keywords["node_id"], cls, classes),
                            _constant(keywords["display_name"], cls, classes))
    for base in node_class.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            return _schema(classes[base.id], classes, cls)
    raise AssertionError(f"{cls.name}: no define_schema with io.Schema(node_id=..., display_name=...)")


def _list_names(tree: ast.Module, name: str) -> list[ast.expr]:
    for statement in tree.body:
        targets = ([statement.target] if isinstance(statement, ast.AnnAssign) else
                   statement.targets if isinstance(statement, ast.Assign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            assert isinstance(statement.value, ast.List), f"{name} is not a list literal"
            return statement.value.elts
    raise AssertionError(f"no {name} list")


def registered_nodes() -> dict[str, str]:
    """node id -> display name of every node nodes/__init__.py registers (its NODES list)."""
    modules = []
    for element in _list_names(ast.parse((NODES / "__init__.py").read_text()), "NODES"):
        assert isinstance(element, ast.Starred) and isinstance(element.value, ast.Attribute), \
            f"nodes/__init__.py NODES holds {ast.unparse(element)}; expected *module.NODES"
        modules.append(element.value.value.id)
    nodes = {}
    for module in modules:
        tree = ast.parse((NODES / f"{module}.py").read_text())
        classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
        for element in _list_names(tree, "NODES"):
            node_id, display = _schema(classes[element.id], classes)
            assert node_id not in nodes, f"{node_id} registered twice"
            nodes[node_id] = display
    return nodes


# ---- the tests ----------------------------------------------------------------------------------

def test_readme_is_at_most_250_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move detail to docs/"


def test_the_node_source_is_read():
    nodes = registered_nodes()
    assert len(nodes) >= 29, sorted(nodes)
    assert nodes["OmniIdentityFaceMask"] == "Face Mask (OmniIdentity)"
    assert nodes["OmniIdentitySavePivotEncoder"] == "Save Pivot Encoder (OmniIdentity)"


def test_readme_node_map_lists_every_registered_node_with_its_display_name():
    rows = NODE_ROW.findall(prose(README))
    listed = {node_id: display for display, node_id in rows}
    assert len(listed) == len(rows), "a node is listed twice in the README's node map"
    registered = registered_nodes()
    assert sorted(set(registered) - set(listed)) == [], "registered nodes missing from the README's node map"
    assert sorted(set(listed) - set(registered)) == [], "README's node map lists ids the pack does not register"
    wrong = {node_id: (listed[node_id], registered[node_id]) for node_id in registered
             if listed[node_id] != registered[node_id]}
    assert wrong == {}, "display names differ from the code (README, code)"


def test_readme_lists_every_example_workflow():
    text = README.read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "workflows").glob("*.json")) if f"(workflows/{p.name})" not in text]
    assert missing == [], "workflows missing from the README's workflow table"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page):
    broken = []
    for link in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I):          # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        try:
            path.relative_to(ROOT)
        except ValueError:
            broken.append(f"{link} (outside the repository)")
            continue
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {path.relative_to(ROOT)})")
    assert broken == [], "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    for outside in ("../shared", "shared/DESIGN", "DESIGN.md"):
        assert outside not in text, f"{page.name} refers to {outside}"


def test_every_benchmark_figure_names_its_command():
    """docs/benchmarks.md: every section holds the command that printed its figures."""
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert sections
    for section in sections:
        title = section.splitlines()[0]
        assert re.search(r"^```bash\n.*(benchmarks/\w+\.py|\.ci/run)", section, re.M), \
            f"benchmarks.md, section {title!r}: no command"
