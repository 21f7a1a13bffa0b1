"""wsi-espnet's napari plugin: slides as lazy multiscale images, our masks as Labels, a dock widget
that segments the view, drawn shapes or the whole slide with the engine, and the sample slide.

The napari manifest (``napari.yaml``) is found through the ``napari.manifest`` entry point of the
``wsi-espnet`` distribution; ``pip install "wsi-espnet[napari]"`` is all it needs. Only
:mod:`.segment_widget` imports Qt, and napari loads it only when the widget opens.
"""

from wsi_espnet_napari.layers import labels_layer, outputs_beside, slide_layer
from wsi_espnet_napari.reader import get_reader

__all__ = ["get_reader", "labels_layer", "outputs_beside", "slide_layer"]
