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

    def row(variant, target, epochs=1.0):
        # The README quotes the main job's 2,000 examples, for one epoch (63 steps) or three (189).
        return next(r for r in rows if r["task"] == "sst2" and r["variant"] == variant and r["target_density"] == target
                    and r.get("epochs") == epochs and r.get("max_train_samples") == 2000
                    and not r.get("holdout_samples"))

    caption = readme[readme.index("![accuracy"):readme.index("## Commands")]
    quoted = re.findall(r"(\d+\.\d+) %", caption)
    want = [row("peft+thresholds", 0.1)["metric"], 100 * row("peft+thresholds", 0.1)["deployed_density"],
            row("peft+thresholds", 1.0)["metric"], row("peft+train_density=0.1", 0.1)["metric"],
            100 * row("peft+train_density=0.1", 0.1)["deployed_density"],
            row("peft+train_density=0.1", 0.1, 3.0)["metric"], 100 * row("peft+train_density=0.1", 0.1, 3.0)["deployed_density"],
            row("peft+thresholds", 1.0, 3.0)["metric"]]
    assert [float(q) for q in quoted] == [round(w, 2 if w >= 10 else 1) for w in want]


def test_docs_are_in_the_repository_and_linked():
    readme = (ROOT / "README.md").read_text()
    for doc in ("method", "usage", "results", "architecture"):
        assert (ROOT / "docs" / f"{doc}.md").is_file() and f"docs/{doc}.md" in readme
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "METHOD.md" not in path.read_text(), f"{path.name} sends readers to a file outside the repository"


def test_deployed_density_summary_is_the_average_of_its_rows():
    # The headline (≥ 50 % deployed-density change within 0.5 point) recomputed from the rows by hand:
    # eq. 10 per task against the dense PEFT row of the same task and budget, tasks that learned only.
    import json

    payload = json.loads((ROOT / "benchmarks" / "results" / "deployed_density.json").read_text())
    rows, budgets = payload["rows"], payload["budgets"]

    def at_budget(r, budgets):
        want = budgets[r["task"]]
        return all(r.get(k) == v for k, v in want.items()) and r.get("learning_rate") == want.get("learning_rate") \
            and r.get("holdout_samples", 0) == want.get("holdout_samples", 0)

    def by_hand(entry, seed):
        changes, deltas = [], []
        for task in entry["tasks"]:
            mine = [r for r in rows if r["task"] == task and r["model"] == "minilm" and r.get("seed", 0) == seed
                    and at_budget(r, entry.get("budgets", budgets))]
            dense = next(r for r in mine if r["variant"] == "peft+thresholds" and r["target_density"] == 1.0)
            row = next(r for r in mine if r["variant"] == entry["variant"] and r["target_density"] == entry["target_density"])
            assert row["learned"] and dense["learned"]
            changes.append(1 - row["deployed_density"] / dense["deployed_density"])
            deltas.append(row["metric"] - dense["metric"])
        return sum(changes) / len(changes), sum(deltas) / len(deltas)

    assert payload["summary"], "no summary entry"
    assert any("per_seed" in e for e in payload["summary"]), "no mean-of-seeds entry (docs/results.md quotes one)"
    for entry in payload["summary"]:
        if "per_seed" in entry:  # the mean over seeds: each seed against its own dense PEFT run
            seeds = [p["seed"] for p in entry["per_seed"]]
            assert seeds == entry["seed"] and len(seeds) >= 2
            each = [by_hand(entry, seed) for seed in seeds]
            for p, (change, delta) in zip(entry["per_seed"], each):
                assert abs(p["avg_density_change"] - change) < 1e-9 and abs(p["avg_metric_delta"] - delta) < 1e-9
            change, delta = (sum(v[i] for v in each) / len(each) for i in (0, 1))
        else:
            change, delta = by_hand(entry, entry.get("seed", 0))
        assert abs(entry["avg_density_change"] - change) < 1e-9
        assert abs(entry["avg_metric_delta"] - delta) < 1e-9
        assert entry["meets_target"] == (entry["avg_density_change"] >= 0.5 and entry["avg_metric_delta"] >= -0.5)


def test_deployed_density_selection_is_chosen_on_heldout_rows_only():
    # Each task's operating point recomputed by hand: among the task's rows at the entry's budget,
    # those within the tolerance of dense PEFT on the held-out examples, the lowest held-out density;
    # then the dev numbers of that row, eq. 10 against dense PEFT's dev row, averaged.
    import json

    payload = json.loads((ROOT / "benchmarks" / "results" / "deployed_density.json").read_text())
    assert payload["selection"], "no held-out selection entry"
    for entry in payload["selection"]:
        changes, deltas = [], []
        for task, chosen in entry["tasks"].items():
            want = entry["budgets"][task]
            mine = [r for r in payload["rows"] if r["task"] == task and r["model"] == "minilm" and r["learned"]
                    and r.get("seed", 0) == 0 and r.get("holdout_samples", 0) == want["holdout_samples"] and r["epochs"] == want["epochs"]
                    and r["max_train_samples"] == want["max_train_samples"]
                    and r.get("learning_rate") == want.get("learning_rate")]
            dense = next(r for r in mine if r["variant"] == "peft+thresholds" and r["target_density"] == 1.0)
            best = None
            common = set.intersection(*({r["variant"] for r in payload["rows"] if r["task"] == t and r["model"] == "minilm"
                                         and r.get("seed", 0) == 0 and r.get("holdout_samples", 0) == want["holdout_samples"]}
                                        for t in entry["tasks"]))
            assert set(entry["candidate_variants"]) == common
            for r in mine:  # a plain loop over the rows, not the benchmark's min()
                if r["variant"] not in common or r["heldout_metric"] < dense["heldout_metric"] - entry["tolerance"]:
                    continue
                if best is None or r["heldout_deployed_density"] < best["heldout_deployed_density"] or (
                        r["heldout_deployed_density"] == best["heldout_deployed_density"]
                        and r["heldout_metric"] > best["heldout_metric"]):
                    best = r
            assert (chosen["variant"], chosen["target_density"]) == (best["variant"], best["target_density"])
            assert chosen["metric"] == best["metric"] and chosen["deployed_density"] == best["deployed_density"]
            changes.append(1 - best["deployed_density"] / dense["deployed_density"])
            deltas.append(best["metric"] - dense["metric"])
        assert abs(entry["avg_density_change"] - sum(changes) / len(changes)) < 1e-9
        assert abs(entry["avg_metric_delta"] - sum(deltas) / len(deltas)) < 1e-9
        assert entry["meets_target"] == (entry["avg_density_change"] >= 0.5 and entry["avg_metric_delta"] >= -0.5)


def test_readme_shrink_numbers_are_the_benchmark_s():
    import json
    import re

    readme = (ROOT / "README.md").read_text()
    shrink = json.loads((ROOT / "benchmarks" / "results" / "shrink.json").read_text())
    batch32 = next(r for r in shrink["rows"] if r["batch_size"] == 32 and not r.get("compiled"))
    removed, faster = re.search(r"removes (\d+) % of the MLP neurons and the smaller dense model runs (\d+\.\d+)×",
                                readme.replace("\n", " ")).groups()
    assert int(removed) == round(100 * batch32["neurons_removed_share"])
    assert float(faster) == round(batch32["throughput_ratio"], 1)
