import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
VIDEOS = DATA / "videos"
OBAMA = VIDEOS / "styletalk_obama_clip1.mp4"
ANDREW = VIDEOS / "styletalk_andrew_clip1.mp4"


def need_data():
    if not VIDEOS.is_dir():
        pytest.skip(f"real test data not found at {DATA} (shared/ beside the checkout)")


@pytest.fixture(scope="session")
def obama_faces(tmp_path_factory):
    """Frames and aligned faces of the first 120 frames of the Obama clip (made once per session)."""
    need_data()
    import crop_face
    import crop_from_video

    root = tmp_path_factory.mktemp("obama")
    crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(root / "frames"), "--max-frames", "120"])
    crop_face.main(["--images-dir", str(root / "frames"), "--faces-dir", str(root / "faces"), "--workers", "2"])
    return root


@pytest.fixture(scope="session")
def andrew_faces(tmp_path_factory):
    need_data()
    import crop_face
    import crop_from_video

    root = tmp_path_factory.mktemp("andrew")
    crop_from_video.main(["--video-path", str(ANDREW), "--save-dir", str(root / "frames"), "--max-frames", "120"])
    crop_face.main(["--images-dir", str(root / "frames"), "--faces-dir", str(root / "faces"), "--workers", "2"])
    return root
