"""KPrism for 3D Slicer: logic over MRML nodes (no Qt), parameters, dependency installation.

`logic` and `nodes` import in plain Python with the slicer-core wheel; torch and kprism are
imported on first use. `parameters` and `install` need the Slicer application. Importing this
package puts the kprism shipped with the module on sys.path (`bundled`), before anything imports it.
"""

import logging

from . import bundled

try:
    bundled.ensure_on_path()
except bundled.UnsupportedPython as error:  # Slicer 5.8 (Python 3.9): the module shows this line
    logging.error(str(error))

__all__ = ["logic", "nodes"]
