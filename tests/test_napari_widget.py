"""The "Segment with ESPNet" dock widget in a real viewer (PyQt6 under Xvfb, started by `.ci/run`), with the
packaged breast model on CMU-1-Small-Region: region runs equal the engine's, lie over the slide in
micrometres and respect drawn shapes; whole-slide runs cancel midway and resume; legend, GeoJSON export,
errors as notifications, and what the canvas shows."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari plugin's tests need the napari extra (pip install -e '.[test]')")
if not os.environ.get("DISPLAY") and os.environ.get("CI") != "true":
    pytest.skip("no display: run under xvfb-run (as .ci/run does) to test the napari plugin", allow_module_level=True)

from napari.utils.notifications import NotificationSeverity, notification_manager
from PIL import Image
from wsi_espnet_napari.results import RegionPlans, RunSettings
from wsi_espnet_napari.segment_widget import SegmentWidget

from wsi_espnet.geometry import Region
from wsi_espnet.models import load_model
from wsi_espnet.models.registry import DEFAULT_MODEL, resolve_model_path
from wsi_espnet.outputs.label_pyramid import read_label_pyramid
from wsi_espnet.segmentation import segment_region
from wsi_espnet.segmentation.label_store import LabelStore
from wsi_espnet.segmentation.region import measured_halo
from wsi_espnet.slides import open_slide

PLUGIN = "wsi-espnet"
SLIDE = "CMU-1-Small-Region.svs"
#: Coarse settings keep each run to a few seconds on 2 cores: 2 um/px is 4x coarser than the slide.
MPP, TILE = 2.0, 512
#: A whole-slide run that has enough tile groups (11) to be cancelled with work left over.
SLIDE_MPP, SLIDE_TILE = 1.5, 256
#: Waiting for a run (a cold start measures the model's halo once).
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def slide_path(shared_data: Path) -> Path:
    return shared_data / "slides" / SLIDE


@pytest.fixture(scope="module")
def engine(slide_path):
    """The packaged model and the slide reader, as the engine's own calls below use them."""
    model, config = load_model(resolve_model_path(DEFAULT_MODEL))
    with open_slide(slide_path) as reader:
        yield reader, model, config


@pytest.fixture(scope="module")
def whole_slide_labels(engine):
    """segment_region over the whole slide at the widget tests' settings: any region's labels are its crop."""
    reader, model, config = engine
    height, width = reader.level_shapes[0]
    return segment_region(reader, model, config, Region(0, 0, height, width), target_mpp=MPP, tile_size=TILE)


@pytest.fixture
def viewer_widget(make_napari_viewer, slide_path):
    viewer = make_napari_viewer()
    slide = viewer.open(slide_path, plugin=PLUGIN)[0]
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment with ESPNet")
    widget.mpp_spin.setValue(MPP)
    assert widget.tile_spin.value() == TILE  # the widget's default for interactive runs
    return viewer, slide, widget


def _run(qtbot, widget) -> None:
    qtbot.mouseClick(widget.run_button, _left_button())
    assert widget.worker is not None, widget.status_label.text()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)


def _left_button():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


def _view(viewer, *, center_um: tuple[float, float], zoom: float) -> None:
    camera = viewer.scene.camera
    camera.center = center_um
    camera.zoom = zoom


