"""Step 2: find, align and save the faces of one person in a folder of frames.

For every image in IMAGES_DIR (in name order): find the faces with dlib (HOG by default,
CNN by flag), following them from frame to frame (the detector runs on a downscaled copy
only every few frames, after a cut or a lost face; the 68 landmarks are found at full
resolution in every frame), and align each face with a similarity (Umeyama) fit of
landmarks 17..67 to a mean-face template, so the template fills the central 160 px of a
256x256 face, the region train.py's augmentation uses.

Which faces are kept:
  * the person: with --reference photos (or aligned faces) of the person, faces within
    --identity-threshold of them (dlib's face-recognition ResNet; 0.6 = same person);
    --exclude drops people you name. Without --reference, in footage with several people,
    the faces of the whole run are clustered and the person seen in the most frames is
    kept; a face of each person found is written to FACES_DIR/people/ (pass one as
    --reference to keep that person instead). One person per frame at most, unless
    --all-faces (which keeps every face of every person).
  * curation: faces much blurrier than the run's typical face (motion blur) and faces
    whose landmarks fit the mean face badly (misaligned) go to FACES_DIR/rejected/.
Writes FACES_DIR/<frame>_<k>.png and FACES_DIR/alignments.json: per frame its faces, each
with box, 68 landmarks (frame pixels), the 2x3 frame->face matrix, sharpness, head yaw
and pitch, landmark fit error, identity distance (where measured) and whether it was kept
or why it was rejected. Move a face between FACES_DIR and rejected/ by hand and later runs
respect it; train.py uses the faces in FACES_DIR only.

A re-run resumes (alignments.json is saved every few seconds, so even a killed run loses
little) as long as the frames are the ones the record describes; faces of other frames
or other settings are never mixed in (--overwrite starts again). One run at a time per
faces folder.

Example:
    python crop_face.py --images-dir train/personA --faces-dir train/personA_face
    python crop_face.py --images-dir train/stage --faces-dir train/stage_face --reference me.jpg
Tiny run:
    python crop_face.py --images-dir /tmp/frames --faces-dir /tmp/faces --workers 1
"""
import argparse
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import utils

IMAGES_DIR = Path("train/personA")      # frames from crop_from_video.py
FACES_DIR = Path("train/personA_face")  # aligned 256x256 faces + alignments.json
WORKERS = max(1, (os.cpu_count() or 1))  # detection processes
IDENTITY_THRESHOLD = 0.6                # face-recognition distance under which a face is the reference person
BLUR_THRESHOLD = 0.25                   # reject faces less sharp than this share of the run's median face
MAX_FIT_ERROR = 0.07                    # reject faces whose landmarks fit the mean face worse than this
CHUNK = 256                             # most consecutive frames per task (faces are followed within a task)
AMBIGUOUS = (0.75, 1.5)                 # carried identities this far (x threshold) from the person are re-measured
SAVE_SECONDS = 5                        # alignments.json is rewritten this often
REJECTED, PEOPLE = "rejected", "people"  # subfolders of FACES_DIR


