"""Emulate a smaller GPU: cap PyTorch's CUDA caching allocator at ``ANCHOR_MEM_GB`` GiB per process.

Put this folder first on ``PYTHONPATH`` (``bench/anchor_extra.sh``'s ``run_extra.sh`` does, for both
tools). With ``ANCHOR_MEM_GB`` unset it does nothing except hand over to the next ``sitecustomize``
on ``sys.path`` (Python imports only the first one it finds, so an image's own one still runs).

With ``ANCHOR_MEM_GB=N`` it watches for ``import torch`` (a ``sys.meta_path`` finder; torch itself is
not imported here) and then queues, with ``torch.cuda._lazy_call``, a call that runs inside CUDA's
lazy initialisation, before the first CUDA allocation:
``torch.cuda.set_per_process_memory_fraction(N * 2**30 / total_memory, device)`` for every visible
device, printing ``[memcap] capped at N GiB of M GiB``. So nothing initialises CUDA in a process that
never uses it, and forked DataLoader workers (which may not initialise CUDA) are untouched.
The allocator then raises ``torch.OutOfMemoryError`` past N GiB (cached blocks are freed and the
allocation retried first). The CUDA context (~0.5 GiB) is outside the cap, as on a real card.
A cap of at least the card's memory is not applied (one line says so).
"""

import os
import sys

_ENV = "ANCHOR_MEM_GB"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _gib_text(x):
    return f"{x:g}"


def apply_cap(torch, gib, log=print):
    """Cap every visible CUDA device's caching allocator at ``gib`` GiB (CUDA must be usable)."""
    for dev in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(dev).total_memory
        where = f" (cuda:{dev})" if torch.cuda.device_count() > 1 else ""
        fraction = gib * 2**30 / total
        if fraction >= 1.0:
            log(f"[memcap] not capped: {_gib_text(gib)} GiB is not below the card's {total / 2**30:.1f} GiB{where}")
            continue
        torch.cuda.set_per_process_memory_fraction(float(fraction), dev)
        log(f"[memcap] capped at {_gib_text(gib)} GiB of {total / 2**30:.1f} GiB{where}")


def _queue_cap(gib):
    """Right after ``import torch``: queue the cap for CUDA's lazy initialisation (no CUDA call now)."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "cuda"):
        return

    def cap():
        try:
            apply_cap(torch, gib, log=lambda s: print(s, flush=True))
        except Exception as exc:  # a failing queued call would break CUDA's initialisation
            print(f"[memcap] not capped: {exc!r}", flush=True)

    try:
        torch.cuda._lazy_call(cap)
    except Exception as exc:  # a torch without the private hook: say so, keep the run
        print(f"[memcap] not capped (torch.cuda._lazy_call: {exc!r})", flush=True)


class _AfterTorchImport:
    """``sys.meta_path`` finder: lets the other finders find ``torch`` and runs ``hook`` after it loads."""

    def __init__(self, hook):
        self.hook = hook

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        sys.meta_path.remove(self)  # once is enough
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        hook = self.hook

        def exec_then_hook(module):
            try:
                exec_module(module)
            finally:
                loader.__dict__.pop("exec_module", None)  # the loader is torch's own again
            hook()

        loader.exec_module = exec_then_hook  # this loader instance only; spec and __loader__ stay torch's
        return spec


def install(environ=os.environ):
    """Set up the cap for this process when ``ANCHOR_MEM_GB`` asks for one; returns the GiB or None."""
    raw = environ.get(_ENV, "").strip()
    if not raw:
        return None
    try:
        gib = float(raw)
    except ValueError:
        print(f"[memcap] not capped: {_ENV}={raw!r} is not a number", file=sys.stderr, flush=True)
        return None
    if gib <= 0:
        print(f"[memcap] not capped: {_ENV}={raw!r} is not positive", file=sys.stderr, flush=True)
        return None
    if "torch" in sys.modules:
        _queue_cap(gib)
    else:
        sys.meta_path.insert(0, _AfterTorchImport(lambda: _queue_cap(gib)))
    return gib


def _chain():
    """Run the next ``sitecustomize`` on ``sys.path`` (the image's or a site folder's), as Python would have."""
    import importlib.machinery
    import importlib.util

    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    try:
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    except Exception:
        return
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # what site.py does with a failing sitecustomize
        print(f"Error in sitecustomize (chained from {__file__}); set PYTHONVERBOSE for traceback:\n"
              f"{type(exc).__name__}: {exc}", file=sys.stderr)


if __name__ == "sitecustomize":
    install()
    _chain()
