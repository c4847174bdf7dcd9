"""rst-mart's engine. Public API: `load_model(path)` and `build_model(arch, num_classes, in_channels)`.

They are re-exported lazily from `stages.models`, so importing the engine (for the CLI or `status`)
does not pay for torch.
"""

import os

__all__ = ["load_model", "build_model"]

# PyTorch's CPU allocator asks for transparent huge pages for its tensors of 2 MiB and more when this is
# set before torch is imported (it reads it once). Without it every forward maps fresh 4 KiB pages for its
# activations and the kernel zeroes each on first touch: a tiny-cnn teacher at batch 1024 on 2 EPYC cores
# ran at 3,047 img/s with 7.7M page faults, and at 5,936 img/s with 0.4M with it. Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def __getattr__(name):
    if name in __all__:
        from stages import models

        return getattr(models, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
