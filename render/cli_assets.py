"""``serialgen assets build``: the asset folder (contract 1), with Blender reading the files.

The build is ``assets_manifest.build.build_assets`` (Blender-free); this command hands it the Blender
probe (``render.asset_build.BlenderProbe``: one worker process per character or motion file,
``SERIALGEN_IMPORT_TIMEOUT`` seconds each), which is why it lives on the render floor. Heavy imports
happen inside the handler.
"""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _nonneg_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer, got {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name}: must be >= 0, got {v}")
        return v
    return parse


def register(sub, groups) -> None:
    p = groups["assets"].add_parser(
        "build", help="scan/generate inputs into manifests under DIR",
        description="Build the asset folder: procedural and imported characters, the pose library "
                    "(18 built-in motion sets + imported motions), backgrounds (bundled photos, HDRI "
                    "views, procedural images + your folders) and report.json. Incremental on re-runs.")
    p.add_argument("--out", required=True, metavar="DIR", help="asset folder to create or update")
    p.add_argument("--procedural", type=_nonneg_int("--procedural"), default=0, metavar="N",
                   help="number of procedural characters proc-000000 ... (default 0)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="run seed for characters, poses and backgrounds")
    p.add_argument("--characters", nargs="+", default=[], metavar="PATH",
                   help="character files or folders (glTF/GLB/VRM/FBX/.blend)")
    p.add_argument("--motions", nargs="+", default=[], metavar="PATH",
                   help="motion files or folders (BVH, glTF/FBX actions), merged into the pose library")
    p.add_argument("--backgrounds", nargs="+", default=[], metavar="PATH",
                   help="your background images or folders (jpg/jpeg/png/webp, recursive)")
    p.add_argument("--poses", type=_nonneg_int("--poses"), default=None, metavar="N",
                   help="pose library size (default 3817, as in the paper)")
    p.add_argument("--min-pose-distance", type=float, default=None, metavar="DEG",
                   help="de-duplication threshold in degrees of pose distance (default 4)")
    p.add_argument("--procedural-backgrounds", type=_nonneg_int("--procedural-backgrounds"), default=None,
                   metavar="N", help="procedural background images (default 64)")
    p.add_argument("--no-hdri", action="store_true", help="skip the HDRI views (no bpy subprocess)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    from serialgen.assets_manifest.build import build_assets, print_summary
    from serialgen.render.asset_build import BlenderProbe

    # Flags left out keep build_assets' defaults (kept there, so --help needs no numpy).
    optional = {"poses": args.poses, "min_pose_distance": args.min_pose_distance,
                "procedural_backgrounds": args.procedural_backgrounds}
    summary = build_assets(
        args.out, probe=BlenderProbe(), procedural=args.procedural, seed=args.seed, characters=args.characters,
        motions=args.motions, backgrounds=args.backgrounds, hdri=not args.no_hdri, quiet=args.quiet,
        **{k: v for k, v in optional.items() if v is not None})
    print_summary(summary)
    return 0
