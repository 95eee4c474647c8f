"""FMNIST-C v1: the Fashion-MNIST test set under synthetic corruptions.

BENCHMARK.md names six corruptions, each at severities 1..5, made
deterministically from seed 0. This module makes them with numpy alone (no
scipy, no TensorFlow), so that any framework can rebuild the same arrays:

| corruption | parameter | severities 1..5 |
|---|---|---|
| `gaussian_noise` | sigma of N(0, sigma) added to [0, 1] pixels | 0.04, 0.08, 0.12, 0.18, 0.26 |
| `gaussian_blur` | sigma of a separable Gaussian kernel, pixels | 0.5, 0.75, 1.0, 1.25, 1.5 |
| `contrast` | scale of (x - image mean) | 0.6, 0.5, 0.4, 0.3, 0.2 |
| `rotation` | angle in degrees, sign drawn per image | 7.5, 15, 22.5, 30, 37.5 |
| `translation` | shift in pixels, one of 4 directions per image | 1, 2, 3, 4, 5 |
| `pixel_dropout` | fraction of each image's pixels set to 0 | 0.05, 0.1, 0.2, 0.3, 0.4 |

Every result is clipped to [0, 1] and keeps the input's shape and dtype
float32. Each (corruption, severity) pair draws from its own generator,
`numpy.random.default_rng([seed, corruption index, severity])`, so a set does
not depend on which other sets were made or in what order. Choices the
protocol leaves open, fixed here: the blur kernel has radius ceil(3 sigma) and
zero padding (the images' background is 0); rotation turns about the image
centre with bilinear sampling and zero fill, clockwise or counter-clockwise
with probability 1/2; translation shifts by exactly the severity's pixel count
up, down, left or right (probability 1/4 each) with zero fill; pixel dropout
zeroes exactly round(fraction * pixels) pixels of each image.

Usage (writes a preview grid and prints a digest of every set):

```
.venv/bin/python benchmarks/corruptions.py \
    --preview=benchmarks/results/fmnist_c_v1_examples.png
```
"""

import hashlib
import math
import os
import pathlib
import sys

import numpy as np

CORRUPTIONS = (
    "gaussian_noise", "gaussian_blur", "contrast", "rotation", "translation",
    "pixel_dropout",
)
SEVERITIES = (1, 2, 3, 4, 5)
PARAMETERS = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),
    "gaussian_blur": (0.5, 0.75, 1.0, 1.25, 1.5),
    "contrast": (0.6, 0.5, 0.4, 0.3, 0.2),
    "rotation": (7.5, 15.0, 22.5, 30.0, 37.5),
    "translation": (1, 2, 3, 4, 5),
    "pixel_dropout": (0.05, 0.1, 0.2, 0.3, 0.4),
}
SEED = 0


