"""Short real training runs on the breast data: MONAI engines, checkpoints, resume, fine-tuning, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_espnet.cli import main
from wsi_espnet.datasets.manifest import load_manifest
from wsi_espnet.errors import CheckpointError, ConfigError, InputError
from wsi_espnet.evaluation.evaluate import evaluate_split
from wsi_espnet.models import load_model
from wsi_espnet.models.registry import default_model_path
from wsi_espnet.training.recipe import TrainingRecipe, load_recipe
from wsi_espnet.training.statistics import paper_class_weights
from wsi_espnet.training.train import TrainOptions, train

MANIFESTS = Path(__file__).resolve().parent.parent / "data_manifests"
BREAST = MANIFESTS / "breast-tumour.yaml"

# Tiny but real: 64-px crops of the real regions, a few iterations per epoch.
TINY = TrainingRecipe(
    stages=("decoder",),
    decoder_epochs=3,
    encoder_epochs=2,
    batch_size=4,
    crop_size=(64, 64),
    samples_per_epoch=12,
    scale_range=(0.8, 1.25),
    lr=2e-3,
    lr_step=2,
)


@pytest.fixture(autouse=True)
def _data(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_ESPNET_TEST_DATA", str(shared_data))


def _history(folder: Path) -> list[dict[str, str]]:
    with (folder / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _run(out: Path, recipe: TrainingRecipe = TINY) -> list[str]:
    messages: list[str] = []
    train(TrainOptions(manifest=BREAST, out=out, recipe=recipe, progress=False), log=messages.append)
    return messages


@pytest.fixture(scope="module")
def two_stage_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two-stage")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WSI_ESPNET_TEST_DATA", str(shared_data))
        messages = _run(out, TINY.replace(stages=["encoder", "decoder"], encoder_epochs=2, decoder_epochs=4))
    (out / "log.txt").write_text("\n".join(messages))
    return out


def test_paper_class_weights_follow_the_formula():
    weights = paper_class_weights(np.array([0.9, 0.1, 0.0]))
    np.testing.assert_allclose(weights, 1 / np.log(1.10 + np.array([0.9, 0.1, 0.0])))
    assert weights[2] > weights[1] > weights[0]  # rarer classes weigh more


def test_two_stage_run_learns_and_writes_everything(two_stage_run: Path):
    for name in ("run.json", "statistics.json", "model.safetensors", "metrics.json", "model_card.md"):
        assert (two_stage_run / name).is_file(), name
    assert (two_stage_run / "confusion_val.png").is_file()
    assert (two_stage_run / "evaluation_test.json").is_file()  # the held-out BCSS tiles
    encoder = _history(two_stage_run / "encoder")
    decoder = _history(two_stage_run / "decoder")
    assert [int(r["epoch"]) for r in encoder] == [1, 2]
    assert [int(r["epoch"]) for r in decoder] == [1, 2, 3, 4]
    assert float(decoder[-1]["loss"]) < float(decoder[0]["loss"])  # it learns
    assert all(r["val_mean_iou"] for r in decoder)
    stats = json.loads((two_stage_run / "statistics.json").read_text())
    assert set(stats["class_pixels"]) == {"other tissue", "tumour"}
    assert all(n > 0 for n in stats["class_pixels"].values())
    # The second stage starts from the first stage's encoder.
    log = (two_stage_run / "log.txt").read_text()
    assert f"stage decoder: 170 tensors from {two_stage_run / 'encoder' / 'best.safetensors'}" in log
    _, encoder_config = load_model(two_stage_run / "encoder" / "best.safetensors")
    _, config = load_model(two_stage_run / "model.safetensors")
    assert encoder_config.variant == "espnet-c"
    assert config.variant == "espnet"
    assert config.target_mpp == 1.0
    assert config.class_names == ("other tissue", "tumour")
    card = (two_stage_run / "model_card.md").read_text()
    for text in ("other tissue", "tumour", "1.0", "mean IoU", "Hardware", "CC0"):
        assert text in card


def test_reloaded_checkpoint_predicts_exactly_what_training_validated(two_stage_run: Path):
    """The evaluator's confusion matrix (in-memory network, during training) equals the one of the reloaded file."""
    best = json.loads((two_stage_run / "decoder" / "best.json").read_text())
    model, config = load_model(two_stage_run / "model.safetensors")
    confusion = evaluate_split(model, config, load_manifest(BREAST), "val")
    assert confusion.matrix.tolist() == best["confusion_matrix"]


