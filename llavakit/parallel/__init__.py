"""Tensor-parallel inference on torch.distributed: one model split over N ranks (processes).

    plan.py     how a config splits over N (heads, kv heads, MLP, vocabulary); ConfigError if it cannot
    shard.py    each rank's local layer widths, and the slices of the checkpoint it reads (get_slice)
    layers.py   the collectives added after loading: row-split linears, vocabulary embedding and head
    comm.py     process groups (gloo on CPUs, NCCL on GPUs) with a timeout on every collective
    channel.py  rank 0's commands to the other ranks (header + packed tensors)
    driver.py   rank 0: sends a command before each forward that needs every rank; heartbeat; watching
    worker.py   ranks 1..N-1: run rank 0's commands
    entry.py    `python -m llavakit.parallel.entry`: a rank started by rank 0 (launch + worker)
    launch.py   `llavakit.load(..., tensor_parallel_size=N)`: start the ranks here or join torchrun's

The model files stay single-device (DESIGN.md rule 8): the split is a rewrite of a loaded model,
and rank 0's engine, caches and sampling are the one-process ones.
"""
