"""Where training data comes from: dataset manifests, their samples, and tiles of annotated slides.

- :mod:`wsi_espnet.datasets.manifest`: declarative YAML descriptions of labelled datasets.
- :mod:`wsi_espnet.datasets.samples`: a manifest split as (image, labels) arrays.
- :mod:`wsi_espnet.datasets.annotated_slides`: QuPath GeoJSON annotations -> labelled tiles of a slide.
"""
