"""Throughput and learning benchmarks; installed as `sparsegps.benchmarks`, each module also runs
alone. Shared helpers live one module per concern (import from the module that defines them):

    arguments   flags every benchmark takes, the reproducing command line, `main_for`
    timing      `time_interleaved` (and `time_call`, the same with one method), `Timing`
    memory      peak memory of a call (sampled RSS on CPU, the allocator's peak on CUDA)
    flops       FLOPs of a call (torch's flop counter)
    machine     `machine_info`, load notes, page cache, sizes on disk
    scenes      benchmark scenes (`random_room`, `synthetic_scenes`, `SCANNET20`)
    report      ratios, targets, `Result`, `finish` (JSON + markdown + PNG), `bar_chart`, `save_figure`

Every benchmark reports speed as a ratio against a baseline measured in the same run on the
same machine, so numbers from different machines are never compared directly.

Result files share one schema (checked by the tests):

    benchmark   name, as in `sparsegps bench NAME`
    command     the command line that produced the file
    created     ISO time stamp
    machine     `machine_info()`: CPU model and cores or GPU name, torch version, load average
    config      every flag value
    baseline    what the ratios are measured against
    rows        one dict per measured configuration; each has `method`, `seconds` (median of the
                timed repeats), `repeats`, a throughput, and `ratio_vs_baseline`
    targets     [{name, ratio, target, met}]: the speed claims the benchmark checks
    notes       caveats (cache state, memory method, what is and is not counted)
    details     optional benchmark-specific measurements (e.g. a per-stage time breakdown)
"""
