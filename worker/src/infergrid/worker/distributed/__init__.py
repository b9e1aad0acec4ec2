"""Tensor parallelism across the GPUs of one pod (Megatron column/row sharding over torch.distributed).

    parallel_state.py   this process's rank, world size and process group; size checks against a model
    communication.py    the collectives the model and the runner use (all-reduce, gather, min, barrier)
    debug.py            INFERGRID_TP_DEBUG: checks that every rank issues the same collectives
    messages.py         the fixed-size control messages rank 0 sends its followers
    executor.py         Executor, UniProcExecutor: what LLMEngine runs the model through
    multiproc_executor.py  MultiProcExecutor: tensor_parallel_size ranks (rank_process.py starts them)
    worker_proc.py      the main loop of ranks 1..N-1 (spawned processes)

README.md: the TP=2 NCCL hang on GPU, its likely causes, what was fixed and what is unverified.
"""
