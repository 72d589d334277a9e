"""``serialgen assets poses-preview``: a stick-figure contact sheet of a pose library.

(``serialgen assets build`` needs Blender to read character and motion files, so its command lives a
floor up, in ``render/cli_assets.py``; the build itself is ``assets_manifest/build.py``.)
"""

from __future__ import annotations

from serialgen.errors import UserInputError

__all__ = ["register"]


def register(sub, groups) -> None:
    q = groups["assets"].add_parser(
        "poses-preview", help="draw a stick-figure contact sheet of a pose library",
        description="Front and side stick figures of a few poses of every motion (one row per motion), "
                    "to check by eye that poses look like their motion names.")
    q.add_argument("assets", metavar="DIR", help="asset folder (or a poses.npz file)")
    q.add_argument("--out", required=True, metavar="PNG", help="output image")
    q.add_argument("--per-motion", type=int, default=6, metavar="K", help="poses per motion (default 6)")
    q.set_defaults(handler=_cmd_poses_preview)


def _cmd_poses_preview(args) -> int:
    from serialgen.assets_manifest.poses import load_pose_library, render_pose_sheet

    if args.per_motion < 1:
        raise UserInputError(f"--per-motion: must be >= 1, got {args.per_motion}")
    lib = load_pose_library(args.assets)
    out = render_pose_sheet(lib, args.out, per_motion=args.per_motion)
    print(f"wrote {out} ({len(lib)} poses, {len(set(lib.motion_index.tolist()))} motions)")
    return 0
