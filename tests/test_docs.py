"""docs/ against the CLI and against itself: the generated --help blocks are current, every command has
a page, and every relative link of README.md and docs/*.md reaches an existing file (and heading)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def _load_cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", os.path.join(ROOT, "tools", "cli_docs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_docs = _load_cli_docs()


def test_docs_help_blocks_are_current():
    problems = cli_docs.check()
    assert not problems, "docs/ is out of date with the CLI; run `python tools/cli_docs.py`:\n" + "\n".join(problems)


def test_every_command_has_a_page():
    missing = [c for c in cli_docs.commands() if not os.path.exists(os.path.join(DOCS, f"{c}.md"))]
    assert not missing, f"commands without a docs page: {missing}; run `python tools/cli_docs.py` and write them"


@pytest.mark.parametrize("command", [None, "tile"])
def test_rendered_help_is_what_the_cli_prints(command):
    """The tool's rendering is the real `--help` of the installed entry point, in a terminal at least as
    wide as the group's max_content_width (and wider ones print the same)."""
    exe = os.path.join(os.path.dirname(sys.executable), "gigassl-fast")
    if not os.path.exists(exe):
        pytest.skip(f"no gigassl-fast entry point beside {sys.executable} (the package is not installed)")
    args = [exe, *([command] if command else []), "--help"]
    for columns in (cli_docs.COLUMNS, 300):
        env = {**os.environ, "COLUMNS": str(columns)}
        real = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout
        assert real == cli_docs.render_help(command) + "\n"


def test_check_names_a_stale_page(tmp_path, monkeypatch):
    """--check exits 1 and names the page whose block no longer matches; writing fixes it."""
    page = tmp_path / "pack.md"
    page.write_text("# pack\n\n<!-- BEGIN generated: gigassl-fast pack --help -->\n```text\nold\n```\n"
                    "<!-- END generated -->\n", encoding="utf-8")
    monkeypatch.setattr(cli_docs, "DOCS", str(tmp_path))
    monkeypatch.setattr(cli_docs, "ROOT", str(tmp_path.parent))
    problems = cli_docs.check()
    assert any(p.startswith(f"{tmp_path.name}/pack.md: stale") for p in problems)
    assert any("tile.md: missing" in p for p in problems)
    assert cli_docs.main(["--check"]) == 1
    cli_docs.write()
    assert cli_docs.check() == []
    assert cli_docs.render_help("pack") in page.read_text(encoding="utf-8")


# --- links ------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _markdown_files() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as fh:
        text = _FENCE.sub("", fh.read())
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(text):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        anchors.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return anchors


def _links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        text = _CODE.sub("", _FENCE.sub("", fh.read()))
    return _LINK.findall(text)


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_reach_existing_files(page):
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(dest):
            broken.append(f"{target} (no {os.path.relpath(dest, ROOT)})")
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(dest, ROOT)})")
    assert not broken, f"{os.path.relpath(page, ROOT)}: broken links: {broken}"


def test_the_link_checker_finds_links():
    """Guards the checker itself: the README links into docs/, and a heading slug is GitHub's."""
    assert any(t.startswith("docs/") for t in _links(os.path.join(ROOT, "README.md")))
    assert _slug("Tile file `tiles/<slide_id>.h5`") == "tile-file-tilesslide_idh5"
    assert _slug("Where tiles are decoded (`--decode`)") == "where-tiles-are-decoded---decode"
