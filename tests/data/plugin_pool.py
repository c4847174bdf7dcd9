"""A third-party pool provider for the plugin tests (found as module:factory or via an entry point)."""
import numpy as np

from pipeline.core.fingerprint import fingerprint


class ToyPool:
    def __init__(self, size: int, fill: int):
        self.name = f"toy:{size}x{fill}"
        self.size, self.fill = size, fill

    def __len__(self):
        return self.size

    def read(self, start, stop):
        stop = min(stop, self.size)
        rows = np.arange(start, max(start, stop), dtype=np.uint8)
        return np.ascontiguousarray(np.broadcast_to(rows[:, None, None, None] + self.fill, (len(rows), 32, 32, 3)))

    def fingerprint(self):
        return fingerprint({"toy": self.size, "fill": self.fill})


def make_pool(size: int = 5, fill: int = 0):
    return ToyPool(size, fill)
