"""The ``--help`` blocks of docs/: rendered from the CLI itself, so the pages cannot drift from it.

Each stage page ``docs/<command>.md`` holds its command's help between two markers::

    <!-- BEGIN generated: gigassl-fast <command> --help -->
    ```text
    ...exactly what `gigassl-fast <command> --help` prints...
    ```
    <!-- END generated -->

(``<!-- BEGIN generated: gigassl-fast --help -->`` holds the group's own help.) The text is rendered
through click's API for a terminal of ``COLUMNS`` columns (the group's ``max_content_width``), which is
what ``gigassl-fast <command> --help`` prints in any terminal at least that wide.

    python tools/cli_docs.py            # rewrite every generated block (and add a stub page for a new command)
    python tools/cli_docs.py --check    # exit 1 naming the stale or missing pages

tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PROG = "gigassl-fast"
#: The terminal the help is rendered for: as wide as the group's max_content_width, so that any wider
#: terminal prints the same text.
COLUMNS = 110

_BLOCK = re.compile(
    r"(?P<begin><!-- BEGIN generated: gigassl-fast(?P<cmd>(?: [\w-]+)?) --help -->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- END generated -->)",
    re.DOTALL,
)


def _cli() -> click.Group:
    try:
        from gigassl_fast.cli import cli
    except ImportError:  # run from a checkout without the package installed
        sys.path.insert(0, os.path.join(ROOT, "python"))
        from gigassl_fast.cli import cli
    return cli


def commands() -> list[str]:
    """Every command of the CLI, sorted (hidden ones included: they need a page too if they exist)."""
    return sorted(_cli().commands)


def render_help(command: str | None = None) -> str:
    """What ``gigassl-fast [command] --help`` prints in a terminal of ``COLUMNS`` (or more) columns, without
    the final newline."""
    cli = _cli()
    # click's formatter, given no width, takes min(terminal columns, max_content_width) - 2; given one, uses it.
    width = max(min(COLUMNS, cli.context_settings.get("max_content_width", 80)) - 2, 50)
    settings = {**cli.context_settings, "terminal_width": width}
    with click.Context(cli, info_name=PROG, **settings) as ctx:
        if command is None:
            return ctx.get_help()
        sub = cli.commands[command]
        with click.Context(sub, info_name=command, parent=ctx, **sub.context_settings) as sub_ctx:
            return sub_ctx.get_help()


def block_body(command: str | None) -> str:
    return "```text\n" + render_help(command) + "\n```\n"


def page_path(command: str) -> str:
    return os.path.join(DOCS, f"{command}.md")


def _pages() -> list[str]:
    if not os.path.isdir(DOCS):
        return []
    return sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))


def _refresh(text: str, known: set[str]) -> tuple[str, list[str]]:
    """`text` with every generated block re-rendered, and the problems found (unknown commands)."""
    problems: list[str] = []

    def sub(m: re.Match) -> str:
        cmd = m.group("cmd").strip() or None
        if cmd is not None and cmd not in known:
            problems.append(f"a generated block for `{PROG} {cmd}`, which is not a command")
            return m.group(0)
        return m.group("begin") + block_body(cmd) + m.group("end")

    return _BLOCK.sub(sub, text), problems


def _stub(command: str) -> str:
    return (f"# `{PROG} {command}`\n\n{_first_line(command)}\n\n## Options\n\n"
            f"<!-- BEGIN generated: {PROG} {command} --help -->\n{block_body(command)}<!-- END generated -->\n")


def _first_line(command: str) -> str:
    return _cli().commands[command].get_short_help_str(limit=200)


def check() -> list[str]:
    """Problems of docs/, one line each: pages whose generated blocks are stale, commands without a page
    or without a block in their page, blocks for commands that do not exist. Empty when all is well."""
    known = set(commands())
    problems = []
    for command in sorted(known):
        path = page_path(command)
        if not os.path.exists(path):
            problems.append(f"docs/{command}.md: missing (every command has a page)")
            continue
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if not any(m.group("cmd").strip() == command for m in _BLOCK.finditer(text)):
            problems.append(f"docs/{command}.md: no generated block for `{PROG} {command} --help`")
    for path in _pages():
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        fresh, bad = _refresh(text, known)
        rel = os.path.relpath(path, ROOT)
        problems += [f"{rel}: {b}" for b in bad]
        if fresh != text:
            problems.append(f"{rel}: stale --help block (the CLI's help changed)")
    return problems


def write() -> list[str]:
    """Rewrites every generated block in docs/*.md and adds a stub page for a command without one.
    Returns the files changed, and raises SystemExit on a block naming an unknown command."""
    known = set(commands())
    os.makedirs(DOCS, exist_ok=True)
    changed = []
    for command in sorted(known):
        path = page_path(command)
        if not os.path.exists(path):
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(_stub(command))
            changed.append(os.path.relpath(path, ROOT) + " (new stub page: write its prose)")
    for path in _pages():
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        fresh, bad = _refresh(text, known)
        if bad:
            raise SystemExit("\n".join(f"{os.path.relpath(path, ROOT)}: {b}" for b in bad))
        if fresh != text:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(fresh)
            changed.append(os.path.relpath(path, ROOT))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="check the pages instead of rewriting them")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        if problems:
            print("docs/ is out of date with the CLI:", *(f"  {p}" for p in problems),
                  "Run `python tools/cli_docs.py` to regenerate the --help blocks (and write a page for a new "
                  "command).", sep="\n", file=sys.stderr)
            return 1
        print(f"docs/: the --help blocks of {len(commands())} commands are up to date")
        return 0
    changed = write()
    print("\n".join(f"rewrote {c}" for c in changed) if changed else "docs/: nothing to change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
