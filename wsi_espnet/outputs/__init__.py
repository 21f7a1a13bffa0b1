"""The files a segmentation writes (OME-Zarr, OME-TIFF, GeoJSON, provenance) and reading its mask back.

>>> pyramid = read_label_pyramid("out/slide.mask.zarr")   # doctest: +SKIP
>>> pyramid.levels[0].shape, pyramid.mpp, pyramid.classes[1].name   # doctest: +SKIP
"""

from wsi_espnet.outputs.label_pyramid import LabelPyramid, is_label_pyramid, read_label_pyramid

__all__ = ["LabelPyramid", "is_label_pyramid", "read_label_pyramid"]
