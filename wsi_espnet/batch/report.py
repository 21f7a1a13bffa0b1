"""What a batch job did, per slide and in all: the cohort report (CSV and JSON) and the summary table."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wsi_espnet.atomic_files import replacing
from wsi_espnet.batch.cohort import CohortSlide

__all__ = ["BatchReport", "SlideOutcome", "SlideStatus"]

#: ok: segmented now; skipped: already complete (nothing recomputed); failed: see the reason;
#: cancelled: stopped on request (resumable).
SlideStatus = Literal["ok", "skipped", "failed", "cancelled"]

_OUTPUT_COLUMNS = ("ome-zarr", "ome-tiff", "geojson", "provenance")
#: Report columns; cohort metadata may not reuse these names.
FIXED_COLUMNS = (
    "slide", "name", "status", "reason", "seconds", "attempts", "mpp_override", "effective_mpp", "tissue_area_mm2",
    "low_confidence_fraction", "stain_distance", "warnings",
    *(f"output_{name.replace('-', '_')}" for name in _OUTPUT_COLUMNS), "log",
)  # fmt: skip


@dataclass(frozen=True)
class SlideOutcome:
    """One slide's result: status, reason (for failed and skipped), seconds, outputs and its provenance record.

    attempts : runs of the slide (2 when it was resumed once after a lost worker).
    log : the file with the failure's traceback, for failed slides.
    """

    slide: CohortSlide
    status: SlideStatus
    reason: str = ""
    seconds: float = 0.0
    outputs: dict[str, Path] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None
    attempts: int = 1
    log: Path | None = None

    @property
    def class_areas_mm2(self) -> dict[str, float]:
        """Model class name -> area in mm^2 (from the provenance; empty without one)."""
        classes = (self.provenance or {}).get("classes", [])
        return {entry["name"]: entry["area_mm2"] for entry in classes[1:]}

    @property
    def tissue_area_mm2(self) -> float | None:
        area = (self.provenance or {}).get("tissue", {}).get("segmented_area_mm2")
        return None if area is None else float(area)

    def row(self, class_names: tuple[str, ...], metadata_columns: tuple[str, ...]) -> dict[str, Any]:
        """The report row: fixed columns (with the slide's low-confidence tissue fraction, stain distance and
        reliability warnings), ``area_mm2:<class>`` per class, then the cohort's metadata."""
        record = self.provenance or {}
        areas = self.class_areas_mm2
        row: dict[str, Any] = {
            "slide": str(self.slide.path),
            "name": self.slide.stem,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 2),
            "attempts": self.attempts,
            "mpp_override": self.slide.mpp,
            "effective_mpp": record.get("resolution", {}).get("effective_mpp"),
            "tissue_area_mm2": self.tissue_area_mm2,
        }
        trust = record.get("reliability") or {}
        row["low_confidence_fraction"] = (trust.get("confidence") or {}).get("low_confidence_fraction")
        row["stain_distance"] = (trust.get("stain") or {}).get("distance")
        row["warnings"] = "; ".join(trust.get("warnings") or [])
        for name in _OUTPUT_COLUMNS:
            path = self.outputs.get(name)
            row[f"output_{name.replace('-', '_')}"] = None if path is None else str(path)
        row["log"] = None if self.log is None else str(self.log)
        row.update({f"area_mm2:{name}": areas.get(name) for name in class_names})
        row.update({key: self.slide.metadata.get(key) for key in metadata_columns})
        return row


@dataclass(frozen=True)
class BatchReport:
    """Every slide's outcome, in cohort order, with where and when the job ran."""

    pipeline: str
    outcomes: tuple[SlideOutcome, ...]
    started: str
    seconds: float
    scheduler: str
    dashboard: str | None
    metadata_columns: tuple[str, ...] = ()

    @property
    def counts(self) -> Counter[str]:
        return Counter(o.status for o in self.outcomes)

    @property
    def failed(self) -> tuple[SlideOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status in ("failed", "cancelled"))

    @property
    def class_names(self) -> tuple[str, ...]:
        names: dict[str, None] = {}
        for outcome in self.outcomes:
            names.update(dict.fromkeys(outcome.class_areas_mm2))
        return tuple(names)

    def rows(self) -> list[dict[str, Any]]:
        return [o.row(self.class_names, self.metadata_columns) for o in self.outcomes]

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``<folder>/<pipeline>.batch-report.csv`` and ``.json`` (each appears whole); returns both paths."""
        rows = self.rows()
        csv_path = folder / f"{self.pipeline}.batch-report.csv"
        json_path = csv_path.with_suffix(".json")
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else list(FIXED_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        document = {
            "pipeline": self.pipeline, "started": self.started, "seconds": round(self.seconds, 2),
            "scheduler": self.scheduler, "dashboard": self.dashboard, "counts": dict(self.counts),
            "classes": list(self.class_names), "slides": rows,
        }  # fmt: skip
        with replacing(csv_path) as partial:
            partial.write_text(text.getvalue())
        with replacing(json_path) as partial:
            partial.write_text(json.dumps(document, indent=2, default=str))
        return csv_path, json_path

    def summary_table(self) -> str:
        """A fixed-width table: one line per slide (status, seconds, tissue and class areas, reason)."""
        names = self.class_names
        width = max([4, *(len(o.slide.stem) for o in self.outcomes)])
        header = f"{'slide':<{width}}  {'status':<9} {'seconds':>7} {'tissue mm2':>10}"
        header += "".join(f" {name[:14]:>14}" for name in names)
        lines = [header, "-" * len(header)]
        for outcome in self.outcomes:
            tissue = outcome.tissue_area_mm2
            areas = outcome.class_areas_mm2
            line = f"{outcome.slide.stem:<{width}}  {outcome.status:<9} {outcome.seconds:>7.1f} "
            line += f"{'' if tissue is None else f'{tissue:.3f}':>10}"
            line += "".join(f" {'' if areas.get(n) is None else f'{areas[n]:.3f}':>14}" for n in names)
            if outcome.status in ("failed", "cancelled"):
                line += f"  {outcome.reason}"
            lines.append(line)
        counts = self.counts
        lines.append(
            f"{len(self.outcomes)} slides: {counts['ok']} segmented, {counts['skipped']} already complete, "
            f"{counts['failed']} failed" + (f", {counts['cancelled']} cancelled" if counts["cancelled"] else "")
            + f"; {self.seconds:.1f} s"
        )  # fmt: skip
        return "\n".join(lines)
