"""The comparison: plain arrays in, metrics, statistics and judged gates out. Pure numpy:
never torch, an engine or pytest."""
