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
Writes FACES_DIR/<frame>_<k>.png and FACES_DIR/alignments.json (records.py): per frame its
faces, each with box, 68 landmarks (frame pixels), the 2x3 frame->face matrix, sharpness,
head yaw and pitch, landmark fit error, its face-recognition embedding, identity distance
(where measured) and whether it was kept or why it was rejected. Move a face between
FACES_DIR and rejected/ by hand and later runs respect it; train.py uses the faces in
FACES_DIR only. Images you add to FACES_DIR yourself are yours: a re-run keeps them (and
says so), and --overwrite deletes only the faces the record lists, never through a link.

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
import dlib
import numpy as np
from tqdm import tqdm

import align
import faces
import records
import utils

IMAGES_DIR = Path("train/personA")      # frames from crop_from_video.py
FACES_DIR = Path("train/personA_face")  # aligned 256x256 faces + alignments.json
WORKERS = max(1, (os.cpu_count() or 1))  # detection processes
BLUR_THRESHOLD = 0.25                   # reject faces less sharp than this share of the run's median face
MAX_FIT_ERROR = 0.07                    # reject faces whose landmarks fit the mean face worse than this
CHUNK = 256                             # most consecutive frames per task (faces are followed within a task)
AMBIGUOUS = (0.75, 1.5)                 # carried identities this far (x threshold) from the person are re-measured
SAVE_SECONDS = 5                        # alignments.json is rewritten this often
REJECTED, PEOPLE = "rejected", "people"  # subfolders of FACES_DIR
MAX_SIZE = 2048                         # the largest --size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images-dir", type=Path, default=IMAGES_DIR, help="folder of frames")
    p.add_argument("--faces-dir", type=Path, default=FACES_DIR, help="output folder for aligned faces")
    faces.add_detector_args(p)
    p.add_argument("--reference", type=Path, nargs="+", default=None,
                   help="photos or aligned faces of the person to keep")
    p.add_argument("--exclude", type=Path, nargs="+", default=None, help="photos of people to leave out")
    p.add_argument("--identity-threshold", type=utils.non_negative_number, default=faces.IDENTITY_THRESHOLD,
                   help="largest face-recognition distance to --reference that counts as the person")
    p.add_argument("--all-faces", action="store_true", help="keep every face of every person, not one person")
    p.add_argument("--blur-threshold", type=utils.non_negative_number, default=BLUR_THRESHOLD,
                   help="reject faces less sharp than this share of the median face (0 = keep blurred faces)")
    p.add_argument("--max-fit-error", type=utils.non_negative_number, default=MAX_FIT_ERROR,
                   help="reject faces whose landmarks fit the mean face worse than this (0 = off)")
    p.add_argument("--redetect-every", type=utils.positive_int, default=faces.REDETECT_EVERY,
                   help="run the detector at least every N frames while following faces (1 = every frame)")
    p.add_argument("--size", type=utils.whole(32, MAX_SIZE), default=align.FACE_SIZE,
                   help="size of the saved faces in pixels")
    p.add_argument("--workers", type=utils.positive_int, default=WORKERS, help="detection processes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the faces this script made in --faces-dir before (images you added are kept)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- per chunk of frames (worker processes)


def process_chunk(task):
    """Find, align and save the faces of consecutive frames; [(frame name, stat, [FaceRecord] or None)].

    Each face gets its identity (a face-recognition embedding): measured on every face when
    embed_every, else where the face was detected and carried along while it is followed
    (faces.carry_embeddings: one measurement per face every few frames, enough to tell people apart)."""
    paths, faces_dir, size, redetect_every, embed_every = task
    tracker = faces.FaceTracker(faces.worker_analyzer(), redetect_every, all_faces=True)
    results, carried = [], []
    for path in paths:
        stat = frame_stat(path)
        image = utils.read_image(path)
        if image is None:
            results.append((path.name, stat, None))
            tracker.reset()
            continue
        found = tracker(image)
        carried = faces.carry_embeddings(image, found, carried if tracker.continued else [],
                                         lambda im, landmarks: (embed(im, landmarks), path.name), embed_every)
        results.append((path.name, stat, [face_record(image, path, k, box, face, faces_dir, size)
                                          for k, ((box, _), face) in enumerate(zip(found, carried))]))
    return results


def face_record(image, path, k, box, carried, faces_dir, size):
    """Align, save and measure the k-th face of a frame (`carried`: its embedding, where that was measured and
    its landmarks): its FaceRecord."""
    embedding, measured_on, landmarks = carried
    matrix = align.align_matrix(landmarks, size)
    face = align.warp_face(image, matrix, size)
    face_name = f"{path.stem}_{k}.png"
    utils.write_image(Path(faces_dir) / face_name, face)
    yaw, pitch, _ = align.head_pose(landmarks, image.shape)
    in_face = align.transform_points(landmarks, matrix)
    interior = align.face_interior_mask(in_face, face.shape)
    return records.FaceRecord(
        frame=path.name, face=face_name, box=[round(v, 2) for v in box], landmarks=landmarks.round(2).tolist(),
        matrix=matrix.round(6).tolist(), sharpness=round(align.sharpness(face, in_face, interior), 2),
        weakest_direction=round(weakest_direction(face, interior), 2), yaw=round(yaw, 1), pitch=round(pitch, 1),
        fit_error=round(alignment_residual(landmarks), 4), embedding=embedding, embedding_of=measured_on)


def embed(image, landmarks):
    return faces.worker_embedder().embed(image, landmarks).round(5).tolist()


def alignment_residual(landmarks):
    """RMS distance of the landmarks, aligned, to the mean face (units of the template's size): the shape fit."""
    points = np.asarray(landmarks, np.float64)[align.ALIGN_POINTS]
    fitted = align.transform_points(points, align.umeyama(points, align.MEAN_FACE)[:2])
    return float(np.sqrt(((fitted - align.MEAN_FACE) ** 2).sum(1).mean()))


def weakest_direction(face, interior):
    """Second-derivative energy inside the face along its weakest of four directions (0, 45, 90, 135 deg).

    Motion blur wipes out detail along one direction only; the Laplacian (the sum over directions) barely
    drops when the blur runs along the face's many horizontal edges, this measure does (docs/QUALITY.md)."""
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
    return embed(face, align.transform_points(landmarks, matrix))


def frame_stat(path):
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def chunk_size(frames, workers):
    """Frames per task: as many per worker as the frames allow, up to CHUNK (progress is saved per task), in tasks
    of equal size. Faces are followed through a task, and each face's identity is measured once per task."""
    tasks = max(1, workers * -(-frames // (workers * CHUNK)))
    return max(1, -(-frames // tasks))


# ---------------------------------------------------------------- the folder and its record


def frames_identity(images_dir):
    """What crop_from_video.py recorded about where the frames came from (None for a folder of your own)."""
    return records.frames_source(images_dir)


def run_identity(args):
    """The settings that make faces differ: a record made with others cannot be resumed."""
    return dict(images_dir=str(args.images_dir.resolve()), frames_source=frames_identity(args.images_dir),
                size=args.size, detector=args.detector, detect_size=args.detect_size, upsample=args.upsample,
                landmarks_model=str(args.landmarks_model) if args.landmarks_model else None)


class Folder:
    """The faces folder: its record (alignments.json: `header`, the settings, and `done`, {frame name: (stat,
    [FaceRecord])}) and the face files that record lists, in the folder or in rejected/. Images it does not list
    are the user's: never deleted or moved."""

    def __init__(self, path, identity, args):
        self.path, self.identity, self.args = path, identity, args
        self.rejected, self.people = path / REJECTED, path / PEOPLE
        try:
            found = records.read_alignments(path)
        except utils.UserError:
            if not args.overwrite:
                raise
            found = None  # a damaged record: --overwrite starts afresh (what it listed is unknown, so nothing goes)
        self.header, self.done = found if found is not None else (None, {})

    def save(self):
        records.write_alignments(self.path, dict(self.identity, coverage=align.FACE_COVERAGE,
                                                 settings=utils.settings_dict(self.args)), self.done)

    def faces(self):
        return [r for _, recs in self.done.values() for r in recs]

    def file(self, face_name):
        here = self.path / face_name
        return here if here.exists() else self.rejected / face_name

    def images(self):
        """The images in the folder and, unless it is a link to elsewhere, in rejected/."""
        inside = self.rejected.is_dir() and not self.rejected.is_symlink()
        return utils.list_images(self.path) + (utils.list_images(self.rejected) if inside else [])

    def users_images(self):
        """The images in the folder that the record does not list (the user's own)."""
        recorded = {r.face for r in self.faces()}
        return [p for p in utils.list_images(self.path) if p.name not in recorded]

    def remove_listed(self):
        """Delete the faces the record lists (never through a link) and the people/ samples; the user's images
        stay. The record starts afresh."""
        for record in self.faces():
            for path in (self.path / record.face, self.rejected / record.face):
                if path.is_file() and not path.is_symlink() and not path.parent.is_symlink():
                    path.unlink()
        if self.people.is_dir() and not self.people.is_symlink():
            for path in self.people.glob("person*frames.png"):
                path.unlink()
        self.done = {}


def load_previous(folder, frames, overwrite):
    """Resume an earlier run of the same frames and settings (its record stays in folder.done), or start afresh;
    refuses to mix faces of other frames or settings into the folder."""
    same = folder.header is not None and all(folder.header.get(k) == v for k, v in folder.identity.items())
    if overwrite or not same:
        ours = {r.face for r in folder.faces()}
        if not overwrite and folder.images() and (folder.header is None or ours):
            what = ("frames of another video or other settings" if folder.header is not None and
                    folder.header.get("images_dir") == folder.identity["images_dir"] else "faces from other frames")
            raise utils.UserError(f"{folder.path} already holds {len(folder.images())} {what}; "
                                  "choose another --faces-dir or pass --overwrite to replace them")
        folder.remove_listed()
        return
    now = {p.name: frame_stat(p) for p in frames}
    changed = [name for name, (stat, _) in folder.done.items() if now.get(name) != stat]
    if changed:
        raise utils.UserError(f"{len(changed)} frames in {folder.identity['images_dir']} changed since these faces "
                              f"were made (e.g. {changed[0]}); pass --overwrite to make them again")
    todo = {Path(name).stem for name in now if name not in folder.done}
    for path in folder.users_images():  # faces an interrupted run saved after its last record (their frames are
        if path.stem.rsplit("_", 1)[0] in todo:  # done again); the user's own images stay
            path.unlink()


# ---------------------------------------------------------------- who is kept


def choose_person(found, references, excludes, threshold):
    """({face name: distance to the person} of the person's faces, {face name: distance} of all, the people
    found: [(frames, sample face, centroid, total face area)], most frames first; empty with references).

    With references: faces within `threshold` of the nearest reference and not nearer an excluded
    person. Without: the embeddings are clustered (dlib's Chinese whispers) and the cluster seen in the
    most frames is the person: its faces, and any face within `threshold` of its centre."""
    names = [r.face for r in found]
    vectors = np.array([r.embedding for r in found])
    people, member = [], np.zeros(len(found), bool)
    if references is None:
        labels = np.array(dlib.chinese_whispers_clustering([dlib.vector(v) for v in vectors], 0.5))
        for label in set(labels.tolist()):
            members = np.flatnonzero(labels == label)
            frames = len({found[i].frame for i in members})
            area = sum(face_area(found[i]) for i in members)
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
    left, top, right, bottom = record.box
    return (right - left) * (bottom - top)


def decide(done, args, person, distances):
    """Set each face's kept (True, or False with the reason); one face per frame unless --all-faces."""
    found = [r for _, recs in done.values() for r in recs]
    for r in found:
        r.kept = r.reason = None
        if r.by_hand:
            r.kept, r.reason = (True, None) if r.by_hand == "kept" else (False, "rejected by hand")
        if distances is not None:
            r.identity_distance = distances.get(r.face)
    for _, recs in done.values():
        candidates = (sorted((r for r in recs if r.face in person), key=lambda r: person[r.face])
                      if person is not None else list(recs))
        keep = candidates if args.all_faces else candidates[:1]
        for r in recs:
            if r.kept is None and r not in candidates:
                r.reject("another person" if person is not None else "a smaller face in the frame")
            elif r.kept is None and r not in keep:
                r.reject("the person again in this frame (a weaker match)")
    undecided = [r for r in found if r.kept is None]
    median = float(np.median([r.weakest_direction for r in undecided])) if undecided else 0.0
    for r in undecided:
        if args.max_fit_error and r.fit_error > args.max_fit_error:
            r.reject(f"misaligned (landmark fit error {r.fit_error:.3f} > {args.max_fit_error})")
        elif args.blur_threshold and r.weakest_direction < args.blur_threshold * median:
            r.reject(f"blurred (detail along its weakest direction {r.weakest_direction:.0f} < "
                     f"{args.blur_threshold} x the median face's {median:.0f})")
        else:
            r.kept = True


def place(folder):
    """Move each face file to FACES_DIR or rejected/ as decided."""
    if folder.rejected.is_symlink():
        raise utils.UserError(f"{folder.rejected} is a link; move it away (this script moves rejected faces there)")
    folder.rejected.mkdir(exist_ok=True)
    for r in folder.faces():
        here, there = folder.path / r.face, folder.rejected / r.face
        source, target = (there, here) if r.kept else (here, there)
        if source.exists() and not target.exists():
            os.replace(source, target)


def notice_hand_moves(folder):
    """A face a person moved between FACES_DIR and rejected/ since the last run keeps that choice."""
    for r in folder.faces():
        if r.kept is None:
            continue
        in_main, in_rejected = (folder.path / r.face).exists(), (folder.rejected / r.face).exists()
        if r.kept and in_rejected and not in_main:
            r.by_hand = "rejected"
        elif not r.kept and in_main and not in_rejected:
            r.by_hand = "kept"


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
    settings = faces.DetectorSettings.from_args(args)
    references = faces.reference_embeddings(args.reference, "reference", settings) if args.reference else None
    excludes = faces.reference_embeddings(args.exclude, "exclude", settings) if args.exclude else None
    if (records.read_frames(args.images_dir) or {}).get("complete") is False:
        print(f"warning: {args.images_dir} holds an incomplete extraction (interrupted, still running, or "
              "a damaged video); the frames there are used")
    folder = Folder(faces_dir, run_identity(args), args)
    load_previous(folder, frames, args.overwrite)
    folder.save()  # from the first moment: a killed run can always be resumed
    notice_hand_moves(folder)
    unreadable = find_faces(args, folder, [p for p in frames if p.name not in folder.done], settings,
                            embed_every=references is not None)  # a chosen person: each face is checked itself
    if not folder.faces():
        summary(folder, unreadable)
        raise utils.UserError(f"no faces found in {args.images_dir}; try --detector cnn or --upsample 1")
    person = distances = None
    if not args.all_faces or references is not None:
        person, distances, people = identify(folder, references, excludes, args)
        folder.save()
        if references is None and len(people) > 1:
            report_people(folder, people)
    decide(folder.done, args, person, distances)
    place(folder)
    folder.save()
    if not summary(folder, unreadable):
        raise utils.UserError(f"no face kept in {faces_dir} (see {folder.rejected} and the reasons above)")
    return 0


def find_faces(args, folder, todo, settings, embed_every):
    """Find, align and save the faces of the frames `todo` in the detection pool, adding them to the folder's
    record as they come (saved every SAVE_SECONDS): the names of unreadable frames."""
    if folder.done:
        print(f"resuming: {len(folder.done)} frames already processed, {len(todo)} to go")
    workers = faces.detection_workers(args.workers)
    step = chunk_size(len(todo), workers)
    tasks = [(todo[i:i + step], folder.path, args.size, args.redetect_every, embed_every)
             for i in range(0, len(todo), step)]
    unreadable, last_save = [], time.time()
    try:
        with faces.detection_pool(min(workers, max(1, len(tasks))), settings) as pool, \
                tqdm(total=len(todo), unit="frame", desc="faces") as bar:
            for results in pool.imap(process_chunk, tasks):
                for name, stat, found in results:
                    bar.update(1)
                    if found is None:
                        unreadable.append(name)
                        tqdm.write(f"warning: skipped unreadable image {name}")
                    else:
                        folder.done[name] = (stat, found)
                if time.time() - last_save > SAVE_SECONDS:  # a crash or kill loses only the last seconds
                    folder.save()
                    last_save = time.time()
    finally:
        folder.save()
    return unreadable


def identify(folder, references, excludes, args):
    """Choose the person's faces: ({face: distance} of the person, {face: distance} of all, people found).

    Faces without an identity get one (with --reference, every face its own). Without a reference,
    faces whose identity was carried along a track and lies near the line between the person and the
    others (AMBIGUOUS) are measured themselves and the choice is made again: one poor measurement at
    the start of a track must not decide for all its frames."""
    found = folder.faces()
    measure(folder, [r for r in found if r.embedding is None
                     or (references is not None and r.embedding_of != r.frame)], args)
    usable = [r for r in found if r.embedding is not None]
    person, distances, people = choose_person(usable, references, excludes, args.identity_threshold)
    if references is None:
        low, high = AMBIGUOUS[0] * args.identity_threshold, AMBIGUOUS[1] * args.identity_threshold
        unsure = [r for r in usable if r.embedding_of != r.frame and low < distances[r.face] < high]
        if unsure:
            measure(folder, unsure, args)
            person, distances, people = choose_person(usable, None, excludes, args.identity_threshold)
    return person, distances, people


def measure(folder, found, args):
    """Give each record its own face's identity (from the saved aligned face, in the pool)."""
    if not found:
        return
    tasks = [(folder.file(r.face), r.landmarks, r.matrix) for r in found]
    workers = faces.detection_workers(args.workers) if len(tasks) > 8 else 1
    with faces.detection_pool(workers, faces.DetectorSettings.from_args(args)) as pool:
        stream = pool.imap(embed_face, tasks, chunksize=4)
        for r, embedding in zip(found, tqdm(stream, total=len(tasks), unit="face", desc="identities")):
            r.embedding, r.embedding_of = embedding, r.frame


def report_people(folder, people):
    """Print the people found and save a face of each to FACES_DIR/people/ (to pass as --reference)."""
    if folder.people.is_symlink():
        raise utils.UserError(f"{folder.people} is a link; move it away (a face of each person found is written "
                              "there)")
    folder.people.mkdir(exist_ok=True)
    for path in folder.people.glob("person*frames.png"):  # the samples of an earlier run
        path.unlink()
    print(f"{len(people)} people found; keeping person 1 (seen in the most frames). A face of each is in "
          f"{folder.people}:")
    for k, (frames, sample, _, _) in enumerate(people, 1):
        target = folder.people / f"person{k}_{frames}frames.png"
        shutil.copy(folder.file(sample), target)
        print(f"  person {k}: in {frames} frames, e.g. {target}")
    if len(people) > 1:
        print(f"  to keep another person: --reference {folder.people}/person2_*.png (and --overwrite is not needed)")


def summary(folder, unreadable):
    """Print what was kept and rejected and why; returns the number of faces kept."""
    found = folder.faces()
    kept = sum(1 for r in found if r.kept)
    reasons = {}
    for r in found:
        if not r.kept:
            key = (r.reason or "undecided").split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    no_face = sorted(name for name, (_, recs) in folder.done.items() if not recs)
    rejected = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1])) or "none"
    print(f"{len(folder.done)} frames: {kept} faces kept in {folder.path}, rejected: {rejected} "
          f"(in {folder.rejected}); {len(no_face)} frames without a face, {len(unreadable)} unreadable")
    if no_face:
        print(f"  no face in: {', '.join(no_face[:10])}{' ...' if len(no_face) > 10 else ''}")
    yours = folder.users_images()
    if yours:
        print(f"  {len(yours)} images in {folder.path} were not made by this script (e.g. {yours[0].name}): kept "
              "as they are; train.py uses them")
    return kept


def main(argv=None):
    return utils.main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
