"""The `s4v` command line: train, eval, config, info, list, bench, convert-official."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _fmt_params(n: int) -> str:
    return f"{n:,} ({n / 1e6:.1f} M)"


def _all_specs() -> dict:
    from s4v.model.retrieval_specs import RETRIEVAL_MODELS
    from s4v.model.specs import MODELS

    return {**MODELS, **RETRIEVAL_MODELS}


def cmd_list(args: argparse.Namespace) -> int:
    specs = _all_specs()
    width = max(len(n) for n in specs)
    for name in sorted(specs):
        print(f"{name:<{width}}  {specs[name].description}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import s4v
    from s4v.model.flops import model_stats
    from s4v.model.retrieval_specs import RETRIEVAL_MODELS

    names = s4v.list_models() if args.name == "all" else [args.name]
    for name in names:
        retrieval = name in RETRIEVAL_MODELS
        model = s4v.create_model(name, args.num_classes, args.num_frames, device="meta")  # each family's defaults
        frames = model.num_frames
        st = model_stats(model)
        bb, side = model.spec.backbone, model.spec.side
        taps = side.tap_layers(bb.layers)
        print(f"{name}: {model.spec.description}")
        print(f"  backbone      {bb.family} {bb.open_clip_name}  width {bb.width}, {bb.layers} layers, "
              f"{bb.heads} heads, patch {bb.patch_size}, {bb.image_size}px")
        from s4v.model.towers import position_scheme

        prefix = ("CLS" if bb.class_token else "no CLS") + (f" + {bb.reg_tokens} registers" if bb.reg_tokens else "")
        print(f"  tokens        {prefix}, {position_scheme(model.backbone.tower)} positions; side prompt: "
              + ("CLS" if bb.class_token else "patch mean"))
        where = "every layer" if side.tap_every == 1 else f"after layers {taps[0]},{taps[1]},..,{taps[-1]}"
        print(f"  side network  width {side.width}, {side.num_heads} heads, {len(taps)} blocks ({where}), "
              f"{side.block_norm}-norm")
        print(f"  clip          {frames} frames" + ("" if retrieval else f", {args.num_classes} classes"))
        print(f"  parameters    total {_fmt_params(st.total_params)}")
        print(f"                frozen {_fmt_params(st.frozen_params)}")
        print(f"                trainable {_fmt_params(st.trainable_params)}")
        note = " (video encoder; text tower not counted)" if retrieval else ""
        print(f"  GFLOPs/view   {st.gflops:.1f} (backbone {st.backbone_gflops:.1f} + side {st.side_gflops:.1f})"
              + note)
    return 0


def cmd_convert_official(args: argparse.Namespace) -> int:
    from s4v.model.official import convert_official

    convert_official(args.src, args.dst, args.num_frames, args.backbone_heads, args.side_heads)
    print(f"wrote {args.dst}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """The resolved experiment (defaults <- RECIPE <- key=value overrides) as YAML, as a run would store it."""
    import yaml

    from s4v.config import config_to_dict
    from s4v.experiment import load_experiment

    path, overrides = (None, args.rest) if args.recipe is None or "=" in args.recipe else (args.recipe, args.rest)
    if args.recipe is not None and "=" in args.recipe:
        overrides = [args.recipe, *args.rest]
    cfg = load_experiment(path, overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None), end="")
    return 0


def _benches() -> dict[str, str]:
    """`s4v bench` subcommands: the s4v.bench modules with a main(), each with its docstring's first line
    (read from the source, so `s4v --help` imports no torch)."""
    import ast
    from pathlib import Path

    out = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            doc = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())  # first paragraph
            out[path.stem] = doc.split(":", 1)[-1].strip() if doc.startswith("`s4v bench") else doc
    return out


BENCHES = tuple(_benches())


def _passthrough(module: str):
    """Subcommands with their own argument handling (config files + key=value overrides)."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main(args.rest)
    return run


# Commands that use a trained model (issue 15), each a module with its own main(argv).
INFER_COMMANDS = {
    "predict": ("s4v.infer.predict", "classify video files: s4v predict MODEL VIDEO_OR_DIR... [--topk 5] "
                "[--views 3x2] [--out preds.jsonl]"),
    "export": ("s4v.infer.export", "model file from any checkpoint: s4v export RUN_DIR [--tag step_N] [--out FILE]"),
    "extract": ("s4v.infer.extract", "features of video files: s4v extract MODEL VIDEO_OR_DIR... --out DIR "
                "[--level clip|frame|tokens] [--texts FILE]"),
    "search": ("s4v.infer.search", "text-to-video search: s4v search INDEX \"text\" [--topk 10] [--video FILE]"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s4v", description="Side4Video: memory-efficient video transfer "
                                     "of frozen image ViTs with a spatial-temporal side network.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the model names")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="parameters and GFLOPs of a model (built on the meta device)")
    p.add_argument("name", help="a model name (see `s4v list`) or 'all'")
    p.add_argument("--num-frames", type=int, default=None, help="default: 8 (recognition), 12 (retrieval)")
    p.add_argument("--num-classes", type=int, default=174)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="print the resolved experiment: s4v config [RECIPE.yaml] [key=value ...]")
    p.add_argument("recipe", nargs="?", default=None, help="an experiment YAML (ds_configs/experiments/)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="key=value overrides")
    p.set_defaults(func=cmd_config)

    for name, module, text in (("train", "s4v.train.main", "train: s4v train CONFIG.yaml [key=value ...] "
                                "(`s4v train --help` lists every key)"),
                               ("eval", "s4v.eval.main", "multi-view evaluation: s4v eval RUN_DIR|MODEL.pt ..."),
                               *((name, module, text) for name, (module, text) in INFER_COMMANDS.items())):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_passthrough(module))

    benches = _benches()
    p = sub.add_parser("bench", help=f"benchmarks: s4v bench {{{','.join(benches)}}} ... (`s4v bench --help`)",
                       description="\n".join(f"{k}: {v}" for k, v in benches.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=tuple(benches), help="the benchmark; `s4v bench NAME --help` for its options")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__(f"s4v.bench.{a.which}", fromlist=["main"]).main(a.rest))

    p = sub.add_parser("convert-official", help="official Side4Video checkpoint -> native s4v model file")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--backbone-heads", type=int, default=None, help="default: width // 64 (EVA: // 112)")
    p.add_argument("--side-heads", type=int, default=None, help="default: side width // 64")
    p.set_defaults(func=cmd_convert_official)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval"):  # these parse their own config + key=value arguments
        import importlib

        return importlib.import_module(f"s4v.{argv[0]}.main").main(argv[1:])
    if argv and argv[0] in INFER_COMMANDS:  # s4v.infer: their own options
        import importlib

        return importlib.import_module(INFER_COMMANDS[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:  # ConfigError and WeightsFileError included
        print(f"s4v {args.command}: error: {str(err).removeprefix(f's4v {args.command}: ')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
