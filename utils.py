"""Shared helpers: errors, files, face detection and alignment, augmentation, blending, metrics.

Everything the four scripts have in common lives here once: crop_face.py and
convert_video.py align faces with the same functions, train.py and
convert_video.py agree on what the model sees through `align_matrix`.
"""
import contextlib
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


def frame_name(index, ext="png"):
    """Zero-padded so names sort in frame order."""
    return f"{index:06d}.{ext}"


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


def write_image(path, image, jpeg_quality=95):
    """Write atomically (temp file + rename) so an interrupted run leaves no half file."""
    path = Path(path)
    ext = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, image, params)
    if not ok:
        raise UserError(f"could not encode {path}")
    write_bytes_atomic(path, buf.tobytes())


def write_bytes_atomic(path, data):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


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


def print_settings(args, title):
    """The resolved settings, one line each, so a log shows what a run used."""
    print(f"{title} settings:")
    for key, value in vars(args).items():
        print(f"  {key:<16} {value}")


def settings_dict(args):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


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


class FaceAnalyzer:
    """dlib detector (HOG or CNN) + 68-point landmarks, detecting on a downscaled copy."""

    def __init__(self, detector="hog", landmarks_model=None, detect_size=640, upsample=0):
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


def init_worker_analyzer(detector, landmarks_model, detect_size, upsample):
    """Pool initializer: load the dlib models once per process."""
    global _worker_analyzer
    cv2.setNumThreads(1)
    _worker_analyzer = FaceAnalyzer(detector, landmarks_model, detect_size, upsample)


def worker_analyzer():
    return _worker_analyzer


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
LEFT_EYE, RIGHT_EYE = slice(36, 42), slice(42, 48)


