"""The manual: README.md stays short, every relative link in it and in docs/ leads somewhere, and every
``svp <command>`` the pages name is one the CLI registers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_BYTES = 12 * 1024  # a newcomer reads it whole; the detail lives in docs/
PAGES = [README, REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# A command line's svp: at the start of a code line or span (after a path such as .venv/bin/), or after
# && or |; not a printout's "svp pass, ..." or "demo: svp cIoU".
SVP_COMMAND = re.compile(r"(?:^|&&|\|)\s*(?:\S*/)?svp ([a-z][a-z0-9-]*)(?=\s|$)", re.MULTILINE)


def registered_commands() -> set[str]:
    """The keys of ``jobs.cli.COMMANDS``, read from the source (importing it would import torch)."""
    tree = ast.parse((REPO / "jobs" / "cli.py").read_text())
    for node in ast.walk(tree):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "COMMANDS" and isinstance(node.value, ast.Dict):
            return {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
    raise AssertionError("jobs/cli.py: no COMMANDS dict literal")


def code_of(text: str) -> list[str]:
    """Fenced blocks and inline code spans: where a page names a command."""
    fenced = FENCE.findall(text)
    return fenced + INLINE_CODE.findall(FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(match) for match in re.findall(r"^#+\s+(.*)$", text, re.MULTILINE)}


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


def test_the_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (at most {README_MAX_BYTES})"


def test_the_commands_are_read_from_the_cli():
    assert {"precompute", "train", "eval", "predict", "tiny-sam"} <= registered_commands()


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO)) for page in PAGES])
def test_every_relative_link_leads_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO)) for page in PAGES])
def test_every_svp_command_named_is_a_real_command(page):
    named = {command for code in code_of(page.read_text()) for command in SVP_COMMAND.findall(code)}
    unknown = named - registered_commands()
    assert not unknown, f"{page.relative_to(REPO)} names svp commands the CLI lacks: {sorted(unknown)}"


def test_the_readme_names_every_command_it_tours():
    named = {command for code in code_of(README.read_text()) for command in SVP_COMMAND.findall(code)}
    assert {"synth", "precompute", "train", "eval", "predict", "tiny-sam", "export"} <= named
