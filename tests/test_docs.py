"""The documentation: pages with figures agree with the results JSON they come from; README is a short guide.

No torch, no models: these read text files and run docs/generate.py's pure functions (well under a second).
"""

import ast
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def load_generate():
    """docs/generate.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_generate()


@pytest.fixture
def results_copy(tmp_path):
    """Factory: a copy of assets/results (the JSON files only) with one row's field changed."""

    def make(stem: str, match: dict, field: str, value: float) -> Path:
        shutil.copytree(
            ROOT / "assets" / "results",
            tmp_path,
            dirs_exist_ok=True,
            ignore=lambda folder, names: [n for n in names if Path(n).suffix in {".png", ".html", ".csv"}],
        )
        path = tmp_path / f"{stem}.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = [r for r in data["rows"] if all(r[k] == v for k, v in match.items())]
        assert len(rows) == 1, f"{match} matches {len(rows)} rows of {stem}"
        rows[0][field] = value
        path.write_text(json.dumps(data), encoding="utf-8")
        return tmp_path

    return make


# ---------------------------------------------------------------- generated pages


def test_generated_pages_equal_what_the_json_gives_now():
    """docs/results.md and README's headline table are exactly what docs/generate.py writes from the JSON."""
    for page, text in generate.expected_pages().items():
        assert (ROOT / page).read_text(encoding="utf-8") == text, f"{page} is stale; run python docs/generate.py"
    assert generate.stale_pages() == []


def test_a_changed_figure_changes_the_pages(results_copy):
    """Sensitivity: one number changed in a copy of one JSON changes both pages, and --check's test sees it."""
    match = {"method": "clover", "ratio": 0.125}
    original = generate.pick(generate.load(generate.RESULTS, "smollm2_vo_perplexity_uniform")["rows"], **match)
    assert original["ppl_wikitext2"] != 1234.5
    changed = results_copy("smollm2_vo_perplexity_uniform", match, "ppl_wikitext2", 1234.5)

    page, page_changed = generate.render_results(), generate.render_results(changed)
    assert page != page_changed
    assert "1,234.50" in page_changed and "1,234.50" not in page
    assert generate.ppl(original["ppl_wikitext2"]) in page
    headline = generate.render_headline(changed)
    assert "**1,234.50**" in headline and headline != generate.render_headline()
    assert set(generate.stale_pages(ROOT, changed)) == {generate.RESULTS_PAGE, generate.README}


def test_prose_that_the_figures_contradict_stops_generation(results_copy):
    """A hand-written claim ("CLOVER is better at every ratio") is checked against the figures."""
    changed = results_copy("smollm2_vo_perplexity_uniform", {"method": "clover", "ratio": 0.25}, "ppl_wikitext2", 1e6)
    with pytest.raises(generate.StaleProse, match="uniform mode CLOVER is better at every ratio"):
        generate.render_results(changed)


def test_the_template_uses_every_results_file():
    """Each results JSON has a section: its command appears on the page."""
    page = (ROOT / generate.RESULTS_PAGE).read_text(encoding="utf-8")
    files = sorted((ROOT / "assets" / "results").rglob("*.json"))
    assert files, "no results JSON found"
    for path in files:
        command = json.loads(path.read_text(encoding="utf-8"))["meta"]["command"]
        assert command in page, f"{path.relative_to(ROOT)} has no section in docs/results.md"
        assert f"../assets/results/{path.relative_to(ROOT / 'assets' / 'results').with_suffix('.png')}" in page


def test_the_generator_needs_only_the_standard_library():
    tree = ast.parse((ROOT / "docs" / "generate.py").read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported - set(sys.stdlib_module_names)


# ---------------------------------------------------------------- README and links

FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.MULTILINE)}


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_readme_is_a_short_guide():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move details to docs/"
    assert lines[:2] == ["---", "title: CLOVER Studio"], "the Hugging Face Space front matter must stay first"


def test_the_quick_start_block_has_the_two_commands():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = FENCE.search(section)
    assert block, "README's Quick start has no code block"
    assert "make demo" in block.group(0) and "make test" in block.group(0)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(page):
    assert links(page) or page.name == "security.md", f"{page.name}: no links found (is the pattern broken?)"
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.relative_to(ROOT)} links to {target}: no such heading"


def test_link_checker_sees_a_broken_link(tmp_path):
    """Sensitivity of the link check: a missing file and a missing heading are both found."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n[a](missing.md) [b](#title) [c](#nope) `[d](skipped.md)` [e](https://x.org)\n")
    assert links(page) == ["missing.md", "#title", "#nope"]
    assert not (tmp_path / "missing.md").exists()
    assert "title" in anchors(page) and "nope" not in anchors(page)
