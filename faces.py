"""Finding faces and telling people apart, with dlib: detection, 68 landmarks, following faces from frame to
frame, face-recognition embeddings, and the processes that do it for a run.

crop_face.py and convert_video.py find faces with the same settings (DetectorSettings, from the same flags:
add_detector_args) and the same tracker; a person is known by the mean embedding of their faces, which
crop_face.py stores in alignments.json (records.py) and the other steps read from there (person_embedding).
"""
import contextlib
import dataclasses
import importlib.util
import multiprocessing
import os
import signal
from pathlib import Path

import cv2
import dlib
import numpy as np

import align
import records
import utils
from utils import UserError

IDENTITY_THRESHOLD = 0.6  # face-recognition distance under which two faces are the same person (dlib's bound)
REDETECT_EVERY = 24       # frames between detector runs while faces are followed

# ---------------------------------------------------------------- dlib's models and the detector settings

LANDMARKS_MODEL = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR_MODEL = "mmod_human_face_detector.dat"
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


def dlib_model_path(name):
    """Path of a model file shipped by the face-recognition-models package.

    Looked up without importing the package (its __init__ needs pkg_resources).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("package face-recognition-models is missing: pip install -r requirements.txt")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / name


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
    """How faces are found; the defaults are every script's --detector/--detect-size/--upsample defaults."""
    detector: str = "hog"        # hog (fast, frontal) or cnn (slower, more poses)
    landmarks_model: Path = None  # dlib 68-point model file (None: the one in face-recognition-models)
    detect_size: int = 640       # detect on a copy whose longer side is at most this (0 = full size)
    upsample: int = 0            # dlib upsampling for small faces (each step ~4x slower)

    @classmethod
    def from_args(cls, args):
        """The settings of the flags add_detector_args declares."""
        return cls(args.detector, args.landmarks_model, args.detect_size, args.upsample)

    def analyzer(self):
        return FaceAnalyzer(**dataclasses.asdict(self))


def add_detector_args(parser):
    """The face-detection flags every step that finds faces takes, with the same defaults."""
    default = DetectorSettings()
    parser.add_argument("--detector", choices=["hog", "cnn"], default=default.detector, help="dlib face detector")
    parser.add_argument("--detect-size", type=utils.non_negative_int, default=default.detect_size,
                        help="longest side of the copy detection runs on (0 = full size); raise it for small faces")
    parser.add_argument("--upsample", type=utils.non_negative_int, default=default.upsample,
                        help="dlib upsampling steps for small faces")
    parser.add_argument("--landmarks-model", type=Path, default=None,
                        help="dlib 68-point model file (default: the one in face-recognition-models)")


