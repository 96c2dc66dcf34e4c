"""Sweeps: Ray Tune grids over methods, NormGuard weights, rewards and seeds, and their comparison."""
