"""phalanx: ensembles whose adversarial weak spots do not overlap, and an honest measure of their robustness.

The Python API (phalanx.api) is re-exported here: `phalanx.train`, `phalanx.evaluate`,
`phalanx.transfer`, `phalanx.report`, `phalanx.TensorData`, `phalanx.load_run`. They are imported
on first use, so `import phalanx` stays cheap (the CLI starts without loading torch's models).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {"evaluate", "transfer", "TensorData", "TrainResult"}
_CALLABLE_PACKAGES = {"train", "report"}  # subpackages that are also API calls (callable_module.py)


def load_run(run_dir):  # noqa: ANN001, ANN201 - thin re-export, typed at its source
    """The trained Mixture of a run directory, in eval mode (see `phalanx.runs.load_run`)."""
    from phalanx.runs import load_run as _load_run

    return _load_run(run_dir)


def __getattr__(name: str) -> Any:
    if name in _API:
        from phalanx import api

        return getattr(api, name)
    if name in _CALLABLE_PACKAGES:
        import importlib

        return importlib.import_module(f"phalanx.{name}")
    raise AttributeError(f"module 'phalanx' has no attribute {name!r}")


__all__ = ["__version__", "load_run", *sorted(_API | _CALLABLE_PACKAGES)]
