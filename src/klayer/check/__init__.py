"""Check a student's own gradients against the exact ones, and say what is wrong.

The checker's public API (the only names this package gathers from its modules)::

    from klayer.check import make_case, compare, check_function
    case = make_case(d=10, n=20, hidden=(8, 8), lam=0.01)
    report = check_function(my_compute_gradients, case)   # or compare(case, my_grads)
    print(report.text())

See ``diagnose`` for how a report is reached and ``bugs`` for the mistakes it knows.
"""

from klayer.check.course import Case
from klayer.check.diagnose import Report, compare
from klayer.check.files import load_arrays, load_case, make_case, save_case
from klayer.check.step import check_function, check_step

__all__ = ["Case", "Report", "check_function", "check_step", "compare", "load_arrays",
           "load_case", "make_case", "save_case"]
