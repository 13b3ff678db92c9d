"""Where a face is and how it is turned: the mean-face template, the similarity fit that aligns a face to it,
warps between frame and aligned face, face masks, head pose and sharpness.

Every step agrees on what an aligned face is through this module: crop_face.py saves faces aligned by
`align_matrix`, train.py draws its training views from them, convert_video.py aligns each frame's faces the same
way and warps the model's output back with the inverse matrix.
"""
import cv2
import numpy as np

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
INNER_LIPS_MIDDLE = (62, 66)  # the upper and lower inner lip's middle points: their gap is the mouth's opening
ALIGN_POINTS = slice(17, 68)  # what the similarity fit uses (MEAN_FACE); the jaw is left out


def umeyama(src, dst, estimate_scale=True):
    """Least-squares similarity transform (3x3) taking points src (N, 2) onto dst (N, 2); NaN if degenerate.

    Umeyama's fit in 2D, in closed form: with centred points as complex numbers z (src) and w (dst),
    the rotation and scale are those of sum(conj(z) w) / sum(|z|^2) (the same as the SVD form, and
    cheaper: crop_face.py fits every frame's landmarks several times)."""
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
    """The size x size aligned face of `matrix` (bilinear; supersampling a shrunk crop measured no better, see
    docs/QUALITY.md)."""
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


def face_hull_mask(landmarks, shape, brow_lift=0.0, outward=False):
    """Float mask (H, W) of the landmarks' convex hull; brow_lift > 0 raises the brows over the forehead.

    Each brow point moves straight up the face (perpendicular to the line through the eyes) by
    brow_lift x its height over that line, so the mask covers the lower forehead as faceswap's
    "extended" mask does, and its sides stay at the brows' ends. outward=True moves them away
    from the eyes' centre instead, by their distance to it: the outer ends go out over the temples
    and their hair (the training loss's region, measured with it; docs/QUALITY.md).
    """
    pts = np.asarray(landmarks, np.float64).copy()
    if brow_lift:
        left, right = pts[LEFT_EYE].mean(0), pts[RIGHT_EYE].mean(0)
        if outward:
            pts[BROWS] = pts[BROWS] + (pts[BROWS] - (left + right) / 2) * brow_lift
        else:
            along = (right - left) / max(float(np.linalg.norm(right - left)), 1e-6)
            up = np.array([along[1], -along[0]])  # image up for an upright face
            height = (pts[BROWS] - (left + right) / 2) @ up
            pts[BROWS] = pts[BROWS] + np.outer(height * brow_lift, up)
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(pts).astype(np.int32)), 255)
    return mask.astype(np.float32) / 255



def clamp_box(box, width, height):
    l, t, r, b = box
    return [float(max(0, l)), float(max(0, t)), float(min(width - 1, r)), float(min(height - 1, b))]



def center_face(image, size=64, coverage=FACE_COVERAGE):
    """The un-augmented model view of a stored face: its central `coverage`, resized."""
    full = image.shape[0]
    lo, hi = round(full * (1 - coverage) / 2), round(full * (1 + coverage) / 2)
    return cv2.resize(image[lo:hi, lo:hi], (size, size), interpolation=cv2.INTER_AREA)



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
