"""A TorchDispatchMode that records something about each aten op run inside it: for tests that check which
operations a computation performs (no dtype round trips, no vocabulary product over masked rows, no dense mask)."""

from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    """Runs every op as usual; `seen` keeps what `pick(func, args, out)` returns for it, when not None."""

    def __init__(self, pick):
        super().__init__()
        self.pick, self.seen = pick, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        picked = self.pick(func, args, out)
        if picked is not None:
            self.seen.append(picked)
        return out
