"""edgerun: what runs on the target, and the only code a deploy bundle ships.

Readers, onnxruntime and TensorRT runners, engine compatibility, the static TensorRT pre-flight,
`infer` and `benchmark`. It imports neither torch nor the pipeline, so a Jetson needs only numpy,
onnx/onnxruntime or TensorRT. The other packages (pipeline/, export/, calib/) build on it.
"""
import os
import sys


def _leave_the_bundle_off_the_import_path() -> None:
    """A bundle folder is an import root for edgerun only, never for numpy or onnxruntime.

    `cd bundle && python3 -m edgerun ...` (and build_engine.sh's PYTHONPATH) put the bundle folder
    ahead of site-packages, so a planted `onnxruntime.py` there would run. Once this package is
    imported its submodules come from its own folder, so the bundle folder leaves sys.path here,
    before anything else is imported (only `os` and `sys`, loaded at start-up, are used). A folder
    without manifest.json (a checkout, site-packages) keeps its place.
    """
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if not os.path.isfile(os.path.join(root, "manifest.json")):
        return
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]


_leave_the_bundle_off_the_import_path()

from edgerun.errors import EdgeError  # noqa: E402  (after the import path is safe)

__version__ = "0.2.0"
__all__ = ["EdgeError", "__version__"]
