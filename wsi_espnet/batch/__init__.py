"""Cohort batch jobs: a cohort of slides in, one mask per slide out, on one Dask cluster, with a report.

>>> pipeline = load_pipeline("pipelines/local-example.yaml")        # doctest: +SKIP
>>> report = run_pipeline(pipeline)                                 # doctest: +SKIP
>>> print(report.summary_table())                                   # doctest: +SKIP

Modules: :mod:`~wsi_espnet.batch.cohort` (cohort manifests, folders, globs), :mod:`~wsi_espnet.batch.pipeline`
(pipeline files), :mod:`~wsi_espnet.batch.clusters` (the one client), :mod:`~wsi_espnet.batch.kubernetes`
(DaskClusters on Kubernetes), :mod:`~wsi_espnet.batch.run` (slide drivers), :mod:`~wsi_espnet.batch.report`
(per-slide outcomes, CSV/JSON report, summary table).
"""

from wsi_espnet.batch.cohort import Cohort, CohortSlide, cohort_from_pattern, load_cohort
from wsi_espnet.batch.pipeline import ClusterSpec, Pipeline, load_pipeline, pipeline_from_inputs
from wsi_espnet.batch.report import BatchReport, SlideOutcome, SlideStatus
from wsi_espnet.batch.run import run_pipeline

__all__ = [
    "BatchReport",
    "ClusterSpec",
    "Cohort",
    "CohortSlide",
    "Pipeline",
    "SlideOutcome",
    "SlideStatus",
    "cohort_from_pattern",
    "load_cohort",
    "load_pipeline",
    "pipeline_from_inputs",
    "run_pipeline",
]