def test_a_visible_region_run_equals_segment_region_and_lies_over_the_slide(qtbot, viewer_widget, engine):
    viewer, slide, widget = viewer_widget
    _view(viewer, center_um=(600.0, 450.0), zoom=1.5)  # a part of the 1480 x 1108 um slide
    _run(qtbot, widget)
    layer = widget.results["view"]
    assert layer in viewer.layers
    assert not layer.multiscale

    # The region is what the canvas shows, in level-0 pixels.
    half = np.array(viewer.canvas.size) / 1.5 / 2
    top_left = np.floor((np.array([600.0, 450.0]) - half) / slide.scale)
    bottom_right = np.ceil((np.array([600.0, 450.0]) + half) / slide.scale)
    region = Region(*layer.metadata["wsi_espnet"]["level0_regions"][0])
    assert (region.top, region.left) == tuple(np.maximum(top_left, 0))
    assert (region.bottom, region.right) == tuple(np.minimum(bottom_right, slide.data.shape[:2]))
    assert region.height < slide.data.shape[0] or region.width < slide.data.shape[1]

    reader, model, config = engine
    expected = segment_region(reader, model, config, region, target_mpp=MPP, tile_size=TILE)
    assert np.array_equal(layer.data, expected.labels)
    assert set(np.unique(layer.data)) == {0, 1, 2}

    # In micrometres over the slide: label pixel (r, c) covers level-0 pixels from (top + r) * target_to_level0.
    assert tuple(layer.scale) == pytest.approx((expected.output_mpp, expected.output_mpp))
    corner_um = np.array([expected.region.top, expected.region.left]) * expected.output_mpp
    assert tuple(layer.translate) == pytest.approx(tuple(corner_um + expected.output_mpp / 2))
    for label_pixel in [(0, 0), (layer.data.shape[0] - 1, layer.data.shape[1] - 1)]:
        on_slide = np.array(slide.world_to_data(layer.data_to_world(label_pixel)))
        centre = (np.array([expected.region.top, expected.region.left]) + label_pixel + 0.5) * expected.target_to_level0
        assert on_slide == pytest.approx(centre - 0.5)


def test_drawn_shapes_segment_their_boxes_and_blank_outside_them(qtbot, viewer_widget, whole_slide_labels):
    viewer, slide, widget = viewer_widget
    triangle = np.array([[100.0, 100.0], [700.0, 150.0], [400.0, 800.0]])  # (y, x) um
    box = np.array([[900.0, 300.0], [900.0, 1000.0], [1350.0, 1000.0], [1350.0, 300.0]])
    viewer.add_shapes([triangle, box], shape_type=["polygon", "ellipse"], name="areas")
    widget.run_kind = "shapes"
    assert widget.shapes_combo.currentText() == "areas"
    _run(qtbot, widget)
    layer = widget.results["shapes"]

    mpp0 = slide.scale[-1]
    regions = [Region(*r) for r in layer.metadata["wsi_espnet"]["level0_regions"]]
    for shape, region in zip([triangle, box], regions, strict=True):
        assert (region.top, region.left) == tuple(np.floor(shape.min(axis=0) / mpp0))
        assert (region.bottom, region.right) == tuple(np.ceil(shape.max(axis=0) / mpp0))

    # Label pixel centres in um; inside/outside decided here independently of the widget's rasterising.
    reference = whole_slide_labels
    rows, cols = np.indices(layer.data.shape)
    y, x = layer.translate[0] + rows * layer.scale[0], layer.translate[1] + cols * layer.scale[1]
    # Signed distances (um) to the triangle's edges: all of one sign inside.
    sides = [
        ((x - a[1]) * (b[0] - a[0]) - (y - a[0]) * (b[1] - a[1])) / np.hypot(*(b - a))
        for a, b in zip(triangle, np.roll(triangle, -1, axis=0), strict=True)
    ]
    inside_triangle = np.all([s < -1.0 for s in sides], axis=0) | np.all([s > 1.0 for s in sides], axis=0)
    near_triangle = np.any([np.abs(s) <= 1.0 for s in sides], axis=0)
    radius = ((y - 1125.0) / 225.0) ** 2 + ((x - 650.0) / 350.0) ** 2
    inside, outside = inside_triangle | (radius < 0.97), ~inside_triangle & ~near_triangle & (radius > 1.03)

    top = round(layer.translate[0] / layer.scale[0] - 0.5)
    left = round(layer.translate[1] / layer.scale[1] - 0.5)
    expected = reference.labels[top : top + layer.data.shape[0], left : left + layer.data.shape[1]]
    assert np.array_equal(layer.data[inside], expected[inside])
    assert not layer.data[outside].any()
    assert expected[outside].any(), "the shapes should leave some tissue out"


