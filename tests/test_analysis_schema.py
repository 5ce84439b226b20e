"""The outliers.json schema each statistic declares: it names exactly the keys the analysis writes (checked on the
golden outliers.json, which test_golden.py keeps equal to a fresh analysis), and docs/analysis.md holds it as
analysis.report.schema_markdown() renders it (UPDATE_GOLDEN=1 rewrites that block after a reviewed change)."""

import json
import os

from analysis.report import HEAD_SCHEMA, TAIL_SCHEMA, schema_markdown
from analysis.statistics import REGISTRY
from conftest import REPO_ROOT

GOLDEN_JSON = os.path.join(REPO_ROOT, "tests", "golden", "analysis", "outliers.json")
DOC = os.path.join(REPO_ROOT, "docs", "analysis.md")
BEGIN, END = "<!-- schema: analysis.report.schema_markdown() -->\n", "<!-- end of schema -->\n"


def parts(key):
    """'[].early_stage?' -> ('[]', 'early_stage'), optional: True."""
    optional = key.endswith("?")
    key = key.rstrip("?")
    return tuple(p for p in key.replace("[]", ".[].").split(".") if p), optional


def matches(pattern, path):
    """A '<name>' part stands for any key; '[]' for a list's entries; any other part for itself."""
    return len(pattern) == len(path) and all(p == k or (p.startswith("<") and k != "[]") for p, k in zip(pattern, path))


def paths_in(value, patterns, prefix=()):
    """The key paths of `value` (a statistic's result), followed as deep as some pattern reaches."""
    items = (value.items() if isinstance(value, dict) else [("[]", v) for v in value] if isinstance(value, list)
             else [])
    found = set()
    for key, v in items:
        path = prefix + (key,)
        found.add(path)
        if any(len(p) > len(path) and matches(p[:len(path)], path) for p in patterns):
            found |= paths_in(v, patterns, path)
    return found


def schema_mismatches(name, schema, result):
    declared = [parts(key) for key in schema]
    patterns = [p for p, _ in declared]
    problems = []
    for path in sorted(paths_in(result, patterns)):
        reaches = [p for p in patterns if len(p) >= len(path) and matches(p[:len(path)], path)]
        if not reaches:
            problems.append(f"{name}: {'.'.join(path)} is written but not declared")
    found = paths_in(result, patterns)
    for pattern, optional in declared:
        if not optional and not any(matches(pattern, path) for path in found):
            problems.append(f"{name}: {'.'.join(pattern)} is declared but not written")
    return problems


def test_every_statistic_declares_the_keys_it_writes():
    with open(GOLDEN_JSON, encoding="utf-8") as f:
        doc = json.load(f)
    problems = []
    for name, statistic in REGISTRY.items():
        assert name in doc, f"statistic {name} missing from the golden outliers.json"
        problems += schema_mismatches(name, statistic.schema, doc[name])
    assert problems == []
    # and the document's own keys, in their order around the statistics' ('meta' is masked in the golden copy)
    expected = [k for k in [*HEAD_SCHEMA, *REGISTRY, *TAIL_SCHEMA] if k != "meta"]
    assert list(doc) == expected


def test_schema_check_finds_a_missing_and_an_undeclared_key():
    schema = {"[].a": "x", "[].b?": "y", "<kind>.c": "z"}
    assert schema_mismatches("s", {k: v for k, v in schema.items() if k.startswith("[]")}, [{"a": 1}, {"a": 2, "b": 3}]) == []
    assert schema_mismatches("s", {"[].a": "x"}, [{"a": 1, "z": 2}]) == ["s: [].z is written but not declared"]
    assert schema_mismatches("s", {"<kind>.c": "z"}, {"h": {}}) == ["s: <kind>.c is declared but not written"]


def test_docs_hold_the_generated_schema():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    assert BEGIN in text and END in text, f"{DOC} lacks the schema markers"
    head, rest = text.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    generated = schema_markdown() + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(head + BEGIN + generated + END + tail)
        return
    assert block == generated, "docs/analysis.md's schema is stale: UPDATE_GOLDEN=1 pytest tests/test_analysis_schema.py"
