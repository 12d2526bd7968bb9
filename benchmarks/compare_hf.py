"""One GPU run: the device's limits, our engine, and Hugging Face transformers on the same model.

    python3 benchmarks/compare_hf.py --preset ernie-4.5-0.3b --out result.json

Measures, in this order and on the same device:
  1. copy bandwidth (device-to-device copy, bytes read + written) and the bf16 matmul rate;
  2. ours: decode step time at batch 1 (and its fraction of the copy-bandwidth floor), and the
     offline workload: N requests, input and output lengths uniform in [lo, hi], ignore_eos;
  3. HF transformers: `generate` decode step time at batch 1, and `generate_batch` (continuous
     batching) on a subset of the same workload;
then prints a table with ratios. Every figure is measured here; nothing is copied in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def copy_bandwidth(gib: float = 2.0) -> float:
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    iters = 20
    start = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.nbytes * iters / (time.perf_counter() - start)  # read + write


def matmul_rate(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters = 20
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start)


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        in_len = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        out_len = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        out.append((torch.randint(100, vocab - 100, (in_len,), generator=gen).tolist(), out_len))
    return out


def ours_decode_step(llm, prompt_len: int, steps: int) -> list[float]:
    from ernieserve import SamplingParams

    eng = llm.llm_engine
    eng.add_request("decode-probe", {"prompt_token_ids": list(range(100, 100 + prompt_len))},
                    SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True))
    eng.step()  # prefill
    times = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    return times


def active_weight_bytes(llm) -> int:
    """Bytes a decode step must read (ModelRunner.decode_weight_bytes: routed experts count only
    the k of E a token picks)."""
    return llm.decode_weight_bytes()


def graph_replay_ms(llm) -> dict:
    """GPU time of one decode step replayed from its CUDA graph, without any host work: the
    difference to the engine's step time is what the host adds."""
    graphs = llm.llm_engine.core.runner.graphs
    if graphs is None:
        return {}
    out = {}
    for bs in sorted({1, min(64, graphs.max_bs), graphs.max_bs}):
        if bs not in graphs.graphs:
            continue
        g = graphs.graphs[bs]
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(100):
            g.replay()
        torch.cuda.synchronize()
        out[str(bs)] = (time.perf_counter() - t) / 100 * 1e3
    return out


def ours_offline(llm, reqs) -> dict:
    from ernieserve import SamplingParams

    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    params = [SamplingParams(temperature=1.0, max_tokens=o, ignore_eos=True, seed=i) for i, (_, o) in enumerate(reqs)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(p) for p, _ in reqs)
    return {"elapsed_s": elapsed, "output_tokens": n_out, "output_tok_s": n_out / elapsed,
            "total_tok_s": (n_in + n_out) / elapsed, "requests_s": len(reqs) / elapsed}


def hf_decode_step(model, prompt_len: int, steps: int) -> float:
    ids = torch.arange(100, 100 + prompt_len, device="cuda")[None]
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - t - prefill) / (steps - 1)