class FaceAnalyzer:
    """dlib detector (HOG or CNN) + 68-point landmarks, detecting on a downscaled copy."""

    def __init__(self, detector="hog", landmarks_model=None, detect_size=640, upsample=0):
        if detector == "hog":
            self.detector = dlib.get_frontal_face_detector()
        elif detector == "cnn":
            path = utils.require_file(dlib_model_path(CNN_DETECTOR_MODEL), "dlib CNN detector model")
            self.detector = dlib.cnn_face_detection_model_v1(str(path))
        else:
            raise UserError(f"unknown detector {detector!r} (use hog or cnn)")
        path = utils.require_file(landmarks_model or dlib_model_path(LANDMARKS_MODEL), "landmarks model")
        self.predictor = dlib.shape_predictor(str(path))
        self.kind, self.detect_size, self.upsample = detector, detect_size, upsample

    def detect(self, gray):
        """Face boxes [left, top, right, bottom] in full-resolution pixels, largest first."""
        h, w = gray.shape[:2]
        scale = min(1.0, self.detect_size / max(h, w)) if self.detect_size else 1.0
        small = gray if scale == 1.0 else cv2.resize(gray, (round(w * scale), round(h * scale)),
                                                     interpolation=cv2.INTER_AREA)
        found = self.detector(small, self.upsample)
        rects = [d.rect if self.kind == "cnn" else d for d in found]
        boxes = [[r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale] for r in rects]
        boxes = [align.clamp_box(b, w, h) for b in boxes]
        boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def landmarks(self, gray, box):
        rect = dlib.rectangle(*[int(round(v)) for v in box])
        shape = self.predictor(gray, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def analyze(self, image, all_faces=False):
        """[(box, landmarks(68, 2))] for the largest face, or for every face."""
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        boxes = self.detect(gray)
        if not all_faces:
            boxes = boxes[:1]
        return [(box, self.landmarks(gray, box)) for box in boxes]


# ---------------------------------------------------------------- following faces


class FaceTracker:
    """Faces followed from frame to frame in a run of consecutive frames.

    The landmark model runs on a box taken from the previous frame's landmarks; the detector
    runs only on the first frame, every `redetect_every` frames (so faces entering the shot
    are found), after a cut (a large change of the whole frame) and when a face is lost (its
    aligned crop no longer looks like the one at the last detection, or it jumps or changes
    size too much). Call it with each frame in order; reset() before a frame that does not
    follow the last one.
    """

    CUT = 25.0          # mean absolute change of a 32x32 grey thumbnail (0..255) that counts as a cut
    SAME_FACE = 0.6     # least correlation of the 32x32 aligned grey crop with the one at the last detection
    MAX_JUMP = 0.5      # largest move of the face centre between frames, in inter-ocular distances
    MAX_SCALE = 0.25    # largest relative change of the face size between frames

    def __init__(self, analyzer, redetect_every=REDETECT_EVERY, all_faces=False):
        self.analyzer, self.redetect_every, self.all_faces = analyzer, redetect_every, all_faces
        self.detections = self.tracked = 0  # detector runs and tracked frames, for the record
        self.reset()

    def reset(self):
        self.faces, self.thumb, self.since, self.detected, self.continued = [], None, 0, False, False

    def __call__(self, image):
        """[(box, landmarks (68, 2))] of the faces in this frame, largest first."""
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        thumb = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
        cut = self.thumb is not None and np.abs(thumb - self.thumb).mean() > self.CUT
        self.thumb = thumb
        tracked = None
        if self.faces and not cut and self.since < self.redetect_every:
            tracked = self._follow(gray)
        self.continued = bool(self.faces) and not cut  # the same shot: faces near the last frame's are those faces
        if tracked is None:
            found = self.analyzer.analyze(gray, self.all_faces)
            self.faces = [dict(landmarks=landmarks, detected=(box, landmarks), crop=_crop(gray, landmarks))
                          for box, landmarks in found]
            self.since, self.detections, self.detected = 1, self.detections + 1, True
            return found
        for face, (_, landmarks) in zip(self.faces, tracked):
            face["landmarks"] = landmarks
        self.since, self.tracked, self.detected = self.since + 1, self.tracked + 1, False
        return sorted(tracked, key=lambda f: -(f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))

    def _follow(self, gray):
        """Each face's (box, landmarks) in this frame, or None when any face is lost (the detector must run).

        The box is the detector's box at the last detection, moved and scaled as the landmarks moved
        since then, so the landmark model sees the box it would get from the detector."""
        h, w = gray.shape
        tracked = []
        for face in self.faces:
            previous = face["landmarks"]
            (l, t, r, b), at_detection = face["detected"]
            motion = align.umeyama(at_detection, previous)[:2]  # similarity: landmarks then -> landmarks now
            centre = align.transform_points([[(l + r) / 2, (t + b) / 2]], motion)[0]
            half_w, half_h = np.array([r - l, b - t]) * align.matrix_scale(motion) / 2
            box = align.clamp_box([centre[0] - half_w, centre[1] - half_h, centre[0] + half_w, centre[1] + half_h],
                                  w, h)
            landmarks = self.analyzer.landmarks(gray, box)
            size_then, size_now = align.inter_ocular(previous), align.inter_ocular(landmarks)
            jump = np.linalg.norm(landmarks.mean(0) - previous.mean(0)) / max(size_then, 1e-6)
            if (jump > self.MAX_JUMP or abs(size_now / max(size_then, 1e-6) - 1) > self.MAX_SCALE
                    or _correlation(_crop(gray, landmarks), face["crop"]) < self.SAME_FACE):
                return None
            tracked.append((box, landmarks))
        return tracked


def _crop(gray, landmarks, size=32):
    return align.warp_face(gray, align.align_matrix(landmarks, size, coverage=1.0), size).astype(np.float32)


def _correlation(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-6))



# ---------------------------------------------------------------- who is who


class FaceEmbedder:
    """dlib's face-recognition ResNet: 128-d embeddings; distance < 0.6 means the same person."""

    def __init__(self):
        path = utils.require_file(dlib_model_path(RECOGNITION_MODEL), "dlib recognition model")
        self.net = dlib.face_recognition_model_v1(str(path))

    def embed(self, image, landmarks):
        """Embedding of the face with these 68 landmarks (frame pixels) in a BGR image."""
        pts = [dlib.point(int(round(x)), int(round(y))) for x, y in landmarks]
        l, t = np.min(landmarks, 0)
        r, b = np.max(landmarks, 0)
        shape = dlib.full_object_detection(dlib.rectangle(int(l), int(t), int(r), int(b)), pts)
        return np.array(self.net.compute_face_descriptor(np.ascontiguousarray(image[..., ::-1]), shape))


