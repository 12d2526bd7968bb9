"""Writes docs/parameters.md from the server's real argument parser, so the document cannot drift.

    python3 scripts/gen_parameters_doc.py > docs/parameters.md
"""

from __future__ import annotations

import argparse

from ernieserve.entrypoints.openai.cli_args import make_arg_parser

HEADER = """# Parameters

`ernieserve serve [MODEL] [flags]` and `python -m ernieserve.entrypoints.openai.api_server --model
PATH [flags]` take these flags (FastDeploy's names; vLLM's where FastDeploy has none). The offline
`LLM(...)` takes the engine flags as keyword arguments with underscores (`max_model_len=4096`).
Generated from the parser by `scripts/gen_parameters_doc.py`; a test keeps it in step.

Environment variables: `FD_API_KEY` (comma-separated API keys, as in FastDeploy),
`ERNIESERVE_CACHE_DIR` (where the built-in default model is written; default
`~/.cache/ernieserve`), `ERNIESERVE_DISABLE_TRITON_ELEMENTWISE=1` (use the torch reference for
norm/rotary/activation and the sampler's race on GPU, for debugging), `ERNIESERVE_STEP_STATS=1` (time every engine step by
kind and segment; the benchmarks print the table, the engine logs it at shutdown),
`ERNIESERVE_PROFILE_STEPS=START:COUNT` (torch.profiler over COUNT steps from the START-th; logs the
kernels with the most device time, `ERNIESERVE_PROFILE_ROWS` of them (20), and the kernels per step;
`ERNIESERVE_PROFILE_TRACE=FILE.json` also writes the timeline for `benchmarks/trace_gaps.py`),
`ERNIESERVE_DENSE_GEMV_MAX_TOKENS=0` (turns off the one-row decode GEMV of `kernels/gemv.py`, which
loads its weight before the PDL wait; cuBLAS or the int GEMM then),
`ERNIESERVE_FUSED_QKV_ROPE=0` (default 1 = on: where that GEMV computes an ERNIE layer's qkv projection, one decode row with the Triton attention backend, its
epilogue also applies the rotary to q and k and writes k and v into the KV cache,
`gemv.gemv_rope_store`, instead of a separate `_rotary_store_kernel` launch; same bits either way),
`ERNIESERVE_ROUTE_ALIGN_MAX_TOKENS=N` (experimental, default 0 = off; broken on the GPU past one
token: its first H100 run hit an illegal memory access at 8 tokens. MoE
layers with up to N tokens, at most 8 for ERNIE-21B's 6 + 2 slots, let the router's last program also
write the expert alignment, `fused_moe.triton_route_align`, instead of a separate `_moe_align_kernel`
launch; one rank or tensor parallel, not expert parallel),
`ERNIESERVE_MOE_STATIC_ALIGN_MAX_TOKENS=N` (default 1; 0 = off: MoE layers with up to N tokens give
the grouped GEMMs one block per expert assignment, `fused_moe.per_assignment_alignment`, so no
alignment is computed at all; taken before the router-side alignment),
`ERNIESERVE_MOE_DOWN_EARLY=0` (default on: the MoE down GEMMs read their block's routing, routing
weights and scales before the PDL wait, `fused_moe._down_block`),
`ERNIESERVE_MOE_SHARED_EARLY=0` (default on: with one block per assignment, the MoE gate/up GEMM
computes the folded shared experts' blocks before the PDL wait, while the router runs),
`ERNIESERVE_MOE_ASSIGN_GEMV=0` (default on: with one block per assignment, wint8 / wint4 experts
with per-channel scales run `layers/moe/moe_gemv.py`'s per-assignment GEMVs, a weight tile per
one-warp program in registers, on CUDA cores, instead of the tensor-core fused kernels;
int4 with bf16 activations multiplies in packed bf16x2, four products summed in bf16 and the rest
in fp32, `ERNIESERVE_MOE_ASSIGN_PACKED=0` converting to fp32 instead;
`ERNIESERVE_MOE_ASSIGN_TILES=GATE_UP,DOWN` sets their rows per program and
`ERNIESERVE_MOE_ASSIGN_SHARED_COMPUTE=1` / `=0` makes the shared experts' programs compute before
the PDL wait or only load there (default: compute only without the packed products); the last two
for benchmarking),
`ERNIESERVE_GEMV_PACKED=0` (default on: the one-row int4 GEMVs of the dense layers, `kernels/gemv.py`,
multiply bf16 activations in packed bf16x2 like the experts' per-assignment GEMVs; off converts to
fp32),
`ERNIESERVE_DECODE_ATTN="block_n=N,warps=N,stages=N,early=0|1,min_keys=N"` (any subset; unset by
default: the split-K decode attention takes 64-key tiles in one stage that read their first tile of
earlier steps' keys before the PDL wait up to 64 (request, KV head) pairs, 128-key tiles in three
stages beyond; set, those tiles for every decode launch, and `min_keys` the fewest keys per split;
for benchmarking, `kernels/paged_attention.py` `decode_tiles`),
`ERNIESERVE_PDL=0` (turns off programmatic dependent launch, on by default on sm_90+: the decode
path's Triton kernels may start while the previous kernel finishes, also inside CUDA graphs; see
`ernieserve/kernels/pdl.py`).
"""


def fmt_default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return f"`{action.default}`"
    if action.default is None or action.default == argparse.SUPPRESS:
        return "—"
    return f"`{action.default}`"


def main() -> None:
    parser = make_arg_parser(argparse.ArgumentParser(prog="ernieserve serve"))
    print(HEADER)
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        print(f"\n## {group.title}\n")
        print("| flag | default | meaning |")
        print("|---|---|---|")
        for a in actions:
            flags = ", ".join(f"`{f}`" for f in a.option_strings)
            text = (a.help or "").replace("|", "\\|").replace("\n", " ")
            if a.choices:
                text += f" Choices: {', '.join(map(str, a.choices))}."
            print(f"| {flags} | {fmt_default(a)} | {text} |")


if __name__ == "__main__":
    main()
