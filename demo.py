"""The whole pipeline in one command: frames -> faces -> train -> convert -> evaluate.

Runs the four scripts in order on two videos (person A and person B; by default
the Obama and Reagan clips in examples/, which come with the project), trains
train.py's recipe for a short fixed budget (from scratch, or from a pretrained
base with --init), and leaves everything in OUT_DIR:
    personA/, personB/               frames (the last HOLDOUT share of each clip held out)
    personA_face/, personB_face/     aligned training faces + alignments.json
    personA_heldout_face/, ...       held-out faces for the reconstruction metric
    model/                           checkpoint.pt, preview.png, log.csv
    swapped.mp4                      A's video with B's face (H.264, audio kept, marked synthetic)
    evaluation.json, contact_sheet.png   (identity among the people of --gallery: by default everyone in
                                         ../shared/data when it is beside the checkout, else only A and B)
Re-running continues training for another budget and converts again.

Example:
    python demo.py                                   # the example pair, 15 minutes of training
    python demo.py --video-a me.mp4 --video-b friend.mp4 --minutes 60
"""
import argparse
import sys
from pathlib import Path

import convert_video
import crop_face
import crop_from_video
import evaluate
import train
import utils
import video

EXAMPLES = Path(__file__).resolve().parent / "examples"
VIDEO_A = EXAMPLES / "obama.mp4"                         # person A: the video that gets the new face
VIDEO_B = EXAMPLES / "reagan.mp4"                        # person B: the face to put in
OUT_DIR = Path("demo_out")                               # everything goes here
SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"  # more people for the identity gallery
MINUTES = 15.0                                           # training budget per run
BASE_DIR = Path(__file__).resolve().parent / "base"  # pretrained bases, <preset>_base.pt (benchmarks/make_base.py)
HOLDOUT = 0.15                                           # share of each clip kept out of training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video-a", type=Path, default=VIDEO_A, help="video of person A (gets B's face)")
    p.add_argument("--video-b", type=Path, default=VIDEO_B, help="video of person B")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR, help="output folder for every step")
    p.add_argument("--minutes", type=utils.non_negative_number, default=MINUTES, help="training budget of this run")
    p.add_argument("--model", default=train.MODEL, help="model preset (train.py's --model)")
    p.add_argument("--init", default="none",
                   help="pretrained base to start from (a file, or auto = base/<model>_base.pt); none = scratch, "
                        "which measured better for identity (docs/QUALITY.md)")
    p.add_argument("--holdout", type=utils.share, default=HOLDOUT, help="share of each clip held out for evaluation")
    p.add_argument("--max-frames", type=utils.non_negative_int, default=0,
                   help="frames per clip for training (0 = all)")
    p.add_argument("--eval-every", type=utils.positive_int, default=3, help="evaluate every Nth converted frame")
    p.add_argument("--gallery", type=Path, default=None,
                   help="a folder of <person>/ photos or clips of other people for the identity measure (default: "
                        "everyone in ../shared/data when it is beside the checkout, else only A and B)")
    return p.parse_args(argv)


# Every person in ../shared/data, for evaluate.py's identity gallery: person -> files (globs) of that person.
SHARED_GALLERY = {
    "obama": ["videos/styletalk_obama_clip*.mp4", "images/facerec/obama.jpg", "images/facerec/obama2.jpg"],
    "andrew_ng": ["videos/styletalk_andrew_clip1.mp4"],
    "reagan": ["videos/styletalk_reagan_clip1.mp4"],
    "mead_m030": ["videos/dreamtalk_mead_M030_*.mp4"],
    "mead_w009": ["videos/dreamtalk_mead_W009_*.mp4"],
    "mead_w011": ["videos/dreamtalk_mead_W011_*.mp4"],
    "ocasio_cortez": ["videos/sadtalker_WDA_AlexandriaOcasioCortez_000.mp4"],
    "katie_hill": ["videos/sadtalker_WDA_KatieHill_000.mp4"],
    "grimacing_woman_d6": ["videos/liveportrait_driving_d6.mp4"],
    **{f"talking_{k}": [f"videos/liveportrait_driving_{k}.mp4"] for k in ("d0", "d9", "d10", "d11", "d12", "d13",
                                                                         "d14", "d20")},
    **{f"retalking_{k}": [f"videos/retalking_face_{k}.mp4"] for k in ("1", "2", "5")},
    "elon_musk": ["videos/dlib_elon-musk-smoke.gif"],
    "biden": ["images/facerec/biden.jpg", "images/facerec/biden2.jpg"],
    "kit_harington": ["images/facerec/kit_harington_*"],
    "rose_leslie": ["images/facerec/rose_leslie_*"],
    "lin_manuel_miranda": ["images/facerec/lin-manuel-miranda.png"],
    "alex_lacamoire": ["images/facerec/alex_lacamoire_*"],
    **{name.lower(): [f"images/dlib_johns/{name}/*.jpg"] for name in
       ("John_Salley", "John_Savage", "John_Schneider", "John_Shimkus", "John_Simm")},
}


