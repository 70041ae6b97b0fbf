"""KPrism for 3D Slicer: logic over MRML nodes (no Qt), parameters, dependency installation.

`logic` and `nodes` import in plain Python with the slicer-core wheel; torch and kprism are
imported on first use. `parameters` and `install` need the Slicer application.
"""

__all__ = ["logic", "nodes"]
