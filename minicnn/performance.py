"""The layers' performance policy: work buffers, chunks of images, layouts.

The layers' math reads none of this except through the choices returned here. Every choice
depends on the shapes alone (never on the worker count or the number of cores), so a result is
the same bit for bit with any number of workers; the choices set speed and memory (and, where
two exact routes round differently, which one is taken).

Why chunks (measured with VGG16 at batch 128): the ``cols`` of one conv layer are ``kh*kw``
times its input, 300 MB for one layer. The layer therefore works on chunks of images whose
``cols`` fit in about :data:`CHUNK_BYTES` (16 MB: the GEMM reads what im2col has just written
while it is still in cache; much smaller chunks mean many small GEMM calls), and keeps only its
input for backward (as Chainer does), redoing a chunk's im2col there: 0.8 GB less memory. The
chunks also are the parts the CPU workers take: :data:`MIN_CHUNKS` gives several workers
something to share on layers whose whole batch fits in one chunk, but not below
:data:`MIN_CHUNK_IMAGES` images per chunk, where the GEMMs get thin (single-threaded float32
``(512, 4608) @ (4608, 4n)``, a 2x2-map layer: 105 GFLOP/s for n = 8 images, 129 for 16, 142
for 32, 155 for 128, on a 2-core Intel Xeon with AVX-512). Element-wise and per-channel work
(ReLU, pooling, BatchNorm) goes in blocks of at least :data:`BLOCK_SIZE` elements: BatchNorm's
forward and backward on 128x128x4x4 float32 took 1.3 ms as one block and 2.5 ms as two on 2
workers of that machine (shared with other work), and at most :data:`MAX_BLOCKS`
(:data:`MAX_CHANNEL_BLOCKS` of channels, :func:`over_channels`).

Why at least 8 chunks of 16 images or more, and up to 16 blocks (4 of channels): with at least
4 chunks of 32 images and at most 4 blocks, a VGG16 step at batch 128 could not use more than
about 4 cores (the 8x8, 4x4 and 2x2 layers had 4 or 5 chunks). Measured by timing every part on
one worker and dealing the parts out to W workers in order (as :func:`minicnn.backend.on_items`
does), the speed-up over one worker at width 1.0 on 2, 8 and 16 workers: 1.81, 3.6 and 3.8 with
4 chunks and 4 blocks against 1.88, 4.5 and 4.9 with these constants; at width 0.25 on 8 and 16
workers: 3.2 and 3.2 against 4.2 and 4.3. On 2 workers of that Xeon, the two settings
alternating step by step in one process: 0.95 of the step time at width 0.25, 0.99 at width
1.0 (the machine shared with other work). A conv backward keeps one ``dW`` per chunk (``F*K``:
9 MB for 512 filters of 512x3x3), so its chunks stop at :data:`SLOT_BYTES` of those: 8 chunks
there would have added 38 MB to the peak. On small batches the CPU plan is one chunk per conv
layer and one block per array, as on the GPU.
"""
import math

from minicnn import backend
from minicnn.utils import winograd as winograd_mod

CHUNK_BYTES = 16 << 20       # the size of one chunk's cols
MIN_CHUNKS = 8               # chunks per batch at least, ...
MIN_CHUNK_IMAGES = 16        # ... as long as each keeps this many images
SLOT_BYTES = 40 << 20        # ... and the per-chunk results kept (image_chunks) fit in this
BLOCK_SIZE = 1 << 18         # elements per block of element-wise or per-channel work, at least
MAX_BLOCKS = 16              # blocks per array at most
MAX_CHANNEL_BLOCKS = 4       # ... and blocks of channels (over_channels) at most
BATCH_LAST_MAX_PIXELS = 16   # outputs of at most this many pixels use the batch-last layout
WINOGRAD_MAX_PIXELS = 64     # Winograd F(2x2, 3x3) on outputs of at most this many pixels ...
WINOGRAD_MIN_PAIRS = 128 * 256   # ... and at least this many channel pairs C_in * C_out
CACHE_BYTES = 1 << 20        # work passed over several times in a row: blocks of about this size
reuse_workspace = True       # False: a fresh array per workspace() call (for tests)


def workspace(name, shape, like):
    """A scratch array ``(shape, like.dtype)`` on ``like``'s device, contents undefined.

    A view of the calling worker's own buffer ``name`` (``backend.worker_buffer``), valid until
    that worker asks for ``name`` again: a layer uses its views inside one forward or backward
    call only, and layers run one after the other, so one buffer per worker serves every layer
    without a page fault per 4 KiB of a fresh array.
    """
    xp = backend.get_array_module(like)
    if not reuse_workspace:
        return xp.empty(shape, dtype=like.dtype)
    return backend.worker_buffer(name, math.prod(shape), like.dtype, xp).reshape(shape)