def test_a_whole_slide_run_cancelled_midway_resumes_to_the_fresh_result(qtbot, viewer_widget, engine, tmp_path):
    _, _, widget = viewer_widget
    widget.run_kind = "slide"
    widget.mpp_spin.setValue(SLIDE_MPP)
    widget.tile_spin.setValue(SLIDE_TILE)
    widget.out_edit.setText(str(tmp_path))
    widget.geojson_check.setChecked(True)
    store = tmp_path / "CMU-1-Small-Region.mask.zarr"

    qtbot.mouseClick(widget.run_button, _left_button())
    qtbot.waitUntil(lambda: widget.progress_bar.value() > 0, timeout=TIMEOUT_MS)  # the first tiles are done
    qtbot.mouseClick(widget.cancel_button, _left_button())
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert "slide" not in widget.results
    assert widget.status_label.text() == "cancelled"
    assert _notifications(NotificationSeverity.INFO)[-1].startswith(f"segmentation of {SLIDE} was cancelled")
    assert LabelStore(store).state()["status"] == "running"
    assert not (tmp_path / "CMU-1-Small-Region.provenance.json").exists()

    _run(qtbot, widget)
    layer = widget.results["slide"]
    provenance = json.loads((tmp_path / "CMU-1-Small-Region.provenance.json").read_text())
    assert 0 < provenance["tiling"]["tiles_resumed"] < provenance["tiling"]["tiles_with_tissue"]
    # The run's reliability warnings (the street-scene model is unsure on tissue) are shown with the result.
    assert widget.status_label.text().startswith(f"done: {layer.name}")
    for warning in provenance["reliability"]["warnings"]:
        assert f"warning: {warning}." in widget.status_label.text()
    assert layer.multiscale
    assert layer.metadata["wsi_espnet"]["path"] == str(store)
    assert read_label_pyramid(store).complete

    reader, model, config = engine
    height, width = reader.level_shapes[0]
    fresh = segment_region(
        reader, model, config, Region(0, 0, height, width), target_mpp=SLIDE_MPP, tile_size=SLIDE_TILE
    )
    assert np.array_equal(np.asarray(layer.data[0]), fresh.labels)
    # The legend gives the whole slide's areas from the provenance.
    areas = [area for _, _, area in widget.legend_rows]
    assert sum(areas) == pytest.approx(provenance["tissue"]["segmented_area_mm2"])
    # Exporting the multiscale layer gives the GeoJSON the run wrote.
    widget.export_geojson(tmp_path / "exported.geojson")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    written = json.loads((tmp_path / "CMU-1-Small-Region.mask.geojson").read_text())
    assert json.loads((tmp_path / "exported.geojson").read_text()) == written


