"""Functional building blocks shared by the layers and ``cht``: ``conv`` (geometry, im2col, col2im)."""
