"""What two or more steps share: errors and files, devices, face detection and
alignment, face tensors, video reading.

crop_face.py and convert_video.py find and align faces with the same functions,
train.py and convert_video.py agree on what the model sees through `align_matrix`.
Code with a single caller lives with that caller (augmentation in train.py,
blending and the video writer in convert_video.py, metrics in evaluate.py).
"""
import collections
import contextlib
import functools
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

# ---------------------------------------------------------------- errors & files


class UserError(Exception):
    """A problem with the user's input or setup: printed as one line, exit code 1."""


@contextlib.contextmanager
def user_errors():
    """Turn UserError into 'error: ...' on stderr and exit code 1, Ctrl-C into exit 130 (no traceback)."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def list_images(folder):
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def read_image(path):
    """BGR uint8 image, or None when the file is missing or not an image (unicode-safe)."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


# PNG as zlib's Huffman coding of each row's difference from the row above: lossless, and measured on
# frames and faces of 256 and 512 px, 9-37 % faster to write than OpenCV's default, as fast or faster
# to read, at most 3 % larger (python benchmarks/bench_crop_face.py --png)
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
              cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]


def write_image(path, image, jpeg_quality=95):
    """Write atomically (temp file + rename) so an interrupted run leaves no half file."""
    path = Path(path)
    ext = path.suffix.lower()
    params = ([cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext in (".jpg", ".jpeg") else
              PNG_PARAMS if ext == ".png" else [])
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise UserError(f"could not encode {path}")
    write_bytes_atomic(path, buf.tobytes())


TEMP_SUFFIX = ".tmp"  # every atomic write's temp file is ".<name>.<random>.tmp" beside its target


def temp_path(path, suffix=TEMP_SUFFIX):
    """A new, empty temp file beside `path` with the permissions a plain open() would give (umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600 files; others could not read the result
    return fd, Path(tmp)


@functools.lru_cache(maxsize=1)
def current_umask():
    """The process umask (read once: os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path, data):
    """Write to a temp file in the same folder, then rename over `path`: never a half-written file."""
    path = Path(path)
    fd, tmp = temp_path(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path, obj, indent=1):
    """Write atomically; indent=None for large records (json's C encoder: 7x faster than with an indent)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=indent) + "\n").encode())


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def ensure_writable_dir(folder):
    """Create folder (and parents) and prove we can write there, with a clear error if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror or e}") from None
    return folder


def require_file(path, what, hint=""):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    return path


LOCK_NAME = ".faceswap.lock"  # held by the run writing into a folder


@contextlib.contextmanager
def locked(folder, target=None):
    """Hold an advisory lock on an output folder (or on one file `target` in it) for a run.

    A second run on the same output stops at once with a one-line error instead of mixing its
    work into the first one's. The lock goes with the process, so a killed run leaves none.
    """
    import fcntl

    folder = Path(folder)
    path = folder / (LOCK_NAME if target is None else f".{Path(target).name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{folder / (target or '')} is in use by another run (process {owner}); "
                        "wait for it to finish or choose another output") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        remove_stale_temps(folder, target)  # ours to clean now: no other run writes here
        yield
    finally:
        if target is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)  # releases the lock


def remove_stale_temps(folder, target=None):
    """Delete temp files that an interrupted run of this project left (".<name>.<random>.tmp...")."""
    pattern = f".{Path(target).name}.*{TEMP_SUFFIX}*" if target else f".*{TEMP_SUFFIX}*"
    for path in Path(folder).glob(pattern):
        if path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()


def positive_int(text):
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text):
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def non_negative_number(text, also=""):
    """argparse type: a number >= 0 (`also`: what else the flag takes, for the message, e.g. "'auto' or ")."""
    return _number_in(text, 0, None, also)


def share(text):
    """argparse type: a number from 0 to 1."""
    return _number_in(text, 0, 1)


def _number_in(text, low, high=None, also=""):
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (low <= value and (high is None or value <= high)):
        bound = f">= {low:g}" if high is None else f"from {low:g} to {high:g}"
        raise argparse.ArgumentTypeError(f"must be {also}a number {bound}, got {text!r}")
    return value


def _int_at_least(text, low):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {low} or more (got {value})")
    return value