def alignment_residual(landmarks):
    """RMS distance of the landmarks, aligned, to the mean face (units of the template's size): the shape fit."""
    landmarks = np.asarray(landmarks, np.float64)
    fitted = utils.transform_points(landmarks[utils.ALIGN_POINTS],
                                    utils.umeyama(landmarks[utils.ALIGN_POINTS], utils.MEAN_FACE)[:2])
    return float(np.sqrt(((fitted - utils.MEAN_FACE) ** 2).sum(1).mean()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images-dir", type=Path, default=IMAGES_DIR, help="folder of frames")
    p.add_argument("--faces-dir", type=Path, default=FACES_DIR, help="output folder for aligned faces")
    utils.add_detector_args(p)
    p.add_argument("--reference", type=Path, nargs="+", default=None,
                   help="photos or aligned faces of the person to keep")
    p.add_argument("--exclude", type=Path, nargs="+", default=None, help="photos of people to leave out")
    p.add_argument("--identity-threshold", type=float, default=IDENTITY_THRESHOLD,
                   help="largest face-recognition distance to --reference that counts as the person")
    p.add_argument("--all-faces", action="store_true", help="keep every face of every person, not one person")
    p.add_argument("--blur-threshold", type=float, default=BLUR_THRESHOLD,
                   help="reject faces less sharp than this share of the median face (0 = keep blurred faces)")
    p.add_argument("--max-fit-error", type=float, default=MAX_FIT_ERROR,
                   help="reject faces whose landmarks fit the mean face worse than this (0 = off)")
    p.add_argument("--redetect-every", type=utils.positive_int, default=utils.REDETECT_EVERY,
                   help="run the detector at least every N frames while following faces (1 = every frame)")
    p.add_argument("--size", type=utils.positive_int, default=utils.FACE_SIZE, help="size of the saved faces in pixels")
    p.add_argument("--workers", type=utils.positive_int, default=WORKERS, help="detection processes")
    p.add_argument("--overwrite", action="store_true", help="replace faces already in --faces-dir")
    return p.parse_args(argv)


# ---------------------------------------------------------------- per chunk of frames (worker processes)


def process_chunk(task):
    """Find, align and save the faces of consecutive frames; [(frame name, stat, face records or None)].

    Each face gets its identity (a face-recognition embedding): measured on every face when
    embed_every, else where the face was detected and carried along while it is followed
    (one measurement per face every few frames: enough to tell people apart)."""
    paths, faces_dir, size, redetect_every, embed_every = task
    tracker = utils.FaceTracker(utils.worker_analyzer(), redetect_every, all_faces=True)
    results, identities = [], []
    for path in paths:
        stat = frame_stat(path)
        image = utils.read_image(path)
        if image is None:
            results.append((path.name, stat, None))
            tracker.reset()
            continue
        records = []
        found = tracker(image)
        identities = carried_identities(image, path.name, found, identities if tracker.continued else [], embed_every)
        for k, ((box, landmarks), (embedding, measured_on, _)) in enumerate(zip(found, identities)):
            matrix = utils.align_matrix(landmarks, size)
            face = utils.warp_face(image, matrix, size)
            face_name = f"{path.stem}_{k}.png"
            utils.write_image(Path(faces_dir) / face_name, face)
            yaw, pitch, _ = utils.head_pose(landmarks, image.shape)
            in_face = utils.transform_points(landmarks, matrix)
            interior = utils.face_interior_mask(in_face, face.shape)
            records.append(dict(
                frame=path.name, face=face_name, box=[round(v, 2) for v in box],
                landmarks=landmarks.round(2).tolist(), matrix=matrix.round(6).tolist(),
                sharpness=round(utils.sharpness(face, in_face, interior), 2),
                weakest_direction=round(weakest_direction(face, interior), 2),
                yaw=round(yaw, 1), pitch=round(pitch, 1), fit_error=round(alignment_residual(landmarks), 4),
                embedding=embedding, embedding_of=measured_on))
        results.append((path.name, stat, records))
    return results


def chunk_size(frames, workers):
    """Frames per task: as many per worker as the frames allow, up to CHUNK (progress is saved per task),
    in tasks of equal size. Faces are followed through a task, and each face's identity (135 ms of a core)
    is measured once per task. 602 frames on 2 workers: 4 tasks of 151 frames; 200 frames: 2 of 100 (not
    64 + 64 on one worker and 64 + 8 on the other, as in fixed tasks of 64)."""
    tasks = max(1, workers * -(-frames // (workers * CHUNK)))
    return max(1, -(-frames // tasks))


def carried_identities(image, frame, found, previous, every):
    """[(embedding, frame it was measured on, landmarks)] for this frame's faces.

    A face near one of the last frame's faces (followed, or found again where it was) carries that
    face's identity; a new face is measured (every face, with every=True, and after a cut, where the
    caller passes no previous faces: another person may stand where the face was)."""
    out = []
    for _, landmarks in found:
        near = [p for p in previous if np.linalg.norm(p[2].mean(0) - landmarks.mean(0)) <
                0.5 * utils.inter_ocular(landmarks)]
        if near and not every:
            out.append((near[0][0], near[0][1], landmarks))
        else:
            out.append((utils.worker_embedder().embed(image, landmarks).round(5).tolist(), frame, landmarks))
    return out


def weakest_direction(face, interior):
    """Second-derivative energy inside the face along its weakest of four directions (0, 45, 90, 135 deg).

    Motion blur wipes out detail along one direction only; the Laplacian (the sum over directions)
    barely drops when the blur runs along the face's many horizontal edges (measured: motion-blurred
    copies kept 19-60 % of the clip's median Laplacian variance, this measure 12-13 %, against >= 46 %
    for every face of the clip itself)."""
    gray = cv2.cvtColor(face, cv2.COLOR_BGR2GRAY).astype(np.float64)
    inside = interior > 0.5
    diagonal = np.array([[1, 0, 0], [0, -2, 0], [0, 0, 1]], np.float64)
    kernels = (np.array([[1, -2, 1]], np.float64), np.array([[1], [-2], [1]], np.float64), diagonal, diagonal[:, ::-1])
    return min(float(cv2.filter2D(gray, -1, k)[inside].var()) for k in kernels)


def embed_face(task):
    """dlib embedding of a saved aligned face (its landmarks moved into the face), or None if unreadable."""
    path, landmarks, matrix = task
    face = utils.read_image(path)
    if face is None:
        return None
    return utils.worker_embedder().embed(face, utils.transform_points(landmarks, matrix)).round(5).tolist()


def frame_stat(path):
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


# ---------------------------------------------------------------- the record


def frames_identity(images_dir):
    """What crop_from_video.py recorded about where the frames came from (None for a folder of your own)."""
    meta_path = images_dir / utils.FRAMES_NAME
    if not meta_path.is_file():
        return None
    meta = utils.read_json(meta_path)
    return {k: meta.get(k) for k in utils.FRAMES_SOURCE_KEYS}


def run_identity(args):
    """The settings that make faces differ: a record made with others cannot be resumed."""
    return dict(images_dir=str(args.images_dir.resolve()), frames_source=frames_identity(args.images_dir),
                size=args.size, detector=args.detector, detect_size=args.detect_size, upsample=args.upsample,
                landmarks_model=str(args.landmarks_model) if args.landmarks_model else None)


def load_previous(faces_dir, identity, frames, overwrite):
    """{frame name: (stat, face records)} of an earlier run to resume, {} to start afresh; refuses to mix."""
    path = faces_dir / utils.ALIGNMENTS_NAME
    existing = utils.list_images(faces_dir) + (utils.list_images(faces_dir / REJECTED)
                                               if (faces_dir / REJECTED).is_dir() else [])
    if overwrite:
        for p in existing:
            p.unlink()
        shutil.rmtree(faces_dir / PEOPLE, ignore_errors=True)
        return {}
    data = utils.read_json(path) if path.exists() else None
    if data is None or any(data.get(k) != v for k, v in identity.items()):
        if not existing:
            return {}
        what = ("frames of another video or other settings" if data is not None and
                data.get("images_dir") == identity["images_dir"] else "faces from other frames")
        raise utils.UserError(f"{faces_dir} already holds {len(existing)} {what}; "
                              "choose another --faces-dir or pass --overwrite to replace them")
    now = {p.name: frame_stat(p) for p in frames}
    done = {name: (rec["stat"], rec["faces"]) for name, rec in data.get("frames", {}).items()}
    changed = [name for name, (stat, _) in done.items() if now.get(name) != stat]
    if changed:
        raise utils.UserError(f"{len(changed)} frames in {identity['images_dir']} changed since these faces were "
                              f"made (e.g. {changed[0]}); pass --overwrite to make them again")
    recorded = {r["face"] for _, faces in done.values() for r in faces}
    for p in existing:  # faces an interrupted run saved after its last record: their frames are done again
        if p.name not in recorded:
            p.unlink()
    return done


def save_record(faces_dir, identity, args, done):
    utils.write_json(faces_dir / utils.ALIGNMENTS_NAME, dict(
        identity, coverage=utils.FACE_COVERAGE, settings=utils.settings_dict(args),
        frames={name: dict(stat=stat, faces=faces) for name, (stat, faces) in sorted(done.items())}), indent=None)


# ---------------------------------------------------------------- who is kept


def choose_person(faces, references, excludes, threshold):
    """({face name: distance to the person} of the person's faces, {face name: distance} of all, the people
    found: [(frames, sample face, centroid, total face area)], most frames first; empty with references).

    With references: faces within `threshold` of the nearest reference and not nearer an excluded
    person. Without: the embeddings are clustered (dlib's Chinese whispers) and the cluster seen in the
    most frames is the person: its faces, and any face within `threshold` of its centre."""
    import dlib

    names = [r["face"] for r in faces]
    vectors = np.array([r["embedding"] for r in faces])
    people, member = [], np.zeros(len(faces), bool)
    if references is None:
        labels = np.array(dlib.chinese_whispers_clustering([dlib.vector(v) for v in vectors], 0.5))
        for label in set(labels.tolist()):
            members = np.flatnonzero(labels == label)
            frames = len({faces[i]["frame"] for i in members})
            area = sum(face_area(faces[i]) for i in members)
            people.append((frames, names[members[0]], vectors[members].mean(0), area, label))
        people.sort(key=lambda p: (-p[0], -p[3]))  # the most frames; then the larger faces
        references, member = people[0][2][None], labels == people[0][4]
        people = [p[:4] for p in people]
    distance = np.linalg.norm(vectors[:, None] - references[None], axis=2).min(1)
    keep = member | (distance < threshold)
    if excludes is not None and len(excludes):
        keep &= np.linalg.norm(vectors[:, None] - excludes[None], axis=2).min(1) >= distance
    return ({n: round(float(d), 4) for n, d, k in zip(names, distance, keep) if k},
            {n: round(float(d), 4) for n, d in zip(names, distance)}, people)


def face_area(record):
    l, t, r, b = record["box"]
    return (r - l) * (b - t)


def decide(done, args, person, distances):
    """Set each face's 'kept' (True, or the reason it is rejected); one face per frame unless --all-faces."""
    faces = [r for _, recs in done.values() for r in recs]
    for r in faces:
        r.pop("kept", None)
        if r.get("by_hand"):
            r["kept"] = r["by_hand"] == "kept" or "rejected by hand"
        if distances is not None:
            r["identity_distance"] = distances.get(r["face"])
    for _, recs in done.values():
        if person is not None:
            candidates = sorted((r for r in recs if r["face"] in person), key=lambda r: person[r["face"]])
        else:
            candidates = list(recs)
        keep = candidates if args.all_faces else candidates[:1]
        for r in recs:
            if "kept" in r:
                continue
            if r not in candidates:
                r["kept"] = "another person" if person is not None else "a smaller face in the frame"
            elif r not in keep:
                r["kept"] = "the person again in this frame (a weaker match)"
    sharp = [r["weakest_direction"] for r in faces if "kept" not in r]
    median = float(np.median(sharp)) if sharp else 0.0
    for r in faces:
        if "kept" in r:
            continue
        if args.max_fit_error and r["fit_error"] > args.max_fit_error:
            r["kept"] = f"misaligned (landmark fit error {r['fit_error']:.3f} > {args.max_fit_error})"
        elif args.blur_threshold and r["weakest_direction"] < args.blur_threshold * median:
            r["kept"] = (f"blurred (detail along its weakest direction {r['weakest_direction']:.0f} < "
                         f"{args.blur_threshold} x the median face's {median:.0f})")
        else:
            r["kept"] = True


def place(faces_dir, done):
    """Move each face file to FACES_DIR or rejected/ as decided; notice faces a person moved by hand."""
    (faces_dir / REJECTED).mkdir(exist_ok=True)
    for _, recs in done.values():
        for r in recs:
            here, there = faces_dir / r["face"], faces_dir / REJECTED / r["face"]
            source, target = (there, here) if r["kept"] is True else (here, there)
            if source.exists() and not target.exists():
                os.replace(source, target)


def notice_hand_moves(faces_dir, done):
    """A face a person moved between FACES_DIR and rejected/ since the last run keeps that choice."""
    for _, recs in done.values():
        for r in recs:
            if "kept" not in r:
                continue
            in_main = (faces_dir / r["face"]).exists()
            in_rejected = (faces_dir / REJECTED / r["face"]).exists()
            if r["kept"] is True and in_rejected and not in_main:
                r["by_hand"] = "rejected"
            elif r["kept"] is not True and in_main and not in_rejected:
                r["by_hand"] = "kept"


# ---------------------------------------------------------------- main


def run(args):
    utils.print_settings(args, "crop_face.py")
    if not args.images_dir.is_dir():
        raise utils.UserError(f"frames folder not found: {args.images_dir} (run crop_from_video.py first)")
    frames = utils.list_images(args.images_dir)
    if not frames:
        raise utils.UserError(f"no images in {args.images_dir}")
    faces_dir = utils.ensure_writable_dir(args.faces_dir)
    if faces_dir.resolve() == args.images_dir.resolve():
        raise utils.UserError("--faces-dir is the frames folder; choose another folder")
    with utils.locked(faces_dir):
        return crop(args, frames, faces_dir)


def crop(args, frames, faces_dir):
    settings = utils.detector_settings(args)
    references = utils.reference_embeddings(args.reference, "reference", settings) if args.reference else None
    excludes = utils.reference_embeddings(args.exclude, "exclude", settings) if args.exclude else None
    meta = args.images_dir / utils.FRAMES_NAME
    if meta.is_file() and utils.read_json(meta).get("complete") is False:
        print(f"warning: {args.images_dir} holds an incomplete extraction (interrupted, still running, or "
              "a damaged video); the frames there are used")
    identity = run_identity(args)
    done = load_previous(faces_dir, identity, frames, args.overwrite)
    save_record(faces_dir, identity, args, done)  # from the first moment: a killed run can always be resumed
    notice_hand_moves(faces_dir, done)
    todo = [p for p in frames if p.name not in done]
    if done:
        print(f"resuming: {len(done)} frames already processed, {len(todo)} to go")
    unreadable = []
    embed_every = references is not None  # a chosen person: each face is checked itself
    workers = utils.detection_workers(args.workers)
    step = chunk_size(len(todo), workers)
    tasks = [(todo[i:i + step], faces_dir, args.size, args.redetect_every, embed_every)
             for i in range(0, len(todo), step)]
    pool = utils.detection_pool(min(workers, max(1, len(tasks))), settings)
    last_save = time.time()
    try:
        stream = pool.imap(process_chunk, tasks) if pool else map(process_chunk, tasks)
        with tqdm(total=len(todo), unit="frame", desc="faces") as bar:
            for results in stream:
                for name, stat, records in results:
                    bar.update(1)
                    if records is None:
                        unreadable.append(name)
                        tqdm.write(f"warning: skipped unreadable image {name}")
                        continue
                    done[name] = (stat, records)
                if time.time() - last_save > SAVE_SECONDS:  # a crash or kill loses only the last seconds
                    save_record(faces_dir, identity, args, done)
                    last_save = time.time()
    finally:
        if pool:
            pool.terminate()
        save_record(faces_dir, identity, args, done)
    faces = [r for _, recs in done.values() for r in recs]
    if not faces:
        summary(done, unreadable, faces_dir)
        raise utils.UserError(f"no faces found in {args.images_dir}; try --detector cnn or --upsample 1")
    person = distances = None
    if not args.all_faces or references is not None:
        person, distances, people = identify(faces, faces_dir, references, excludes, args)
        save_record(faces_dir, identity, args, done)
        if references is None and len(people) > 1:
            report_people(faces_dir, people, faces)
    decide(done, args, person, distances)
    place(faces_dir, done)
    save_record(faces_dir, identity, args, done)
    if not summary(done, unreadable, faces_dir):
        raise utils.UserError(f"no face kept in {faces_dir} (see {faces_dir / REJECTED} and the reasons above)")
    return 0


def identify(faces, faces_dir, references, excludes, args):
    """Choose the person's faces: ({face: distance} of the person, {face: distance} of all, people found).

    Faces without an identity get one (with --reference, every face its own). Without a reference,
    faces whose identity was carried along a track and lies near the line between the person and the
    others (AMBIGUOUS) are measured themselves and the choice is made again: one poor measurement at
    the start of a track must not decide for all its frames."""
    measure(faces_dir, [r for r in faces if r.get("embedding") is None
                        or (references is not None and r.get("embedding_of") != r["frame"])], args)
    usable = [r for r in faces if r.get("embedding") is not None]
    person, distances, people = choose_person(usable, references, excludes, args.identity_threshold)
    if references is None:
        low, high = AMBIGUOUS[0] * args.identity_threshold, AMBIGUOUS[1] * args.identity_threshold
        unsure = [r for r in usable if r.get("embedding_of") != r["frame"] and low < distances[r["face"]] < high]
        if unsure:
            measure(faces_dir, unsure, args)
            person, distances, people = choose_person(usable, None, excludes, args.identity_threshold)
    return person, distances, people


def measure(faces_dir, records, args):
    """Give each record its own face's identity (from the saved aligned face, in the pool)."""
    if not records:
        return
    tasks = [(face_path(faces_dir, r), r["landmarks"], r["matrix"]) for r in records]
    workers = utils.detection_workers(args.workers) if len(tasks) > 8 else 1
    pool = utils.detection_pool(workers, utils.detector_settings(args))
    try:
        stream = pool.imap(embed_face, tasks, chunksize=4) if pool else map(embed_face, tasks)
        for r, embedding in zip(records, tqdm(stream, total=len(tasks), unit="face", desc="identities")):
            r["embedding"], r["embedding_of"] = embedding, r["frame"]
    finally:
        if pool:
            pool.terminate()


def face_path(faces_dir, record):
    here = faces_dir / record["face"]
    return here if here.exists() else faces_dir / REJECTED / record["face"]


def report_people(faces_dir, people, faces):
    """Print the people found and save a face of each to FACES_DIR/people/ (to pass as --reference)."""
    folder = faces_dir / PEOPLE
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    print(f"{len(people)} people found; keeping person 1 (seen in the most frames). A face of each is in {folder}:")
    for k, (frames, sample, _, _) in enumerate(people, 1):
        target = folder / f"person{k}_{frames}frames.png"
        shutil.copy(face_path(faces_dir, {"face": sample}), target)
        print(f"  person {k}: in {frames} frames, e.g. {target}")
    if len(people) > 1:
        print(f"  to keep another person: --reference {folder}/person2_*.png (and --overwrite is not needed)")


def summary(done, unreadable, faces_dir):
    """Print what was kept and rejected and why; returns the number of faces kept."""
    faces = [r for _, recs in done.values() for r in recs]
    kept = sum(1 for r in faces if r["kept"] is True)
    reasons = {}
    for r in faces:
        if r["kept"] is not True:
            key = r["kept"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    no_face = sorted(name for name, (_, recs) in done.items() if not recs)
    rejected = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])) or "none"
    print(f"{len(done)} frames: {kept} faces kept in {faces_dir}, rejected: {rejected} "
          f"(in {faces_dir / REJECTED}); {len(no_face)} frames without a face, {len(unreadable)} unreadable")
    if no_face:
        print(f"  no face in: {', '.join(no_face[:10])}{' ...' if len(no_face) > 10 else ''}")
    return kept


def main(argv=None):
    args = parse_args(argv)
    with utils.user_errors():
        return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
