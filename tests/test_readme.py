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


def test_readme_quotes_the_glue_tables_as_the_benchmark_wrote_them():
    # The README's GLUE numbers must be the ones `benchmarks/glue_table.py` wrote, row for row.
    readme = (ROOT / "README.md").read_text().splitlines()
    for name in ("glue_table.md", "glue_table_lora_3ep.md"):
        table = _first_table((ROOT / "benchmarks" / "results" / name).read_text())
        assert len(table) > 3
        for row in table:
            assert row in readme, f"{name}: README lacks {row!r}"
