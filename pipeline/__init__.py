"""rst-mart's engine. Public API: `load_model(path)` and `build_model(arch, num_classes, in_channels)`.

They are the ML library's, aliased lazily through pipeline/library.py, so importing the engine (for
the CLI or `status`) does not pay for torch, and the engine imports no library floor.
"""

__all__ = ["load_model", "build_model"]


def __getattr__(name):
    if name in __all__:
        from pipeline import library

        return library.function(name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
