"""Figures and the run report (Markdown and self-contained HTML) made from run directories.

Calling this package, `phalanx.report(run_dirs, out)`, is the Python API's `phalanx.api.report`.
"""

from phalanx.callable_module import make_callable
from phalanx.report.render import write_report

make_callable(__name__, "report")

__all__ = ["write_report"]
