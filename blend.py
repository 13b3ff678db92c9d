"""Blending a drawn face into a frame: the inverse warp of the face's alignment, the mask (the landmark hull with
the brows raised, the model's own mask, or both), colour matching, the replaced face's fine texture, sharpening,
and the blend itself. convert_video.py builds BlendSettings from its flags; nothing here reads a flag.
"""
import dataclasses

import cv2
import numpy as np

import align

AUTO_SHARPEN_MAX = 2.0  # the most sharpen="auto" applies
DETAIL_CLIP = 2.0       # keep_texture's texture, up to this many of its typical amplitudes: texture, not edges


@dataclasses.dataclass(frozen=True)
class BlendSettings:
    """How a drawn face is pasted (convert_video.py's flags of the same names)."""
    color: str = "rct"        # rct (Reinhard LAB), avg, hist or none
    mask: str = "both"        # hull (landmarks), learned (the model's own) or both (intersected)
    mask_erode: float = 0.0   # mask erosion, as a fraction of the face width
    mask_blur: float = 0.05   # mask feathering, as a fraction of the face width
    brow_lift: float = 1.0    # how far the hull reaches above the brows
    seamless: bool = False    # Poisson blending instead of the feathered mask
    sharpen: object = "auto"  # unsharp amount (0 = off) or "auto" (up to the replaced face's fine detail)
    detail: float = 1.0       # share of the replaced face's own texture kept (0 = off)

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def paste_face(frame, face, matrix, landmarks, settings, face_mask=None):
    """Frame with `face` (the model's output, aligned by `matrix`) blended in; only the face region changes.
    face_mask: the model's own mask of the face (float, face-sized), used as settings.mask says."""
    h, w = frame.shape[:2]
    size = face.shape[0]
    inverse = cv2.invertAffineTransform(matrix)
    corners = align.transform_points([[0, 0], [size, 0], [0, size], [size, size]], inverse)
    face_width = size / align.matrix_scale(matrix)
    margin = int(face_width * settings.mask_blur) + 2
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - margin, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + margin, [w, h])
    if x1 <= x0 or y1 <= y0:
        return frame
    roi = frame[y0:y1, x0:x1]
    shift = matrix.copy()
    shift[:, 2] += matrix[:, :2] @ [x0, y0]  # roi pixels -> aligned face
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    swapped = cv2.warpAffine(face, shift, (x1 - x0, y1 - y0), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    # The model's square shrunk by the feather width, so the feathered edge fades out inside it:
    # where the hull runs past the square (over the brows) there is no hard seam.
    blur_px = face_width * settings.mask_blur
    inner = int(np.ceil(size * settings.mask_blur)) + 1
    square = np.zeros((size, size), np.float32)
    square[inner:size - inner, inner:size - inner] = 1
    inside = cv2.warpAffine(square, shift, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderValue=0) > 0.5
    mask = align.face_hull_mask(landmarks - [x0, y0], roi.shape, settings.brow_lift) * inside
    if face_mask is not None and settings.mask != "hull":
        learned = cv2.warpAffine(face_mask, shift, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderValue=0) > 0.5
        mask = (learned * inside).astype(np.float32) if settings.mask == "learned" else mask * learned
    mask = erode_and_blur(mask, face_width * settings.mask_erode, blur_px)
    swapped = color_transfer(swapped, roi, mask, settings.color)
    if settings.detail > 0:
        swapped = keep_texture(swapped, roi, mask, face_width / size, settings.detail)
    if settings.sharpen != 0:
        swapped = sharpen(swapped, roi, mask, face_width / size, settings.sharpen)
    out = frame.copy()
    if settings.seamless and (mask > 0.5).any():
        binary = (mask > 0.5).astype(np.uint8) * 255
        ys, xs = np.nonzero(binary)
        center = (int((xs.min() + xs.max()) / 2) + x0, int((ys.min() + ys.max()) / 2) + y0)
        full = np.zeros((h, w), np.uint8)
        full[y0:y1, x0:x1] = binary
        canvas = frame.copy()
        canvas[y0:y1, x0:x1] = swapped
        return cv2.seamlessClone(canvas, frame, full, center, cv2.NORMAL_CLONE)
    m = mask[..., None]
    out[y0:y1, x0:x1] = (swapped * m + roi * (1 - m) + 0.5).astype(np.uint8)
    return out


def sharpen(face, source, mask, upscale, amount):
    """Unsharp mask of the pasted face, at the scale the model's face was enlarged by (`upscale` frame pixels
    per model pixel). amount "auto": as much as brings the face's fine detail (variance of the grey
    Laplacian where mask > 0.5) up to that of `source`, the face it replaces, at most AUTO_SHARPEN_MAX;
    never more than the source has, so a soft or grainy video gets a face of its own kind."""
    face = face.astype(np.float32, copy=False)  # float already after --detail
    detail = fine_band(face, upscale)
    if amount == "auto":
        inside = mask > 0.5
        if inside.sum() < 16:
            return face
        l_face, l_detail, l_source = (
            cv2.Laplacian(cv2.cvtColor(image.astype(np.float32), cv2.COLOR_BGR2GRAY), cv2.CV_32F)[inside]
            .astype(np.float64) for image in (face, detail, source))  # linear: face + a detail -> l_face + a l_detail
        target = l_source.var() - 20 / 12  # less the Laplacian of 8-bit rounding, which the pasted face gets again
        # var(l_face + a l_detail) = target, a quadratic in a; its larger root (the smaller is negative)
        a2 = l_detail.var()
        a1 = 2 * np.mean((l_face - l_face.mean()) * (l_detail - l_detail.mean()))
        a0 = l_face.var() - target
        if a0 >= 0 or a2 <= 0:
            return face
        amount = min(AUTO_SHARPEN_MAX, (-a1 + np.sqrt(a1 * a1 - 4 * a2 * a0)) / (2 * a2))
    return np.clip(face + amount * detail, 0, 255)


def keep_texture(face, source, mask, upscale, amount):
    """`face` with `amount` of `source`'s (the face it replaces) texture added: the band finer than the model's
    pixels (`upscale` frame pixels each), which the model cannot draw, softly limited (tanh) to DETAIL_CLIP times
    that band's typical amplitude inside the mask (> 0.5). Skin texture and the video's grain carry over; the
    strong edges of the replaced face's eyes, brows and mouth, which would show its features through, do not."""
    band = fine_band(source.astype(np.float32), upscale)
    few = (mask > 0.5)[::2, ::2]  # the amplitude from every second pixel, as colour_transfer's statistics
    if few.sum() < 16:
        return face
    limit = DETAIL_CLIP * 1.4826 * np.median(np.abs(band[::2, ::2][few])) + 1e-3  # a robust standard deviation
    band *= 1 / limit  # in place from here: face + amount * limit * tanh(band / limit), clipped to 0..255
    np.tanh(band, out=band)
    band *= amount * limit
    band += face
    return np.clip(band, 0, 255, out=band)


def fine_band(image, upscale):
    """What a float image holds finer than a model pixel enlarged `upscale` times: it less its Gaussian blur."""
    return image - cv2.GaussianBlur(image, (0, 0), max(0.8, upscale / 2))


def erode_and_blur(mask, erode_px, blur_px):
    """A 0/1 mask shrunk by erode_px (a disc; through the distance transform, fast for any size) and feathered."""
    if erode_px > 0:
        inside = (mask > 0.5).astype(np.uint8)
        mask = (cv2.distanceTransform(inside, cv2.DIST_L2, 5) > erode_px).astype(np.float32)
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
        s, t = cv2.cvtColor(source, cv2.COLOR_BGR2LAB), cv2.cvtColor(target, cv2.COLOR_BGR2LAB)
        few = sel[::2, ::2]  # statistics from every second pixel: the same to a fraction of a level, 4x faster
        s_sel, t_sel = s[::2, ::2][few].astype(np.float32), t[::2, ::2][few].astype(np.float32)
        gain = t_sel.std(0) / (s_sel.std(0) + 1e-6)
        levels = np.arange(256, dtype=np.float32)[:, None]
        lut = np.clip((levels - s_sel.mean(0)) * gain + t_sel.mean(0) + 0.5, 0, 255).astype(np.uint8)  # (256, 3)
        out = cv2.merge([cv2.LUT(channel, lut[:, c].copy()) for c, channel in enumerate(cv2.split(s))])
        return cv2.cvtColor(out, cv2.COLOR_LAB2BGR)
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
