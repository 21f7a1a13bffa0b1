"""The ``wsi-espnet`` command line.

Exit codes: 0 success; 2 bad input or usage (a message says what to fix); 3 a checkpoint that is
missing, corrupted or does not fit; 1 an unexpected internal error (please report it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from wsi_espnet import __version__
from wsi_espnet.errors import InputError, WsiEspnetError

__all__ = ["main"]


def _cmd_models(args: argparse.Namespace) -> int:
    from wsi_espnet.models import build_espnet, count_multiply_adds, count_parameters, get_model_config, list_models

    rows = []
    for entry in list_models():  # everything is validated before anything is printed
        config = (
            entry.config if args.num_classes is None else get_model_config(entry.name, num_classes=args.num_classes)
        )
        params = count_parameters(build_espnet(config))
        macs = count_multiply_adds(config, height=args.height, width=args.width)
        rows.append(f"{entry.name:<22} {config.num_classes:>7} {params:>11,} {macs / 1e9:>7.2f}  {entry.description}")
    print(f"Multiply-adds of the convolutions for one {args.width}x{args.height} (width x height) image.")
    header = f"{'name':<22} {'classes':>7} {'parameters':>11} {'GMACs':>7}  description"
    print(header)
    print("-" * len(header))
    print("\n".join(rows))
    return 0


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from wsi_espnet.models import count_parameters, load_original_checkpoint, save_model

    model, config = load_original_checkpoint(
        args.input, num_classes=args.num_classes, dataset=args.dataset, name=args.name
    )
    out = save_model(model, config, args.output)
    print(
        f"wrote {out}: {config.variant}, {config.num_classes} classes, alpha2={config.alpha2}, "
        f"alpha3={config.alpha3}, {count_parameters(model):,} parameters; input {config.preprocessing.channel_order}, "
        f"(x - mean) / std / {config.preprocessing.scale_divisor:g}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from wsi_espnet.inference.onnx_export import export_onnx
    from wsi_espnet.models import load_model

    if args.onnx is None:
        raise InputError("say which format to export: --onnx OUT.onnx")
    model, config = load_model(args.model)
    out = export_onnx(model, config, args.onnx, height=args.height, width=args.width)
    print(f"wrote {out}: input 'image' (B, {config.in_channels}, H, W) normalised float32, H and W multiples of 8")
    return 0


def _image_side(text: str) -> int:
    from wsi_espnet.models.espnet import TOTAL_STRIDE

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0 or value % TOTAL_STRIDE:
        raise argparse.ArgumentTypeError(f"{value} must be a positive multiple of {TOTAL_STRIDE}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-espnet",
        description="Segment gigapixel whole-slide images with ESPNet.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad input or usage, 3 bad checkpoint.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list model variants with parameters and multiply-adds")
    models.add_argument("--height", type=_image_side, default=512, help="image height (default 512)")
    models.add_argument("--width", type=_image_side, default=1024, help="image width (default 1024)")
    models.add_argument("--num-classes", type=int, default=None, help="count for this many classes (default 20)")
    models.set_defaults(run=_cmd_models)

    convert = commands.add_parser(
        "convert-weights", help="convert an original ESPNet .pth checkpoint to wsi-espnet .safetensors"
    )
    convert.add_argument("input", type=Path, help="original checkpoint, e.g. decoder_espnet_p_2_q_8.pth")
    convert.add_argument("output", type=Path, help="output file, e.g. espnet-cityscapes.safetensors")
    convert.add_argument(
        "--dataset", choices=["cityscapes", "camvid"], default=None, help="training set (default: from class count)"
    )
    convert.add_argument("--num-classes", type=int, default=None, help="fail unless the file has this many classes")
    convert.add_argument("--name", default=None, help="model name to record (default: the input file's stem)")
    convert.set_defaults(run=_cmd_convert_weights)

    export = commands.add_parser("export", help="export a checkpoint for other runtimes")
    export.add_argument("model", type=Path, help="a .safetensors checkpoint (or an original .pth)")
    export.add_argument("--onnx", type=Path, metavar="OUT.onnx", help="write ONNX with dynamic batch and size")
    export.add_argument("--height", type=_image_side, default=512, help="tracing height (default 512)")
    export.add_argument("--width", type=_image_side, default=1024, help="tracing width (default 1024)")
    export.set_defaults(run=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # so a closed pipe is reported here, not at interpreter exit
        return code
    except WsiEspnetError as exc:
        print(f"wsi-espnet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("wsi-espnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
