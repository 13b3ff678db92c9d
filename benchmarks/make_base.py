"""Train a pretrained base: a model preset on the faces of many people, so a new pair starts from it.

Faces come from every clip of ../shared/data except the people the quality benchmark measures (Obama,
Andrew Ng, the MEAD actors, Ocasio-Cortez, Katie Hill), so that benchmark measures pairs the base has
never seen, and except the MEAD clips, whose licence is research-only. Both decoders learn every face
(train.py --pretrain); the result, weights only in half precision, is written to --out with a model card.

    python benchmarks/make_base.py --model tiny --iterations 0 --minutes 25     # base/tiny_base.pt, on this CPU
    python benchmarks/make_base.py --model lite128 --iterations 6000           # base/lite128_base.pt

The GPU base that README's "Quality" measures is this recipe on one H100 (that machine had no dlib or PyAV, so
the faces were extracted here and sent as JPEG, quality 90, and train.py was run there on them):

    python benchmarks/make_base.py --model tiny --iterations 0 --minutes 6.5 --batch-size 64 --per-clip 300 \
        --device cuda --workers 8
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from common import ROOT, VIDEOS, require_data

import crop_face
import crop_from_video
import models
import records
import train
import utils

BASE_CLIPS = {  # clip -> its source and licence, for the model card
    "styletalk_reagan_clip1.mp4": "FuxiVirtualHuman/styletalk, MIT (code licence; clip third-party)",
    **{f"liveportrait_driving_{k}.mp4": "KwaiVGI/LivePortrait, MIT (code licence; media third-party)"
       for k in ("d0", "d6", "d9", "d10", "d11", "d12", "d13", "d14", "d20")},
    **{f"retalking_face_{k}.mp4": "OpenTalker/video-retalking, Apache-2.0 (code licence; clips third-party)"
       for k in ("1", "2", "5")},
    "dlib_elon-musk-smoke.gif": "davisking/dlib, BSL-1.0 (media third-party)",
    "facerec_short_hamilton_clip.mp4": "ageitgey/face_recognition, MIT (code licence; clip third-party)",
}
RECIPE = ["--loss", "masked", "--lr", "2e-4", "--warmup", "200",
          "--no-warp-last", "0"]  # warped to the end: a base should generalise, not settle on these faces


def extract(work, per_clip=0):
    """Each clip's aligned faces; with per_clip, at most that many of each, evenly spaced (long clips are
    mostly near-repeats), linked into faces_<per_clip>/ with their alignments."""
    folders = []
    for clip in BASE_CLIPS:
        frames, faces = work / "frames" / Path(clip).stem, work / "faces" / Path(clip).stem
        crop_from_video.main(["--video-path", str(VIDEOS / clip), "--save-dir", str(frames)])
        crop_face.main(["--images-dir", str(frames), "--faces-dir", str(faces), "--all-faces"])
        if per_clip:
            picked = work / f"faces_{per_clip}" / faces.name
            shutil.rmtree(picked, ignore_errors=True)
            picked.mkdir(parents=True)
            paths = utils.list_images(faces)
            for i in np.unique(np.linspace(0, len(paths) - 1, min(per_clip, len(paths))).astype(int)):
                os.link(paths[i], picked / paths[i].name)
            shutil.copy(faces / records.ALIGNMENTS_NAME, picked)
            faces = picked
        folders.append(faces)
    return folders


def export(model_dir, out, budget, model, folders, where, batch):
    """Weights only, in half precision (a base needs no optimizer state), with a model card beside it."""
    ckpt = models.load_checkpoint(model_dir / models.CHECKPOINT)
    state = dict(model={k: v.half() for k, v in ckpt["model"].items()}, config=ckpt["config"], step=ckpt["step"],
                 base_of=sorted(BASE_CLIPS))
    out.parent.mkdir(parents=True, exist_ok=True)
    models.save_checkpoint(out.parent, state, is_best=False)
    (out.parent / models.CHECKPOINT).replace(out)
    faces = sum(len(utils.list_images(p)) for p in folders)
    card = [f"# {out.name}: a pretrained base for the `{model}` preset", "",
            f"Trained with `python benchmarks/make_base.py {budget}` "
            f"(train.py --pretrain --model {model} {' '.join(RECIPE)}) for {ckpt['step']} steps of "
            f"{batch} + {batch} faces on {where}.",
            f"Start a new pair from it with `train.py --model {model} --init base/{out.name}` "
            "(or `demo.py --init auto`).", "",
            f"Data: {faces} aligned faces of {len(BASE_CLIPS)} clips of ../shared/data (about 20 people); none "
            "of the people the quality benchmark measures, no MEAD clip (research-only licence):", ""]
    card += [f"- `{clip}`: {source}" for clip, source in BASE_CLIPS.items()]
    card += ["", "Licence: the clips are third-party media distributed in the repositories above under those "
             "repositories' licences; no separate media licence is known. Use the base, as the rest of this "
             "project, for consented and lawful work (research, education, your own face) only.", ""]
    out.with_suffix(".md").write_text("\n".join(card))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {out.with_suffix('.md')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=6000, help="training steps (0 = until --minutes)")
    p.add_argument("--minutes", type=float, default=0, help="stop after this many minutes (0 = no limit)")
    p.add_argument("--work", type=Path, default=ROOT / "bench_out" / "base", help="frames, faces and the run")
    p.add_argument("--model", default="tiny", help="the preset (train.py's --model)")
    p.add_argument("--out", type=Path, default=None, help="the exported base (default base/<model>_base.pt)")
    p.add_argument("--batch-size", type=int, default=16, help="faces per side per step")
    p.add_argument("--per-clip", type=int, default=0, help="at most this many faces of each clip (0 = all)")
    p.add_argument("--device", default="auto", help="where to train (train.py's --device)")
    p.add_argument("--workers", type=int, default=1, help="train.py's batch-making processes")
    a = p.parse_args(argv)
    require_data()
    folders = extract(a.work, a.per_clip)
    model_dir, out = a.work / f"model_{a.model}", a.out or ROOT / "base" / f"{a.model}_base.pt"
    half = len(folders) // 2  # --pretrain pools both sides: every face is drawn for both decoders
    code = train.main(["--faces-a", *map(str, folders[:half]), "--faces-b", *map(str, folders[half:]), "--pretrain",
                       "--model-dir", str(model_dir), "--iterations", str(a.iterations), "--minutes", str(a.minutes),
                       "--save-every", "250", "--preview-every", "250", "--model", a.model,
                       "--batch-size", str(a.batch_size), "--device", a.device, "--workers", str(a.workers), *RECIPE])
    if code:  # interrupted: the card would describe a budget the base did not get; run again to go on
        return code
    budget = " ".join(argv if argv is not None else sys.argv[1:])
    device = utils.pick_device(a.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "a CPU"
    export(model_dir, out, budget, a.model, folders, where, a.batch_size)
    shutil.rmtree(a.work / "frames", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