def print_settings(args, title):
    """The resolved settings, one line each, so a log shows what a run used."""
    print(f"{title} settings:")
    for key, value in vars(args).items():
        print(f"  {key:<16} {value}")


def settings_dict(args):
    """The parsed flags as JSON-ready values (paths as strings)."""
    def plain(v):
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {k: plain(v) for k, v in vars(args).items()}


# ---------------------------------------------------------------- devices and precision


def pick_device(name):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available")
    return device


def cpu_supports_bf16():
    import torch

    with contextlib.suppress(Exception):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def cpu_has_amx():
    """Whether the CPU has AMX bf16 tiles (Linux), where bf16 convolutions outrun fp32."""
    with contextlib.suppress(OSError):
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    return False


def pick_precision(precision, device):
    """torch dtype for autocast, or None for plain fp32.

    auto: bf16 (fp16 on GPUs without it) on a GPU or an AMX CPU; fp32 on other CPUs, AVX-512 bf16 ones
    included: there bf16 autocast was no faster for any preset, training or converting, and up to 1.3x
    slower for the default `tiny` (benchmarks/bench_train.py --precision, bench_convert.py --precision)."""
    import torch

    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_amx() and cpu_supports_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------- dlib models


def dlib_model_path(name):
    """Path of a model file shipped by the face-recognition-models package.

    Looked up without importing the package (its __init__ needs pkg_resources).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("package face-recognition-models is missing: pip install -r requirements.txt")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / name


LANDMARKS_MODEL = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR_MODEL = "mmod_human_face_detector.dat"
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


# Detector settings, the defaults of every script's --detector/--detect-size/--upsample flags.
DETECTOR = "hog"    # hog (fast, frontal) or cnn (slower, more poses)
DETECT_SIZE = 640   # detect on a copy whose longer side is at most this (0 = full size)
UPSAMPLE = 0        # dlib upsampling for small faces (each step ~4x slower)


def add_detector_args(parser):
    """The face-detection flags every step that finds faces takes, with the same defaults."""
    parser.add_argument("--detector", choices=["hog", "cnn"], default=DETECTOR, help="dlib face detector")
    parser.add_argument("--detect-size", type=non_negative_int, default=DETECT_SIZE,
                        help="longest side of the copy detection runs on (0 = full size); raise it for small faces")
    parser.add_argument("--upsample", type=non_negative_int, default=UPSAMPLE,
                        help="dlib upsampling steps for small faces")
    parser.add_argument("--landmarks-model", type=Path, default=None,
                        help="dlib 68-point model file (default: the one in face-recognition-models)")


def detector_settings(args):
    """FaceAnalyzer's arguments from the flags of add_detector_args."""
    return (args.detector, args.landmarks_model, args.detect_size, args.upsample)


