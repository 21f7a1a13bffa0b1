"""Segmenting ordinary image files: real CamVid frames, label and overlay PNGs, MPP resampling, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_espnet.cli import main
from wsi_espnet.errors import InputError
from wsi_espnet.inference import predict
from wsi_espnet.inference.predict import resize_image
from wsi_espnet.inference.predict_images import predict_image_files
from wsi_espnet.models import create_model, load_original_checkpoint

VOID = 11  # CamVid's unlabelled pixels, and the original model's twelfth output


@pytest.fixture(scope="module")
def camvid_model(original_weights):
    return load_original_checkpoint(
        original_weights / "decoder_espnet_p_2_q_8_camvid.pth", num_classes=12, dataset="camvid"
    )


@pytest.fixture(scope="module")
def camvid_frames(shared_data) -> list[Path]:
    """Two real 480x360 CamVid validation frames; their labels have the same names in valannot/."""
    return sorted((shared_data / "street" / "camvid" / "val").glob("*.png"))[:2]


def _ground_truth(frame: Path) -> np.ndarray:
    with Image.open(frame.parent.parent / "valannot" / frame.name) as image:
        return np.asarray(image)


def _read(path: Path) -> tuple[str, np.ndarray, list[int] | None]:
    with Image.open(path) as image:
        return image.mode, np.asarray(image), image.getpalette()


def _agreement(labels: np.ndarray, truth: np.ndarray) -> float:
    labelled = truth != VOID
    return float((labels[labelled] == truth[labelled]).mean())


def test_real_frames_give_palette_labels_and_overlays(camvid_model, camvid_frames, tmp_path):
    model, config = camvid_model
    results = predict_image_files(model, config, camvid_frames, tmp_path / "out")
    assert [r.source for r in results] == camvid_frames
    for result in results:
        assert result.labels_path == tmp_path / "out" / f"{result.source.stem}.labels.png"
        assert result.overlay_path == tmp_path / "out" / f"{result.source.stem}.overlay.png"
        with Image.open(result.source) as image:
            rgb = np.asarray(image.convert("RGB"))
        mode, labels, palette = _read(result.labels_path)
        assert mode == "P"
        assert palette is not None
        assert palette[: 3 * 12] == [v for color in config.class_colors for v in color]
        assert labels.shape == result.shape == (360, 480)
        np.testing.assert_array_equal(labels, predict(model, rgb, config=config).labels)
        assert _agreement(labels, _ground_truth(result.source)) > 0.8
        assert result.class_pixels == tuple(np.bincount(labels.ravel(), minlength=12))
        assert sum(result.class_fractions) == pytest.approx(1.0)
        assert result.scale == 1.0
        mode, overlay, _ = _read(result.overlay_path)
        assert mode == "RGB"
        expected = np.rint(0.5 * rgb + 0.5 * np.asarray(config.class_colors)[labels])
        np.testing.assert_allclose(overlay, expected, atol=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{f.stem}.{kind}.png" for f in camvid_frames for kind in ("labels", "overlay")
    )


@pytest.mark.parametrize(("alpha", "shows"), [(0.0, "image"), (1.0, "colours")])
def test_alpha_runs_from_image_only_to_colours_only(camvid_model, camvid_frames, tmp_path, alpha, shows):
    model, config = camvid_model
    (result,) = predict_image_files(model, config, camvid_frames[:1], tmp_path, alpha=alpha)
    overlay = _read(result.overlay_path)[1]
    labels = _read(result.labels_path)[1]
    with Image.open(result.source) as image:
        expected = np.asarray(image.convert("RGB")) if shows == "image" else np.asarray(config.class_colors)[labels]
    np.testing.assert_array_equal(overlay, expected)


def test_jpeg_tiff_grey_and_transparent_inputs_are_read_as_rgb(camvid_model, camvid_frames, tmp_path):
    model, config = camvid_model
    with Image.open(camvid_frames[0]) as image:
        frame = image.convert("RGB")
    frame.save(tmp_path / "frame.jpg", quality=95)
    frame.save(tmp_path / "frame_tiff.tif")
    frame.convert("L").save(tmp_path / "grey.png")
    transparent = frame.convert("RGBA")
    transparent.putalpha(0)
    transparent.save(tmp_path / "clear.png")
    inputs = [tmp_path / n for n in ("frame.jpg", "frame_tiff.tif", "grey.png", "clear.png")]
    results = predict_image_files(model, config, inputs, tmp_path / "out")
    truth = _ground_truth(camvid_frames[0])
    assert _agreement(_read(results[0].labels_path)[1], truth) > 0.8  # JPEG-compressed, still the same scene
    np.testing.assert_array_equal(
        _read(results[1].labels_path)[1], predict(model, np.asarray(frame), config=config).labels
    )
    assert _read(results[2].labels_path)[1].shape == (360, 480)
    white = np.full((360, 480, 3), 255, dtype=np.uint8)  # fully transparent pixels become white, not black
    np.testing.assert_array_equal(_read(results[3].labels_path)[1], predict(model, white, config=config).labels)


def test_images_at_another_mpp_are_resampled_to_the_models(camvid_model, camvid_frames, tmp_path):
    model, config = camvid_model
    config = config.replace(target_mpp=1.0)
    with Image.open(camvid_frames[0]) as image:
        frame = image.convert("RGB")
    (half,) = predict_image_files(model, config, camvid_frames[:1], tmp_path / "half", mpp=0.5)
    assert half.scale == 0.5
    small = resize_image(frame, 0.5)  # as training data at another MPP is resampled
    assert small.size == (240, 180)
    expected = Image.fromarray(predict(model, np.asarray(small), config=config).labels).resize(
        (480, 360), resample=Image.Resampling.NEAREST
    )
    labels = _read(half.labels_path)[1]
    assert labels.shape == half.shape == (360, 480)
    np.testing.assert_array_equal(labels, np.asarray(expected))
    # Within 1 % of the model's MPP, and for models without one, the image is used as it is.
    (close,) = predict_image_files(model, config, camvid_frames[:1], tmp_path / "close", mpp=1.005)
    (street,) = predict_image_files(model, config.replace(target_mpp=None), camvid_frames[:1], tmp_path / "s", mpp=0.5)
    assert close.scale == street.scale == 1.0
    np.testing.assert_array_equal(_read(close.labels_path)[1], predict(model, np.asarray(frame), config=config).labels)


def test_more_than_256_classes_are_written_as_16_bit_grey(tmp_path):
    torch.manual_seed(0)
    model = create_model("espnet", num_classes=300).eval()
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "noise.png")
    (result,) = predict_image_files(model, model.config, [tmp_path / "noise.png"], tmp_path)
    mode, labels, _ = _read(result.labels_path)
    assert mode == "I;16"
    np.testing.assert_array_equal(labels, predict(model, image).labels)
    assert len(result.class_pixels) == 300


def test_existing_outputs_are_replaced_whole(camvid_model, camvid_frames, tmp_path):
    model, config = camvid_model
    stale = tmp_path / f"{camvid_frames[0].stem}.labels.png"
    stale.write_bytes(b"an older result")
    (result,) = predict_image_files(model, config, camvid_frames[:1], tmp_path)
    assert _read(result.labels_path)[0] == "P"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([stale.name, result.overlay_path.name])


@pytest.mark.parametrize(
    ("make_inputs", "message"),
    [
        (lambda d, f: [f[0], d / "missing.png"], r"image '.*missing.png' does not exist; give the path of an image"),
        (lambda d, f: [d], r"image '.*' is a folder; give the path of an image file"),
        (lambda d, f: [_write(d / "notes.png", b"not an image")], r"is not an image file Pillow can read; give a PNG"),
        (lambda d, f: [f[0], _copy(f[0], d / "copy" / f[0].name)], r"would both write 0016E5_07959.labels.png; rename"),
        (lambda d, f: [_write(d / "cut.png", f[0].read_bytes()[:5000])], r"cannot decode .*cut.png.*truncated or corr"),
        (lambda d, f: [], "no images were given"),
    ],
)  # fmt: skip
def test_bad_inputs_are_explained(camvid_model, camvid_frames, tmp_path, make_inputs, message):
    model, config = camvid_model
    inputs = make_inputs(tmp_path, camvid_frames)
    with pytest.raises(InputError, match=message):
        predict_image_files(model, config, inputs, tmp_path / "out")
    written = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert not written  # inputs are checked before the first is segmented; a failed one leaves no partial file


@pytest.mark.parametrize(("options", "message"), [({"alpha": 1.5}, "alpha=1.5 is not an opacity"),
                                                  ({"mpp": 0.0}, "mpp=0.0 must be a positive number")])  # fmt: skip
def test_bad_options_are_explained(camvid_model, camvid_frames, tmp_path, options, message):
    model, config = camvid_model
    with pytest.raises(InputError, match=message):
        predict_image_files(model, config, camvid_frames[:1], tmp_path, **options)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir()
    return _write(target, source.read_bytes())


def test_cli_predicts_real_frames(original_weights, camvid_frames, tmp_path, capsys):
    weights = original_weights / "decoder_espnet_p_2_q_8_camvid.pth"
    out = tmp_path / "predictions"
    code = main(["predict", *map(str, camvid_frames), "--model", str(weights), "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = printed.out.splitlines()
    assert len(lines) == 2
    for frame, line in zip(camvid_frames, lines, strict=True):
        labels_path, overlay_path = out / f"{frame.stem}.labels.png", out / f"{frame.stem}.overlay.png"
        assert line.startswith(f"{frame}: {labels_path}, {overlay_path}; ")
        assert "road " in line
        assert line.endswith("%")
        assert overlay_path.is_file()
        assert _agreement(_read(labels_path)[1], _ground_truth(frame)) > 0.8


def test_cli_reports_a_missing_image_with_exit_code_2(original_weights, camvid_frames, tmp_path, capsys):
    weights = original_weights / "decoder_espnet_p_2_q_8_camvid.pth"
    missing = tmp_path / "missing.png"
    code = main(["predict", str(camvid_frames[0]), str(missing), "--model", str(weights), "--out", str(tmp_path)])
    assert code == 2
    assert f"wsi-espnet: error: image '{missing}' does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
