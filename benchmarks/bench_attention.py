"""Decode attention on the GPU: Triton split-K kernel vs torch references vs the bytes-read floor.

    python benchmarks/bench_attention.py                      # ERNIE-4.5-0.3B layout, 1k context
    python benchmarks/bench_attention.py --context 8192 --batch-sizes 1,8,64
    # what a captured decode graph runs (splits fixed for the longest context) against fewer splits:
    python benchmarks/bench_attention.py --context 190,1024,8192 --batch-sizes 1,8 --splits graph,policy,1 --skip-ref

Per batch size it times one layer's decode attention (the K/V store excluded) and prints a
markdown table:
  - triton (graph): the decode kernels replayed from a CUDA graph, as the runner runs them;
  - triton (eager): the same launched from Python, launch overhead included;
  - torch gather+SDPA: gather every request's blocks into a dense tensor, then one batched SDPA;
  - torch ref: the per-request oracle `paged_attention_ref` (a host loop; the CPU-serving path);
  - floor: bytes that must be read (K and V of every context token, plus q and out) divided by
    the measured device-to-device copy bandwidth (or --peak-gbs).
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from ernieserve.attention.base import AttentionMetadata
from ernieserve.attention.torch_ref import paged_attention_ref
from ernieserve.kernels.paged_attention import choose_num_splits, paged_attention_decode

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(slots=True)
class DecodeBatch:
    query: torch.Tensor  # [batch, heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor
    seq_lens: torch.Tensor  # [batch] int32
    block_tables: torch.Tensor  # [batch, blocks_per_req] int32
    meta: AttentionMetadata


def make_batch(batch: int, context: int, args: argparse.Namespace) -> DecodeBatch:
    dtype = DTYPES[args.dtype]
    blocks_per_req = -(-context // args.block_size)
    num_blocks = batch * blocks_per_req
    # shuffled block ids, as a long-running server's free list hands them out
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_req)
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, device="cuda", dtype=dtype)
    v_cache = torch.randn(shape, device="cuda", dtype=dtype)
    query = torch.randn(batch, args.heads, args.head_dim, device="cuda", dtype=dtype)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(
        num_reqs=batch, num_tokens=batch, max_query_len=1, max_seq_len=context,
        query_start_loc=qsl, seq_lens=seq_lens, block_tables=block_tables,
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device="cuda"),
        query_start_loc_cpu=qsl.cpu(), seq_lens_cpu=seq_lens.cpu(), is_decode_only=True,
    )
    return DecodeBatch(query, k_cache, v_cache, seq_lens, block_tables, meta)


def gather_sdpa(b: DecodeBatch, scale: float, context: int) -> torch.Tensor:
    """Dense torch baseline: [batch, ctx, kv_heads, d] gathers, then one GQA SDPA call."""
    batch = b.query.shape[0]
    k = b.k_cache[b.block_tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)  # [B, kvh, ctx, d]
    v = b.v_cache[b.block_tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)
    q = b.query.view(batch, -1, 1, b.query.shape[-1])  # [B, heads, 1, d]
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def copy_bandwidth_gbs() -> float:
    """Achieved device-to-device bandwidth (bytes read + written per second), in GB/s."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--context", default="1024", help="context lengths, comma-separated")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--peak-gbs", type=float, default=None, help="bandwidth for the floor (default: measured)")
    parser.add_argument("--skip-ref", action="store_true", help="skip the slow per-request torch oracle")
    parser.add_argument("--splits", default="policy",
                        help="split counts, comma-separated: 'policy' (choose_num_splits for the context), "
                             "'graph' (what a CUDA graph captured for --max-model-len fixes), or numbers")
    parser.add_argument("--max-model-len", type=int, default=131072, help="the context a graph's split count is for")
    parser.add_argument("--block-n", default="default",
                        help="keys per tile, comma-separated: 'default' (the wrapper's choice) and/or numbers")
    args = parser.parse_args()

    torch.manual_seed(0)
    scale = args.head_dim**-0.5
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = args.peak_gbs or copy_bandwidth_gbs()
    elt = torch.finfo(DTYPES[args.dtype]).bits // 8
    print(f"# decode attention, {torch.cuda.get_device_name(0)}, {args.dtype}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, block {args.block_size}, floor bw {bw:.0f} GB/s\n")
    print("| batch | context | splits | triton graph us | triton eager us | achieved GB/s | "
          "% of floor | gather+SDPA us | torch ref us | floor us |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for context in (int(x) for x in args.context.split(",")):
        for batch in (int(x) for x in args.batch_sizes.split(",")):
            b = make_batch(batch, context, args)
            ref = paged_attention_ref(b.query, (b.k_cache, b.v_cache), b.meta, scale)
            t_sdpa = do_bench(lambda: gather_sdpa(b, scale, context)) * 1e3
            t_ref = float("nan")
            if not args.skip_ref:
                t_ref = do_bench(lambda: paged_attention_ref(b.query, (b.k_cache, b.v_cache), b.meta, scale),
                                 rep=200) * 1e3
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * elt
            io_bytes = 2 * b.query.numel() * elt + b.block_tables.numel() * 4
            floor = (kv_bytes + io_bytes) / (bw * 1e9) * 1e6
            for label, block_n in itertools.product(args.splits.split(","), args.block_n.split(",")):
                bn = None if block_n == "default" else int(block_n)
                if label == "policy":
                    splits = choose_num_splits(batch, args.kv_heads, context, sms)
                elif label == "graph":
                    splits = choose_num_splits(batch, args.kv_heads, args.max_model_len, sms)
                else:
                    splits = int(label)
                scratch = torch.empty(batch * args.heads * splits * (args.head_dim + 1), device="cuda")
                out = torch.empty_like(b.query)

                def triton_step() -> None:
                    paged_attention_decode(b.query, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, scale,
                                           splits, out=out, scratch=scratch, block_n=bn)

                triton_step()
                torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
                t_graph = do_bench_cudagraph(triton_step) * 1e3
                t_eager = do_bench(triton_step) * 1e3
                achieved = (kv_bytes + io_bytes) / (t_graph * 1e-6) / 1e9
                tile = "" if bn is None else f", {bn} keys/tile"
                print(f"| {batch} | {context} | {splits} ({label}{tile}) | {t_graph:.1f} | {t_eager:.1f} | "
                      f"{achieved:.0f} | {100 * floor / t_graph:.0f}% | {t_sdpa:.1f} | {t_ref:.1f} | {floor:.1f} |")
            b = None  # noqa: F841 - frees this shape's caches before the next one's
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
