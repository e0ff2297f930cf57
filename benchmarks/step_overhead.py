"""Cost of DEFT's capture + density loss on a MiniLM training step, side by side in one run.

Same model, same batch, same optimizer: PEFT steps (task loss only, no hooks) and DEFT steps
(hooks + λ·L_density) are interleaved, so machine noise hits both alike. Prints the ratio of
median step times and of training memory, and writes benchmarks/results/step_overhead.json.

Memory on CPU cannot be read per step side by side (RSS only grows), so the memory ratio is
counted exactly instead: the bytes autograd keeps for backward during the forward (every saved
tensor, once per storage) plus parameters, gradients and AdamW state of the trainable
parameters and the frozen weights — the peak of a training step, up to allocator slack.

    python benchmarks/step_overhead.py [--steps 20] [--batch-size 32] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lib.timing import interleaved_medians

from deft.core.approx import make_approx
from deft.core.capture import ActivationCapture
from deft.core.loss import DensityLossConfig, combine_terms
from deft.methods import get_method
from deft.io.models import load_for_sequence_classification, load_tokenizer
from deft.tasks import load_glue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side (after 3 warm-up steps each)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--method-options", default='{"include_mlp": true}', help="LoRA config (JSON), as in deft train")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_overhead.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    data = load_glue("sst2", "train", data_dir=args.data_dir, max_samples=args.batch_size, seed=0)
    batch = tok(list(data["text_a"]), padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt")
    labels = torch.tensor(list(data["label"]))
    model = load_for_sequence_classification(args.model, 2, tokenizer=tok)
    model = get_method("lora").apply(model, json.loads(args.method_options), task_type="SEQ_CLS")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_cfg = DensityLossConfig()
    capture = ActivationCapture(model, approx=make_approx("l0"))

    def saved_bytes(deft: bool) -> int:
        """Bytes autograd saves for backward in one forward (each storage counted once)."""
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward_loss(deft)
        loss.backward()
        opt.zero_grad(set_to_none=True)
        return sum(seen.values())

    def forward_loss(deft: bool) -> torch.Tensor:
        """The task loss, plus λ·L_density with the hooks on for the DEFT side (the only difference)."""
        if deft:
            capture.attach()
        loss = model(**batch, labels=labels).loss
        if deft:
            loss = loss + combine_terms(capture.pop_terms(), loss_cfg)
            capture.detach()
        return loss

    def step(deft: bool) -> None:
        loss = forward_loss(deft)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    timed = interleaved_medians({"peft": lambda: step(False), "deft": lambda: step(True)}, args.steps, warmup=3)
    times = {k: v["all"] for k, v in timed.items()}
    med = {k: v["median"] for k, v in timed.items()}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    static = params + 3 * trainable  # weights + grads + AdamW's two moments
    saved = {"peft": saved_bytes(False), "deft": saved_bytes(True)}
    memory = {k: static + v for k, v in saved.items()}
    result = {
        "model": args.model, "method_options": json.loads(args.method_options), "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "median_step_seconds": med, "step_time_ratio_deft_over_peft": med["deft"] / med["peft"],
        "saved_for_backward_bytes": saved, "training_memory_bytes": memory,
        "memory_ratio_deft_over_peft": memory["deft"] / memory["peft"],
        "activation_memory_ratio_deft_over_peft": saved["deft"] / saved["peft"],
        "all_step_seconds": times,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"median step: PEFT {med['peft']:.3f}s, DEFT {med['deft']:.3f}s -> ratio {result['step_time_ratio_deft_over_peft']:.3f}")
    print(f"training memory: PEFT {memory['peft'] / 2**20:.1f} MiB, DEFT {memory['deft'] / 2**20:.1f} MiB -> ratio "
          f"{result['memory_ratio_deft_over_peft']:.3f} (saved activations alone: "
          f"{result['activation_memory_ratio_deft_over_peft']:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
