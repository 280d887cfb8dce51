"""trtserve-bench: a load generator for trtserve in the spirit of perf_analyzer."""
