# Settings of a run that do not change any artifact: they are not part of any version hash.
runtime = dict(
    store='store',        # artifact store root, relative to the working directory
    device='cpu',         # 'cpu' | 'cuda'
    gpus=1,               # processes for data-parallel training (torchrun; gloo on CPU, NCCL on CUDA)
    num_workers=2,        # worker processes for sharded CPU work (image decoding, CRF)
    lock_timeout=None,    # seconds to wait for another run writing the same stage version; None = forever
)
