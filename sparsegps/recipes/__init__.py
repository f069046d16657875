"""Recipes: documented sequences of `sparsegps` commands, each run as its own process, with a summary.

    steps.py     the step runner (progress shown, full output kept, timings) and `command`, which
                 writes a command's flags and config settings (no argv assembled by hand)
    grounding.py pre-training and grounding fine-tuning that converge on 2 CPU cores in 45 minutes

`sparsegps.demo` (`make demo`) is the few-minute recipe of the whole product.
"""
