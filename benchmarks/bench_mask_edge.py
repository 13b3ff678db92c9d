"""Where the pasted face's edge lies against what B's decoder was trained to draw, and what --mask-erode takes away.

Two figures per pair of bench_quality.py (its faces and held-out frames, made there first), no model needed:

- reach: in the model's view (--size px, --coverage), the pixels inside A's landmark hull on most of A's held-out
  faces that lie inside B's training region (train.region_weights, the loss's face) on fewer than --rare of B's
  training faces: where a swap is pasted but B's decoder learnt little (the loss weighs it at 0.05 there).
- eroded: for each --erode, the share of evaluate.py's measured interior (the hull drawn in by a tenth of the eye
  distance) where the pasted mask is below 0.99, i.e. where A's own face shows through, and A's mean weight there
  (1 - the mask, over the whole interior): the detail figures of a conversion read that much of A's real skin.

    python benchmarks/bench_mask_edge.py --out <bench_quality.py's --out> --pairs obama-andrew mead hdtf
"""
import argparse
import json
from pathlib import Path

import numpy as np

from bench_quality import PAIRS, prepare_pair
from common import require_data

import align
import blend
import faces
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


def reach(sides, size, coverage, rare):
    """(pixels in A's hull on most of A's held-out faces, of them those in B's region on < rare of B's faces)."""
    full = (align.FACE_SIZE, align.FACE_SIZE)
    b = region_share(sides["B"][0], size, coverage, lambda p: train.region_weights(p) > 0)
    a = region_share(sides["A"][1], size, coverage, lambda p: align.face_hull_mask(p, full, 1.0) > 0)
    inside = a > 0.5
    return int(inside.sum()), int((inside & (b < rare)).sum())


def eroded(test_frames, size, coverage, erode, every):
    """{erosion: (mean share of the measured interior where the pasted mask is below 0.99, A's mean weight there)}."""
    analyzer = faces.FaceAnalyzer()
    shares = {e: [] for e in erode}
    white = np.full((size, size, 3), 255, np.uint8)
    for path in utils.list_images(test_frames)[::every]:
        image = utils.read_image(path)
        found = analyzer.analyze(image)
        if not found:
            continue
        landmarks = found[0][1]
        matrix = align.align_matrix(landmarks, size, coverage)
        interior = align.face_interior_mask(landmarks, image.shape) > 0.5
        for e in erode:  # a white face pasted on black, as convert_video.py pastes it: the mask itself
            settings = blend.BlendSettings(color="none", mask="hull", mask_erode=e, sharpen=0, detail=0)
            mask = blend.paste_face(np.zeros_like(image), white, matrix, landmarks, settings)[..., 0] / 255
            shares[e].append(((mask[interior] < 0.99).mean(), 1 - mask[interior].mean()))
    return {e: [round(float(x), 4) for x in np.mean(v, axis=0)] for e, v in shares.items()}


def main(argv=None):
    args = parse_args(argv)
    require_data()
    results = {}
    for pair in args.pairs:
        sides, test_frames = prepare_pair(pair, args.out)
        in_a, rare = reach(sides, args.size, args.coverage, args.rare)
        results[pair] = dict(a_hull_pixels=in_a, rarely_in_b_region=rare,
                             interior_below_full_mask=eroded(test_frames, args.size, args.coverage, args.erode,
                                                             args.every))
        print(json.dumps({pair: results[pair]}), flush=True)
    print(f"\n| pair | A's hull px ({args.size} px view) | of them in B's region on < {args.rare:.0%} of B's faces | "
          + " | ".join(f"--mask-erode {e:g}: interior not fully pasted, A's weight" for e in args.erode) + " |")
    print("|---|---|---|" + "---|" * len(args.erode))
    for pair, r in results.items():
        shares = r["interior_below_full_mask"]
        print(f"| {pair} | {r['a_hull_pixels']} | {r['rarely_in_b_region']} | "
              + " | ".join(f"{shares[e][0]:.3f}, {shares[e][1]:.3f}" for e in args.erode) + " |")


if __name__ == "__main__":
    main()
