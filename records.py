"""The records the steps leave beside their images, each read and written here only.

frames.json (crop_from_video.py, beside the frames): where the frames came from (the video's path, size and a
digest of its contents, the selection settings), the video's fps, size and rotation, each frame's index and
timestamp, and whether the extraction is complete.

alignments.json (crop_face.py, beside the aligned faces): the settings that made the faces and, per frame, its
file's size and time and its faces, each a FaceRecord: box, 68 landmarks (frame pixels), the 2x3 frame->face
matrix, sharpness, head yaw and pitch, landmark fit error, its face-recognition embedding, and whether it was
kept (in the folder) or why not (in rejected/). On disk "kept" is true or the reason, as it always was.

A record of the wrong shape (edited by hand, or another program's file of the same name) is a UserError that
names the file, never a traceback.
"""
import dataclasses
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import align
import utils
from utils import UserError

FRAMES_NAME = "frames.json"          # crop_from_video.py's record beside the frames it saved
ALIGNMENTS_NAME = "alignments.json"  # crop_face.py's record beside the faces it saved
# what in frames.json identifies the frames (the video's size and contents, the settings), not its path: a re-run
# with the same resumes them, and crop_face.py knows its faces came from them
FRAMES_SOURCE_KEYS = ("source_bytes", "source_digest", "every", "start", "end", "max_frames", "format")


def damaged(path, what):
    return UserError(f"{path} is damaged or not a record of this project ({what}); move it away or pass "
                     "--overwrite to start again")


def _read(path, required):
    """A JSON object with these keys, or a UserError naming the file."""
    data = utils.read_json(path)
    if not isinstance(data, dict):
        raise damaged(path, f"a {type(data).__name__}, not an object")
    missing = [k for k in required if k not in data]
    if missing:
        raise damaged(path, f"no {missing[0]!r}")
    return data


# ---------------------------------------------------------------- frames.json


def read_frames(folder):
    """A frames folder's record as a dict (frames: indices, times: seconds), or None where there is none."""
    path = Path(folder) / FRAMES_NAME
    if not path.is_file():
        return None
    data = _read(path, ("frames", "times"))
    frames, times = data["frames"], data["times"]
    if not (isinstance(frames, list) and isinstance(times, list) and len(frames) == len(times)
            and all(isinstance(i, int) for i in frames) and all(isinstance(t, (int, float)) for t in times)):
        raise damaged(path, "its frames and times are not two lists of numbers of one length")
    return data


def write_frames(folder, source, info, written, complete, note=None):
    """Record the frames `written` ({index: seconds}) of the extraction `source` (FRAMES_SOURCE_KEYS and the
    video's path) from a video described by `info` (fps, size, rotation)."""
    order = sorted(written)
    meta = dict(source, **info, frames=order, times=[written[i] for i in order], complete=complete)
    if note:
        meta["note"] = note
    utils.write_json(Path(folder) / FRAMES_NAME, meta)


def frames_source(folder):
    """What identifies the frames of a folder crop_from_video.py made (FRAMES_SOURCE_KEYS), or None for a folder
    of the user's own images."""
    meta = read_frames(folder)
    return None if meta is None else {k: meta.get(k) for k in FRAMES_SOURCE_KEYS}


# ---------------------------------------------------------------- alignments.json


@dataclasses.dataclass
class FaceRecord:
    """One face crop_face.py found: where, how aligned, how it measured, and whether it is kept."""
    frame: str                        # the frame's file name
    face: str                         # the aligned face's file name
    box: list                         # detector box [left, top, right, bottom], frame pixels
    landmarks: list                   # 68 x [x, y], frame pixels
    matrix: list                      # 2x3, frame pixels -> aligned face pixels
    sharpness: float = 0.0
    weakest_direction: float = 0.0    # detail along the face's weakest direction (motion blur lowers it)
    yaw: float = 0.0
    pitch: float = 0.0
    fit_error: float = 0.0            # how far the landmarks lie from the mean face, aligned
    embedding: list = None            # 128-d face-recognition embedding
    embedding_of: str = None          # the frame it was measured on (carried along a followed face)
    kept: bool = None                 # None until decided
    reason: str = None                # why not kept
    identity_distance: float = None   # to the person kept
    by_hand: str = None               # "kept" or "rejected": where a person moved it

    OPTIONAL = ("identity_distance", "by_hand")

    def to_json(self):
        data = dataclasses.asdict(self)
        kept, reason = data.pop("kept"), data.pop("reason")
        for key in self.OPTIONAL:
            if data[key] is None:
                data.pop(key)
        if kept is not None:
            data["kept"] = True if kept else reason
        return data

    @classmethod
    def from_json(cls, data):
        data = dict(data)
        kept = data.pop("kept", None)
        record = cls(**data)
        if kept is True:
            record.kept = True
        elif isinstance(kept, str):
            record.kept, record.reason = False, kept
        landmarks, matrix = np.asarray(record.landmarks, float), np.asarray(record.matrix, float)
        if landmarks.shape != (68, 2) or matrix.shape != (2, 3):
            raise ValueError("landmarks or matrix of the wrong size")
        return record

    def reject(self, reason):
        self.kept, self.reason = False, reason


def read_alignments(folder):
    """(header, {frame name: (stat, [FaceRecord])}) of a faces folder's alignments.json, or None where there is
    none. header: the settings that made the faces."""
    path = Path(folder) / ALIGNMENTS_NAME
    if not path.is_file():
        return None
    data = _read(path, ("frames",))
    if not isinstance(data["frames"], dict):
        raise damaged(path, "'frames' is not an object")
    frames = {}
    for name, frame in data["frames"].items():
        try:
            frames[name] = (list(frame["stat"]), [FaceRecord.from_json(r) for r in frame["faces"]])
        except (TypeError, KeyError, ValueError) as e:
            raise damaged(path, f"frame {name}: {e}") from None
    return {k: v for k, v in data.items() if k != "frames"}, frames


def write_alignments(folder, header, frames):
    """Write a faces folder's record: `header` (settings) and {frame name: (stat, [FaceRecord])}."""
    utils.write_json(Path(folder) / ALIGNMENTS_NAME, dict(
        header, frames={name: dict(stat=stat, faces=[r.to_json() for r in faces])
                        for name, (stat, faces) in sorted(frames.items())}), indent=None)


def _records(folder):
    found = read_alignments(folder)
    return [] if found is None else [r for _, faces in found[1].values() for r in faces]


def aligned_landmarks(folder):
    """{face file name: its 68 landmarks in aligned-face pixels} from a folder's alignments.json ({} if none)."""
    return {r.face: align.transform_points(r.landmarks, r.matrix) for r in _records(folder)}


def face_embeddings(folder):
    """{face file name: its embedding (or None)} from a folder's alignments.json ({} if none)."""
    return {r.face: r.embedding for r in _records(folder)}


def load_faces(folders, size=align.FACE_SIZE, quiet=False):
    """(faces, landmarks) of one or more aligned-face folders; unreadable files are skipped.

    faces: uint8 (N, size, size, 3); landmarks: (N, 68, 2) in aligned-face pixels from each
    folder's alignments.json, NaN for a face without a record (e.g. added by hand).
    """
    folders = [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]
    faces, landmarks = [], []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"faces folder not found: {folder} (run crop_face.py first)")
        paths = utils.list_images(folder)
        if not paths:
            raise UserError(f"no face images in {folder} (run crop_face.py first)")
        known = aligned_landmarks(folder)
        for path in tqdm(paths, desc=f"loading {folder.name}", unit="face", disable=quiet, leave=False):
            image = utils.read_image(path)
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