def umeyama(src, dst, estimate_scale=True):
    """Least-squares similarity transform (3x3) taking points src (N, 2) onto dst (N, 2)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones(dim)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    t = np.eye(dim + 1)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        return np.full((dim + 1, dim + 1), np.nan)
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:
        d_adj = d.copy()
        d_adj[-1] = -1
        t[:dim, :dim] = u @ np.diag(d_adj) @ vt
    else:
        t[:dim, :dim] = u @ np.diag(d) @ vt
    scale = (s @ d) / src_c.var(0).sum() if estimate_scale else 1.0
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean)
    t[:dim, :dim] *= scale
    return t


def align_matrix(landmarks, size=FACE_SIZE, coverage=FACE_COVERAGE):
    """2x3 matrix taking frame pixels to a size x size aligned face.

    The mean-face template (points 17..67) fills `coverage` of the crop, centred.
    coverage=1 gives exactly what the model sees: the central 160/256 of a stored face.
    """
    mat = umeyama(np.asarray(landmarks)[17:], MEAN_FACE)[:2]
    inner = size * coverage
    mat = mat * inner
    mat[:, 2] += (size - inner) / 2
    return mat


def transform_points(points, matrix):
    points = np.asarray(points, np.float64)
    return points @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def warp_face(image, matrix, size):
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_AREA if matrix_scale(matrix) < 1
                          else cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def matrix_scale(matrix):
    return float(np.sqrt(abs(np.linalg.det(np.asarray(matrix)[:, :2]))))


def eye_centres(landmarks):
    landmarks = np.asarray(landmarks)
    return landmarks[LEFT_EYE].mean(0), landmarks[RIGHT_EYE].mean(0)


def template_eye_centres(size=FACE_SIZE, coverage=FACE_COVERAGE):
    """Where the template puts the eye centres in an aligned face (pixels)."""
    inner = size * coverage
    pts = MEAN_FACE * inner + (size - inner) / 2
    return pts[LEFT_EYE.start - 17:LEFT_EYE.stop - 17].mean(0), pts[RIGHT_EYE.start - 17:RIGHT_EYE.stop - 17].mean(0)


# ---------------------------------------------------------------- augmentation (training)


def random_transform(image, rng, rotation=10, zoom=0.05, shift=0.05, flip=0.4):
    """Random rotation/zoom/shift (border replicated) and horizontal flip, as the tutorial."""
    h, w = image.shape[:2]
    angle = rng.uniform(-rotation, rotation)
    scale = rng.uniform(1 - zoom, 1 + zoom)
    tx, ty = rng.uniform(-shift, shift) * w, rng.uniform(-shift, shift) * h
    mat = cv2.getRotationMatrix2D((w // 2, h // 2), angle, scale)
    mat[:, 2] += (tx, ty)
    out = cv2.warpAffine(image, mat, (w, h), borderMode=cv2.BORDER_REPLICATE)
    if rng.random() < flip:
        out = out[:, ::-1]
    return out


def random_warp(image, rng, size=64, coverage=FACE_COVERAGE, sigma=5.0):
    """(warped input, target) at size x size from a 256 face, as the tutorial.

    A 5x5 grid over the central `coverage` of the face is jittered by N(0, sigma px);
    the input is remapped through the jittered grid, the target is the same region
    taken with the similarity fit of the jittered grid to the regular one.
    """
    full = image.shape[0]
    half = full * coverage / 2
    grid = np.linspace(full / 2 - half, full / 2 + half, 5)
    mapx = np.broadcast_to(grid, (5, 5)) + rng.normal(0, sigma * full / 256, (5, 5))
    mapy = np.broadcast_to(grid, (5, 5)).T + rng.normal(0, sigma * full / 256, (5, 5))
    pad = size // 8  # resize the 5x5 grid to size*1.25 and keep the inner size x size
    interp_x = cv2.resize(mapx, (size + 2 * pad, size + 2 * pad))[pad:-pad, pad:-pad].astype(np.float32)
    interp_y = cv2.resize(mapy, (size + 2 * pad, size + 2 * pad))[pad:-pad, pad:-pad].astype(np.float32)
    warped = cv2.remap(image, interp_x, interp_y, cv2.INTER_LINEAR)
    src = np.stack([mapx.ravel(), mapy.ravel()], axis=-1)
    dst = np.mgrid[0:size + 1:size // 4, 0:size + 1:size // 4].T.reshape(-1, 2)
    mat = umeyama(src, dst)[:2]
    target = cv2.warpAffine(image, mat, (size, size), flags=cv2.INTER_AREA)
    return warped, target


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


# ---------------------------------------------------------------- blending (conversion)


def face_hull_mask(landmarks, shape, brow_lift=1.0):
    """Float mask (H, W) of the landmarks' convex hull, with the brows raised over the forehead.

    The brows (17..26) move up by brow_lift x their distance to the eyes, so the mask
    covers the lower forehead as faceswap's "extended" mask does.
    """
    pts = np.asarray(landmarks, np.float64).copy()
    eyes = pts[36:48].mean(0)
    brows = pts[17:27]
    pts[17:27] = brows + (brows - eyes) * brow_lift
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(pts).astype(np.int32)), 255)
    return mask.astype(np.float32) / 255


def erode_and_blur(mask, erode_px, blur_px):
    if erode_px > 0:
        k = 2 * int(erode_px) + 1
        mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    if blur_px > 0:
        k = 2 * int(blur_px) + 1
        mask = cv2.GaussianBlur(mask, (k, k), 0)
    return mask


def color_transfer(source, target, mask, method="rct"):
    """Recolour `source` (BGR uint8) to match `target` inside mask (> 0.5).

    rct: Reinhard mean/std transfer in LAB; avg: mean colour shift; hist: per-channel
    histogram matching; none: unchanged.
    """
    if method == "none":
        return source
    sel = mask > 0.5
    if sel.sum() < 16:
        return source
    if method == "rct":
        s = cv2.cvtColor(source, cv2.COLOR_BGR2LAB).astype(np.float32)
        t = cv2.cvtColor(target, cv2.COLOR_BGR2LAB).astype(np.float32)
        s_mean, s_std = s[sel].mean(0), s[sel].std(0) + 1e-6
        t_mean, t_std = t[sel].mean(0), t[sel].std(0)
        out = (s - s_mean) * (t_std / s_std) + t_mean
        return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2BGR)
    if method == "avg":
        diff = target[sel].astype(np.float32).mean(0) - source[sel].astype(np.float32).mean(0)
        return np.clip(source.astype(np.float32) + diff, 0, 255).astype(np.uint8)
    if method == "hist":
        out = source.copy()
        for c in range(3):
            s_vals, t_vals = source[..., c][sel], target[..., c][sel]
            s_cdf = np.cumsum(np.bincount(s_vals, minlength=256)) / s_vals.size
            t_cdf = np.cumsum(np.bincount(t_vals, minlength=256)) / t_vals.size
            lut = np.searchsorted(t_cdf, s_cdf).clip(0, 255).astype(np.uint8)
            out[..., c] = lut[source[..., c]]
        return out
    raise ValueError(f"unknown colour method {method!r}")


# ---------------------------------------------------------------- metrics


def ssim(x, y, window=11, sigma=1.5):
    """Mean SSIM of two float image batches (N, C, H, W) in [0, 1] (torch)."""
    import torch
    import torch.nn.functional as F

    c = x.shape[1]
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean()


def psnr(x, y):
    """PSNR in dB of two uint8 or [0, 1] float arrays; inf when identical."""
    peak = 255.0 if np.asarray(x).dtype == np.uint8 else 1.0
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


# ---------------------------------------------------------------- video files (PyAV)

SYNTHETIC_NOTE = "SYNTHETIC MEDIA: face swapped with a deepfake model (faceswap pipeline); not a real recording."


def open_video(path):
    """(PyAV container, its first video stream) or a UserError saying what is wrong."""
    import av

    path = require_file(path, "video")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"cannot open {path} as a video: {e}") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def video_info(path):
    """dict(fps, width, height, frames, has_audio) of a video file, frames counted by decoding."""
    container, stream = open_video(path)
    with container:
        fps = stream.average_rate or stream.guessed_rate
        frames = sum(1 for _ in container.decode(stream))
        return dict(fps=float(fps) if fps else 0.0, width=stream.codec_context.width,
                    height=stream.codec_context.height, frames=frames,
                    has_audio=bool(container.streams.audio))


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


def bgr_to_frame(image):
    """BGR uint8 -> PyAV yuv444p frame (see frame_to_bgr); the encoder subsamples it exactly."""
    import av

    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24").reformat(format="yuv444p")


def read_video(path):
    """Yield BGR uint8 frames of a video file, in order."""
    import av

    container, stream = open_video(path)
    with container:
        try:
            for frame in container.decode(stream):
                yield frame_to_bgr(frame)
        except av.FFmpegError as e:
            raise UserError(f"error decoding {path}: {e}") from None


class VideoWriter:
    """H.264 MP4 through PyAV, optionally copying the audio of `audio_from`, labelled synthetic.

    Writes to a temp file beside `path`; close() renames it into place, abort() removes it.
    """

    def __init__(self, path, fps, width, height, audio_from=None, crf=18, metadata_note=SYNTHETIC_NOTE):
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}.", suffix=".tmp.mp4")
        os.close(fd)
        self.tmp = Path(tmp)
        self.container, self.audio_in = None, None
        try:
            self._open(fps, width, height, audio_from, crf, metadata_note)
        except BaseException:
            self.abort()  # no temp file left behind
            raise
        self.count = 0

    def _open(self, fps, width, height, audio_from, crf, metadata_note):
        import fractions

        import av

        self.container = av.open(str(self.tmp), "w", format="mp4")
        rate = fractions.Fraction(fps).limit_denominator(1001) if fps else fractions.Fraction(25)
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width, height
        # 4:2:0 needs even sizes; keep odd-sized inputs at their size with 4:4:4
        self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.container.metadata["comment"] = metadata_note
        self.container.metadata["description"] = metadata_note
        if audio_from is not None:
            source = av.open(str(audio_from))
            if source.streams.audio:
                self.audio_in = source
                self.audio_out = self.container.add_stream_from_template(source.streams.audio[0])
            else:
                source.close()

    def write(self, image):
        frame = bgr_to_frame(image)
        frame.pts = self.count
        self.count += 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self):
        for packet in self.stream.encode():
            self.container.mux(packet)
        if self.audio_in is not None:
            in_stream = self.audio_in.streams.audio[0]
            for packet in self.audio_in.demux(in_stream):
                if packet.dts is None:
                    continue
                packet.stream = self.audio_out
                self.container.mux(packet)
            self.audio_in.close()
        self.container.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.close()
        if self.audio_in is not None:
            self.audio_in.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
