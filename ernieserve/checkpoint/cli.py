"""``ernieserve make-dummy``: write a random-weight checkpoint of a preset to a folder."""

from __future__ import annotations

import argparse
import sys

from ernieserve.checkpoint.presets import PRESETS


def add_make_dummy_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers the ``make-dummy`` subcommand on an ``add_subparsers()`` object."""
    parser = subparsers.add_parser(
        "make-dummy",
        help="write a random-weight Hugging Face checkpoint of a model preset",
        description=(
            "Write config.json, generation_config.json, sharded safetensors and a tokenizer "
            "for a preset, with random weights whose logits are peaked (see "
            "ernieserve.checkpoint.dummy). Large presets write config and tokenizer only."
        ),
    )
    # --preset and OUT_DIR are required unless --list is given; make_dummy_main checks them.
    parser.add_argument("--preset", metavar="NAME", help="preset to write (see --list)")
    parser.add_argument("out_dir", metavar="OUT_DIR", nargs="?", help="folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="weight dtype (default: bfloat16)",
    )
    parser.add_argument(
        "--max-shard-bytes",
        type=int,
        default=None,
        help="largest shard in bytes (default: half the checkpoint, at most 512 MiB)",
    )
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.set_defaults(func=make_dummy_main)
    return parser


def make_dummy_main(args: argparse.Namespace) -> int:
    if args.list:
        width = max(len(name) for name in PRESETS)
        for name, preset in PRESETS.items():
            kind = "weights" if preset.weights else "config only"
            print(f"{name:<{width}}  {kind:<11}  {preset.description}")
        return 0
    if not args.preset or not args.out_dir:
        print("make-dummy: --preset NAME and OUT_DIR are required (or use --list)", file=sys.stderr)
        return 2
    if args.preset not in PRESETS:
        valid = ", ".join(PRESETS)
        print(f"make-dummy: unknown preset {args.preset!r}; valid presets: {valid}", file=sys.stderr)
        return 2
    # Imported late: writing pulls in transformers, which --list does not need.
    from ernieserve.checkpoint.dummy import write_dummy_checkpoint

    out = write_dummy_checkpoint(
        args.preset,
        args.out_dir,
        seed=args.seed,
        dtype=args.dtype,
        max_shard_bytes=args.max_shard_bytes,
    )
    print(out)
    return 0
