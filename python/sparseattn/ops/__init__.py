"""One folder per op family: ``op.py`` (custom op, fake, autograd, public function), ``cpu.py``
(the PyTorch CPU path) and ``naive.py`` (the float64 oracle, re-exported by
:mod:`sparseattn.reference`). The Triton kernels and launchers live in
``sparseattn.triton_kernels.<op>``. :mod:`.common` holds the one input check every op shares."""