def test_the_legend_and_the_geojson_export_describe_the_region(qtbot, viewer_widget, tmp_path):
    viewer, slide, widget = viewer_widget
    _view(viewer, center_um=(700.0, 600.0), zoom=1.2)
    _run(qtbot, widget)
    first = widget.results["view"]
    _run(qtbot, widget)  # a second run replaces the first one's layer, in its place
    layer = widget.results["view"]
    assert first not in viewer.layers
    assert [type(x).__name__ for x in viewer.layers] == ["Image", "Labels"]
    assert np.array_equal(layer.data, first.data)  # the second run reused the first one's slide plan

    # Class swatches, names and areas in mm^2 that add up to the region's tissue.
    names = [name for name, _, _ in widget.legend_rows]
    assert names == ["other tissue", "tumour"]
    mm2_per_pixel = (layer.scale[0] / 1000) ** 2
    for value, (_, colour, area) in enumerate(widget.legend_rows, start=1):
        assert area == pytest.approx(np.count_nonzero(layer.data == value) * mm2_per_pixel)
        assert np.allclose(layer.colormap.map(np.array([value]))[0][:3] * 255, colour, atol=1)
    tissue = sum(area for _, _, area in widget.legend_rows)
    assert tissue == pytest.approx(np.count_nonzero(layer.data) * mm2_per_pixel)
    shown = [w.text() for w in widget.findChildren(type(widget.result_label))]
    assert {"other tissue", "tumour", "tissue", f"{tissue:.4f} mm²"} <= set(shown)

    # Opacity and outlines act on the result layer.
    widget.opacity_slider.setValue(80)
    widget.contour_check.setChecked(True)
    assert layer.opacity == pytest.approx(0.8)
    assert layer.contour > 0

    path = tmp_path / "region.geojson"
    widget.export_geojson(path)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    assert [f["properties"]["classification"]["name"] for f in collection["features"]] == names
    # Level-0 slide pixels (x, y) inside the region, with the class areas (outlines simplified by <= 0.5 px).
    region = Region(*layer.metadata["wsi_espnet"]["level0_regions"][0])
    to_level0 = layer.metadata["wsi_espnet"]["target_to_level0"]
    for feature, (_, _, area) in zip(collection["features"], widget.legend_rows, strict=True):
        polygons = feature["geometry"]["coordinates"]
        xy = np.concatenate([np.array(ring) for polygon in polygons for ring in polygon])
        (left, top), (right, bottom) = xy.min(axis=0), xy.max(axis=0)
        assert region.left - to_level0 <= left < right <= region.right + to_level0
        assert region.top - to_level0 <= top < bottom <= region.bottom + to_level0
        level0_pixels = sum(_ring_area(p[0]) - sum(_ring_area(hole) for hole in p[1:]) for p in polygons)
        assert level0_pixels * (slide.scale[-1] / 1000) ** 2 == pytest.approx(area, rel=0.05)


