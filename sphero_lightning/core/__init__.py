"""Lightning-free, storage-free numerics: coordinates and transforms, resampling, losses, the per-pair optimizers, the pair objective, initialisation, crop, synthetic test stacks."""