def hf_generate_batch(model, reqs) -> dict:
    from transformers import GenerationConfig

    max_out = max(o for _, o in reqs)
    cfg = GenerationConfig(max_new_tokens=max_out, min_new_tokens=max_out, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    # generate_batch has one max_new_tokens for all; we count only each request's own share
    res = model.generate_batch(inputs=[p for p, _ in reqs], generation_config=cfg, progress_bar=False)
    elapsed = time.perf_counter() - start
    n_out = sum(len(r.generated_tokens) for r in res.values())
    return {"elapsed_s": elapsed, "output_tokens": n_out, "output_tok_s": n_out / elapsed, "requests": len(reqs),
            "note": f"every request generates max_new_tokens={max_out}"}


def run_ours(args, ckpt: Path, result: dict) -> list[tuple[list[int], int]]:
    """Our engine's figures into result; returns the workload, for HF to run the same."""
    from ernieserve import LLM

    llm = LLM(model=str(ckpt), dtype="bfloat16", max_model_len=4096, max_num_seqs=256,
              load_format=args.load_format, **json.loads(args.engine_args))
    result["ours_graph_replay_ms"] = graph_replay_ms(llm)
    param_bytes = active_weight_bytes(llm)
    vocab = llm.llm_engine.config.model.vocab_size
    stats = llm.llm_engine.core.step_stats  # where step time goes; None unless ERNIESERVE_STEP_STATS=1
    if stats is not None:
        stats.reset()
    steps = ours_decode_step(llm, 32, 129)
    if stats is not None:
        result["ours_decode_b1_step_stats"] = stats.as_dict()
        print("decode b=1 " + stats.summary(), flush=True)
        stats.reset()
    p50 = statistics.median(steps)
    # a step reads the weights once; the copy rate counts bytes read + written, i.e. HBM traffic
    floor = param_bytes / (result["copy_bandwidth_tb_s"] * 1e12)
    result["ours_decode_b1_ms"] = {"mean": statistics.mean(steps) * 1e3, "p50": p50 * 1e3,
                                   "p99": sorted(steps)[int(0.99 * (len(steps) - 1))] * 1e3}
    result["weight_bytes"] = param_bytes
    result["bandwidth_floor_ms"] = floor * 1e3
    result["ours_decode_b1_fraction_of_floor"] = floor / p50
    print(json.dumps(result), flush=True)
    reqs = workload(args.num_prompts, args.lo, args.hi, vocab, 0)
    result["ours_offline"] = ours_offline(llm, reqs)
    if stats is not None:
        result["ours_offline"]["step_stats"] = stats.as_dict()
        print("offline " + stats.summary(), flush=True)
    print(json.dumps(result), flush=True)
    del llm
    torch.cuda.empty_cache()
    return reqs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ernie-4.5-0.3b")
    ap.add_argument("--checkpoint", default="/tmp/bench-ckpt")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--lo", type=int, default=100)
    ap.add_argument("--hi", type=int, default=1024)
    ap.add_argument("--hf-batch-prompts", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-ours", action="store_true",
                    help="HF only: for models where HF and our engine do not fit in one process's GPU memory")
    ap.add_argument("--engine-args", default="{}", help="JSON of extra LLM() arguments")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                    help="dummy: random weights from config.json alone (for presets too big to write); "
                         "HF then gets a random init of the same config on the GPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["copy_bandwidth_tb_s"] = copy_bandwidth() / 1e12
    result["bf16_matmul_tflops"] = matmul_rate() / 1e12
    print(json.dumps(result), flush=True)

    from ernieserve.checkpoint.dummy import write_dummy_checkpoint

    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").exists():
        write_dummy_checkpoint(args.preset, ckpt, dtype="bfloat16")
    result["preset"] = args.preset
    if not args.skip_ours:
        reqs = run_ours(args, ckpt, result)
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(ckpt))
        vocab = (getattr(cfg, "text_config", None) or cfg).vocab_size
        reqs = workload(args.num_prompts, args.lo, args.hi, vocab, 0)
        result["hf_workload_requests"] = len(reqs)

    if not args.skip_hf:
        from transformers import AutoConfig, AutoModelForCausalLM

        if args.load_format == "dummy":
            with torch.device("cuda"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(ckpt)), dtype=torch.bfloat16).eval()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).cuda().eval()
        with torch.no_grad():  # not inference_mode: generate_batch updates its tensors from a thread
            result["hf_generate_decode_b1_ms"] = hf_decode_step(model, 32, 129) * 1e3
            print(json.dumps(result), flush=True)
            try:
                result["hf_generate_batch"] = hf_generate_batch(model, reqs[: args.hf_batch_prompts])
            except Exception as e:  # report, do not hide: the API moves between transformers versions
                result["hf_generate_batch"] = {"error": repr(e)}
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def print_table(r: dict) -> None:
    print("\n=========== ernieserve vs HF transformers ===========")
    print(f"device: {r['device']}  torch {r['torch']}  {r['date']}  preset {r.get('preset')}")
    print(f"copy bandwidth (read+write): {r['copy_bandwidth_tb_s']:.2f} TB/s; bf16 matmul {r['bf16_matmul_tflops']:.0f} TFLOP/s")
    d = r.get("ours_decode_b1_ms")
    if d is None:
        if "hf_generate_decode_b1_ms" in r:
            print(f"decode b=1, HF generate: {r['hf_generate_decode_b1_ms']:.3f} ms/step")
        hb = r.get("hf_generate_batch") or {}
        print(f"HF generate_batch: {hb.get('output_tok_s', hb)}")
        return
    print(f"decode b=1, ours: p50 {d['p50']:.3f} ms (mean {d['mean']:.3f}, p99 {d['p99']:.3f}); "
          f"floor {r['bandwidth_floor_ms']:.3f} ms -> {100 * r['ours_decode_b1_fraction_of_floor']:.1f}% of bandwidth")
    if r.get("ours_graph_replay_ms"):
        print("decode step GPU time (graph replay alone, ms by batch size): "
              + ", ".join(f"b={k}: {v:.3f}" for k, v in r["ours_graph_replay_ms"].items()))
    if "hf_generate_decode_b1_ms" in r:
        hf = r["hf_generate_decode_b1_ms"]
        print(f"decode b=1, HF generate: {hf:.3f} ms/step -> ours is {hf / d['p50']:.1f}x faster")
    o = r["ours_offline"]
    print(f"offline workload, ours: {o['output_tok_s']:.0f} output tok/s ({o['output_tokens']} tokens, {o['elapsed_s']:.1f} s)")
    hb = r.get("hf_generate_batch")
    if hb and hb.get("output_tok_s"):
        print(f"HF generate_batch ({hb['requests']} requests): {hb['output_tok_s']:.0f} output tok/s "
              f"-> ours/HF = {o['output_tok_s'] / hb['output_tok_s']:.1f}x")
    elif hb:
        print(f"HF generate_batch gave no tokens: {hb.get('error', hb)}")


if __name__ == "__main__":
    sys.exit(main())