class FaceAnalyzer:
    """dlib detector (HOG or CNN) + 68-point landmarks, detecting on a downscaled copy."""

    def __init__(self, detector=DETECTOR, landmarks_model=None, detect_size=DETECT_SIZE, upsample=UPSAMPLE):
        import dlib

        if detector == "hog":
            self.detector = dlib.get_frontal_face_detector()
        elif detector == "cnn":
            path = require_file(dlib_model_path(CNN_DETECTOR_MODEL), "dlib CNN detector model")
            self.detector = dlib.cnn_face_detection_model_v1(str(path))
        else:
            raise UserError(f"unknown detector {detector!r} (use hog or cnn)")
        path = require_file(landmarks_model or dlib_model_path(LANDMARKS_MODEL), "landmarks model")
        self.predictor = dlib.shape_predictor(str(path))
        self.kind, self.detect_size, self.upsample = detector, detect_size, upsample
        self._dlib = dlib

    def detect(self, gray):
        """Face boxes [left, top, right, bottom] in full-resolution pixels, largest first."""
        h, w = gray.shape[:2]
        scale = min(1.0, self.detect_size / max(h, w)) if self.detect_size else 1.0
        small = gray if scale == 1.0 else cv2.resize(gray, (round(w * scale), round(h * scale)),
                                                     interpolation=cv2.INTER_AREA)
        found = self.detector(small, self.upsample)
        rects = [d.rect if self.kind == "cnn" else d for d in found]
        boxes = [[r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale] for r in rects]
        boxes = [clamp_box(b, w, h) for b in boxes]
        boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def landmarks(self, gray, box):
        rect = self._dlib.rectangle(*[int(round(v)) for v in box])
        shape = self.predictor(gray, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def analyze(self, image, all_faces=False):
        """[(box, landmarks(68, 2))] for the largest face, or for every face."""
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        boxes = self.detect(gray)
        if not all_faces:
            boxes = boxes[:1]
        return [(box, self.landmarks(gray, box)) for box in boxes]


_worker_analyzer = None  # one FaceAnalyzer per worker process

WORKER_MEMORY_MB = 400  # what a detection worker process holds (dlib models, a frame, numpy, torch imported)


def init_worker_analyzer(detector, landmarks_model, detect_size, upsample):
    """Load the dlib models once per process (the main one too, when it detects itself)."""
    global _worker_analyzer
    cv2.setNumThreads(1)
    _worker_analyzer = FaceAnalyzer(detector, landmarks_model, detect_size, upsample)


_worker_error = None  # why the models could not be loaded in this worker


def init_detection_worker(*settings):
    """Pool initializer: Ctrl-C is the main process's to handle (no traceback from each worker); a model
    that cannot be loaded is reported by the worker's first task (a failing initializer would be retried
    forever by the pool)."""
    import signal

    global _worker_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        init_worker_analyzer(*settings)
    except (UserError, RuntimeError) as e:
        _worker_error = UserError(str(e))


def worker_analyzer():
    if _worker_error is not None:
        raise _worker_error
    return _worker_analyzer


_worker_embedder = None


def worker_embedder():
    """The face-recognition model of this process, loaded on first use."""
    global _worker_embedder
    _worker_embedder = _worker_embedder or FaceEmbedder()
    return _worker_embedder


def detection_workers(requested):
    """How many detection processes to start: no more than asked, than the cores, or than free memory holds."""
    return max(1, min(requested, os.cpu_count() or 1, available_memory_mb() // WORKER_MEMORY_MB))


def detection_pool(workers, settings):
    """A pool of `workers` detection processes, or None for 1 (this process detects; its models are loaded)."""
    if workers <= 1:
        init_worker_analyzer(*settings)
        return None
    import multiprocessing as mp

    return mp.get_context("spawn").Pool(workers, init_detection_worker, settings)


def available_memory_mb():
    """Free memory (MemAvailable), or a large number where it cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 1 << 20


REDETECT_EVERY = 24  # frames between detector runs while tracking


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
            motion = umeyama(at_detection, previous)[:2]  # similarity: landmarks then -> landmarks now
            centre = transform_points([[(l + r) / 2, (t + b) / 2]], motion)[0]
            half_w, half_h = np.array([r - l, b - t]) * matrix_scale(motion) / 2
            box = clamp_box([centre[0] - half_w, centre[1] - half_h, centre[0] + half_w, centre[1] + half_h], w, h)
            landmarks = self.analyzer.landmarks(gray, box)
            size_then, size_now = inter_ocular(previous), inter_ocular(landmarks)
            jump = np.linalg.norm(landmarks.mean(0) - previous.mean(0)) / max(size_then, 1e-6)
            if (jump > self.MAX_JUMP or abs(size_now / max(size_then, 1e-6) - 1) > self.MAX_SCALE
                    or _correlation(_crop(gray, landmarks), face["crop"]) < self.SAME_FACE):
                return None
            tracked.append((box, landmarks))
        return tracked


def _crop(gray, landmarks, size=32):
    return warp_face(gray, align_matrix(landmarks, size, coverage=1.0), size).astype(np.float32)


def _correlation(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-6))


class FaceEmbedder:
    """dlib's face-recognition ResNet: 128-d embeddings; distance < 0.6 means the same person."""

    def __init__(self):
        import dlib

        path = require_file(dlib_model_path(RECOGNITION_MODEL), "dlib recognition model")
        self.net = dlib.face_recognition_model_v1(str(path))
        self._dlib = dlib

    def embed(self, image, landmarks):
        """Embedding of the face with these 68 landmarks (frame pixels) in a BGR image."""
        pts = [self._dlib.point(int(round(x)), int(round(y))) for x, y in landmarks]
        l, t = np.min(landmarks, 0)
        r, b = np.max(landmarks, 0)
        shape = self._dlib.full_object_detection(self._dlib.rectangle(int(l), int(t), int(r), int(b)), pts)
        return np.array(self.net.compute_face_descriptor(np.ascontiguousarray(image[..., ::-1]), shape))


def reference_embeddings(paths, what="reference", settings=()):
    """(K, 128) embeddings of the largest face in each photo or aligned face of `paths`; UserError if none."""
    analyzer, embedder = FaceAnalyzer(*settings), FaceEmbedder()
    found = []
    for path in paths:
        image = read_image(require_file(path, f"{what} image"))
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


def clamp_box(box, width, height):
    l, t, r, b = box
    return [float(max(0, l)), float(max(0, t)), float(min(width - 1, r)), float(min(height - 1, b))]


# ---------------------------------------------------------------- alignment

# Mean face of dlib's 68-point scheme, points 17..67 (the jaw is left out), in [0, 1].
# The same template faceswap's "legacy" centring uses.
MEAN_FACE = np.array([
    [0.000213256, 0.106454], [0.0752622, 0.038915], [0.18113, 0.0187482], [0.29077, 0.0344891],
    [0.393397, 0.0773906], [0.586856, 0.0773906], [0.689483, 0.0344891], [0.799124, 0.0187482],
    [0.904991, 0.038915], [0.98004, 0.106454], [0.490127, 0.203352], [0.490127, 0.307009],
    [0.490127, 0.409805], [0.490127, 0.515625], [0.36688, 0.587326], [0.426036, 0.609345],
    [0.490127, 0.628106], [0.554217, 0.609345], [0.613373, 0.587326], [0.121737, 0.216423],
    [0.187122, 0.178758], [0.265825, 0.179852], [0.334606, 0.231733], [0.260918, 0.245099],
    [0.182743, 0.244077], [0.645647, 0.231733], [0.714428, 0.179852], [0.793132, 0.178758],
    [0.858516, 0.216423], [0.79751, 0.244077], [0.719335, 0.245099], [0.254149, 0.780233],
    [0.340985, 0.745405], [0.428858, 0.727388], [0.490127, 0.742578], [0.551395, 0.727388],
    [0.639268, 0.745405], [0.726104, 0.780233], [0.642159, 0.864805], [0.556721, 0.902192],
    [0.490127, 0.909281], [0.423532, 0.902192], [0.338094, 0.864805], [0.290379, 0.784792],
    [0.428096, 0.778746], [0.490127, 0.785343], [0.552157, 0.778746], [0.689874, 0.784792],
    [0.553364, 0.824182], [0.490127, 0.831803], [0.42689, 0.824182]])

FACE_SIZE = 256          # aligned faces on disk are 256x256
FACE_COVERAGE = 160 / 256  # the template box fills the central 160 px (48..208), as the training warp expects

# Index ranges of dlib's 68-point scheme ("left" = the subject's right, on the image's left).
JAW, BROWS, NOSE = slice(0, 17), slice(17, 27), slice(27, 36)
LEFT_EYE, RIGHT_EYE, EYES, MOUTH = slice(36, 42), slice(42, 48), slice(36, 48), slice(48, 68)
OUTER_EYE_CORNERS = (36, 45)
ALIGN_POINTS = slice(17, 68)  # what the similarity fit uses (MEAN_FACE); the jaw is left out


def umeyama(src, dst, estimate_scale=True):
    """Least-squares similarity transform (3x3) taking points src (N, 2) onto dst (N, 2); NaN if degenerate.

    Umeyama's fit in 2D, in closed form: with centred points as complex numbers z (src) and w (dst),
    the rotation and scale are those of sum(conj(z) w) / sum(|z|^2) (the SVD form gives the same to
    1e-14, at 3x the cost; crop_face.py fits every frame's landmarks several times)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    (x, y), (u, v) = (src - src_mean).T, (dst - dst_mean).T
    a, b, norm = x @ u + y @ v, x @ v - y @ u, x @ x + y @ y
    length = np.hypot(a, b)
    if norm == 0 or length == 0:
        return np.full((3, 3), np.nan)
    scale = length / norm if estimate_scale else 1.0
    cos, sin = scale * a / length, scale * b / length
    t = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    t[:2, 2] = dst_mean - t[:2, :2] @ src_mean
    return t


def align_matrix(landmarks, size=FACE_SIZE, coverage=FACE_COVERAGE):
    """2x3 matrix taking frame pixels to a size x size aligned face.

    The mean-face template (points 17..67) fills `coverage` of the crop, centred.
    coverage=1 gives exactly what the model sees: the central 160/256 of a stored face.
    """
    mat = umeyama(np.asarray(landmarks)[ALIGN_POINTS], MEAN_FACE)[:2]
    inner = size * coverage
    mat = mat * inner
    mat[:, 2] += (size - inner) / 2
    return mat


def transform_points(points, matrix):
    points = np.asarray(points, np.float64)
    return points @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def warp_face(image, matrix, size):
    # Bilinear. warpAffine has no INTER_AREA, so a shrunk crop aliases (the 64 px model face of a 512 px talking
    # head is ~9 grey levels RMSE off a supersampled one). Supersampling it (a k x size warp box-averaged down)
    # moved no quality figure of the three pairs by more than 0.01 but pose, at ~1 ms a face at 512 px: not kept.
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def matrix_scale(matrix):
    return float(np.sqrt(abs(np.linalg.det(np.asarray(matrix)[:, :2]))))


def eye_centres(landmarks):
    landmarks = np.asarray(landmarks)
    return landmarks[LEFT_EYE].mean(0), landmarks[RIGHT_EYE].mean(0)


def inter_ocular(landmarks):
    """Distance between the outer eye corners: the scale landmark errors are measured in."""
    landmarks = np.asarray(landmarks, np.float64)
    return float(np.linalg.norm(landmarks[OUTER_EYE_CORNERS[0]] - landmarks[OUTER_EYE_CORNERS[1]]))


def face_hull_mask(landmarks, shape, brow_lift=0.0):
    """Float mask (H, W) of the landmarks' convex hull; brow_lift > 0 raises the brows over the forehead.

    The brows move up by brow_lift x their distance to the eyes, so the mask covers the
    lower forehead as faceswap's "extended" mask does.
    """
    pts = np.asarray(landmarks, np.float64).copy()
    if brow_lift:
        eyes = pts[EYES].mean(0)
        pts[BROWS] = pts[BROWS] + (pts[BROWS] - eyes) * brow_lift
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(pts).astype(np.int32)), 255)
    return mask.astype(np.float32) / 255


# ---------------------------------------------------------------- head pose and sharpness

# OpenFace's 68-point 3D mean face (x right, y down, z away from the camera; arbitrary units).
MEAN_FACE_3D = np.array([
    [-73.393523, -29.801432, 47.667532], [-72.775014, -10.949766, 45.909403], [-70.533638, 7.929818, 44.842580],
    [-66.850058, 26.074280, 43.141114], [-59.790187, 42.564390, 38.635298], [-48.368973, 56.481080, 30.750622],
    [-34.121101, 67.246992, 18.456453], [-17.875411, 75.056892, 3.609035], [0.098749, 77.061286, -0.881698],
    [17.477031, 74.758448, 5.181201], [32.648966, 66.929021, 19.176563], [46.372358, 56.311389, 30.770570],
    [57.343480, 42.419126, 37.628629], [64.388482, 25.455880, 40.886309], [68.212038, 6.990805, 42.281449],
    [70.486405, -11.666193, 44.142567], [71.375822, -30.365191, 47.140426], [-61.119406, -49.361602, 14.254422],
    [-51.287588, -58.769795, 7.268147], [-37.804800, -61.996155, 0.442051], [-24.022754, -61.033399, -6.606501],
    [-11.635713, -56.686759, -11.967398], [12.056636, -57.391033, -12.051204], [25.106256, -61.902186, -7.315098],
    [38.338588, -62.777713, -1.022953], [51.191007, -59.302347, 5.349435], [60.053851, -50.190255, 11.615746],
    [0.653940, -42.193790, -13.380835], [0.804809, -30.993721, -21.150853], [0.992204, -19.944596, -29.284036],
    [1.226783, -8.414541, -36.948060], [-14.772472, 2.598255, -20.132003], [-7.180239, 4.751589, -23.536684],
    [0.555920, 6.562900, -25.944448], [8.272499, 4.661005, -23.695741], [15.214351, 2.643046, -20.858157],
    [-46.047290, -37.471411, 7.037989], [-37.674688, -42.730510, 3.021217], [-27.883856, -42.711517, 1.353629],
    [-19.648268, -36.754742, -0.111088], [-28.272965, -35.134493, -0.147273], [-38.082418, -34.919043, 1.476612],
    [19.265868, -37.032306, -0.665746], [27.894191, -43.342445, 0.247660], [37.437529, -43.110822, 1.696435],
    [45.170805, -38.086515, 4.894163], [38.196454, -35.532024, 0.282961], [28.764989, -35.484289, -1.172675],
    [-28.916267, 28.612716, -2.240310], [-17.533194, 22.172187, -15.934335], [-6.684590, 19.029051, -22.611355],
    [0.381001, 20.721118, -23.748437], [8.375443, 19.035460, -22.721995], [18.876618, 22.394109, -15.610679],
    [28.794412, 28.079924, -3.217393], [19.057574, 36.298248, -14.987997], [8.956375, 39.634575, -22.554245],
    [0.381549, 40.395647, -23.591626], [-7.428895, 39.836405, -22.406106], [-18.160634, 36.677899, -15.121907],
    [-24.377490, 28.677771, -4.785684], [-6.897633, 25.475976, -20.893742], [0.340663, 26.014269, -22.220479],
    [8.444722, 25.326198, -21.025520], [24.474473, 28.323008, -5.712776], [8.449166, 30.596216, -20.671489],
    [0.205322, 31.408738, -21.903670], [-7.198266, 30.844876, -20.328022]])


def head_pose(landmarks, image_shape):
    """(yaw, pitch, roll) in degrees of a face's 68 landmarks: cv2.solvePnP against a 3D mean face.

    A pinhole camera with the focal length of the image width, centred; 0, 0, 0 is a face
    looking straight at the camera. Yaw > 0: the face turns to the image's right.
    """
    h, w = image_shape[:2]
    camera = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float64)
    points = np.asarray(landmarks, np.float64)
    # SQPnP finds the global optimum (the iterative solver can land on a mirrored face behind the camera)
    ok, rvec, tvec = cv2.solvePnP(MEAN_FACE_3D, points, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        return (float("nan"),) * 3
    rvec, _ = cv2.solvePnPRefineLM(MEAN_FACE_3D, points, camera, None, rvec, tvec)
    angles = cv2.RQDecomp3x3(cv2.Rodrigues(rvec)[0])[0]  # rotations about x (pitch), y (yaw), z (roll)
    pitch, yaw, roll = ((a + 180) % 360 - 180 for a in angles)
    return float(yaw), float(pitch), float(roll)


def face_interior_mask(landmarks, shape, margin=0.1):
    """The landmark hull drawn in by `margin` x the inter-ocular distance: the face without its outline."""
    points = np.asarray(landmarks, np.float64)
    hull = cv2.convexHull(np.round(points).astype(np.float32))[:, 0].astype(np.float64)
    centre = hull.mean(0)
    reach = np.linalg.norm(hull - centre, axis=1).mean()
    shrunk = centre + (hull - centre) * max(0.0, 1 - margin * inter_ocular(points) / max(reach, 1e-6))
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, np.round(shrunk).astype(np.int32), 255)
    return mask.astype(np.float32) / 255


def sharpness(image, landmarks, mask=None):
    """Variance of the Laplacian of the grey image inside the face's interior: fine detail (blur lowers it)."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    mask = face_interior_mask(landmarks, gray.shape) if mask is None else mask
    values = cv2.Laplacian(gray, cv2.CV_64F)[mask > 0.5]
    return float(values.var()) if values.size > 16 else float("nan")


# ---------------------------------------------------------------- faces as arrays and tensors


ALIGNMENTS_NAME = "alignments.json"  # crop_face.py's record beside the faces it saved
FRAMES_NAME = "frames.json"  # crop_from_video.py's record beside the frames it saved
# what in that record identifies the frames (the video's size and contents, the settings), not its path: a
# re-run with the same resumes them, and crop_face.py knows its faces came from them
FRAMES_SOURCE_KEYS = ("source_bytes", "source_digest", "every", "start", "end", "max_frames", "format")


def load_faces(folders, size=FACE_SIZE, quiet=False):
    """(faces, landmarks) of one or more aligned-face folders; unreadable files are skipped.

    faces: uint8 (N, size, size, 3); landmarks: (N, 68, 2) in aligned-face pixels from each
    folder's alignments.json, NaN for a face without a record (e.g. added by hand).
    """
    from tqdm import tqdm

    folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
    faces, landmarks = [], []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"faces folder not found: {folder} (run crop_face.py first)")
        paths = list_images(folder)
        if not paths:
            raise UserError(f"no face images in {folder} (run crop_face.py first)")
        known = aligned_landmarks(folder)
        for path in tqdm(paths, desc=f"loading {folder.name}", unit="face", disable=quiet, leave=False):
            image = read_image(path)
            if image is None:
                tqdm.write(f"warning: skipped unreadable {path}")
                continue
            points = known.get(path.name, np.full((68, 2), np.nan))
            if image.shape[:2] != (size, size):
                points = points * size / image.shape[0]
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            faces.append(image)
            landmarks.append(points)
    if not faces:
        raise UserError(f"no readable face images in {', '.join(map(str, folders))}")
    return np.stack(faces), np.stack(landmarks).astype(np.float32)


def aligned_landmarks(folder):
    """{face file name: its 68 landmarks in aligned-face pixels} from a folder's alignments.json ({} if none)."""
    path = Path(folder) / ALIGNMENTS_NAME
    if not path.is_file():
        return {}
    found = {}
    for frame in read_json(path).get("frames", {}).values():
        for r in frame["faces"]:
            found[r["face"]] = transform_points(r["landmarks"], r["matrix"])
    return found


def center_face(image, size=64, coverage=FACE_COVERAGE):
    """The un-augmented model view of a stored face: its central `coverage`, resized."""
    full = image.shape[0]
    lo, hi = round(full * (1 - coverage) / 2), round(full * (1 + coverage) / 2)
    return cv2.resize(image[lo:hi, lo:hi], (size, size), interpolation=cv2.INTER_AREA)


def to_tensor(images):
    """uint8 BGR (N, H, W, 3) -> float RGB (N, 3, H, W) in [0, 1]."""
    import torch

    arr = np.ascontiguousarray(np.asarray(images)[..., ::-1].transpose(0, 3, 1, 2))
    return torch.from_numpy(arr).float().div_(255)


def to_images(tensor):
    """float RGB (N, 3, H, W) in [0, 1] -> uint8 BGR (N, H, W, 3)."""
    arr = tensor.detach().float().clamp(0, 1).mul(255).round().byte().cpu().numpy()
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1)[..., ::-1])


