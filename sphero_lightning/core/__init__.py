"""Lightning-free, storage-free numerics: coordinates and transforms, resampling, losses, solvers, the pair objective, initialisation, crop, synthetic test stacks."""
