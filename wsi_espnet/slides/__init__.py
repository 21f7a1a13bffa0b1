"""Where slides are read: open a whole-slide image, pick the pyramid level for a target resolution,
and view a level as a lazy Dask array.

>>> reader = open_slide("slide.svs")                 # doctest: +SKIP
>>> choice = choose_level(reader, target_mpp=0.5)     # doctest: +SKIP
>>> pixels = slide_level_dask(reader, choice.level)   # doctest: +SKIP
"""

from wsi_espnet.slides.lazy_array import slide_level_dask
from wsi_espnet.slides.levels import LevelChoice, choose_level, read_target_region
from wsi_espnet.slides.reader import SlideError, SlideReader, can_open, describe_slide, open_slide

__all__ = [
    "LevelChoice",
    "SlideError",
    "SlideReader",
    "can_open",
    "choose_level",
    "describe_slide",
    "open_slide",
    "read_target_region",
    "slide_level_dask",
]
