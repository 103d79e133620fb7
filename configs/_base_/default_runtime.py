# Settings of a run that do not change any artifact: they are not part of any version hash.
runtime = dict(
    store='store',        # artifact store root, relative to the working directory
    device='cpu',         # 'cpu' | 'cuda'
    gpus=1,               # processes for data-parallel training (torchrun; gloo on CPU, NCCL on CUDA)
    num_workers=2,        # worker processes for sharded CPU work (image decoding, CRF)
    lock_timeout=None,    # seconds to wait for another run writing the same stage version; None = forever
    # Scale-out of the sharded stages (instances, features, mining, and the labelling of proposals
    # and distill): where their shards run. See SCALING.md and partdistill/parallel.py.
    task_runner='local',  # 'local' (this process) | 'dask' (prefect-dask) | 'ray' (pip install prefect-ray)
    workers=2,            # processes of the local cluster started for 'dask' / 'ray' (one thread each)
    cluster_address=None,  # an existing cluster instead: 'tcp://host:8786' (Dask), 'ray://host:10001' (Ray)
    cluster_kwargs=None,  # extra arguments for the local dask.distributed.LocalCluster, e.g. dict(memory_limit='8GiB')
    shard_threads=1,      # torch threads while a shard runs, here and in workers alike (0: leave as is);
                          # float sums depend on the thread count, so equal settings give equal bytes
    train_threads=0,      # torch threads while a stage trains in this process (0: torch's default, the
                          # core count); pin it for the same trained bytes on machines of other core counts
    shard_retries=2,      # retries of a failed shard task on a cluster
    shard_retry_delay_seconds=[10, 60],  # delay before each retry (the last one repeats)
)