def ssim(x, y, window=11, sigma=1.5, mask=None):
    """Mean SSIM of two float image batches (N, C, H, W) in [0, 1] (torch); inside `mask` (N, 1, H, W) if given."""
    import torch

    def gaussian_rows(size):
        """(size, size - window + 1) matrix: x @ it is the 'valid' Gaussian blur of x's rows."""
        coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
        g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
        g = g / g.sum()
        offset = torch.arange(size, device=x.device)[:, None] - torch.arange(size - window + 1, device=x.device)
        return torch.where((offset >= 0) & (offset < window), g[offset.clamp(0, window - 1)], 0)

    # The separable blur as two matrix products over all five maps at once: 3x faster on the CPU
    # than five depthwise 11x11 convolutions, which is a fifth of a training step of the tiny model.
    # In full fp32 only (no TF32, no autocast): the variances below cancel.
    mu_x, mu_y, xx, yy, xy = gaussian_rows(x.shape[-2]).T @ (torch.stack([x, y, x * x, y * y, x * y])
                                                             @ gaussian_rows(x.shape[-1]))
    var_x = xx - mu_x ** 2
    var_y = yy - mu_y ** 2
    cov = xy - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    if mask is None:
        return ssim_map.mean()
    half = window // 2  # the map is the 'valid' part: crop the mask to match
    weight = mask[..., half:mask.shape[-2] - half, half:mask.shape[-1] - half].expand_as(ssim_map)
    return (ssim_map * weight).sum() / weight.sum().clamp_min(1e-8)


