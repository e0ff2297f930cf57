"""Run by :func:`deft.deploy.measure.peak_memory_of_export` in a fresh interpreter:
``python -m deft.deploy.peak_memory_child EXPORT_DIR BATCHES_FILE THREADS``; prints one JSON line.

Linux's peak-RSS counter (VmHWM) is reset (writing 5 to /proc/self/clear_refs) after the
imports and again after loading, so the loading's transient copies and the inference pass are
measured apart, each over the process's own baseline.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import time


def kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\s+(\d+)", status.read()).group(1))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(export_dir: str, batches_file: str, threads: int) -> dict:
    import torch
    import transformers

    from deft.deploy.export import load_exported
    from deft.deploy.measure import model_bytes, timed_pass

    torch.set_num_threads(threads)
    batches = torch.load(batches_file)
    # Import everything loading needs before the baseline: transformers imports model code lazily.
    with open(f"{export_dir}/deft_export.json") as f:
        info = json.load(f)
    with torch.device("meta"):
        getattr(transformers, info["architecture"])(transformers.AutoConfig.from_pretrained(export_dir))
    gc.collect()
    reset_peak()
    base = kib("VmRSS")
    start = time.perf_counter()
    model = load_exported(export_dir)
    loaded = time.perf_counter() - start
    gc.collect()
    load_peak, resident = kib("VmHWM"), kib("VmRSS")
    reset_peak()
    timed_pass(model, batches)
    return {"load_seconds": loaded, "load_peak_bytes": 1024 * (load_peak - base),
            "resident_bytes": 1024 * (resident - base), "peak_bytes": 1024 * (kib("VmHWM") - base),
            "param_bytes": model_bytes(model)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
