"""``captum-iclip world`` (also ``python -m captum_iclip.world``): exports of the procedural world.

Examples::

    python -m captum_iclip.world export-voc --root data/world_voc -n 200
    python -m captum_iclip.world export-text --out data/world_text -n 5000 --formats csv wds
"""

from __future__ import annotations

import argparse

from captum_iclip._io import check_output_folder
from captum_iclip.cli.common import HelpFormatter
from captum_iclip.world.export import export_image_text, export_voc
from captum_iclip.world.generator import HELDOUT_SEED_START, TRAIN_SEED_START


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``export-voc`` and ``export-text`` commands."""

    parser = argparse.ArgumentParser(
        prog="captum-iclip world", description="Export scenes of the procedural world.", formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    voc = commands.add_parser(
        "export-voc",
        help="write a VOC 2012-style segmentation split (held-out seeds)",
        description="Write held-out scenes as a VOC 2012-style split (JPEGImages, SegmentationClass, ImageSets).",
        formatter_class=HelpFormatter,
    )
    voc.add_argument("--root", required=True, help="dataset root to create")
    voc.add_argument("-n", type=int, required=True, help="number of scenes")
    voc.add_argument("--seed", type=int, default=HELDOUT_SEED_START, help="first seed (default: %(default)s)")
    voc.add_argument("--size", type=int, default=96, help="image side in pixels (default: %(default)s)")
    voc.add_argument("--split", default="val", help="image-set name (default: %(default)s)")

    text = commands.add_parser(
        "export-text",
        help="write an open_clip image-text training set (train seeds)",
        description="Write training scenes with captions as open_clip's CSV and/or webdataset shards.",
        formatter_class=HelpFormatter,
    )
    text.add_argument("--out", required=True, help="output folder")
    text.add_argument("-n", type=int, required=True, help="number of scenes")
    text.add_argument("--seed", type=int, default=TRAIN_SEED_START, help="first seed (default: %(default)s)")
    text.add_argument("--size", type=int, default=96, help="image side in pixels (default: %(default)s)")
    text.add_argument("--formats", nargs="+", choices=("csv", "wds"), default=["csv", "wds"], help="output formats")
    text.add_argument("--shard-size", type=int, default=1000, help="samples per webdataset shard")
    text.add_argument("--absolute-paths", action="store_true", help="write absolute image paths in train.csv")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the world command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        Process exit status (0 on success).

    Examples:
        >>> main(["export-voc", "--root", "/tmp/world_voc", "-n", "4"])  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise ValueError(f"-n: expected at least 1 scene, got {args.n}")
    check_output_folder(
        args.root if args.command == "export-voc" else args.out, "--root" if args.command == "export-voc" else "--out"
    )
    if args.command == "export-voc":
        root = export_voc(args.root, args.n, seed=args.seed, size=args.size, split=args.split)
        print(f"wrote {args.n} scenes to {root}")
    else:
        info = export_image_text(
            args.out,
            args.n,
            seed=args.seed,
            size=args.size,
            formats=tuple(args.formats),
            shard_size=args.shard_size,
            absolute_paths=args.absolute_paths,
        )
        print(f"wrote {info['num_samples']} scenes: csv={info['csv']} wds={info['wds_url']}")
    return 0
