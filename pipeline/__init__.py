"""rst-mart's engine. Public API: `load_model(path)` and `build_model(arch, num_classes, in_channels)`.

They are re-exported lazily from `ml.models`, so importing the engine (for the CLI or `status`)
does not pay for torch.
"""

__all__ = ["load_model", "build_model"]


def __getattr__(name):
    if name in __all__:
        from ml import models

        return getattr(models, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
