"""``serialgen assets build``: the asset folder (contract 1), with Blender reading the files.

The build is ``assets_manifest.build.build_assets`` (Blender-free); this command hands it the Blender
probe (``render.asset_build.BlenderProbe``: one worker process per character or motion file,
``SERIALGEN_IMPORT_TIMEOUT`` seconds each), which is why it lives on the render floor. Heavy imports
happen inside the handler.
"""

from __future__ import annotations

import argparse

from serialgen.argtypes import non_negative_int
from serialgen.resolution import add_renamed_flags

__all__ = ["register"]

# Kept in step with assets_manifest.manifest.DEFAULT_MAX_BYTES (1 GiB; a test checks): --help must
# not import numpy.
_DEFAULT_MAX_SIZE = "1G"


def _size(text):
    from serialgen.assets_manifest.manifest import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--max-asset-size: {exc}") from None


_size.__name__ = "size"


def register(sub, groups) -> None:
    p = groups["assets"].add_parser(
        "build", help="scan/generate inputs into manifests under DIR",
        description="Build the asset folder: procedural and imported characters, the pose library "
                    "(18 built-in motion sets + imported motions), backgrounds (bundled photos, HDRI "
                    "views, procedural images + your folders) and report.json. Incremental on re-runs. "
                    "Every file under --characters/--motions/--backgrounds gets a record: accepted, or "
                    "rejected with a reason (docs/real_assets.md lists them). Each character or motion "
                    "file is read in its own worker process, SERIALGEN_IMPORT_TIMEOUT seconds at most "
                    "(default 120).")
    p.add_argument("--out", required=True, metavar="DIR", help="asset folder to create or update")
    p.add_argument("--procedural", type=non_negative_int, default=0, metavar="N",
                   help="number of procedural characters proc-000000 ... (default 0)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="run seed for characters, poses and backgrounds (default 0)")
    p.add_argument("--characters", nargs="+", default=[], metavar="PATH",
                   help="character files or folders (glTF/GLB/VRM/FBX/.blend)")
    p.add_argument("--motions", nargs="+", default=[], metavar="PATH",
                   help="motion files or folders (BVH, glTF/FBX actions), merged into the pose library")
    p.add_argument("--backgrounds", nargs="+", default=[], metavar="PATH",
                   help="your background images or folders (jpg/jpeg/png/webp, recursive)")
    p.add_argument("--poses", type=non_negative_int, default=None, metavar="N",
                   help="pose library size (default 3817, as in the paper)")
    p.add_argument("--min-pose-distance", type=float, default=None, metavar="DEG",
                   help="de-duplication threshold in degrees of pose distance (default 4)")
    p.add_argument("--procedural-backgrounds", type=non_negative_int, default=None,
                   metavar="N", help="procedural background images (default 64)")
    p.add_argument("--no-hdri", action="store_true", help="skip the HDRI views (no bpy subprocess)")
    p.add_argument("--allow-texture-fallback", action="store_true",
                   help="accept characters whose image files are missing, drawn in their material's flat "
                        "colour (default: rejected, texture_missing)")
    p.add_argument("--allow-untextured", action="store_true",
                   help="accept characters whose visible materials are all one untextured colour "
                        "(default: rejected, texture_uniform)")
    p.add_argument("--max-asset-size", type=_size, default=None, metavar="SIZE",
                   help=f"largest character, motion or background file, with the files it refers to "
                        f"(512M, 2G ...; default {_DEFAULT_MAX_SIZE}); larger ones are rejected, too_large")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_renamed_flags(p, {"--quiet": "--no-progress"})
    p.set_defaults(handler=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    from serialgen.assets_manifest.build import build_assets, print_summary
    from serialgen.render.asset_build import BlenderProbe

    # Flags left out keep build_assets' defaults (kept there, so --help needs no numpy).
    optional = {"poses": args.poses, "min_pose_distance": args.min_pose_distance,
                "procedural_backgrounds": args.procedural_backgrounds, "max_asset_bytes": args.max_asset_size}
    summary = build_assets(
        args.out, probe=BlenderProbe(), procedural=args.procedural, seed=args.seed, characters=args.characters,
        motions=args.motions, backgrounds=args.backgrounds, hdri=not args.no_hdri,
        allow_texture_fallback=args.allow_texture_fallback, allow_untextured=args.allow_untextured,
        progress=not args.no_progress, **{k: v for k, v in optional.items() if v is not None})
    print_summary(summary)
    return 0
