"""The model runner: one model on one device, a step at a time (model_runner.py has the map).

    model_runner.py      ModelRunner: prepare_inputs -> forward -> sample; KV allocation; graph capture
    input_batch.py       scheduled requests -> flat int64 step inputs + StepHeader -> device tensors
    sampling_metadata.py sampling rows and their SamplingMetadata (per-request seeded generators)
    runner_output.py     ModelRunnerOutput, PendingRunnerOutput (a launched step's tokens on their way)
    kv_cache.py          how many KV blocks fit (profiling pass on CUDA)
    cuda_graph.py        GraphSet (capture / replay / release, one memory pool per runner) and
                         CUDAGraphRunner, the forward pass keyed by (batch size, query tokens)
    graph_inputs.py      a step's inputs into a graph's static buffers, in one kernel
    host_staging.py      small host-to-device copies through one pinned buffer
    speculator.py        the Protocol of speculative-decoding hooks the runner calls (spec_decode/ implements it)

The runner imports engine/ (the scheduler's output types), distributed/ (messages, collectives),
layers/, sample/ and models; never spec_decode/ or the executors.
"""
