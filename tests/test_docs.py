"""The README and docs/ hold together: links lead somewhere, commands name what exists, the README stays short."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SPECS = {"METHOD.md", "DESIGN.md"}          # copies of the project's specification, not pages of their own
# Written on another branch of the same issue; checked like any other link once it exists.
PENDING = {ROOT / "notebooks" / "README.md"}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text):
    """The text outside fenced code blocks (a `#` there is a shell comment, not a heading)."""
    return FENCE.sub("", text)


def slug(heading):
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    text = prose(path.read_text())
    found, seen = set(), {}
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        s = slug(h)
        found.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return found | set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))


def links(path):
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_somewhere(page):
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if dest in PENDING and not dest.exists():
            continue
        assert dest.exists(), f"{page.name}: link to {target} leads nowhere"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: {target}: no heading or id '{anchor}' in {dest.name}"


def test_the_readme_is_a_first_visit():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_every_docs_page_is_reachable_and_leads_back():
    readme = set(links(ROOT / "README.md"))
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in {t.partition("#")[0] for t in readme}, f"README does not link {page.name}"
        if page.name not in SPECS:
            head = page.read_text().split("\n\n")[:2]
            assert head[0].startswith("# ") and "](../README.md)" in head[1], \
                f"{page.name}: should open with a title and one line that links back to the README"


def commands(text):
    """Every `python -m X` / `python path.py` in fenced blocks and inline code."""
    code = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)) + "\n" + \
        "\n".join(re.findall(r"`([^`\n]+)`", prose(text)))
    return re.findall(r"\bpython3?\s+(-m\s+[\w.]+|[\w./-]+\.py)\b", code)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_names_something_that_exists(page):
    for cmd in commands(page.read_text()):
        if cmd.startswith("-m"):
            module = cmd.split()[1]
            if module.startswith("stamp_min"):
                assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{page.name}: python {cmd}"
            else:
                assert importlib.util.find_spec(module) is not None, f"{page.name}: python {cmd}"
        else:
            assert (ROOT / cmd).exists(), f"{page.name}: python {cmd}"


def test_the_readme_names_its_commands():
    # the two quickstart commands .ci/run relies on, and a command next to the headline numbers
    found = commands((ROOT / "README.md").read_text())
    for cmd in ("-m stamp_min.fcl_loop", "-m pytest", "bench/claims.py", "bench/flora_compare.py"):
        assert cmd in found, cmd


def test_the_variant_example_is_the_same_in_readme_and_workbench():
    def example(path):
        text = path.read_text()
        start = text.index("```python\n", text.index("Prototype a variant"))
        return text[start:text.index("```\n", start + 10)]
    assert example(ROOT / "README.md") == example(ROOT / "docs" / "workbench.md")
