"""The checkpoint tiers: CheckpointEngine against livingai 0.4.1 on the same inputs.

single, production, hyperscale (the workloads), measure (one row: both engines, readback),
plan and state inputs, ours/baseline (the two drivers), readback (the fresh process),
figures, targets (store targets), verdict (the goals), report/markdown (their tables),
codecs (zstd against zlib).
"""