def over_blocks(fn, n, like, max_blocks=None):
    """``fn(i0, i1)`` for contiguous ranges covering ``range(n)`` (images or channels of the
    array ``like``), taken by the CPU workers. The ranges are fixed by ``like``'s size: one per
    ``BLOCK_SIZE`` elements, at most ``max_blocks`` (default ``MAX_BLOCKS``); a single call
    ``fn(0, n)`` on the GPU."""
    cap = MAX_BLOCKS if max_blocks is None else max_blocks
    blocks = 1 if backend.is_gpu_array(like) else min(cap, max(1, like.size // BLOCK_SIZE))
    backend.on_items(lambda r: fn(*r), backend.split(n, blocks), like)


def over_channels(fn, like):
    """:func:`over_blocks` over the channels (axis 1) of ``like`` ``(N, C, ...)``, at most
    ``MAX_CHANNEL_BLOCKS``: a block of channels spans every image, and thin ones slow NumPy's
    broadcast passes down (BatchNorm on 128x64x32x32 and 128x128x16x16 float32, forward and
    backward on 2 workers: 1.20 and 1.35 times the time in 16 blocks than in 4)."""
    over_blocks(fn, like.shape[1], like, MAX_CHANNEL_BLOCKS)


def image_chunks(N, bytes_per_image, like, slot_bytes=0):
    """``(n0, n1)`` ranges of equal size covering the ``N`` images of ``like``: as many as
    needed for each chunk's ``cols`` (``bytes_per_image`` per image) to fit in ``CHUNK_BYTES``,
    and at least ``MIN_CHUNKS`` of ``MIN_CHUNK_IMAGES`` images or more (fewer on small
    batches: one for 31 images or less). ``slot_bytes``: memory the caller keeps per chunk until
    all are done (a conv backward: one ``dW``); the chunks made for the workers stop where those
    slots would pass ``SLOT_BYTES``, so that the peak does not grow with them. On the GPU one
    chunk: its memory is fast, and fewer kernel launches win."""
    if backend.is_gpu_array(like):
        return [(0, N)]
    shared = min(MIN_CHUNKS, N // MIN_CHUNK_IMAGES, SLOT_BYTES // slot_bytes if slot_bytes else N)
    count = max(-(-N // max(1, CHUNK_BYTES // bytes_per_image)), shared)
    nb = -(-N // count)                      # images per chunk: ceil(N / count)
    return [(n0, min(N, n0 + nb)) for n0 in range(0, N, nb)]


def row_blocks(n, row_bytes):
    """``(r0, r1)`` ranges covering ``n`` rows of ``row_bytes`` each, about ``CACHE_BYTES`` per
    block (at least one row): for work that passes over a block several times in a row (CH
    scoring's class sums: 0.41 -> 0.27 s for a 512x512 layer on 4x4 maps, one worker), so the
    later passes read it from cache. Fixed by the shapes alone, as every choice here."""
    rows = max(1, CACHE_BYTES // max(1, row_bytes))
    return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def batch_last(oh, ow):
    """Use the batch-last work layout (``minicnn.utils.conv``) for outputs of at most
    ``BATCH_LAST_MAX_PIXELS`` pixels. Measured (512 channels, batch 128, im2col with the
    transposes in and out): 2x2 maps 7.0 -> 1.8 ms, 4x4 17.5 -> 8.5 ms; from 8x8 on, the
    element-wise transposes this layout needs cost more than they save."""
    return oh * ow <= BATCH_LAST_MAX_PIXELS


def dx_by_conv_pays(F, C):
    """With stride 1, dx as a convolution of dy unrolls ``F*kh*kw`` rows, col2im adds back
    ``C*kh*kw`` rows but costs ~3x more per value (read-modify-write): the convolution wins
    unless ``F >> C``."""
    return F <= 2 * C


def winograd(kernel_size, stride, padding, out_hw, C, F):
    """Convolve by Winograd's F(2x2, 3x3) (``minicnn.utils.winograd``) rather than im2col where it
    applies (3x3, stride 1, padding <= 2, even output sizes), on maps of at most
    :data:`WINOGRAD_MAX_PIXELS` outputs, for at least :data:`WINOGRAD_MIN_PAIRS` channel pairs
    ``C*F``. It makes 16 products per 2x2 outputs instead of 36, but its transforms pass over 4x
    the input and output, one NumPy operation at a time: they cost less than the products saved
    only where each value meets many channels. Measured (batch 128, forward / backward, time
    against im2col's, 2 workers of a 2-core Xeon): 256 -> 256 channels on 8x8 0.84 / 0.79, 512
    -> 512 on 4x4 0.85 / 0.73, on 2x2 1.03 / 0.88, 128 -> 256 on 8x8 1.10 / 0.87; 128 -> 128 on
    4x4 1.34 / 1.13, on 8x8 1.01 / 1.00. The cap on the map bounds its work buffers (``V`` and
    ``M`` are 4x a layer's input and output, kept for the whole batch)."""
    return (winograd_mod.applies(kernel_size, stride, padding, out_hw)
            and out_hw[0] * out_hw[1] <= WINOGRAD_MAX_PIXELS and C * F >= WINOGRAD_MIN_PAIRS)


def dw_transposed(F):
    """Compute ``dW^T = cols @ dy_mat^T`` ``(K, F)`` rather than ``dW = dy_mat @ cols^T``: the
    same products, up to 1.7x faster in OpenBLAS for few filters; with many, adding its
    transpose to ``.grad`` costs more."""
    return F <= 64