def test_resume_after_a_crash_continues_from_the_saved_epoch_and_matches(tmp_path: Path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run(straight)

    def crash_in_epoch_2(message: str) -> None:
        if message.startswith("epoch 2/"):
            raise KeyboardInterrupt  # after epoch 2's history row, before its state is saved

    with pytest.raises(KeyboardInterrupt):
        train(TrainOptions(manifest=BREAST, out=crashed, recipe=TINY, progress=False), log=crash_in_epoch_2)
    assert not (crashed / "model.safetensors").exists()
    assert not (crashed / "decoder" / "done.json").exists()
    messages: list[str] = []
    train(TrainOptions(manifest=BREAST, out=crashed, recipe=TINY, progress=False, resume=True), log=messages.append)
    assert any("resuming after epoch 1" in m for m in messages)
    assert not any(m.startswith("epoch 1/") for m in messages)  # epoch 1 is not trained again
    rows = _history(crashed / "decoder")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["iteration"]) for r in rows] == [3, 6, 9]
    assert [r["loss"] for r in rows] == [r["loss"] for r in _history(straight / "decoder")]
    a, _ = load_model(straight / "model.safetensors")
    b, _ = load_model(crashed / "model.safetensors")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_fine_tuning_an_original_cityscapes_checkpoint_to_two_classes(tmp_path: Path, original_weights: Path):
    messages: list[str] = []
    recipe = TINY.replace(decoder_epochs=1, init=str(original_weights / "decoder_espnet_p_2_q_3.pth"))
    train(TrainOptions(manifest=BREAST, out=tmp_path / "ft", recipe=recipe, progress=False), log=messages.append)
    transfer = next(m for m in messages if "initialised anew" in m)
    copied, fresh = (int(w) for w in transfer.split(": ", 1)[1].split() if w.isdigit())
    assert copied > 100
    assert fresh > 0  # the 20-class layers
    _, config = load_model(tmp_path / "ft" / "model.safetensors")
    _, original_config = load_model(original_weights / "decoder_espnet_p_2_q_3.pth")
    assert config.num_classes == 2
    assert config.preprocessing == original_config.preprocessing  # the weights' own normalisation is kept
    assert config.alpha3 == 3


def test_recipes_load_and_reject_mistakes(tmp_path: Path):
    paper = load_recipe()
    assert (paper.lr, paper.weight_decay, paper.stages) == (5e-4, 5e-4, ("encoder", "decoder"))
    assert load_recipe("camvid-finetune").stages == ("decoder",)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown recipe settings \\['learning_rate'\\]"):
        load_recipe(bad)
    with pytest.raises(InputError, match="packaged recipes"):
        load_recipe("no-such-recipe")
    with pytest.raises(ConfigError, match="multiples of 8"):
        TINY.replace(crop_size=[60, 64])
    with pytest.raises(ConfigError, match="stages"):
        TINY.replace(stages=["decoder", "encoder"])