def make_gallery(folder, data=SHARED_DATA, people=None):
    """A gallery folder for evaluate.py: <person>/ subfolders of symbolic links to the shared files."""
    folder = Path(folder)
    for person, patterns in (people or SHARED_GALLERY).items():
        files = sorted(f for pattern in patterns for f in Path(data).glob(pattern))
        if not files:
            continue
        (folder / person).mkdir(parents=True, exist_ok=True)
        for f in files:
            link = folder / person / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return folder


def base_for(init, model):
    """The base checkpoint to start from, or None (scratch): --init auto, none or a file."""
    if init.lower() == "none":
        return None
    path = BASE_DIR / f"{model}_base.pt" if init.lower() == "auto" else Path(init)
    if not path.is_file():
        if init.lower() != "auto":
            raise utils.UserError(f"--init {path}: no such file")
        return None
    return path


def split_seconds(clip, holdout):
    """The time (s) where the held-out tail of a clip starts."""
    info = video.video_info(clip)
    if info["frames"] < 10 or not info["fps"]:
        raise utils.UserError(f"{clip} is too short for the demo ({info['frames']} frames)")
    return info["frames"] / info["fps"] * (1 - holdout)


def run(args):
    for clip in (args.video_a, args.video_b):
        utils.require_file(clip, "video", "pass your own with --video-a and --video-b" if clip not in
                           (VIDEO_A, VIDEO_B) else "the example pair lives in examples/ of the project")
    out = utils.ensure_writable_dir(args.out_dir)
    for name, clip in (("A", args.video_a), ("B", args.video_b)):
        print(f"\n== person {name}: frames and faces from {clip}")
        frames_and_faces(clip, out / f"person{name}", args)
    init = base_for(args.init, args.model)
    print(f"\n== training ({args.model} model, {args.minutes:g} minutes, "
          f"{'from the base ' + str(init) if init else 'from scratch'})")
    code = train.main(["--faces-a", str(out / "personA_face"), "--faces-b", str(out / "personB_face"),
                       "--model-dir", str(out / "model"), "--model", args.model, "--minutes", str(args.minutes),
                       "--iterations", "0", "--save-every", "100", "--preview-every", "100"]
                      + (["--init", str(init)] if init else []))
    if code:  # Ctrl-C (130) or SIGTERM (143): saved
        print("interrupted (run demo.py again to go on training from the saved checkpoint)", file=sys.stderr)
        return code
    print("\n== converting A's video with B's face")
    convert_video.main(["--video-path", str(args.video_a), "--model-dir", str(out / "model"),
                        "--output-path", str(out / "swapped.mp4"), "--overwrite"])
    print("\n== evaluating")
    evaluate.main(["--converted-path", str(out / "swapped.mp4"), "--source-path", str(args.video_a),
                   "--faces-a", str(out / "personA_face"), "--faces-b", str(out / "personB_face"),
                   "--heldout-a", str(out / "personA_heldout_face"), "--heldout-b", str(out / "personB_heldout_face"),
                   "--model-dir", str(out / "model"), "--out-dir", str(out), "--every", str(args.eval_every)]
                  + gallery_flags(args, out))
    print(f"""
== done; everything is in {out}/
  frames           {out}/personA, {out}/personB
  aligned faces    {out}/personA_face, {out}/personB_face (+ *_heldout_face)
  checkpoint       {out}/model/checkpoint.pt
  preview          {out}/model/preview.png, loss curve {out}/model/loss.png
  swapped video    {out}/swapped.mp4
  evaluation       {out}/evaluation.json, {out}/contact_sheet.png""")
    return 0


def frames_and_faces(clip, folder, args):
    """Frames and faces of a clip: its first 1 - --holdout in `folder`, the rest (held out) in <folder>_heldout,
    each with its faces in <...>_face."""
    split = split_seconds(clip, args.holdout)
    limit = ["--max-frames", str(args.max_frames)] if args.max_frames else []
    for part, extra in ((folder, ["--end", f"{split:.3f}"] + limit), (folder.with_name(folder.name + "_heldout"),
                                                                      ["--start", f"{split:.3f}"])):
        crop_from_video.main(["--video-path", str(clip), "--save-dir", str(part)] + extra)
        crop_face.main(["--images-dir", str(part), "--faces-dir", str(part.with_name(part.name + "_face"))])


# the example pair's people, by their names in SHARED_GALLERY (their own faces stand for them there)
EXAMPLE_PEOPLE = {VIDEO_A.name: "obama", VIDEO_B.name: "reagan"}


def gallery_flags(args, out):
    """evaluate.py's --gallery (and --name-a/--name-b where A or B is one of its people): --gallery, or everyone
    in ../shared/data when it is there, else nothing (evaluate.py then measures among A and B only)."""
    if args.gallery is None and not SHARED_DATA.is_dir():
        return []
    flags = ["--gallery", str(args.gallery or make_gallery(out / "gallery"))]
    names = {path.resolve(): person for person, patterns in SHARED_GALLERY.items() for pattern in patterns
             for path in SHARED_DATA.glob(pattern)}
    for flag, clip in (("--name-a", args.video_a), ("--name-b", args.video_b)):
        name = names.get(clip.resolve()) or (EXAMPLE_PEOPLE.get(clip.name) if clip.parent == EXAMPLES else None)
        if name:
            flags += [flag, name]
    return flags


def main(argv=None):
    return utils.main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
