"""Losses: a loss maps ``(logits, labels) -> float`` and ``backward() -> dlogits``.

A loss is the root of backpropagation, so ``backward`` takes no upstream gradient
(``dL/dL = 1``). Legend: ``N`` batch size, ``K`` number of classes.
"""
from minicnn import backend


class CrossEntropyLoss:
    """Softmax cross-entropy, averaged over the batch (PyTorch's ``nn.CrossEntropyLoss()``).

    forward:  ``L = -1/N * sum_n log softmax(z_n)[y_n]``, computed as the numerically stable
    log-softmax ``log p = (z - max z) - log sum exp(z - max z)``.
    backward: ``dL/dz = (softmax(z) - onehot(y)) / N``.

    Cache (set by forward, read by backward):
        probs:  (N, K) softmax probabilities, dtype of the logits.
        labels: (N,) integer class indices.

    Labels must lie in ``[0, K)``: PyTorch's ``ignore_index`` (-100) and label smoothing are
    not supported, and a label out of range raises ValueError (NumPy would silently wrap a
    negative index).
    """

    def __init__(self):
        self.probs = None
        self.labels = None

    def forward(self, logits, labels):
        """logits (N, K) float, labels (N,) int -> the mean loss as a Python float."""
        xp = backend.get_array_module(logits)
        if logits.ndim != 2 or labels.shape != (logits.shape[0],):
            raise ValueError(f"CrossEntropyLoss expects logits (N, K) and labels (N,), got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        if labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = xp.asarray(labels)  # NumPy labels with CuPy logits: moved to the GPU
        N, K = logits.shape
        if N == 0:
            raise ValueError("CrossEntropyLoss of an empty batch")
        if bool(((labels < 0) | (labels >= K)).any()):   # one scalar to the host (on a GPU: per batch)
            raise ValueError(f"labels must lie in [0, {K}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        rows = xp.arange(N)
        z = logits - logits.max(axis=1, keepdims=True)  # (N, K) shifted: exp cannot overflow
        z_y = z[rows, labels]                            # (N,) shifted logit of the true class
        e = xp.exp(z, out=z)                             # (N, K) exp(z - max), in place
        s = e.sum(axis=1)                                # (N,) sum_k exp(z_k - max) >= 1
        loss = (xp.log(s) - z_y).mean()                  # -log p_y = log s - (z_y - max)
        self.probs = e / s[:, None]                      # (N, K) softmax
        self.labels = labels
        return float(loss)

    __call__ = forward

    def backward(self):
        """-> dlogits (N, K) = (softmax - onehot(labels)) / N, in the dtype of the logits."""
        if self.probs is None:
            raise RuntimeError("CrossEntropyLoss.backward() called before forward()")
        xp = backend.get_array_module(self.probs)
        N = self.probs.shape[0]
        d = self.probs.copy()              # (N, K)
        d[xp.arange(N), self.labels] -= 1  # softmax - onehot
        d /= N                             # d(mean)/d(each term) = 1/N
        return d
