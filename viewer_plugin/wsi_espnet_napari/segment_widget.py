"""The dock widget "Segment with ESPNet": run the engine on the visible region, on drawn shapes or on the
whole slide, without freezing napari, and review the result (legend with areas, opacity, outlines,
GeoJSON export for QuPath).

Runs happen in napari's ``thread_worker``; the engine's :class:`~wsi_espnet.segmentation.ProgressEvent` s
reach the GUI thread through the :attr:`SegmentWidget.progressed` signal, and Cancel sets the
``threading.Event`` the engine checks between tiles (a cancelled whole-slide run stays resumable).
What a run computes is in :mod:`.results` and :mod:`.regions`, which need no Qt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari.layers import Image, Labels, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, Signal  # type: ignore[attr-defined]  # qtpy aliases pyqtSignal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from wsi_espnet.errors import Cancelled, InputError, WsiEspnetError
from wsi_espnet.models.checkpoint_io import read_model_config
from wsi_espnet.models.registry import DEFAULT_MODEL, list_packaged_models, resolve_model_path
from wsi_espnet.segment_slide import DEFAULT_FORMATS
from wsi_espnet.segmentation.label_values import NO_TISSUE
from wsi_espnet.segmentation.progress import ProgressCallback, ProgressEvent
from wsi_espnet_napari.layers import LayerData
from wsi_espnet_napari.regions import SlideFrame, outline_region, shape_outlines, visible_region
from wsi_espnet_napari.results import (
    REGION_TILE_SIZE,
    RunKind,
    RunSettings,
    export_geojson,
    layer_class_areas,
    layer_classes,
    segment_regions,
    segment_whole_slide,
)

__all__ = ["SegmentWidget"]

_logger = logging.getLogger(__name__)

#: What the "Run on" choice offers, in order.
RUN_KINDS: dict[RunKind, str] = {
    "view": "Visible region",
    "shapes": "Drawn shapes",
    "slide": "Whole slide (to disk)",
}
#: Outline thickness (label pixels) when "Outlines only" is on.
CONTOUR_WIDTH = 2

#: A run: given the progress callback and the cancel event, returns (run kind, layer data).
Job = Callable[[ProgressCallback, threading.Event], tuple[RunKind, LayerData]]


class SegmentWidget(QWidget):
    """Segment the slide shown in ``napari_viewer`` with an ESPNet model and show the mask over it."""

    #: Each :class:`ProgressEvent` of the running job, emitted from its worker thread.
    progressed = Signal(object)

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        #: The running worker, None when idle.
        self.worker: Any = None
        self.cancel_event = threading.Event()
        self.results: dict[RunKind, Labels] = {}
        #: What the legend shows: one (class name, RGB colour, area in mm^2 or None) per class.
        self.legend_rows: list[tuple[str, tuple[int, int, int], float | None]] = []
        self._shown: Labels | None = None
        self._build()
        self.progressed.connect(self._show_progress)
        self.viewer.layers.events.inserted.connect(self._refresh_layer_choices)
        self.viewer.layers.events.removed.connect(self._refresh_layer_choices)
        self.viewer.layers.selection.events.active.connect(self._follow_selection)
        self._refresh_layer_choices()
        self._follow_selection()

    # -- building the form ------------------------------------------------------------------------------

    def _build(self) -> None:
        self.slide_combo = QComboBox()
        self.model_combo = QComboBox()
        for packaged in list_packaged_models():
            self.model_combo.addItem(packaged.name, packaged.name)
        self.model_combo.setCurrentIndex(max(0, self.model_combo.findData(DEFAULT_MODEL)))
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        model_file = QPushButton("File…")
        model_file.setToolTip("Use a .safetensors checkpoint of wsi-espnet")
        model_file.clicked.connect(self._choose_model_file)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.0, 64.0)
        self.mpp_spin.setDecimals(3)
        self.mpp_spin.setSingleStep(0.25)
        self.mpp_spin.setSuffix(" um/px")
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(64, 8192)
        self.tile_spin.setSingleStep(128)
        self.tile_spin.setValue(REGION_TILE_SIZE)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("Tile side at the target MPP; region and whole-slide runs agree for equal tiles")
        self.mode_combo = QComboBox()
        for kind, text in RUN_KINDS.items():
            self.mode_combo.addItem(text, kind)
        self.mode_combo.currentIndexChanged.connect(self._mode_changed)
        self.shapes_combo = QComboBox()
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("beside the slide")
        out_browse = QPushButton("Browse…")
        out_browse.clicked.connect(self._choose_out_dir)
        self.overwrite_check = QCheckBox("Replace outputs of other settings")
        self.geojson_check = QCheckBox("Also write GeoJSON")

        form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        form.addRow("Model", _row(self.model_combo, model_file))
        form.addRow("Target MPP", self.mpp_spin)
        form.addRow("Tile size", self.tile_spin)
        form.addRow("Run on", self.mode_combo)
        form.addRow("Shapes layer", self.shapes_combo)
        form.addRow("Output folder", _row(self.out_edit, out_browse))
        form.addRow("", self.overwrite_check)
        form.addRow("", self.geojson_check)
        self._slide_only = [self.out_edit, out_browse, self.overwrite_check, self.geojson_check]

        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        result = QGroupBox("Result")
        self.result_label = QLabel("no result yet")
        self.result_label.setWordWrap(True)
        self.legend_grid = QGridLayout()
        legend = QWidget()
        legend.setLayout(self.legend_grid)
        self.opacity_slider = QSlider(Qt.Orientation.Horizontal)
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(50)
        self.opacity_slider.valueChanged.connect(self._set_opacity)
        self.contour_check = QCheckBox("Outlines only")
        self.contour_check.toggled.connect(self._set_contour)
        self.export_button = QPushButton("Export GeoJSON for QuPath…")
        self.export_button.clicked.connect(self._choose_export_path)
        result_form = QFormLayout()
        result_form.addRow(self.result_label)
        result_form.addRow(legend)
        result_form.addRow("Opacity", self.opacity_slider)
        result_form.addRow("", self.contour_check)
        result_form.addRow(self.export_button)
        result.setLayout(result_form)

        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addWidget(_row(self.run_button, self.cancel_button))
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(result)
        layout.addStretch(1)
        self.setLayout(layout)
        self._model_changed()
        self._mode_changed()
        self._set_busy(False)

    # -- choices ----------------------------------------------------------------------------------------

    @property
    def run_kind(self) -> RunKind:
        kind: RunKind = self.mode_combo.currentData()
        return kind

    @run_kind.setter
    def run_kind(self, kind: RunKind) -> None:
        self.mode_combo.setCurrentIndex(self.mode_combo.findData(kind))

    def set_model(self, model: str | Path) -> None:
        """Choose a packaged model by name or a ``.safetensors`` file (added to the list)."""
        spec = str(model)
        index = self.model_combo.findData(spec)
        if index < 0:
            self.model_combo.addItem(Path(spec).name, spec)
            index = self.model_combo.count() - 1
            self.model_combo.setItemData(index, spec, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(index)

    def settings(self) -> RunSettings:
        """The model, target MPP and tile size chosen in the form."""
        mpp = self.mpp_spin.value()
        return RunSettings(str(self.model_combo.currentData()), mpp if mpp > 0 else None, self.tile_spin.value())

    def _model_changed(self) -> None:
        try:
            own = read_model_config(resolve_model_path(str(self.model_combo.currentData()))).target_mpp
        except WsiEspnetError:
            own = None
        self.mpp_spin.setSpecialValueText(f"model's own ({own:g} um/px)" if own else "model's own")

    def _mode_changed(self) -> None:
        kind = self.run_kind
        self.shapes_combo.setEnabled(kind == "shapes")
        for widget in self._slide_only:
            widget.setEnabled(kind == "slide")

    def _choose_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "ESPNet checkpoint", "", "wsi-espnet checkpoints (*.safetensors)")
        if path:
            self.set_model(path)

    def _choose_out_dir(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder", self.out_edit.text())
        if folder:
            self.out_edit.setText(folder)

    def _refresh_layer_choices(self, event: Any = None) -> None:
        _fill(self.slide_combo, [layer for layer in self.viewer.layers if _is_slide(layer)])
        _fill(self.shapes_combo, [layer for layer in self.viewer.layers if isinstance(layer, Shapes)])
        if self._shown is not None and self._shown not in self.viewer.layers:
            self._show(None)

    # -- running ----------------------------------------------------------------------------------------

    def run(self) -> None:
        """Start segmenting what the form says (ignored while a run is going)."""
        if self.worker is not None:
            return
        try:
            job = self._job()
        except WsiEspnetError as exc:
            show_error(str(exc))
            return
        self.cancel_event = threading.Event()
        self.progress_bar.setRange(0, 0)
        self.status_label.setText("starting…")
        self._start(job, self._relay, self.cancel_event, returned=self._add_result, cancellable=True)

    def cancel(self) -> None:
        """Ask the running job to stop after the tiles in flight."""
        if self.worker is not None:
            self.cancel_event.set()
            self.status_label.setText("cancelling: finishing the tiles in flight…")

    def _job(self) -> Job:
        """The run the form describes, with its region worked out now (from the view as it is)."""
        slide = self.slide_combo.currentData()
        if slide is None:
            raise InputError("open a slide first (File > Open, or File > Open Sample > wsi-espnet).")
        path = Path(slide.metadata["wsi_espnet"]["path"])
        settings, kind = self.settings(), self.run_kind
        if kind == "view":
            region = visible_region(self.viewer, slide)
            return lambda progress, cancel: (
                kind, segment_regions(path, settings, [region], kind=kind, on_progress=progress, cancel=cancel)
            )  # fmt: skip
        if kind == "shapes":
            shapes = self.shapes_combo.currentData()
            if shapes is None:
                raise InputError("add a Shapes layer and draw rectangles, ellipses or polygons on the slide.")
            frame = SlideFrame.of(slide)
            outlines = shape_outlines(shapes, frame)
            regions = [outline_region(outline, frame) for outline in outlines]
            return lambda progress, cancel: (
                kind, segment_regions(
                    path, settings, regions, kind=kind, outlines=outlines, on_progress=progress, cancel=cancel
                ),
            )  # fmt: skip
        out_dir = self.out_edit.text().strip() or None
        formats = DEFAULT_FORMATS | {"geojson"} if self.geojson_check.isChecked() else DEFAULT_FORMATS
        overwrite = self.overwrite_check.isChecked()
        return lambda progress, cancel: (
            kind, segment_whole_slide(
                path, settings, out_dir=out_dir, formats=formats, overwrite=overwrite, on_progress=progress,
                cancel=cancel,
            ),
        )  # fmt: skip

    def _start(
        self, function: Callable[..., Any], *args: Any, returned: Callable[[Any], None], cancellable: bool
    ) -> None:
        # errored is connected before the thread starts, so no failure goes unreported.
        self.worker = create_worker(
            function, *args,
            _connect={"returned": returned, "errored": self._show_error, "finished": self._finished},
        )  # fmt: skip
        self._set_busy(True, cancellable=cancellable)

    def _relay(self, event: ProgressEvent) -> None:
        """The engine's progress callback (worker thread): on to the GUI thread as a queued signal."""
        try:
            self.progressed.emit(event)
        except RuntimeError:  # the widget was closed while the job ran
            self.cancel_event.set()

    def _show_progress(self, event: ProgressEvent) -> None:
        if event.stage == "tiles" and event.total:
            self.progress_bar.setRange(0, event.total)
            self.progress_bar.setValue(event.done)
        elif event.done < event.total:
            self.progress_bar.setRange(0, 0)  # busy: planning, pyramid or writing
        detail = f" ({event.detail})" if event.detail else ""
        if not self.cancel_event.is_set():
            self.status_label.setText(f"{event.slide}: {event.stage} {event.done}/{event.total}{detail}")

    def _show_error(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            show_info(str(exc))
            self.status_label.setText("cancelled")
            return
        if isinstance(exc, WsiEspnetError):
            message = str(exc)
        else:  # a bug: the message for the user, the traceback for the log
            _logger.error("the segmentation widget's job failed", exc_info=exc)
            message = f"internal error ({type(exc).__name__}: {exc}); please report it with the log's traceback."
        show_error(message)
        self.status_label.setText(f"failed: {message}")

    def _finished(self) -> None:
        self.worker = None
        self._set_busy(False)
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)

    def _set_busy(self, busy: bool, *, cancellable: bool = False) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy and cancellable)
        self.export_button.setEnabled(not busy and self._shown is not None)

    def _add_result(self, outcome: tuple[RunKind, LayerData]) -> None:
        """Show a run's layer in place of the previous one of its kind (and of any layer of the same mask file)."""
        kind, (data, kwargs, _) = outcome
        path = kwargs["metadata"]["wsi_espnet"].get("path")
        replaced = [self.results.get(kind)]
        replaced += [layer for layer in self.viewer.layers if path and _record(layer).get("path") == path]
        index = None
        for old in replaced:
            if old is not None and old in self.viewer.layers:
                index = self.viewer.layers.index(old)
                self.viewer.layers.remove(old)
        layer = Labels(data, **kwargs | {"opacity": self.opacity_slider.value() / 100})
        layer.contour = CONTOUR_WIDTH if self.contour_check.isChecked() else 0
        if index is None:  # above the slide, below shapes and other layers drawn over it
            slide = self.slide_combo.currentData()
            index = self.viewer.layers.index(slide) + 1 if slide in self.viewer.layers else len(self.viewer.layers)
        self.viewer.layers.insert(index, layer)
        self.results[kind] = layer
        self.viewer.layers.selection.active = layer
        self._show(layer)
        warnings = kwargs["metadata"]["wsi_espnet"].get("warnings") or []
        self.status_label.setText(f"done: {layer.name}" + "".join(f"\nwarning: {w}." for w in warnings))

    # -- the result: legend, opacity, outlines, export ----------------------------------------------------

    def _follow_selection(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if active is not None and layer_classes(active) is not None:
            self._show(active)
        elif self._shown is None:
            self._show(next((layer for layer in self.viewer.layers if layer_classes(layer) is not None), None))

    def _show(self, layer: Labels | None) -> None:
        """Make ``layer`` the one the legend describes and the controls act on."""
        self._shown = layer
        while self.legend_grid.count():
            item = self.legend_grid.takeAt(0)
            widget = None if item is None else item.widget()
            if widget is not None:
                widget.deleteLater()
        self.legend_rows = []
        self.export_button.setEnabled(layer is not None and self.worker is None)
        if layer is None:
            self.result_label.setText("no result yet")
            return
        self.result_label.setText(layer.name)
        areas = layer_class_areas(layer)
        classes = [c for c in layer_classes(layer) or [] if c.value != NO_TISSUE]
        for row, label in enumerate(classes):
            area = None if areas is None else areas.get(label.value, 0.0)
            self.legend_rows.append((label.name, label.color, area))
            swatch = QLabel()
            swatch.setFixedSize(14, 14)
            swatch.setStyleSheet("background-color: rgb({}, {}, {}); border: 1px solid gray;".format(*label.color))
            self.legend_grid.addWidget(swatch, row, 0)
            self.legend_grid.addWidget(QLabel(label.name), row, 1)
            self.legend_grid.addWidget(QLabel(_area_text(area)), row, 2)
        if areas is not None:
            tissue = sum(area for _, _, area in self.legend_rows if area is not None)
            self.legend_grid.addWidget(QLabel("tissue"), len(classes), 1)
            self.legend_grid.addWidget(QLabel(_area_text(tissue)), len(classes), 2)
        # The controls show the layer's own values (it may have been changed in napari's layer controls).
        self.opacity_slider.blockSignals(True)
        self.opacity_slider.setValue(round(layer.opacity * 100))
        self.opacity_slider.blockSignals(False)
        self.contour_check.blockSignals(True)
        self.contour_check.setChecked(layer.contour > 0)
        self.contour_check.blockSignals(False)

    def _set_opacity(self, value: int) -> None:
        if self._shown is not None:
            self._shown.opacity = value / 100

    def _set_contour(self, checked: bool) -> None:
        if self._shown is not None:
            self._shown.contour = CONTOUR_WIDTH if checked else 0

    def _choose_export_path(self) -> None:
        if self._shown is None:
            return
        slide = self._slide_of(self._shown)
        folder = Path(slide.metadata["wsi_espnet"]["path"]).parent if slide is not None else Path.home()
        suggestion = folder / f"{self._shown.name.replace(':', '').replace(' ', '-')}.geojson"
        path, _ = QFileDialog.getSaveFileName(self, "Export GeoJSON", str(suggestion), "GeoJSON (*.geojson)")
        if path:
            self.export_geojson(path)

    def export_geojson(self, path: str | Path) -> None:
        """Write the shown result as QuPath GeoJSON (level-0 slide pixels) to ``path``, in a worker thread."""
        if self._shown is None or self.worker is not None:
            return
        slide = self._slide_of(self._shown)
        if slide is None:
            show_error("open the slide this mask belongs to; GeoJSON coordinates are in its level-0 pixels.")
            return
        self.status_label.setText("exporting GeoJSON…")
        self._start(export_geojson, self._shown, slide, Path(path), returned=self._exported, cancellable=False)

    def _exported(self, path: Path) -> None:
        show_info(f"wrote {path}")
        self.status_label.setText(f"wrote {path}")

    def _slide_of(self, labels: Labels) -> Image | None:
        """The slide layer a result was made from, else the slide chosen in the form."""
        source = _record(labels).get("slide")
        for layer in self.viewer.layers:
            if _is_slide(layer) and source and Path(_record(layer)["path"]) == Path(source):
                return layer
        chosen: Image | None = self.slide_combo.currentData()
        return chosen


def _record(layer: Any) -> dict[str, Any]:
    record: dict[str, Any] = layer.metadata.get("wsi_espnet", {})
    return record


def _is_slide(layer: Any) -> bool:
    return isinstance(layer, Image) and _record(layer).get("kind") == "slide" and bool(_record(layer).get("path"))


def _fill(combo: QComboBox, layers: list[Any]) -> None:
    """Offer ``layers`` in ``combo``, keeping the current choice when it is still there."""
    current = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    for layer in layers:
        combo.addItem(layer.name, layer)
    index = next((i for i, layer in enumerate(layers) if layer is current), 0 if layers else -1)
    combo.setCurrentIndex(index)
    combo.blockSignals(False)


def _row(*widgets: QWidget) -> QWidget:
    row = QWidget()
    layout = QHBoxLayout()
    layout.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        layout.addWidget(widget)
    row.setLayout(layout)
    return row


def _area_text(area: float | None) -> str:
    return "unknown" if area is None else f"{area:.4f} mm²"
