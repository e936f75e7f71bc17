"""The explicit bipartite graph of a sparse conv layer (docs/algorithm.md section 2, the paper's Fig. 1).

Legend: ``C_out, C_in, kh, kw`` mask shape, ``H, W`` input map, ``Ho, Wo`` output map,
``sh, sw`` stride, ``ph, pw`` padding. Input node ``(c, y, x)`` has id ``c*H*W + y*W + x``;
output node ``(o, i, j)`` (filter ``o`` at window ``(i, j)``) has id ``o*Ho*Wo + i*Wo + j``.
Zero-padding positions are not nodes.
"""
from minicnn import backend
from minicnn.utils import conv


def check_layer(mask, input_hw, stride, padding):
    """Validate a layer description; return ``(mask, (H, W), (sh, sw), (ph, pw), (Ho, Wo))``.

    ``mask`` must be a 4-D ``(C_out, C_in, kh, kw)`` array with every size >= 1 holding only 0/1
    (bool preferred); it is returned as bool on its own device.
    """
    xp = backend.get_array_module(mask)
    if not hasattr(mask, "shape") or mask.ndim != 4 or min(mask.shape) < 1:
        raise ValueError(f"mask must be a 4-D (C_out, C_in, kh, kw) array with no empty axis, "
                         f"got shape {getattr(mask, 'shape', None)}")
    if mask.dtype != bool:
        if not bool(xp.all((mask == 0) | (mask == 1))):
            raise ValueError(f"mask must be boolean (or 0/1), got dtype {mask.dtype} "
                             "with other values")
        mask = mask != 0
    H, W = conv.pair(input_hw, "input_hw", 1)
    sh, sw = conv.pair(stride, "stride", 1)
    ph, pw = conv.pair(padding, "padding", 0)
    Ho, Wo = conv.output_hw((H, W), mask.shape[2:], (sh, sw), (ph, pw))
    return mask, (H, W), (sh, sw), (ph, pw), (Ho, Wo)


def conv_topology(mask, input_hw, stride=1, padding=0):
    """The layer's bipartite graph as an edge list.

    Inputs:
    - mask: bool (C_out, C_in, kh, kw), NumPy or CuPy; the same mask in every window
    - input_hw: (H, W) of the input map; stride, padding: int or pair
    Returns ``(edges_in, edges_out, n_in, n_out)``: int64 arrays (E,) of input and output node
    ids (one entry per edge, no duplicates, on the mask's device), ``n_in = C_in*H*W``,
    ``n_out = C_out*Ho*Wo``. Edge ``(o,i,j) - (c,y,x)`` iff ``mask[o,c,dy,dx]`` with
    ``y = i*sh + dy - ph``, ``x = j*sw + dx - pw`` inside the image.
    """
    mask, (H, W), (sh, sw), (ph, pw), (Ho, Wo) = check_layer(mask, input_hw, stride, padding)
    xp = backend.get_array_module(mask)
    C_out, C_in = mask.shape[:2]
    o, c, dy, dx = (a.astype(xp.int64) for a in xp.nonzero(mask))      # active entries, (nnz,)
    y = xp.arange(Ho, dtype=xp.int64)[None, :] * sh + dy[:, None] - ph  # (nnz, Ho) pixel row
    x = xp.arange(Wo, dtype=xp.int64)[None, :] * sw + dx[:, None] - pw  # (nnz, Wo) pixel column
    inside = ((y >= 0) & (y < H))[:, :, None] & ((x >= 0) & (x < W))[:, None, :]  # (nnz, Ho, Wo)
    e, i, j = xp.nonzero(inside)                                          # one triple per edge
    edges_in = c[e] * (H * W) + y[e, i] * W + x[e, j]
    edges_out = o[e] * (Ho * Wo) + i * Wo + j
    return edges_in, edges_out, C_in * H * W, C_out * Ho * Wo