# ---------------------------------------------------------------- reading videos and image folders

Frame = collections.namedtuple("Frame", "index name time image")
Frame.__doc__ = """One input frame: its index, its file name (image folders) or None, its presentation time
in seconds (videos, as the file has it; None for folders) and the BGR uint8 image, upright."""

_ROTATE = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, -90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180,
           -180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE, -270: cv2.ROTATE_90_COUNTERCLOCKWISE}


class FrameSource:
    """The frames of a video file (PyAV) or of an image folder (sorted by name), read once, in order.

    Every step reads frames through this class, so they all see the same pixels. Videos:
    frames are turned upright by the display rotation phones record (`rotation`, in
    degrees counter-clockwise) and carry their timestamps, so a variable frame rate can
    be kept. Decoding that fails part-way (a damaged or cut file) ends the frames early
    and leaves a message in `error`; `expected` is the frame count the file announces
    (None if it does not). Unreadable images in a folder are a UserError.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.error, self.count = None, 0
        if self.path.is_dir():
            self.names = [p.name for p in list_images(self.path)]
            if not self.names:
                raise UserError(f"no images in {self.path}")
            first = read_image(self.path / self.names[0])
            if first is None:
                raise UserError(f"cannot read {self.path / self.names[0]}")
            self.is_folder, self.fps, self.rotation, self.expected = True, 0.0, 0, len(self.names)
            self.height, self.width = first.shape[:2]
            self.has_audio = False
            return
        import av

        require_file(self.path, "video")
        self.is_folder, self.names = False, None
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise UserError(f"{self.path} has no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else 0.0
                self.has_audio = bool(container.streams.audio)
                first = next(container.decode(stream), None)
                if first is None:
                    raise UserError(f"{self.path} has no readable frames")
                self.rotation = int(round(first.rotation or 0))
                self.expected = stream.frames or None
                if not self.expected and stream.duration and stream.time_base and self.fps:
                    self.expected = round(float(stream.duration * stream.time_base) * self.fps)
        except (av.FFmpegError, OSError, ValueError, StopIteration) as e:
            raise UserError(f"cannot open {self.path} as a video: {e}") from None
        w, h = first.width, first.height
        self.width, self.height = (h, w) if self.rotation % 180 else (w, h)

    def __iter__(self):
        """Frame tuples; for videos, decoding errors end the iteration and are kept in self.error."""
        self.error, self.count = None, 0
        if self.is_folder:
            for i, name in enumerate(self.names):
                image = read_image(self.path / name)
                if image is None:
                    raise UserError(f"cannot read {self.path / name} (not an image, or damaged)")
                self.count += 1
                yield Frame(i, name, None, image)
            return
        import av

        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = container.decode(stream)
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except (av.FFmpegError, OSError) as e:
                    self.error = f"decoding stopped after frame {self.count}: {e}"
                    break
                image = frame_to_bgr(frame)
                if self.rotation in _ROTATE:
                    image = cv2.rotate(image, _ROTATE[self.rotation])
                self.count += 1
                yield Frame(self.count - 1, None, frame.time, image)

    @property
    def complete(self):
        """False when decoding failed part-way or fewer frames came out than the file announces."""
        if self.error:
            return False
        return not self.expected or self.is_folder or self.count >= self.expected

    def shortfall_message(self):
        """A one-line warning about a damaged or cut file, or None."""
        if self.complete:
            return None
        expected = f" of the {self.expected} the file announces" if self.expected else ""
        reason = f" ({self.error})" if self.error else ""
        return f"{self.path} ended early: {self.count} frames decoded{expected}{reason}; the file looks damaged or cut"


def video_info(path):
    """dict(fps, width, height, frames, has_audio, rotation, complete) of a video, frames counted by decoding."""
    source = FrameSource(path)
    frames = sum(1 for _ in source)
    return dict(fps=source.fps, width=source.width, height=source.height, frames=frames,
                has_audio=source.has_audio, rotation=source.rotation, complete=source.complete)


def read_video(path):
    """The BGR frames of a video file (or image folder), upright, in order."""
    return (frame.image for frame in FrameSource(path))


def frame_to_bgr(frame):
    """PyAV frame -> BGR uint8, through 4:4:4 first.

    swscale's direct 4:2:0 <-> BGR path is off by a few levels (chroma 127 for 128:
    grey 90 comes back as 86, 89, 87); going through yuv444p is exact for grey.
    """
    name = frame.format.name
    if name.startswith("yuvj"):
        frame = frame.reformat(format="yuvj444p")
    elif name.startswith("yuv"):
        frame = frame.reformat(format="yuv444p")
    return frame.to_ndarray(format="bgr24")
