"""Make a subpackage callable, so that `phalanx.train(...)` and `phalanx.report(...)` are API calls.

`phalanx.train` and `phalanx.report` are subpackages, and importing a subpackage sets the parent
package's attribute to it, replacing any function of that name. Giving the subpackage module a
`__call__` that forwards to the API function keeps both meanings: `phalanx.train(...)` trains,
`phalanx.train.loop` is still the loop module.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def make_callable(module_name: str, function: str) -> None:
    """Calling module `module_name` calls `phalanx.api.<function>` (its docstring says how)."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            from phalanx import api

            return getattr(api, function)(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