# ----------------------------------------------------------------- shapes
def _as_images(x):
    """(N, H, W) float32 view of (N, H, W), (N, H, W, 1) or (N, H*W) input."""
    x = np.asarray(x)
    if x.ndim == 2:
        side = int(round(math.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise ValueError(
                "Argument `images` of shape (N, D) must hold square images "
                f"(D a perfect square). Received: shape={x.shape}"
            )
        images = x.reshape(len(x), side, side)
    elif x.ndim == 3:
        images = x
    elif x.ndim == 4 and x.shape[-1] == 1:
        images = x[..., 0]
    else:
        raise ValueError(
            "Argument `images` must have shape (N, H*W), (N, H, W) or "
            f"(N, H, W, 1). Received: shape={x.shape}"
        )
    images = images.astype(np.float32, copy=False)
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError(
            "Argument `images` must hold pixels in [0, 1]. Received values in "
            f"[{float(images.min())}, {float(images.max())}]"
        )
    return images


def _restore(images, like):
    return np.clip(images, 0.0, 1.0).astype(np.float32).reshape(
        np.shape(like)
    )


def _check_positive(name, value):
    if not (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and value >= 0):
        raise ValueError(
            f"Argument `{name}` must be a number >= 0. Received: "
            f"{name}={value!r}"
        )


# -------------------------------------------------------------- corruptions
def gaussian_noise(images, sigma, rng):
    """Adds N(0, sigma^2) to every pixel and clips to [0, 1].

    Args:
        images: float array in [0, 1], shape (N, H*W), (N, H, W) or
            (N, H, W, 1).
        sigma: float >= 0. Standard deviation of the noise.
        rng: `numpy.random.Generator`.

    Returns:
        The corrupted images, float32, same shape as `images`.

    Example:

    ```python
    noisy = gaussian_noise(x, 0.08, np.random.default_rng(0))
    ```
    """
    _check_positive("sigma", sigma)
    x = _as_images(images)
    noise = rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
    return _restore(x + noise, images)


def gaussian_kernel(sigma):
    """The normalized 1-D Gaussian kernel of radius ceil(3 sigma).

    Args:
        sigma: float >= 0. For 0 the kernel is `[1.0]` (identity).

    Returns:
        float64 array of odd length summing to 1.

    Example:

    ```python
    gaussian_kernel(1.0)  # 7 taps
    ```
    """
    _check_positive("sigma", sigma)
    if sigma == 0:
        return np.ones(1)
    radius = int(math.ceil(3.0 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _convolve_axis(x, kernel, axis):
    radius = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad)
    out = np.zeros_like(x, dtype=np.float64)
    size = x.shape[axis]
    for tap, weight in enumerate(kernel):
        out += weight * np.take(padded, np.arange(tap, tap + size), axis=axis)
    return out


def gaussian_blur(images, sigma):
    """Blurs with a separable Gaussian kernel (zero padding at the borders).

    Args:
        images: float array in [0, 1] (see `gaussian_noise`).
        sigma: float >= 0, in pixels.

    Returns:
        The blurred images, float32, same shape as `images`.

    Example:

    ```python
    blurred = gaussian_blur(x, 1.0)
    ```
    """
    x = _as_images(images).astype(np.float64)
    kernel = gaussian_kernel(sigma)
    x = _convolve_axis(x, kernel, axis=1)
    x = _convolve_axis(x, kernel, axis=2)
    return _restore(x, images)


def contrast(images, scale):
    """Scales each image's deviation from its own mean pixel by `scale`.

    Args:
        images: float array in [0, 1].
        scale: float >= 0 (1 = unchanged, 0 = a flat image at its mean).

    Returns:
        float32 images, same shape as `images`.

    Example:

    ```python
    faded = contrast(x, 0.4)
    ```
    """
    _check_positive("scale", scale)
    x = _as_images(images)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return _restore((x - mean) * scale + mean, images)


def rotate(images, degrees):
    """Rotates each image about its centre by its own angle (bilinear).

    Pixels whose source falls outside the image are 0.

    Args:
        images: float array in [0, 1].
        degrees: float, or float array of shape (N,), counter-clockwise.

    Returns:
        float32 images, same shape as `images`.

    Example:

    ```python
    turned = rotate(x, 15.0)
    ```
    """
    x = _as_images(images)
    n, height, width = x.shape
    angles = np.broadcast_to(
        np.radians(np.asarray(degrees, dtype=np.float64)), (n,)
    )
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    rows, cols = np.meshgrid(np.arange(height) - cy, np.arange(width) - cx,
                             indexing="ij")
    cos = np.cos(angles)[:, None, None]
    sin = np.sin(angles)[:, None, None]
    # Output pixel p takes the input at R(-angle) p (inverse mapping); rows
    # grow downwards, so a counter-clockwise turn on screen is this sign.
    src_c = cos * cols - sin * rows + cx
    src_r = sin * cols + cos * rows + cy
    r0 = np.floor(src_r).astype(np.int64)
    c0 = np.floor(src_c).astype(np.int64)
    fr = src_r - r0
    fc = src_c - c0
    flat = x.reshape(n, -1)
    out = np.zeros((n, height, width), dtype=np.float64)
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                           (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        inside = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        index = np.where(inside, rr * width + cc, 0).reshape(n, -1)
        values = np.take_along_axis(flat, index, axis=1).reshape(out.shape)
        out += np.where(inside, weight * values, 0.0)
    return _restore(out, images)


def translate(images, shifts):
    """Shifts each image by whole pixels, filling with 0.

    Args:
        images: float array in [0, 1].
        shifts: int array of shape (N, 2): (rows down, columns right).

    Returns:
        float32 images, same shape as `images`.

    Example:

    ```python
    moved = translate(x, np.tile([[0, 2]], (len(x), 1)))
    ```
    """
    x = _as_images(images)
    shifts = np.asarray(shifts, dtype=np.int64).reshape(len(x), 2)
    out = np.zeros_like(x)
    height, width = x.shape[1:]
    for dy, dx in np.unique(shifts, axis=0):
        chosen = np.all(shifts == (dy, dx), axis=1)
        if abs(dy) >= height or abs(dx) >= width:
            continue
        src = x[chosen][:, max(0, -dy):height - max(0, dy),
                        max(0, -dx):width - max(0, dx)]
        block = np.zeros((int(chosen.sum()), height, width), np.float32)
        block[:, max(0, dy):height - max(0, -dy),
              max(0, dx):width - max(0, -dx)] = src
        out[chosen] = block
    return _restore(out, images)


def pixel_dropout(images, fraction, rng):
    """Sets exactly round(fraction * pixels) random pixels of each image to 0.

    Args:
        images: float array in [0, 1].
        fraction: float in [0, 1].
        rng: `numpy.random.Generator`.

    Returns:
        float32 images, same shape as `images`.

    Example:

    ```python
    holes = pixel_dropout(x, 0.2, np.random.default_rng(0))
    ```
    """
    _check_positive("fraction", fraction)
    if fraction > 1:
        raise ValueError(
            "Argument `fraction` must be in [0, 1]. "
            f"Received: fraction={fraction!r}"
        )
    x = _as_images(images)
    n = len(x)
    flat = x.reshape(n, -1).copy()
    count = int(round(fraction * flat.shape[1]))
    if count:
        order = np.argsort(rng.random(flat.shape), axis=1)[:, :count]
        np.put_along_axis(flat, order, 0.0, axis=1)
    return _restore(flat, images)


# ------------------------------------------------------------------ sets
def corrupt(images, corruption, severity, seed=SEED):
    """One FMNIST-C v1 set: `images` under `corruption` at `severity`.

    Args:
        images: float array in [0, 1], shape (N, H*W), (N, H, W) or
            (N, H, W, 1): the clean test images.
        corruption: one of `CORRUPTIONS`.
        severity: int in 1..5.
        seed: int. The protocol's seed is 0.

    Returns:
        float32 array, same shape as `images`.

    Example:

    ```python
    from keras_freetickets.contrib import datasets
    x, y = datasets.load_fashion_mnist("test", flatten=True)
    blurred = corrupt(x, "gaussian_blur", 3)
    ```
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(
            f"Argument `corruption` must be one of {list(CORRUPTIONS)}. "
            f"Received: corruption={corruption!r}"
        )
    if severity not in SEVERITIES or isinstance(severity, bool):
        raise ValueError(
            "Argument `severity` must be an int in 1..5. "
            f"Received: severity={severity!r}"
        )
    value = PARAMETERS[corruption][severity - 1]
    rng = np.random.default_rng(
        [int(seed), CORRUPTIONS.index(corruption), int(severity)]
    )
    n = len(images)
    if corruption == "gaussian_noise":
        return gaussian_noise(images, value, rng)
    if corruption == "gaussian_blur":
        return gaussian_blur(images, value)
    if corruption == "contrast":
        return contrast(images, value)
    if corruption == "rotation":
        signs = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        return rotate(images, signs * value)
    if corruption == "translation":
        directions = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)])
        return translate(images, directions[rng.integers(0, 4, n)] * value)
    return pixel_dropout(images, value, rng)


def set_name(corruption, severity):
    """The name of one set, for example `"rotation_3"`."""
    return f"{corruption}_{severity}"


def fmnist_c(images, seed=SEED, corruptions=CORRUPTIONS,
             severities=SEVERITIES):
    """Yields `(corruption, severity, array)` for every set of FMNIST-C v1.

    Args:
        images: the clean test images (see `corrupt`).
        seed: int.
        corruptions: the corruptions to make (default: all six).
        severities: the severities to make (default: 1..5).

    Example:

    ```python
    for name, severity, x_c in fmnist_c(x_test):
        print(name, severity, x_c.mean())
    ```
    """
    for corruption in corruptions:
        for severity in severities:
            yield corruption, severity, corrupt(images, corruption, severity,
                                                seed)


def digest(array):
    """sha256 (first 16 hex digits) of an array's float32 bytes."""
    return hashlib.sha256(
        np.ascontiguousarray(array, dtype=np.float32).tobytes()
    ).hexdigest()[:16]


def preview(images, path, seed=SEED, count=4):
    """Writes a PNG grid: rows = corruptions, columns = severities 0..5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = _as_images(images)[:count]
    fig, axes = plt.subplots(len(CORRUPTIONS), 6 * count,
                             figsize=(6 * count * 0.55, len(CORRUPTIONS) * 0.7))
    for row, name in enumerate(CORRUPTIONS):
        sets = [x] + [_as_images(corrupt(x, name, s, seed))
                      for s in SEVERITIES]
        for col in range(6 * count):
            ax = axes[row, col]
            ax.imshow(sets[col % 6][col // 6], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(str(col % 6), fontsize=6)
        axes[row, 0].set_ylabel(name.replace("_", "\n"), fontsize=6,
                                rotation=0, ha="right", va="center")
    fig.suptitle("FMNIST-C v1 (columns: severity 0..5)", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv):
    """Builds every set of FMNIST-C v1 and prints its digest and mean."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--preview", default=None,
                        help="PNG path for a grid of corrupted examples.")
    parser.add_argument("--out", default=None,
                        help="Optional .npz path receiving every set.")
    args = parser.parse_args(argv)
    repo = pathlib.Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.append(str(repo))
    from keras_freetickets.contrib import datasets

    x, y = datasets.load_fashion_mnist("test", flatten=True)
    arrays = {}
    for name, severity, x_c in fmnist_c(x, seed=args.seed):
        print(f"{set_name(name, severity):18s} param="
              f"{PARAMETERS[name][severity - 1]:<6} mean={x_c.mean():.4f} "
              f"sha256={digest(x_c)}", flush=True)
        if args.out:
            arrays[set_name(name, severity)] = x_c
    if args.out:
        np.savez_compressed(args.out, labels=y, **arrays)
    if args.preview:
        os.makedirs(os.path.dirname(args.preview) or ".", exist_ok=True)
        preview(x, args.preview, seed=args.seed)


if __name__ == "__main__":
    main(sys.argv[1:])
