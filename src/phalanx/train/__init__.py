"""Training: the shared loop (loop.py), the methods (one file each, registry.py), DDP.

Calling this package, `phalanx.train(config, members=..., data=..., out=...)`, is the Python
API's `phalanx.api.train`.
"""

from phalanx.callable_module import make_callable

make_callable(__name__, "train")