def carry_embeddings(image, found, previous, embed, every=False):
    """[(embedding, where it was measured, landmarks)] for a frame's faces [(box, landmarks)].

    A face near one of the last frame's faces (`previous`, as returned for it: followed, or found again where
    it was) carries that face's embedding; a new face is measured with embed(image, landmarks) -> (embedding,
    where). every=True measures every face. Pass no previous faces after a cut: another person may stand where
    the face was."""
    out = []
    for _, landmarks in found:
        near = [p for p in previous if np.linalg.norm(p[2].mean(0) - landmarks.mean(0)) <
                0.5 * align.inter_ocular(landmarks)]
        out.append((near[0][0], near[0][1], landmarks) if near and not every else (*embed(image, landmarks), landmarks))
    return out


def reference_embeddings(paths, what="reference", settings=DetectorSettings()):
    """(K, 128) embeddings of the largest face in each photo or aligned face of `paths`; UserError if none."""
    analyzer, embedder = settings.analyzer(), FaceEmbedder()
    found = []
    for path in paths:
        image = utils.read_image(utils.require_file(path, f"{what} image"))
        if image is None:
            raise UserError(f"cannot read {what} image {path}")
        pad = image.shape[0] // 2  # an aligned face fills its image: the detector needs a margin around it
        for candidate in (image, cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)):
            faces = analyzer.analyze(candidate)
            if faces:
                found.append(embedder.embed(candidate, faces[0][1]))
                break
        else:
            raise UserError(f"no face found in {what} image {path}")
    return np.array(found)


def face_embeddings(folders):
    """(N, 128) embeddings of the faces in aligned-face folders, as crop_face.py measured them (alignments.json);
    faces without one (added by hand, or a folder without a record) are measured here."""
    found, missing = [], []
    for folder in [Path(folders)] if isinstance(folders, (str, Path)) else map(Path, folders):
        stored = records.face_embeddings(folder)
        for path in utils.list_images(folder) if folder.is_dir() else []:
            (found.append(stored[path.name]) if stored.get(path.name) is not None else missing.append(path))
    if missing:
        found += list(reference_embeddings(missing, "face"))
    if not found:
        raise UserError(f"no face images in {', '.join(map(str, folders))} (run crop_face.py first)")
    return np.array(found, np.float64)


def person_embedding(folders):
    """A person's identity: the mean embedding of their faces in aligned-face folders (face_embeddings)."""
    return face_embeddings(folders).mean(0)


# ---------------------------------------------------------------- detection processes

WORKER_MEMORY_MB = 400  # what a detection worker process holds (dlib models, a frame, numpy, torch imported)

_worker = {}  # this process's FaceAnalyzer and FaceEmbedder (made on first use), or why they cannot be


def worker_analyzer():
    """The FaceAnalyzer of this process (a detection worker, or the main process detecting itself)."""
    if "error" in _worker:
        raise _worker["error"]
    return _worker["analyzer"]


def worker_embedder():
    """The face-recognition model of this process, loaded on first use."""
    if "embedder" not in _worker:
        _worker["embedder"] = FaceEmbedder()
    return _worker["embedder"]


def _init_worker(settings, ignore_ctrl_c=True):
    """Load the dlib models once per process. In a pool, Ctrl-C is the main process's to handle (no traceback from
    each worker), and a model that cannot be loaded is reported by the worker's first task (a failing
    initializer would be retried forever by the pool)."""
    cv2.setNumThreads(1)
    if ignore_ctrl_c:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _worker["analyzer"] = settings.analyzer()
    except (UserError, RuntimeError) as e:
        _worker["error"] = UserError(str(e))


def detection_workers(requested):
    """How many detection processes to start: no more than asked, than the cores, or than free memory holds."""
    return max(1, min(requested, os.cpu_count() or 1, available_memory_mb() // WORKER_MEMORY_MB))


class InProcess:
    """A detection pool of one: this process runs each task when its result is asked for (the Pool API in use)."""
    ahead = 0  # tasks worth handing out before the first result is needed

    def imap(self, fn, tasks, chunksize=1):
        return map(fn, tasks)

    def apply_async(self, fn, args):
        return _Later(fn, args)


class _Later:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def get(self):
        return self.fn(*self.args)


@contextlib.contextmanager
def detection_pool(workers, settings):
    """Processes that find faces with `settings`, each with dlib's models loaded, as a multiprocessing Pool (imap,
    apply_async; `ahead`: how many tasks keep them busy); for 1 worker, this process (InProcess, same API)."""
    if workers <= 1:
        _init_worker(settings, ignore_ctrl_c=False)
        if "error" in _worker:
            raise _worker.pop("error")
        yield InProcess()
        return
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (settings,))
    pool.ahead = workers
    try:
        yield pool
    finally:
        pool.terminate()


def available_memory_mb():
    """Free memory (MemAvailable), or a large number where it cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 1 << 20
