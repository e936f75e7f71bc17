"""From stored uint8 images to training batches: statistics, padding, flips, shuffling.

All of it runs in NumPy on the CPU, one vectorised step per batch, and only the finished batch
moves to the device (``backend.to_device``): the CPU and the GPU see the same batches for a
seed. Legend: N images, B batch, C channels, H x W stored size, P padded size.
"""
import numpy as np

from minicnn import backend


def channel_stats(x, chunk=2048):
    """Per-channel mean and standard deviation of uint8 images, in the scale of ``x / 255``.

    x: uint8 (N, C, H, W), the training set. Returns mean, std: float64 (C,). The sums of
    ``x`` and ``x**2`` are accumulated exactly in int64 over chunks of ``chunk`` images (255**2
    fits in uint16, so a chunk costs 2 bytes per pixel), then
    ``var = (n * sum(x**2) - sum(x)**2) / n**2`` in exact integer arithmetic (population
    variance, ddof=0, as ``x.std()``), so the result does not depend on the chunking.
    """
    N, C, H, W = x.shape
    s1 = np.zeros(C, np.int64)
    s2 = np.zeros(C, np.int64)
    for i in range(0, N, chunk):
        xc = x[i:i + chunk].astype(np.uint16)  # (n, C, H, W); x**2 <= 65025 fits
        s1 += xc.sum(axis=(0, 2, 3), dtype=np.int64)
        s2 += (xc * xc).sum(axis=(0, 2, 3), dtype=np.int64)
    n = N * H * W
    mean = np.array([int(a) / n for a in s1]) / 255.0
    var = np.array([(n * int(b) - int(a) ** 2) / n**2 for a, b in zip(s1, s2)]) / 255.0**2
    return mean, np.sqrt(var)


def pad_images(x, size):
    """Zero-pad images to ``size x size``, centred (28 -> 32: 2 pixels on each side).

    x: (N, C, H, W) -> (N, C, size, size), same dtype. Padding happens on the stored pixels,
    before normalisation, as torchvision's ``Pad`` then ``Normalize``: the border is black
    (pixel 0), which continues the black background of MNIST-style digits.
    """
    N, C, H, W = x.shape
    if H > size or W > size:
        raise ValueError(f"cannot pad {H}x{W} images to {size}x{size}")
    top, left = (size - H) // 2, (size - W) // 2
    out = np.zeros((N, C, size, size), dtype=x.dtype)
    out[:, :, top:top + H, left:left + W] = x
    return out


class Loader:
    """An iterable of ``(xb, yb)`` batches: normalised, padded, flipped and shuffled.

    x: uint8 (N, C, H, W) stored images; y: int (N,) labels. mean, std: (C,) in the ``x / 255``
    scale (from :func:`channel_stats` on the training set). Each batch is

        xb = (pad(flip(x[idx])) / 255 - mean) / std     # (B, C, P, P), dtype
        yb = y[idx]                                      # (B,), int64

    on ``device`` (default: the one chosen by ``backend.use``). ``train=True`` shuffles every
    epoch and flips each image horizontally with probability 0.5; ``train=False`` keeps the
    order and does no augmentation. ``pad_to=32`` zero-pads 28x28 images (see
    :func:`pad_images`). ``seed``: an int or a ``numpy.random.Generator`` (used, not copied).

    Randomness: at the start of each epoch (the call to ``iter``) the permutation and all N flip
    decisions are drawn at once, so the generator's state between epochs does not depend on how
    many batches were consumed. ``get_state()`` after an epoch and ``set_state()`` before the
    next reproduce the remaining epochs exactly.
    """

    def __init__(self, x, y, batch_size, mean, std, train, pad_to=None, seed=0,
                 dtype="float32", drop_last=False, device=None):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y = x, np.asarray(y, dtype=np.int64)
        self.batch_size, self.train, self.pad_to = int(batch_size), bool(train), pad_to
        self.drop_last, self.device = drop_last, device
        self.dtype = np.dtype(dtype)
        C = x.shape[1]
        mean = np.asarray(mean, dtype=np.float64).reshape(C, 1, 1)
        std = np.asarray(std, dtype=np.float64).reshape(C, 1, 1)
        # (v / 255 - mean) / std = v * scale - shift, folded once in float64, applied in dtype
        self.scale = (1.0 / (255.0 * std)).astype(self.dtype)
        self.shift = (mean / std).astype(self.dtype)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def __len__(self):
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def get_state(self):
        """The generator's state (a JSON-serialisable dict), for checkpoints between epochs."""
        return self.rng.bit_generator.state

    def set_state(self, state):
        """Restore a state from :meth:`get_state`; the next epoch then repeats exactly."""
        self.rng.bit_generator.state = state

    def __iter__(self):
        n = len(self.x)
        if self.train:  # drawn now, not lazily: see the class docstring
            order = self.rng.permutation(n)
            flips = self.rng.random(n) < 0.5
        else:
            order, flips = np.arange(n), None
        return self._batches(order, flips)

    def _batches(self, order, flips):
        b = self.batch_size
        for k in range(len(self)):
            sl = slice(k * b, (k + 1) * b)
            yield self.batch(order[sl], None if flips is None else flips[sl])

    def batch(self, idx, flip=None):
        """One batch of the images ``idx`` (int (B,)), flipping those where ``flip`` (bool (B,))."""
        xb = self.x[idx]  # (B, C, H, W) uint8, a copy
        if flip is not None and flip.any():
            xb[flip] = xb[flip][..., ::-1]  # horizontal flip: reverse W
        if self.pad_to is not None:
            xb = pad_images(xb, self.pad_to)  # (B, C, P, P)
        out = np.multiply(xb, self.scale, dtype=self.dtype)  # uint8 * scale in dtype
        out -= self.shift
        return backend.to_device(out, self.device), backend.to_device(self.y[idx], self.device)
