from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert "deft compare" in readme[0]
    assert readme[1].endswith("python -m pytest")
    assert readme[1] in (ROOT / ".ci" / "run").read_text().splitlines()
