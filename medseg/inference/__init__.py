"""Lung inference: the U-Net (:mod:`.unet`), the threshold baseline (:mod:`.threshold`) and
the shared postprocessing (:mod:`.postprocess`). Importing this package imports no torch."""

#: Windows per network call and axial slices per slab. Small batches keep each layer's
#: activations in the CPU caches and reuse memory: on chest-ct-philips-141 (2-core VM,
#: 2 threads) ``benchmarks/inference_batch_size.py`` measured 1.86 s with (4, 16) against
#: 2.10 s with (16, 48) and 2.07 s with (48, 48) (allocator tuned as the command does;
#: untuned, 1.9-2.0 s against 2.6-3.3 s and 3.4-4.1 s); docs/benchmarks.md.
DEFAULT_BATCH_SIZE = 4
SLAB_SLICES = 16

#: The model ``medseg segment`` uses unless told otherwise (``medseg.models`` re-exports it;
#: defined here so that argument parsing need not import torch).
DEFAULT_MODEL = "lung2d-v8"
#: The model whose masks, where the threshold baseline agrees, label the real CT that
#: lung2d-v2 and -v8 were trained on and the robustness suite's LIDC reference
#: (:func:`medseg.train.realct.derive_lung_labels`).
LABEL_MODEL = "lung2d-v1"
