"""The application: the command line (``turboquant``), the HTTP service and its page, the plots.

It sits above the engine (``search``, ``studies``, ``evaluators``, ``quant``), which knows nothing of
argparse, HTTP or printing: both front ends call the same engine functions (``search.run_search``,
``search.exporters.export_point``, ``search.sensitivity.run_sensitivity``) and print or return what comes back.
"""

import search  # noqa: F401  (first: it quiets the dependencies' start-up noise, see search.quiet)
