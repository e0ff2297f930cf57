from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert "deft compare" in readme[0]
    assert readme[1].endswith("python -m pytest")
    assert readme[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def _first_table(markdown: str) -> list[str]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_results_quote_the_glue_tables_as_the_benchmark_wrote_them():
    # The GLUE numbers in docs/results.md must be the ones `benchmarks/glue_table.py` wrote, row for row.
    readme = (ROOT / "docs" / "results.md").read_text().splitlines()
    for name in ("glue_table.md", "glue_table_lora_3ep.md"):
        table = _first_table((ROOT / "benchmarks" / "results" / name).read_text())
        assert len(table) > 3
        for row in table:
            assert row in readme, f"{name}: docs/results.md lacks {row!r}"


def test_readme_caption_numbers_are_the_benchmark_s():
    # The numbers under the README's picture, read off deployed_density.json.
    import json
    import re

    readme = (ROOT / "README.md").read_text()
    rows = json.loads((ROOT / "benchmarks" / "results" / "deployed_density.json").read_text())["rows"]

    def row(variant, target):
        return next(r for r in rows if r["task"] == "sst2" and r["variant"] == variant and r["target_density"] == target)

    caption = readme[readme.index("![accuracy"):readme.index("## Commands")]
    quoted = re.findall(r"(\d+\.\d+) %", caption)
    want = [row("peft+thresholds", 0.1)["metric"], 100 * row("peft+thresholds", 0.1)["deployed_density"],
            row("peft+thresholds", 1.0)["metric"], row("peft+train_density=0.1", 0.1)["metric"],
            100 * row("peft+train_density=0.1", 0.1)["deployed_density"]]
    assert [float(q) for q in quoted] == [round(w, 2 if w >= 10 else 1) for w in want]


def test_docs_are_in_the_repository_and_linked():
    readme = (ROOT / "README.md").read_text()
    for doc in ("method", "usage", "results", "architecture"):
        assert (ROOT / "docs" / f"{doc}.md").is_file() and f"docs/{doc}.md" in readme
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "METHOD.md" not in path.read_text(), f"{path.name} sends readers to a file outside the repository"
