"""`megafusion` command line (thin): parse, load the config tree, hand over to the package.

    megafusion train    --config tiny [section.key=value ...]     # one process, or under torchrun
    megafusion config   --config tiny [section.key=value ...]     # print the resolved config
    megafusion generate --checkpoint RUN --prompts prompts.jsonl --out DIR [options]   # text and images
    megafusion generate --hf HF_DIR ...                                               # from an exported folder
    megafusion demo     [--out out/demo] [--minutes 15] [--compare-weighting]           # the whole pipeline
                        [--family masked_diffusion]                       # the tri-modal masked-diffusion demo
    megafusion plan     --config reference --gpus 128 [--json] [--gpu-memory 80GB] [overrides]   # memory, FLOPs
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "pretrain a model"), ("config", "print the resolved config")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default="tiny", help="a YAML file or a preset name in configs/ (default: tiny)")
        p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.num_layers=4")
    from megafusion.inference.cli import add_arguments as generate_arguments

    generate_arguments(sub.add_parser("generate", help="generate text and images from a checkpoint"))
    demo = sub.add_parser("demo", help="corpus -> tokenizer -> preprocessing -> training -> generation -> scores")
    demo.add_argument("--out", default=None, help="demo folder (report in <out>/report/report.md)")
    demo.add_argument("--minutes", type=float, default=None,
                      help="time budget of the whole demo on this machine (default 15; masked_diffusion: 10)")
    demo.add_argument("--compare-weighting", action="store_true",
                      help="also train with fixed loss weighting on the same budget and report both")
    demo.add_argument("--seed", type=int, default=0, help="seed of the world, the corpus and training")
    demo.add_argument("--family", choices=("flow_matching", "masked_diffusion"), default="flow_matching",
                      help="flow_matching: the Transfusion demo; masked_diffusion: the tri-modal masked-diffusion "
                           "demo (megafusion/demo/masked/run.py; default --out out/demo_masked, --minutes 10)")
    from megafusion.planning.cli import add_arguments as plan_arguments

    plan_arguments(sub.add_parser("plan", help="parameters, per-GPU memory, FLOPs and wall-clock on N GPUs"))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        from megafusion.inference.cli import run

        return run(args)
    if args.command == "plan":
        from megafusion.planning.cli import run as plan

        return plan(args)
    if args.command == "demo":
        from megafusion.demo.pipeline import Pipeline, StageFailed

        try:
            if args.family == "masked_diffusion":
                from megafusion.demo.masked.run import MaskedDemo

                minutes = 10.0 if args.minutes is None else args.minutes
                MaskedDemo(args.out or "out/demo_masked", minutes, args.seed).run()
            else:
                minutes = 15.0 if args.minutes is None else args.minutes
                Pipeline(args.out or "out/demo", minutes, args.compare_weighting, args.seed).run()
        except (StageFailed, ValueError) as exc:
            print(f"megafusion demo: {exc}", file=sys.stderr)
            return 1
        return 0
    from megafusion.config import load_config, to_yaml

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"megafusion {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(to_yaml(cfg), end="")
        return 0
    from megafusion.errors import run_reporting
    from megafusion.training.loop import train

    def body() -> int:
        train(cfg)
        return 0

    return run_reporting("train", body)


if __name__ == "__main__":
    sys.exit(main())
