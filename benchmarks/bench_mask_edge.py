"""Where the pasted face's edge lies against what B's decoder was trained to draw, and what --mask-erode takes away.

Per pair of bench_quality.py (its faces and held-out frames, made there first); only the last needs a model:

- reach: in the model's view (--size px, --coverage), the pixels inside A's landmark hull on most of A's held-out
  faces that lie inside B's training region (train.region_weights, the loss's face) on fewer than --rare of B's
  training faces: where a swap is pasted but B's decoder learnt little (the loss weighs it at 0.05 there); and how
  many of them lie outside the reach train.py records for B (train.region_reach, models.REACH_MIN), where
  convert_video.py's default mask (--mask both) leaves A's face; and the share of the pasted mask that this takes
  away, frame by frame.
- eroded: for each --erode, the share of evaluate.py's measured interior (the hull drawn in by a tenth of the eye
  distance) where the pasted mask is below 0.99, i.e. where A's own face shows through, and A's mean weight there
  (1 - the mask, over the whole interior): the detail figures of a conversion read that much of A's real skin.
- with --model (a budget's model of bench_quality.py, e.g. tiny128_cover80_lr5/60min): A's held-out frames
  converted raw (its RAW_FLAGS), and evaluate.py's fine-detail and feature-scale ratios measured on its interior
  and on the part of it that is fully pasted: how much that rim of A's own face adds to the figures; and
  <model>/../mask_reach.jpg: three held-out frames converted with the defaults, --mask hull and --mask both.

    python benchmarks/bench_mask_edge.py --out <bench_quality.py's --out> --pairs obama-andrew mead hdtf
    python benchmarks/bench_mask_edge.py --out <bench_quality.py's --out> --model tiny128_cover80_lr5/60min
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from bench_quality import PAIRS, RAW_FLAGS, check, contact_sheet, prepare_pair, sheet_frames
from common import require_data

import align
import blend
import convert_video
import evaluate
import faces
import models
import records
import train
import utils


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out/quality"), help="bench_quality.py's --out")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--size", type=int, default=128, help="the model's face size")
    p.add_argument("--coverage", type=float, default=0.8, help="the model's --coverage")
    p.add_argument("--rare", type=float, default=0.1, help="'B's decoder learnt little': in B's region on fewer "
                                                           "than this share of B's training faces")
    p.add_argument("--erode", type=float, nargs="+", default=[0.0, 0.02, 0.03, 0.04], help="--mask-erode values")
    p.add_argument("--every", type=int, default=10, help="use every Nth of A's held-out frames for 'eroded'")
    p.add_argument("--cut", type=float, nargs="+", default=[0.5, 0.9],
                   help="also the pasted mask lost if the reach began at these shares of B's faces (models.REACH_MIN)")
    p.add_argument("--model", default=None,
                   help="<recipe>/<N>min of bench_quality.py: also measure its raw swap's detail with and without "
                        "the rim (every 2nd frame, as bench_quality.py)")
    return p.parse_args(argv)


def region_share(folders, size, coverage, region):
    """The share of faces whose `region` (a mask of a face's landmarks in stored-face pixels) covers each pixel of
    the model's view (size x size)."""
    counts, n = np.zeros((size, size)), 0
    for folder in folders:
        for landmarks in records.aligned_landmarks(folder).values():
            mask = region(landmarks).astype(np.float32)
            counts += align.center_face(mask, size, align.FACE_COVERAGE / coverage) > 0.5
            n += 1
    if not n:
        raise SystemExit(f"no aligned faces in {', '.join(map(str, folders))}: run bench_quality.py first")
    return counts / n


def recorded_reach(sides, size, coverage):
    """The reach train.py records for B's decoder (train.region_reach of B's training faces)."""
    return train.region_reach(train.load_training_faces(sides["B"][0], quiet=True), size,
                              align.FACE_COVERAGE / coverage)


def reach(sides, size, coverage, rare, recorded):
    """(pixels in A's hull on most of A's held-out faces, of them those in B's region on < rare of B's faces, of
    them those outside B's `recorded` reach, i.e. what convert_video.py's default mask leaves to A)."""
    full, lift = (align.FACE_SIZE, align.FACE_SIZE), blend.BlendSettings().brow_lift  # the pasted hull's lift
    b = region_share(sides["B"][0], size, coverage, lambda p: train.region_weights(p) > 0)
    a = region_share(sides["A"][1], size, coverage, lambda p: align.face_hull_mask(p, full, lift) > 0)
    inside = a > 0.5
    return (int(inside.sum()), int((inside & (b < rare)).sum()),
            int((inside & (models.reach_mask(recorded) == 0)).sum()))


def pasted_mask(image, landmarks, size, coverage, erode=0.0, reach=None):
    """The mask (0-1, frame-sized) convert_video.py pastes a size-px face of this coverage through: the hull, or with
    `reach` (models.FaceSwapModel.reach_mask) the default --mask both of a model that records one."""
    white = np.full((size, size, 3), 255, np.uint8)  # a white face pasted on black: the mask itself
    settings = blend.BlendSettings(color="none", mask="hull" if reach is None else "both", mask_erode=erode,
                                   sharpen=0, detail=0)
    matrix = align.align_matrix(landmarks, size, coverage)
    return blend.paste_face(np.zeros_like(image), white, matrix, landmarks, settings, reach)[..., 0] / 255


def reach_cut(recorded, test_frames, size, coverage, every, cuts):
    """What B's `recorded` reach takes from the pasted mask over A's held-out frames (every `every`th), at
    models.REACH_MIN and at each share of `cuts`: {share: the share of the hull's pasted weight removed, mean and
    largest over the frames}."""
    shares = sorted({models.REACH_MIN, *cuts})
    analyzer, lost = faces.FaceAnalyzer(), {c: [] for c in shares}
    for path in utils.list_images(test_frames)[::every]:
        image = utils.read_image(path)
        found = analyzer.analyze(image)
        if found:
            hull = pasted_mask(image, found[0][1], size, coverage)
            for c in shares:
                reach = models.reach_mask(recorded, c)
                lost[c].append(1 - pasted_mask(image, found[0][1], size, coverage, reach=reach).sum() / hull.sum())
    return {c: dict(mean=round(float(np.mean(v)), 4), max=round(float(np.max(v)), 4), frames=len(v))
            for c, v in lost.items()}


def eroded(test_frames, size, coverage, erode, every):
    """{erosion: (mean share of the measured interior where the pasted mask is below 0.99, A's mean weight there)}."""
    analyzer = faces.FaceAnalyzer()
    shares = {e: [] for e in erode}
    for path in utils.list_images(test_frames)[::every]:
        image = utils.read_image(path)
        found = analyzer.analyze(image)
        if not found:
            continue
        landmarks = found[0][1]
        interior = align.face_interior_mask(landmarks, image.shape) > 0.5
        for e in erode:
            mask = pasted_mask(image, landmarks, size, coverage, e)
            shares[e].append(((mask[interior] < 0.99).mean(), 1 - mask[interior].mean()))
    return {e: [round(float(x), 4) for x in np.mean(v, axis=0)] for e, v in shares.items()}


def rim_free_detail(test_frames, model_dir, work):
    """evaluate.py's raw fine-detail and feature-scale ratios (swap / source, means over every 2nd frame) on its
    interior and on the interior's fully pasted part."""
    model, _ = models.load_model(model_dir / models.CHECKPOINT)
    swapped = work / "mask_edge_swapped"
    check(convert_video.main(["--video-path", str(test_frames), "--model-dir", str(model_dir), "--output-path",
                              str(swapped), "--workers", "1", "--overwrite"] + RAW_FLAGS.split()))
    analyzer = faces.FaceAnalyzer()
    sums = {region: np.zeros(4) for region in ("interior", "fully pasted")}
    for path in utils.list_images(test_frames)[::2]:
        src, dst = utils.read_image(path), utils.read_image(swapped / (path.stem + ".png"))
        found = analyzer.analyze(src)
        if not found or dst is None:
            continue
        landmarks = found[0][1]
        interior = align.face_interior_mask(landmarks, src.shape)
        full = interior * (pasted_mask(src, landmarks, model.output_size, model.coverage,
                                       reach=model.reach_mask("b")) >= 0.99)
        for region, mask in (("interior", interior), ("fully pasted", full)):
            sums[region] += [align.sharpness(src, None, mask), align.sharpness(dst, None, mask),
                             evaluate.feature_sharpness(src, landmarks, mask),
                             evaluate.feature_sharpness(dst, landmarks, mask)]
    shutil.rmtree(swapped)
    return {region: dict(fine=round(s[1] / s[0], 4), feature_scale=round(s[3] / s[2], 4))
            for region, s in sums.items()}


def reach_sheet(test_frames, model_dir, path, picks=3):
    """`picks` of A's held-out frames (bench_quality.py's sheet_frames) converted with convert_video.py's defaults
    twice, --mask hull (the whole hull) and --mask both (the hull cut to B's recorded reach): one row each, the
    source, hull, both."""
    chosen = sheet_frames(test_frames, picks)
    work = path.parent / "reach_sheet_frames"
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    for frame in chosen:
        shutil.copy(frame, work / "in" / frame.name)
    swapped = {mask: work / mask for mask in ("hull", "both")}
    for mask, folder in swapped.items():
        check(convert_video.main(["--video-path", str(work / "in"), "--model-dir", str(model_dir), "--output-path",
                                  str(folder), "--workers", "1", "--mask", mask]))
    contact_sheet(chosen, swapped, path)
    shutil.rmtree(work)


def main(argv=None):
    args = parse_args(argv)
    require_data()
    results = {}
    for pair in args.pairs:
        sides, test_frames = prepare_pair(pair, args.out)
        recorded = recorded_reach(sides, args.size, args.coverage)
        in_a, rare, cut = reach(sides, args.size, args.coverage, args.rare, recorded)
        results[pair] = dict(a_hull_pixels=in_a, rarely_in_b_region=rare, outside_b_reach=cut,
                             mask_lost_to_reach=reach_cut(recorded, test_frames, args.size, args.coverage,
                                                          args.every, args.cut),
                             interior_below_full_mask=eroded(test_frames, args.size, args.coverage, args.erode,
                                                             args.every))
        model_dir = args.out / pair / args.model / "model" if args.model else None
        if model_dir and (model_dir / models.CHECKPOINT).is_file():
            results[pair]["raw_detail"] = rim_free_detail(test_frames, model_dir, model_dir.parent)
            reach_sheet(test_frames, model_dir, model_dir.parent / "mask_reach.jpg")
        print(json.dumps({pair: results[pair]}), flush=True)
    print(f"\n| pair | A's hull px ({args.size} px view) | of them in B's region on < {args.rare:.0%} of B's faces | "
          "outside B's recorded reach | pasted mask lost to it: mean, largest | "
          + " | ".join(f"--mask-erode {e:g}: interior not fully pasted, A's weight" for e in args.erode) + " |")
    print("|---|---|---|---|---|" + "---|" * len(args.erode))
    for pair, r in results.items():
        shares = r["interior_below_full_mask"]
        lost = r["mask_lost_to_reach"][models.REACH_MIN]
        print(f"| {pair} | {r['a_hull_pixels']} | {r['rarely_in_b_region']} | {r['outside_b_reach']} | "
              f"{lost['mean']:.4f}, {lost['max']:.4f} | "
              + " | ".join(f"{shares[e][0]:.3f}, {shares[e][1]:.3f}" for e in args.erode) + " |")
    print("\npasted mask lost to B's recorded reach at other shares (mean, largest): " + "; ".join(
        f"{pair}: " + ", ".join(f"{c:g}: {v['mean']:.4f}, {v['max']:.4f}" for c, v in r["mask_lost_to_reach"].items())
        for pair, r in results.items()))
    if args.model:
        print(f"\n{args.model}, raw: | pair | fine, feature scale: interior | fully pasted part |\n|---|---|---|")
        for pair, r in results.items():
            if "raw_detail" in r:
                d = r["raw_detail"]
                print(f"| {pair} | {d['interior']['fine']:.3f}, {d['interior']['feature_scale']:.3f} | "
                      f"{d['fully pasted']['fine']:.3f}, {d['fully pasted']['feature_scale']:.3f} |")


if __name__ == "__main__":
    main()
