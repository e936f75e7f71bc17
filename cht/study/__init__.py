"""Study mode: every gradient and mask step made visible (``python -m cht.study --help``).

- ``cht.study.trace``: one training step, layer by layer (activations, gradients, update
  sizes, finite-difference checks, the im2col identities of one conv layer).
- ``cht.study.evotrace``: one CHT-Conv evolution step of one layer (removal, window-averaged
  and single-window CH scores, regrowth, overlap), checked against ``cht.evolution``.
- ``cht.study.plots``: pictures of a run directory with Pillow (curves, density/ITOP, masks).
"""
