"""Faces as tensors: uint8 BGR images <-> float RGB batches, and SSIM (train.py's loss, evaluate.py's metric)."""
import numpy as np
import torch


def to_tensor(images):
    """uint8 BGR (N, H, W, 3) -> float RGB (N, 3, H, W) in [0, 1]."""
    arr = np.ascontiguousarray(np.asarray(images)[..., ::-1].transpose(0, 3, 1, 2))
    return torch.from_numpy(arr).float().div_(255)


def to_images(tensor):
    """float RGB (N, 3, H, W) in [0, 1] -> uint8 BGR (N, H, W, 3)."""
    arr = tensor.detach().float().clamp(0, 1).mul(255).round().byte().cpu().numpy()
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1)[..., ::-1])


def ssim(x, y, window=11, sigma=1.5, mask=None):
    """Mean SSIM of two float image batches (N, C, H, W) in [0, 1] (torch); inside `mask` (N, 1, H, W) if given."""
    def gaussian_rows(size):
        """(size, size - window + 1) matrix: x @ it is the 'valid' Gaussian blur of x's rows."""
        coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
        g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
        g = g / g.sum()
        offset = torch.arange(size, device=x.device)[:, None] - torch.arange(size - window + 1, device=x.device)
        return torch.where((offset >= 0) & (offset < window), g[offset.clamp(0, window - 1)], 0)

    # The separable blur as two matrix products over all five maps at once: much faster on the CPU than five
    # depthwise 11x11 convolutions (docs/SPEED.md).
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
