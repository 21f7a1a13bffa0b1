"""wsi-espnet: segment gigapixel whole-slide images with ESPNet.

The model family lives in :mod:`wsi_espnet.models`; whole-image prediction and export in
:mod:`wsi_espnet.inference`; the command line in :mod:`wsi_espnet.cli`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsi-espnet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
