"""Peak host memory while building a model with online quantization, on the CPU.

    python3 benchmarks/load_memory.py CKPT_DIR wint4 [safetensors|dummy]

Builds the model exactly as the engine does (`models/loader.build_model`, streaming the checkpoint
and quantizing each layer as its last tensor arrives) on the CPU in bf16, sampling the process's
anonymous resident memory (what it holds itself, not mapped checkpoint pages) every 50 ms, and
prints the weights held and the peaks. A checkpoint with real weights: write one with
`ernieserve.checkpoint.dummy._write_weights(checkpoint_tensors(get_preset(NAME), "bfloat16"), DIR, seed=0,
max_shard_bytes=None)` into a `make-dummy --preset NAME DIR` folder.
"""

from __future__ import annotations

import resource
import sys
import threading
import time

import torch

from ernieserve.attention.torch_ref import TorchRefBackend
from ernieserve.config import EngineArgs
from ernieserve.models.loader import build_model


def main() -> None:
    ckpt, quant = sys.argv[1], sys.argv[2]
    fmt = sys.argv[3] if len(sys.argv) > 3 else "safetensors"
    kw = dict(model=ckpt, device="cpu", dtype="bfloat16", load_format=fmt, num_gpu_blocks_override=8,
              max_model_len=1024)
    if quant != "none":
        kw["quantization"] = quant
    cfg = EngineArgs(**kw).create_engine_config()
    peak_anon = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    peak_anon[0] = max(peak_anon[0], int(line.split()[1]) / 2**20)  # GiB
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    start = time.time()
    model = build_model(cfg.model, TorchRefBackend(), torch.device("cpu"))
    done.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    held = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"{ckpt} {quant} {fmt}: weights held {held:.2f} GiB; peak anonymous RSS {peak_anon[0]:.2f} GiB; "
          f"peak RSS incl. mapped checkpoint pages {peak:.2f} GiB; built in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