def test_train_cli_refuses_to_mix_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "run"
    args = ["train", str(BREAST), "--out", str(out), "--stages", "decoder", "--decoder-epochs", "1"]
    args += ["--crop", "64", "--samples-per-epoch", "4", "--batch-size", "4", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mean IoU" in printed
    assert main(args) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert main([*args, "--resume", "--lr", "0.01"]) == 2
    assert "different recipe" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished stages are skipped
    assert main(["train", str(BREAST), "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "no run" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_cli_writes_json_and_png(two_stage_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    model = two_stage_run / "model.safetensors"
    code = main(["evaluate", str(BREAST), "--split", "test", "--model", str(model), "--out", str(tmp_path), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tumour" in printed
    assert "mean IoU" in printed
    report = json.loads(next(tmp_path.glob("*evaluation_test.json")).read_text())
    assert report["split"] == "test"
    assert len(report["classes"]) == 2
    assert next(tmp_path.glob("*confusion_test.png")).stat().st_size > 0
    assert main(["evaluate", str(BREAST), "--split", "nope", "--model", str(model)]) == 2
    assert "has no split 'nope'" in capsys.readouterr().err


def test_overwrite_keeps_the_old_run_until_the_new_one_finishes(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "run"
    args = ["train", str(BREAST), "--out", str(out), "--stages", "decoder", "--decoder-epochs", "1"]
    args += ["--crop", "64", "--samples-per-epoch", "4", "--batch-size", "4", "--quiet"]
    assert main(args) == 0
    model_bytes = (out / "model.safetensors").read_bytes()
    # A failing new run (a bad --init) changes nothing; the old run is still whole.
    assert main([*args, "--overwrite", "--init", str(tmp_path / "missing.safetensors")]) == 3
    assert (out / "model.safetensors").read_bytes() == model_bytes
    capsys.readouterr()
    assert main([*args, "--overwrite", "--seed", "1"]) == 0
    assert json.loads((out / "run.json").read_text())["recipe"]["seed"] == 1
    assert not list(tmp_path.glob(".run.replaced-*"))  # the old run was deleted only at the end


def test_a_corrupt_training_state_is_reported_not_a_traceback(tmp_path: Path):
    out = tmp_path / "run"
    _run(out, TINY.replace(decoder_epochs=1))
    (out / "decoder" / "done.json").unlink()
    (out / "model.safetensors").unlink()
    state = next((out / "decoder" / "state").glob("*.pt"))
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        train(TrainOptions(manifest=BREAST, out=out, recipe=TINY.replace(decoder_epochs=1), resume=True))


def test_fine_tuning_to_renamed_classes_reinitialises_the_classifier(tmp_path: Path, shared_data: Path):
    """Same class count, other classes: the old classifier layers must not be reused."""
    first = tmp_path / "first"
    _run(first, TINY.replace(decoder_epochs=1))
    swapped = tmp_path / "swapped.yaml"
    text = BREAST.read_text().replace("${WSI_ESPNET_TEST_DATA:-../../shared/data}", str(shared_data))
    text = text.replace("- {name: other tissue", "- {name: non-tumour")
    swapped.write_text(text)
    messages: list[str] = []
    recipe = TINY.replace(decoder_epochs=1, init=str(first / "model.safetensors"))
    train(TrainOptions(manifest=swapped, out=tmp_path / "second", recipe=recipe, progress=False), log=messages.append)
    same = TINY.replace(decoder_epochs=1, init=str(first / "model.safetensors"))
    messages_same: list[str] = []
    train(TrainOptions(manifest=BREAST, out=tmp_path / "third", recipe=same, progress=False), log=messages_same.append)

    def fresh(log: list[str]) -> int:
        line = next(m for m in log if "initialised anew" in m)
        return int(line.rsplit(", ", 1)[1].split()[0])

    assert fresh(messages_same) == 0  # same classes: everything is reused
    assert fresh(messages) > 0  # renamed classes: the class-dependent layers start afresh


def test_val_without_labelled_pixels_is_refused_before_anything_is_written(tmp_path: Path, shared_data: Path):
    manifest = tmp_path / "unlabelled-val.yaml"
    text = BREAST.read_text().replace("${WSI_ESPNET_TEST_DATA:-../../shared/data}", str(shared_data))
    manifest.write_text(text.replace("mask: {threshold: 128}", "mask: {threshold: 128, remap: {0: 255, 1: 255}}"))
    with pytest.raises(InputError, match="no labelled pixels"):
        train(TrainOptions(manifest=manifest, out=tmp_path / "run", recipe=TINY), log=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (AMP, channels_last, dataset cached on it)")
def test_gpu_run_uses_amp_channels_last_and_a_device_cache(tmp_path: Path):
    messages = _run(tmp_path / "gpu", TINY.replace(decoder_epochs=2))
    assert any("device cuda" in m and "amp on, channels_last on, dataset cached on cuda" in m for m in messages)
    assert (tmp_path / "gpu" / "model.safetensors").is_file()
    rows = _history(tmp_path / "gpu" / "decoder")
    assert all(np.isfinite(float(r["loss"])) for r in rows)


def test_the_dataset_cache_holds_uint8_and_batches_come_out_float(shared_data: Path):
    """CacheDataset keeps everything up to the first random transform: no float cast may sit before it."""
    from monai.data import CacheDataset

    from wsi_espnet.datasets.samples import list_samples
    from wsi_espnet.training.engine import PrepareBatch
    from wsi_espnet.training.transforms import train_transforms

    manifest = load_manifest(BREAST)
    samples = list_samples(manifest, "val")[:2]
    for scale in ((1.0, 1.0), (0.8, 1.25)):
        transforms = train_transforms(manifest, crop_size=(64, 64), scale_range=scale, ignore_index=255)
        dataset = CacheDataset([{"sample": s} for s in samples], transform=transforms, progress=False)
        cached = dataset._cache[0]
        assert cached["image"].dtype == cached["label"].dtype == torch.uint8
        item = dataset[0]
        images, labels = PrepareBatch(load_model(default_model_path())[1].preprocessing)(
            {"image": torch.as_tensor(item["image"])[None], "label": torch.as_tensor(item["label"])[None]}, "cpu"
        )
        assert images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert set(labels.unique().tolist()) <= {0, 1, 255}


def test_real_bad_files_as_init_or_image_are_refused_cleanly(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    bad = shared_data / "bad-inputs"
    out = tmp_path / "run"
    assert main(["train", str(BREAST), "--init", str(bad / "strip-tiff-not-a-pyramid.tif"), "--out", str(out)]) == 3
    assert "cannot read" in capsys.readouterr().err
    assert not out.exists()  # refused before the run folder was made
    assert main(["predict", str(bad / "malformed-wsi.dcm"), "--out", str(tmp_path / "p")]) == 2
    assert "is not an image file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def breast_image(shared_data: Path) -> torch.Tensor:
    """A real 256 x 256 crop of a BCSS region at 1 um/px, (3, H, W) float32 on the 0-255 scale."""
    from wsi_espnet.datasets.samples import list_samples, load_sample

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WSI_ESPNET_TEST_DATA", str(shared_data))
        manifest = load_manifest(BREAST)
        image, _ = load_sample(manifest, list_samples(manifest, "val")[0])
    return torch.from_numpy(image[:256, :256].transpose(2, 0, 1).copy()).float()


def _laplacian_energy(image: torch.Tensor) -> float:
    grey = image.mean(0)
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float((lap**2).mean())


def test_scanner_and_stain_augmentations_change_images_as_they_say(breast_image: torch.Tensor):
    from monai.data import MetaTensor

    from wsi_espnet.training.transforms import RandBlurd, RandColourJitterd, RandHedJitterd, RandJpegd

    image = MetaTensor(breast_image.clone())
    transforms = {
        "hed": RandHedJitterd(prob=1.0, sigma=0.2, bias=0.05),
        "colour": RandColourJitterd(prob=1.0, brightness=0.25, contrast=0.25, saturation=0.25),
        "blur": RandBlurd(prob=1.0, sigma=(1.0, 1.5)),
        "jpeg": RandJpegd(prob=1.0, quality=(20, 30)),
    }
    outputs = {}
    for name, transform in transforms.items():
        transform.set_random_state(seed=3)
        out = transform({"image": image})["image"]
        assert isinstance(out, MetaTensor), name  # MONAI's collation needs one tensor type throughout
        assert out.shape == image.shape, name
        assert out.dtype == torch.float32, name
        assert float(out.min()) >= 0, name
        assert float(out.max()) <= 255, name
        assert float((out - image).abs().mean()) > 0.5, name
        transform.set_random_state(seed=3)
        assert torch.equal(transform({"image": image})["image"], out), name  # seeded: reproducible
        outputs[name] = out
    assert _laplacian_energy(outputs["blur"]) < 0.5 * _laplacian_energy(image)  # blur removes fine detail
    assert torch.corrcoef(torch.stack([outputs["jpeg"].ravel(), image.ravel()]))[0, 1] > 0.9  # same picture
    # No jitter is no change (up to the OD round trip).
    still = RandHedJitterd(prob=1.0, sigma=0.0, bias=0.0)({"image": image})["image"]
    assert float((still - image).abs().max()) < 1e-3


def test_augmentation_and_stain_recipe_settings_are_checked():
    strong = load_recipe(Path(__file__).resolve().parent.parent / "benchmarks" / "recipes"
                         / "breast-tumour-strong-augmentation.yaml")  # fmt: skip
    augmentation = strong.augmentation()
    assert (augmentation.hed_sigma, augmentation.blur_sigma, augmentation.jpeg_quality) == (0.2, (0.3, 1.5), (40, 95))
    assert len(augmentation.transforms()) == 4
    assert TINY.augmentation().transforms()[0].sigma == 0.05  # the default: the original HED jitter alone
    assert len(TINY.augmentation().transforms()) == 1
    for change, message in [
        ({"jpeg_quality": [0, 120]}, "jpeg_quality"),
        ({"jpeg_quality": [50.5, 90]}, "whole numbers"),
        ({"blur_sigma": [-1, 2]}, "blur_sigma"),
        ({"colour_jitter": [0.2, 1.5, 0.1]}, "colour_jitter"),
        ({"stain_jitter": [0.1]}, "stain_jitter"),
        ({"stain_normalisation": "reinhard"}, "stain_normalisation"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TINY.replace(**change)


def test_a_histology_model_stores_its_training_stain(two_stage_run: Path):
    from wsi_espnet.stain import stain_distance

    _, config = load_model(two_stage_run / "model.safetensors")
    reference = config.stain_reference
    assert reference is not None
    assert reference.normalise is False
    assert reference.stains[0][0] > reference.stains[1][0]  # haematoxylin, then eosin
    assert stain_distance(reference.estimate(), reference) == 0.0


def test_a_macenko_run_trains_and_evaluates_on_normalised_images(tmp_path: Path):
    out = tmp_path / "macenko"
    _run(out, TINY.replace(decoder_epochs=1, stain_normalisation="macenko"))
    model, config = load_model(out / "model.safetensors")
    assert config.stain_reference is not None
    assert config.stain_reference.normalise
    manifest = load_manifest(BREAST)
    normalised = evaluate_split(model, config, manifest, "test").matrix
    plain = evaluate_split(model, config.replace(stain_reference=None), manifest, "test").matrix
    assert normalised.sum() == plain.sum()  # the same labelled pixels
    assert not np.array_equal(normalised, plain)  # but seen in other colours
