"""The user-facing docs: the README stays short, every relative link in README.md and docs/*.md reaches an
existing file (and heading), and the tables generated from registries are the registries' output."""

import re
from pathlib import Path

import pytest

import attention_variants
from hf import models as hf_models

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
README_MAX_BYTES = 20_000

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text):
    """The text outside code blocks and code spans: links inside code are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces
    to hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def broken_links(path):
    """'target: why' for each relative link of `path` that does not resolve."""
    broken = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{fragment}")
    return broken


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes; move reference material to docs/"


@pytest.mark.parametrize("path", [README] + DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
    assert not broken_links(path), f"{path.relative_to(REPO)}: broken links: {broken_links(path)}"


def test_link_check_finds_links_and_catches_broken_ones(tmp_path):
    """The checker is not vacuous: the README has links, and planted bad ones are reported, links inside
    code are not."""
    assert len(LINK.findall(prose(README.read_text(encoding="utf-8")))) >= 8
    (tmp_path / "other.md").write_text("# A `code` heading: here\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md) [ok](other.md#a-code-heading-here) [web](https://example.org/x)\n"
                    "[gone](missing.md) [bad anchor](other.md#nope)\n"
                    "`[in code](missing2.md)`\n```\n[in fence](missing3.md)\n```\n", encoding="utf-8")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nope: no heading with anchor #nope"]


def test_docs_family_table_is_the_registry():
    """docs/hf-models.md holds the family table generated from hf.models.FAMILIES (regenerate it with
    `python -c "from hf import models as m; print(m.family_table())"`); every model type has one row."""
    table = hf_models.family_table()
    assert table in (REPO / "docs" / "hf-models.md").read_text(encoding="utf-8"), \
        "docs/hf-models.md's family table differs from hf.models.family_table()"
    rows = [re.findall(r"`([\w.]+)`", line.split(" | ")[0]) for line in table.splitlines()[2:]]
    assert sorted(t for row in rows for t in row) == sorted(hf_models.FAMILIES)
    gemma2 = next(line for line in table.splitlines() if line.startswith("| `gemma2`"))
    assert "`post_attention_layernorm` / `post_feedforward_layernorm`" in gemma2 and "| 1 + weight |" in gemma2


def test_readme_backend_table_lists_every_backend():
    """The backend table is written by hand: one row per name attention_variants.BACKENDS accepts."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| backend | what it is |"):].split("\n\n")[0]
    rows = re.findall(r"^\| `(\w+)`", table, flags=re.M)
    assert sorted(rows) == sorted(attention_variants.BACKENDS)
