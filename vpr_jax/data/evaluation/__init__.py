"""What evaluation reads: benchmark sets and ordered evaluation batches.

`registry` (the sets known by name, as data), `benchmarks` (a name or folder -> a BenchmarkSet:
image lists, UTM positives), `list_files` (the gsv-cities family's list files), `positives_cache`,
`catalog` (groups, prepared builds, the listing) and `eval_pipeline` (evaluation batches).
"""
