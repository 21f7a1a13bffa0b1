"""wsi-espnet's napari plugin: slides as lazy multiscale images, our masks as Labels,
and the sample slide (the dock widget that segments the view, drawn shapes or the whole slide is in
progress, issue 10).

The napari manifest (``napari.yaml``) is found through the ``napari.manifest`` entry point of the
``wsi-espnet`` distribution; ``pip install "wsi-espnet[napari]"`` is all it needs. Nothing here
imports Qt.
"""

from wsi_espnet_napari.layers import labels_layer, outputs_beside, slide_layer
from wsi_espnet_napari.reader import get_reader

__all__ = ["get_reader", "labels_layer", "outputs_beside", "slide_layer"]
