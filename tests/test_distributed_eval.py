"""Density under torchrun counts each real evaluation sample once.

accelerate's sharded dataloader (``even_batches=True``, the Trainer's default) evens out the last
round of batches with samples from the start of the set; ``gather_for_metrics`` drops them for
the metrics, and the density meter must drop them too.
"""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from deft.io.models import load_tokenizer
from deft.tasks.glue import load_glue

# 2 ranks × eval batch 4: 3 (fewer samples than one round), 7 (last round padded by one), 8 (even),
# 9 (rank 1's last batch is all padding).
SIZES = (3, 7, 8, 9)
MAX_LENGTH = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_tokens(shared_data, tiny_bert_dir, n: int) -> int:
    """Real tokens of the run's first ``n`` dev sentences, counted without the Trainer."""
    tokenizer = load_tokenizer(tiny_bert_dir, "minilm")
    dev = load_glue("sst2", "dev", data_dir=shared_data, max_samples=n, seed=0)
    assert len(dev) == n
    enc = tokenizer(list(dev["text_a"]), truncation=True, max_length=MAX_LENGTH)
    return sum(sum(mask) for mask in enc["attention_mask"])


def test_torchrun_density_counts_each_eval_sample_once(tiny_bert_dir, shared_data, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not available")
    script = tmp_path / "dist_eval.py"
    script.write_text(
        "import json, os, pathlib\n"
        "import torch.distributed as dist\n"
        "from deft.training import TrainConfig, train\n"
        "out = {}\n"
        f"for n in {SIZES!r}:\n"
        f"    cfg = TrainConfig(model={tiny_bert_dir!r}, tokenizer='minilm', task='sst2', method='lora', "
        f"max_train_samples=16, max_eval_samples=n, batch_size=4, eval_batch_size=4, max_steps=1, "
        f"max_length={MAX_LENGTH}, data_dir={str(shared_data)!r}, seed=0)\n"
        f"    r = train(cfg, pathlib.Path({str(tmp_path)!r}) / f'run{{n}}', progress=False)\n"
        "    out[n] = {'tokens': [row['tokens'] for row in r['density']['per_layer']], "
        "'eval_samples': r['eval_samples'], 'world': dist.get_world_size() if dist.is_initialized() else 1}\n"
        # one file per rank: two processes printing to one pipe is not a reliable channel
        f"pathlib.Path({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.json').write_text(json.dumps(out))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {n: real_tokens(shared_data, tiny_bert_dir, n) for n in SIZES}
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        got = {n: seen[str(n)]["tokens"] for n in SIZES}
        assert all(seen[str(n)]["world"] == 2 and seen[str(n)]["eval_samples"] == n for n in SIZES)
        # two layers, each sees every real token once
        assert got == {n: [expected[n]] * 2 for n in SIZES}, f"rank {rank}: counted {got}, real {expected}"
