"""napari's File > Open Sample: ``CMU-1-Small-Region.svs`` (CC0, OpenSlide test data) with its mask.

The slide is found the way ``wsi-espnet demo`` finds it (``$WSI_ESPNET_TEST_DATA/slides``, the
user cache, else a checksum-verified download: choosing the sample in napari's menu is the user's
explicit action). Its mask is made once with the packaged breast model, as ``wsi-espnet demo``
makes it, into the user cache, and reused after that.
"""

from __future__ import annotations

from wsi_espnet.demo import cache_dir, demo_model, sample_slide
from wsi_espnet.outputs.paths import OutputPaths
from wsi_espnet.segment_slide import SegmentOptions, segment_slide
from wsi_espnet_napari.layers import LayerData, labels_layer, slide_layer

__all__ = ["sample_slide_with_mask"]


def sample_slide_with_mask() -> list[LayerData]:
    """The sample slide and its class mask (segmented on first use, about 20 s on 2 cores)."""
    slide = sample_slide(log=lambda _: None)
    model, mpp = demo_model(log=lambda _: None)
    out = cache_dir() / "napari-sample"
    mask = OutputPaths.for_slide(slide, out).zarr
    # segment_slide recognises a finished run and returns at once; an interrupted one resumes.
    segment_slide(slide, model, SegmentOptions(out_dir=out, target_mpp=mpp, formats=frozenset({"ome-zarr"})))
    return [slide_layer(slide), labels_layer(mask)]