def test_region_runs_reuse_the_slide_plan_until_the_slide_or_the_settings_change(engine, slide_path, tmp_path):
    _, model, config = engine
    slide = tmp_path / SLIDE
    shutil.copyfile(slide_path, slide)
    settings = RunSettings(DEFAULT_MODEL, MPP, TILE)
    plans = RegionPlans(size=2)
    first = plans.plan(slide, settings, model, config)
    assert plans.plan(slide, settings, model, config) is first
    assert first.tiles.halo == measured_halo(model, config)
    assert first.choice.output_mpp == pytest.approx(MPP, rel=0.1)
    coarser = plans.plan(slide, dataclasses.replace(settings, target_mpp=2 * MPP), model, config)
    assert coarser is not first
    assert coarser.choice.output_mpp > first.choice.output_mpp
    assert plans.plan(slide, dataclasses.replace(settings, tile_size=TILE // 2), model, config) is not first
    assert plans.plan(slide, settings, model, config) is not first  # the oldest of three was dropped
    stat = slide.stat()
    os.utime(slide, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed on disk
    again = plans.plan(slide, settings, model, config)
    assert again is not plans.plan(slide, dataclasses.replace(settings, tile_size=TILE // 2), model, config)
    assert plans.plan(slide, settings, model, config) is again
    plans.clear()
    assert plans.plan(slide, settings, model, config) is not again


def test_errors_are_notifications_with_the_message(qtbot, viewer_widget, tmp_path):
    _, _, widget = viewer_widget
    widget.run_kind = "shapes"
    widget.run()  # no Shapes layer: refused before anything starts
    assert widget.worker is None
    assert "add a Shapes layer" in _notifications(NotificationSeverity.ERROR)[-1]

    widget.run_kind = "view"
    widget.set_model(tmp_path / "missing.safetensors")
    _run(qtbot, widget)  # fails in the worker thread
    message = _notifications(NotificationSeverity.ERROR)[-1]
    assert "missing.safetensors" in message
    assert "Traceback" not in message
    assert widget.status_label.text() == f"failed: {message}"
    assert widget.run_button.isEnabled()
    assert not widget.cancel_button.isEnabled()


def test_the_canvas_shows_the_mask_colours_over_the_tissue(qtbot, viewer_widget, tmp_path):
    viewer, _, widget = viewer_widget
    viewer.window._qt_window.resize(1280, 900)
    viewer.window._qt_window.show()  # screenshots are black unless the window is shown
    viewer.reset_view()
    _run(qtbot, widget)
    layer = widget.results["view"]
    layer.visible = False
    under = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    layer.visible = True
    shot = viewer.screenshot(canvas_only=True, flash=False)

    folder = Path(os.environ.get("WSI_ESPNET_TEST_ARTEFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    artefact = folder / "napari-widget-region.png"
    Image.fromarray(shot).save(artefact)
    qtbot.wait(100)  # the legend's rows show on the next turn of the event loop
    legend = [widget.legend_grid.itemAt(i).widget() for i in range(widget.legend_grid.count())]
    assert legend
    assert all(label.isVisible() for label in legend)
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(folder / "napari-widget-window.png")
    print(f"screenshot: {artefact}")

    # A pixel of class c shows opacity * colour + (1 - opacity) * the slide beneath it.
    opacity, seen = layer.opacity, {}
    for name, colour, _ in widget.legend_rows:
        blended = opacity * np.array(colour, dtype=float) + (1 - opacity) * under
        close = np.abs(shot[..., :3] - blended).max(axis=-1) <= 12
        changed = np.abs(shot[..., :3] - under).max(axis=-1) > 12
        seen[name] = np.count_nonzero(close & changed)
    shown_pixels = np.prod(shot.shape[:2])
    assert all(count > 0.02 * shown_pixels for count in seen.values()), seen


def _notifications(severity) -> list[str]:
    return [n.message for n in notification_manager.records if n.severity == severity]


def _ring_area(ring) -> float:
    x, y = np.array(ring).T
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2


def _answer_file_dialog(path: Path) -> list[str]:
    """Answer the next modal file dialog as a user does: type ``path`` into its file-name field and press
    its Open/Choose/Save button. The returned list gets the dialog's title."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QDialogButtonBox, QFileDialog, QLineEdit

    seen: list[str] = []

    def answer() -> None:
        dialog = QApplication.activeModalWidget()
        if not isinstance(dialog, QFileDialog):
            QTimer.singleShot(50, answer)  # not open yet
            return
        seen.append(dialog.windowTitle())
        dialog.findChild(QLineEdit, "fileNameEdit").setText(str(path))
        buttons = dialog.findChild(QDialogButtonBox)
        kinds = (QDialogButtonBox.StandardButton.Open, QDialogButtonBox.StandardButton.Save)
        next(b for b in map(buttons.button, kinds) if b is not None).click()

    QTimer.singleShot(50, answer)
    return seen


def test_the_file_dialogs_choose_a_model_an_output_folder_and_an_export_path(qtbot, viewer_widget, tmp_path):
    from qtpy.QtWidgets import QPushButton

    viewer, _, widget = viewer_widget
    buttons = {b.text(): b for b in widget.findChildren(QPushButton)}
    checkpoint = tmp_path / "my-model.safetensors"
    checkpoint.write_bytes(resolve_model_path(DEFAULT_MODEL).read_bytes())
    seen = _answer_file_dialog(checkpoint)
    qtbot.mouseClick(buttons["File…"], _left_button())
    assert seen == ["ESPNet checkpoint"]
    assert widget.settings().model == str(checkpoint)
    assert widget.model_combo.currentText() == "my-model.safetensors"

    widget.run_kind = "slide"
    folder = tmp_path / "masks"
    folder.mkdir()
    seen = _answer_file_dialog(folder)
    qtbot.mouseClick(buttons["Browse…"], _left_button())
    assert seen == ["Output folder"]
    assert Path(widget.out_edit.text()) == folder

    widget.run_kind = "view"
    _view(viewer, center_um=(700.0, 600.0), zoom=1.2)
    _run(qtbot, widget)  # with the checkpoint chosen through the dialog
    target = tmp_path / "from-dialog.geojson"
    seen = _answer_file_dialog(target)
    qtbot.mouseClick(buttons["Export GeoJSON for QuPath…"], _left_button())
    assert seen == ["Export GeoJSON"]
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    collection = json.loads(target.read_text())
    assert [f["properties"]["classification"]["name"] for f in collection["features"]] == ["other tissue", "tumour"]
