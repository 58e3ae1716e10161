"""Lung inference: the U-Net (:mod:`.unet`), the threshold baseline (:mod:`.threshold`) and
the shared postprocessing (:mod:`.postprocess`). Importing this package imports no torch."""

#: Windows per network call and axial slices per slab. Small batches keep each layer's
#: activations in the CPU caches: on chest-ct-philips-141 (2-core VM, 2 threads) U-Net
#: inference took 1.9-2.0 s with (4, 16), 2.6-3.3 s with (16, 48) and 3.4-4.1 s with
#: (48, 48); see docs/benchmarks.md ("Inference batch size").
DEFAULT_BATCH_SIZE = 4
SLAB_SLICES = 16
