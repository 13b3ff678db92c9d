"""The infrastructure every step uses: one-line errors, safe file writing, locks, argparse types, the device and
precision, and the main() every script ends with. Domain code lives in its own module (align, faces, records,
video, tensors, blend); this one imports no torch, dlib or PyAV at module level, so a step that needs none of
them starts without them.
"""
import argparse
import contextlib
import errno
import fcntl
import functools
import hashlib
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
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: the disk is full{where}; free some space and run again (what was saved before is kept)",
              file=sys.stderr)
        raise SystemExit(1) from None


def main(parse_args, run, argv=None):
    """What every script's main(argv) does: parse the flags, run, and turn a UserError, Ctrl-C or a full disk into
    one line on stderr and an exit code (1, 130, 1) instead of a traceback."""
    args = parse_args(argv)
    with user_errors():
        return run(args)


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


# PNG as zlib's Huffman coding of each row's difference from the row above: lossless and faster to write than
# OpenCV's default for frames and faces, about as large (docs/SPEED.md)
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
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            size = f"{len(data) / 2**20:.1f} MiB" if len(data) >= 2**20 else f"{-(-len(data) // 1024)} KiB"
            raise UserError(f"the disk is full: could not write {path} ({size} needed); "
                            "free some space and run again (the file there before is kept)") from None
        raise


DIGEST_SPAN = 1 << 20  # bytes read at each end of a file to tell files apart


def content_digest(path, span=DIGEST_SPAN):
    """SHA-256 of the file's first and last `span` bytes: a file's identity by its contents, so that a copy, a move
    or a touched file is still the same file (its time is not)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(span))
        size = f.seek(0, 2)
        f.seek(max(span, size - span))
        digest.update(f.read(span))
    return digest.hexdigest()


def write_json(path, obj, indent=1):
    """Write atomically; indent=None for large records (json's C encoder, much faster than with an indent)."""
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
def locked(folder, target=None, wait=False):
    """Hold an advisory lock on an output folder (or on one file `target` in it) for a run.

    A second run on the same output stops at once with a one-line error instead of mixing its
    work into the first one's; with `wait` it says so and waits for the first to finish instead.
    The lock goes with the process, so a killed run leaves none.
    """
    folder = Path(folder)
    path = folder / (LOCK_NAME if target is None else f".{Path(target).name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
        if not wait:
            os.close(fd)
            raise UserError(f"{folder / (target or '')} is in use by another run (process {owner}); "
                            "wait for it to finish or choose another output") from None
        print(f"waiting for another run (process {owner}) to finish with {folder / (target or '')} ...", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
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


def whole(low, high=None):
    """argparse type: a whole number >= low (and <= high)."""
    def check(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"{low} or more" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bound} (got {value})")
        return value
    return check


def number(low, high=None, below=None, also=""):
    """argparse type: a finite number >= low (and <= high, or < below); `also` names what else the flag takes,
    for the message (e.g. "'auto' or ")."""
    def check(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (low <= value < min(float("inf"), below or float("inf")) and (high is None or value <= high)):
            bound = (f"from {low:g} to {high:g}" if high is not None else f">= {low:g}" if below is None
                     else f"from {low:g} up to (not including) {below:g}")
            raise argparse.ArgumentTypeError(f"must be {also}a number {bound}, got {text!r}")
        return value
    return check


positive_int, non_negative_int = whole(1), whole(0)
non_negative_number, share = number(0), number(0, 1)


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

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # --precision's choices (pick_precision)


def add_device_args(parser, what="the model"):
    """--device and --precision, as every step that runs a model takes them."""
    parser.add_argument("--device", default="auto", help="where to run: auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help=f"precision of {what}; auto: bf16 on recent GPUs and CPUs with AMX, fp16 on older GPUs, "
                             "fp32 on other CPUs (faster there)")


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
    """torch dtype for autocast, or None for plain fp32. auto: bf16 (fp16 on GPUs without it) on a GPU or an AMX
    CPU; fp32 on other CPUs, where bf16 autocast measured slower (docs/SPEED.md)."""
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

