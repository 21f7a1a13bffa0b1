"""Whole-slide segmentation: the ``segment`` pipeline, its tile tasks, store and provenance."""

from wsi_espnet.segmentation.segment_slide import FORMATS, SegmentationResult, SegmentOptions, segment_slide

__all__ = ["FORMATS", "SegmentOptions", "SegmentationResult", "segment_slide"]
