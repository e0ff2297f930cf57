"""PEFT vs DEFT on SQuAD v1.1 (offline by-article split): F1 / EM and density change per stack.

Two profiles, each running ``deft.training.compare`` (finished runs are reused, so an interrupted
benchmark resumes) and writing one JSON file to ``benchmarks/results/``:

* ``minilm`` — MiniLM (``minilm``, extractive span head), LoRA → ``squad_minilm.json``;
* ``gemma`` — Gemma 3 270M (``gemma3-270m``, generative, decoder-only), LoRA →
  ``squad_gemma3_270m.json``: its decoder density change (there is no encoder). Its weights are
  4-bit Q4_K_M GGUF weights de-quantised to float32, not the original checkpoint; the JSON
  says so.

Scores are on ``offline_eval`` (held-out ~20% of the dev *articles*; the model trains on the
other dev articles): they are **not** official SQuAD dev scores, and the JSON carries the
split note. Density is measured during the final evaluation (``generate()`` for Gemma: prompt
plus each generated token once).

    python benchmarks/squad_compare.py --profile minilm [--seeds 0] [--max-train-samples 2000]
        [--max-eval-samples 500] [--epochs 1] [--runs-dir runs/squad_minilm]
    python benchmarks/squad_compare.py --profile gemma [--max-train-samples 200] [--max-eval-samples 50]

Settings not given on the command line come from the profile (see ``PROFILES``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from deft.training import compare
from deft.core.loss import DensityLossConfig
from deft.core.metrics import density_change
from deft.core.sites import STACKS
from deft.training import TrainConfig

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Profile:
    """Default settings of one benchmark profile (each overridable on the command line)."""

    model: str
    output: str
    max_train_samples: int
    max_eval_samples: int
    max_length: int
    batch_size: int
    eval_batch_size: int
    lr: float
    epochs: float = 1.0
    lora_options: dict = field(default_factory=dict)
    note: str = ""


PROFILES = {
    "minilm": Profile(model="minilm", output="squad_minilm.json", max_train_samples=2000, max_eval_samples=500,
                      max_length=384, batch_size=16, eval_batch_size=64, lr=5e-3,
                      lora_options={"include_mlp": True}),
    "gemma": Profile(model="gemma3-270m", output="squad_gemma3_270m.json", max_train_samples=200,
                     max_eval_samples=50, max_length=256, batch_size=8, eval_batch_size=16, lr=2e-4,
                     lora_options={"include_mlp": True},
                     note="Gemma 3 270M weights are 4-bit (Q4_K_M GGUF) quantised copies of the originals, "
                          "de-quantised to float32; results are for that model, not Google's bf16 checkpoint"),
}


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def stack_summary(runs: dict[str, list[dict]]) -> dict:
    """Per stack (encoder / decoder): mean exact and |a| > τ density per mode and their change (eq. 10, %)."""
    out = {}
    for stack in STACKS:
        row = {}
        for kind, get in (("density", lambda d, s: d[s]), ("density_threshold", lambda d, s: d["threshold"][s]),
                          ("union_density", lambda d, s: d["union"][s])):
            peft = _mean([get(r["density"], stack) for r in runs["peft"]])
            deft = _mean([get(r["density"], stack) for r in runs["deft"]])
            row[kind] = {"peft": None if peft is None else 100 * peft, "deft": None if deft is None else 100 * deft,
                         "change": density_change(peft, deft) if peft and deft is not None else None}
        out[stack] = row if row["density"]["peft"] is not None else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="minilm")
    ap.add_argument("--model", default=None, help="override the profile's model")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument("--max-eval-samples", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--eval-batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--lambda-warmup", type=float, default=0.0, help="ramp λ from 0 over this share of the steps")
    ap.add_argument("--lora-options", default=None, metavar="JSON")
    ap.add_argument("--data-dir", default=None, help="default: $DEFT_DATA_DIR, else the hub")
    ap.add_argument("--runs-dir", default=None, help="default: runs/squad_<profile>")
    ap.add_argument("--output", default=None, help="JSON file (default: benchmarks/results/<profile file>)")
    args = ap.parse_args()

    p = PROFILES[args.profile]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    config = TrainConfig(
        task="squad", method="lora", model=pick(args.model, p.model), tokenizer=args.tokenizer,
        method_options=json.loads(args.lora_options) if args.lora_options else dict(p.lora_options),
        density=DensityLossConfig(weight=args.lam, approx="l0", eps=args.eps), lambda_warmup=args.lambda_warmup,
        epochs=pick(args.epochs, p.epochs), max_steps=args.max_steps, learning_rate=pick(args.lr, p.lr),
        batch_size=pick(args.batch_size, p.batch_size), eval_batch_size=pick(args.eval_batch_size, p.eval_batch_size),
        max_length=pick(args.max_length, p.max_length),
        max_train_samples=pick(args.max_train_samples, p.max_train_samples) or None,
        max_eval_samples=pick(args.max_eval_samples, p.max_eval_samples) or None, data_dir=args.data_dir)
    started = time.perf_counter()
    payload = compare(config, args.seeds, Path(args.runs_dir or f"runs/squad_{args.profile}"), progress=False)
    runs, s = payload["runs"], payload["summary"]
    first = runs["deft"][0]
    result = {
        "benchmark": f"squad_{args.profile}", "model": config.model, "method": "lora", "task": "squad",
        "form": first.get("form"), "train_split": first.get("train_split"), "eval_split": first.get("eval_split"),
        "split_note": first.get("split_note"), "model_note": p.note if pick(args.model, p.model) == p.model else "",
        "seeds": args.seeds, "eval_questions": first.get("eval_questions"), "train_features": first["train_samples"],
        "steps": first["steps"],
        "metrics": {m: {k: 100 * _mean([r["metrics"][k] for r in runs[m]]) for k in ("f1", "exact_match")}
                    for m in ("peft", "deft")},
        "metric_delta_f1": s["metric_delta"],
        "density": {m: {k: s[m][k]["mean"] for k in ("density", "density_threshold", "union_density")}
                    for m in ("peft", "deft")},
        "density_change": s["density_change"],
        "stacks": stack_summary(runs),
        "train_seconds": {m: _mean([r["train_seconds"] for r in runs[m]]) for m in ("peft", "deft")},
        "wall_seconds": time.perf_counter() - started,
        "config": config.to_dict(),
        "units": "metrics and densities in %, changes in % (eq. 10), metric_delta in F1 points",
    }
    out = Path(args.output) if args.output else RESULTS / p.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    m, d = result["metrics"], result["density"]
    print(f"SQuAD {result['form']} / {config.model} / LoRA on {result['eval_split']} ({result['split_note']})")
    if result["model_note"]:
        print(f"note: {result['model_note']}")
    print(f"F1 PEFT {m['peft']['f1']:.2f} DEFT {m['deft']['f1']:.2f}; EM PEFT {m['peft']['exact_match']:.2f} "
          f"DEFT {m['deft']['exact_match']:.2f}")
    print(f"density {d['peft']['density']:.2f}% -> {d['deft']['density']:.2f}% "
          f"({result['density_change']['density']:.2f}% change); |a|>tau {d['peft']['density_threshold']:.2f}% -> "
          f"{d['deft']['density_threshold']:.2f}% ({result['density_change']['density_threshold']:.2f}%)")
    for stack, row in result["stacks"].items():
        if row is not None:
            ch = row["density"]["change"], row["density_threshold"]["change"]
            print(f"  {stack}: change {ch[0]:.2f}% exact, {ch[1]:.2f}% at |a|>tau")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
