"""Video quality of a test video against a reference: PSNR and SSIM per video and per frame, and
LPIPS where its weights are on this machine.

Videos are [B, C, F, H, W] in [0, 1]. PSNR is inf where the two videos are identical. LPIPS
(Zhang et al. 2018, AlexNet features) needs the `lpips` package and torchvision's AlexNet
weights in the torch hub cache; nothing is downloaded: `lpips_status()` says what is missing,
and `lpips_per_video` is only called when it reports them present.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import torch
import torch.nn.functional as F

# torchvision's AlexNet weights, which lpips.LPIPS(net="alex") loads from the torch hub cache.
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def psnr_per_frame(test: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of every frame, [B, F]; inf where a frame is identical."""
    error = (test.float() - reference.float()).pow(2)  # [B, C, F, H, W]
    mse = error.mean(dim=(1, 3, 4))  # [B, F]
    return 10 * torch.log10(1.0 / mse)


def psnr(test: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-video PSNR in dB, [B] (the MSE over every pixel of the video); inf where identical."""
    mse = (test.float() - reference.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()  # [size, size]


def ssim_per_frame(test: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SSIM of every frame, [B, F]: Gaussian 7x7 window, sigma 1.5, per channel, then averaged
    over the frame's channels and window positions; C1 = 0.01^2, C2 = 0.03^2 (range 1)."""
    b, c, f, h, w = test.shape
    x = test.float().permute(0, 2, 1, 3, 4).reshape(b * f * c, 1, h, w)
    y = reference.float().permute(0, 2, 1, 3, 4).reshape(b * f * c, 1, h, w)
    window = _gaussian_window().to(x.device)[None, None]  # [1, 1, 7, 7]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)  # valid convolution: no padding artefacts at borders

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return index.reshape(b, f, -1).mean(dim=2)


def ssim(test: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-video SSIM, [B]: the mean of `ssim_per_frame` (every frame has as many windows)."""
    return ssim_per_frame(test, reference).mean(dim=1)


def lpips_status() -> str | None:
    """None when LPIPS can be computed here; else one line saying what is missing."""
    if find_spec("lpips") is None:
        return "LPIPS not computed: the lpips package is not installed (pip install lpips)"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        return (
            f"LPIPS not computed: torchvision's AlexNet weights are not in {weights.parent} "
            "(nothing is downloaded)"
        )
    return None


def lpips_per_video(test: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS (AlexNet) over the frames of each video, [B]; call only when `lpips_status()`
    is None."""
    import lpips

    metric = lpips.LPIPS(net="alex", verbose=False).to(test.device).eval()
    b, c, f, h, w = test.shape
    frames = [t.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) * 2 - 1 for t in (test, reference)]
    with torch.no_grad():
        distance = metric(frames[0].float(), frames[1].float())  # [B*F, 1, 1, 1]
    return distance.reshape(b, f).mean(dim=1)
