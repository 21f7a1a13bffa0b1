"""Dataset manifests (YAML -> validated :class:`DatasetManifest`) and the samples they describe.

Schema, error and path tests use manifests written to ``tmp_path``; dataset tests read the shipped
manifests in ``data_manifests/`` against the real data in ``$WSI_ESPNET_TEST_DATA`` (CamVid, the
breast histology folders, two Cityscapes frames, the slide CMU-1-Small-Region).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import jsonschema
import numpy as np
import pytest
import yaml
from annotated_slide_fixture import CMU_SLIDE, TUMOUR_IN_STROMA, TUMOUR_WITH_HOLE, write_cmu_annotations
from numpy.typing import NDArray
from PIL import Image

from wsi_espnet.datasets.annotated_slides import sample_annotated_tiles
from wsi_espnet.datasets.manifest import (
    DatasetManifest,
    FolderSplit,
    MaskEncoding,
    SlideSplit,
    expand_env,
    load_manifest,
    manifest_schema,
)
from wsi_espnet.datasets.samples import Sample, decode_mask, list_samples, load_sample
from wsi_espnet.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = PROJECT_ROOT / "data_manifests"
SHIPPED = sorted(p for p in MANIFESTS.glob("*.yaml") if not p.name.startswith("cohort-"))  # cohorts: test_batch
#: Manifests of the user's own data: their root is a variable without default.
USER_DATASETS = {
    "cityscapes.yaml": ("CITYSCAPES_ROOT", ("train", "val"), 19),
    "breast-biopsy-8class.yaml": ("BREAST_BIOPSY_ROOT", ("train", "val", "test"), 8),
    "annotated-slides-example.yaml": ("ANNOTATED_SLIDES_ROOT", ("train", "val"), 2),
}
#: Manifests of the shared test data, rooted at ``${WSI_ESPNET_TEST_DATA:-../../shared/data}``.
SHARED_DATASETS = ("bcss-224.yaml", "breast-tumour.yaml", "breast-tumour-all.yaml", "camvid.yaml")

IGNORE = 255
OTHER, TUMOUR = 0, 1  # breast-tumour's classes
BREAST_VAL = {"bcss-roi-binary": {"1019"}, "camelyon-tiles": {"10072", "10073", "10695", "10698", "10699"}}
BCSS_224_VAL = "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0_0_2240_size224"
CAMVID_PAIRS = ("0001TP_006690", "0001TP_006720", "0001TP_006750")
CITYSCAPES_FRAMES = {"train": "frankfurt_000000_000294", "val": "frankfurt_000000_000576"}
#: (labelId, trainId) of the four horizontal bands of the Cityscapes fixture's masks, top to bottom.
CITYSCAPES_BANDS = ((0, IGNORE), (26, 13), (33, 18), (7, 0))  # unlabelled, car, bicycle, road
Unmapped = Literal["keep", "ignore", "error"]


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def as_json(path: Path) -> Any:
    """A YAML file in JSON's data model (integer keys become strings), as the schema sees it."""
    return json.loads(json.dumps(yaml.safe_load(path.read_text(encoding="utf-8"))))


def load_shipped(name: str, shared_data: Path) -> DatasetManifest:
    """A manifest of ``data_manifests/`` with ``${WSI_ESPNET_TEST_DATA}`` at the data these tests use."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WSI_ESPNET_TEST_DATA", str(shared_data.resolve()))
        return load_manifest(MANIFESTS / name)


def read_raw(path: Path | None) -> NDArray[Any]:
    assert path is not None
    with Image.open(path) as image:
        return np.asarray(image)


def by_name(samples: list[Sample]) -> dict[tuple[str, str], Sample]:
    return {(s.source.name, s.name): s for s in samples}


# --- every shipped manifest ---------------------------------------------------------------------


def test_schema_is_valid_and_every_manifest_is_covered() -> None:
    jsonschema.Draft202012Validator.check_schema(manifest_schema())
    assert {p.name for p in SHIPPED} == set(USER_DATASETS) | set(SHARED_DATASETS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_manifest_validates_against_the_schema(path: Path) -> None:
    jsonschema.Draft202012Validator(manifest_schema()).validate(as_json(path))


@pytest.mark.parametrize("name", SHARED_DATASETS)
def test_shared_data_manifest_loads(name: str, shared_data: Path) -> None:
    manifest = load_shipped(name, shared_data)
    assert manifest.path == (MANIFESTS / name).resolve()
    assert manifest.name == name.removesuffix(".yaml")
    assert manifest.ignore_index == (IGNORE if manifest.kind == "histology" else 11)
    for source in manifest.sources:
        assert source.root.is_dir()
        assert source.root.is_relative_to(shared_data.resolve())
        assert all(isinstance(split, FolderSplit) for split in source.splits.values())


def test_shared_data_root_defaults_to_the_folder_beside_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    default = (PROJECT_ROOT.parent / "shared" / "data").resolve()
    if not (default / "street" / "camvid").is_dir():
        pytest.skip(f"no shared data at the default place {default}")
    monkeypatch.delenv("WSI_ESPNET_TEST_DATA", raising=False)
    monkeypatch.chdir(PROJECT_ROOT / "tests")  # the default is relative to the manifest, not the working directory
    (source,) = load_manifest(MANIFESTS / "camvid.yaml").sources
    assert source.root == default / "street" / "camvid"


@pytest.mark.parametrize(("name", "variable"), [(name, spec[0]) for name, spec in USER_DATASETS.items()])
def test_user_dataset_manifest_names_its_unset_variable(
    name: str, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(InputError, match=rf"sources\[0\] uses \$\{{{variable}\}} but {variable} is not set") as error:
        load_manifest(MANIFESTS / name)
    assert f"export {variable}=" in str(error.value)
    assert name in str(error.value)


@pytest.mark.parametrize(("name", "spec"), USER_DATASETS.items())
def test_user_dataset_manifest_loads_with_its_variable_set(
    name: str, spec: tuple[str, tuple[str, ...], int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable, splits, num_classes = spec
    monkeypatch.setenv(variable, str(tmp_path))
    manifest = load_manifest(MANIFESTS / name)
    assert manifest.split_names == splits
    assert manifest.num_classes == num_classes
    assert len(set(manifest.class_colors)) == num_classes
    (source,) = manifest.sources
    assert source.root == tmp_path.resolve()
    for split in source.splits.values():
        if isinstance(split, SlideSplit):
            assert all(entry.slide.parent == tmp_path.resolve() for entry in split.slides)
        else:
            assert split.images.is_relative_to(tmp_path.resolve())


def test_cityscapes_manifest_maps_label_ids_to_train_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYSCAPES_ROOT", str(tmp_path))
    (source,) = load_manifest(MANIFESTS / "cityscapes.yaml").sources
    assert source.mask.unmapped == "ignore"
    assert sorted(source.mask.remap.values()) == list(range(19))
    assert {7: 0, 26: 13, 33: 18}.items() <= source.mask.remap.items()
    assert (source.recursive, source.image_suffix, source.mask_suffix) == (
        True,
        "_leftImg8bit.png",
        "_gtFine_labelIds.png",
    )


# --- schema and consistency errors ----------------------------------------------------------------

DELETE = object()


def base_manifest() -> dict[str, Any]:
    """A valid histology manifest over ``data/`` (which the tests create) beside the manifest."""
    return {
        "manifest_version": 1,
        "name": "tiny",
        "kind": "histology",
        "classes": [{"name": "other"}, {"name": "tumour", "color": [220, 40, 40]}, {"name": "stroma"}],
        "ignore_index": 255,
        "sources": [
            {
                "layout": "paired_folders",
                "root": "data",
                "mpp": 0.25,
                "splits": {"train": {"images": "images", "masks": "masks"}},
            }
        ],
    }


def edited(data: dict[str, Any], edits: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each dotted key (``sources.0.mask``) set to its value, or removed for DELETE."""
    data = copy.deepcopy(data)
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def write_base(tmp_path: Path, edits: dict[str, Any] | None = None) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    return write_yaml(tmp_path / "tiny.yaml", edited(base_manifest(), edits or {}))


def test_base_manifest_loads(tmp_path: Path) -> None:
    manifest = load_manifest(write_base(tmp_path))
    assert manifest.class_names == ("other", "tumour", "stroma")
    assert manifest.class_colors[0] == (0, 0, 0)  # default palette where no colour is given
    assert manifest.class_colors[1] == (220, 40, 40)
    (source,) = manifest.sources
    assert source.name == "data"  # default: the root folder's name
    assert source.mask == MaskEncoding()
    data = (tmp_path / "data").resolve()
    assert source.splits == {"train": FolderSplit(images=data / "images", masks=data / "masks")}


SCHEMA_ERRORS = [
    ("misspelt top-level key", {"ignore_index": DELETE, "ignore_idx": 255}, "at top level:",
     "'ignore_idx' was unexpected"),
    ("misspelt source key", {"sources.0.mmp": 0.5}, "at sources[0]:", "'mmp' was unexpected"),
    ("misspelt mask key", {"sources.0.mask": {"treshold": 128}}, "at sources[0].mask:", "'treshold' was unexpected"),
    ("misspelt class key", {"classes.0.colour": [1, 2, 3]}, "at classes[0]:", "'colour' was unexpected"),
    ("misspelt split key", {"sources.0.splits.train": {"images": "i", "mask": "m"}}, "at sources[0].splits.train:",
     "either 'images' and 'masks' (paired_folders) or 'slides' (annotated_slides), got keys ['images', 'mask']"),
    ("split with neither", {"sources.0.splits.val": {"files": ["a"]}}, "at sources[0].splits.val:",
     "either 'images' and 'masks'"),
    ("split with both", {"sources.0.splits.train.slides": [{"slide": "a.svs", "annotations": "a.geojson"}]},
     "at sources[0].splits.train:", "got keys ['images', 'masks', 'slides']"),
    ("class without a name", {"classes.1": {"color": [1, 2, 3]}}, "at classes[1]:", "'name' is a required property"),
    ("colour out of range", {"classes.0.color": [0, 0, 256]}, "at classes[0].color[2]:", "256 is greater than"),
    ("one class", {"classes": [{"name": "only"}]}, "at classes:", "[{'name': 'only'}] is too short"),
    ("no sources", {"sources": []}, "at sources:", "should be non-empty"),
    ("missing splits", {"sources.0.splits": DELETE}, "at sources[0]:", "'splits' is a required property"),
    ("unknown layout", {"sources.0.layout": "folders"}, "at sources[0].layout:", "'folders' is not one of"),
    ("remap key not a value", {"sources.0.mask": {"remap": {"tumour": 1}}}, "at sources[0].mask.remap:",
     "'tumour' does not match"),
    ("threshold 0", {"sources.0.mask": {"threshold": 0}}, "at sources[0].mask.threshold:", "less than the minimum"),
    ("ignore_index 256", {"ignore_index": 256}, "at ignore_index:", "256 is greater than the maximum of 255"),
    ("target_mpp 0", {"target_mpp": 0}, "at target_mpp:", "less than or equal to the minimum"),
    ("name with a space", {"name": "my data"}, "at name:", "does not match"),
    ("future version", {"manifest_version": 2}, "at manifest_version:", "1 was expected"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edits", "where", "detail"), [case[1:] for case in SCHEMA_ERRORS], ids=[c[0] for c in SCHEMA_ERRORS]
)
def test_schema_error_names_its_place(tmp_path: Path, edits: dict[str, Any], where: str, detail: str) -> None:
    path = write_base(tmp_path, edits)
    with pytest.raises(InputError) as error:
        load_manifest(path)
    message = str(error.value)
    assert message.startswith(f"manifest {str(path)!r} is not valid {where}")
    assert detail in message
    assert message.endswith("See wsi_espnet/datasets/manifest.schema.json.")
    assert error.value.__cause__ is None  # the schema's own traceback would only bury the message


CONSISTENCY_ERRORS = [
    ("ignore_index equal to a class", {"ignore_index": 1},
     "ignore_index 1 is also class 'tumour'; use a value >= 3 (e.g. 255)"),
    ("remap to a missing class", {"sources.0.mask": {"remap": {"255": 7}}},
     "sources[0]: mask maps a value to class 7, but there are 3 classes (0..2) and the ignore index is 255"),
    ("colour to a missing class", {"sources.0.mask": {"colors": [{"color": [1, 2, 3], "class": 3}]}},
     "sources[0]: mask maps a value to class 3"),
    ("remap to 255 without ignore_index", {"ignore_index": DELETE, "sources.0.mask": {"remap": {"0": 255}}},
     "class 255, but there are 3 classes (0..2) and the ignore index is None"),
    ("unmapped ignore without ignore_index", {"ignore_index": DELETE, "sources.0.mask": {"unmapped": "ignore"}},
     "sources[0]: mask.unmapped is 'ignore' but the manifest has no ignore_index"),
    ("target_mpp with a source lacking mpp", {"target_mpp": 1.0, "sources.0.mpp": DELETE},
     "target_mpp is 1.0 but source 'data' has no 'mpp'"),
    ("class named twice", {"classes.2.name": "Tumour"}, "names a class twice: ['other', 'tumour', 'Tumour']"),
    ("unknown unannotated class", {"sources.0.unannotated": "fat"}, "unannotated class 'fat' is not one of"),
    ("slides in a paired_folders source",
     {"sources.0.splits.val": {"slides": [{"slide": "a.svs", "annotations": "a.geojson"}]}},
     "sources[0]: split 'val' does not fit layout 'paired_folders' (images and masks expected)"),
    ("folders in an annotated_slides source", {"sources.0.layout": "annotated_slides"},
     "sources[0]: split 'train' does not fit layout 'annotated_slides' (slides expected)"),
    ("missing root", {"sources.0.root": "nowhere"}, "sources[0]: root folder"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edits", "detail"), [c[1:] for c in CONSISTENCY_ERRORS], ids=[c[0] for c in CONSISTENCY_ERRORS]
)
def test_inconsistent_manifest_is_an_input_error(tmp_path: Path, edits: dict[str, Any], detail: str) -> None:
    path = write_base(tmp_path, edits)
    with pytest.raises(InputError) as error:
        load_manifest(path)
    assert str(error.value).startswith(f"manifest {str(path)!r}")
    assert detail in str(error.value)


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("name: [unclosed\n", "is not valid YAML"),
        ("classes:\n  - name: a\n bad indent: 1\n", "is not valid YAML"),
        ("", "is not valid at top level: None is not of type 'object'"),
        ("- a list\n", "is not valid at top level"),
        ("name: 2024-05-01\n", "holds a value YAML reads as a non-JSON type"),
    ],
    ids=["unclosed", "indentation", "empty", "list", "date"],
)
def test_unreadable_manifest_is_an_input_error(tmp_path: Path, text: str, detail: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=r"broken\.yaml") as error:
        load_manifest(path)
    assert detail in str(error.value)


def test_invalid_yaml_error_gives_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("manifest_version: 1\nname: x\nclasses: [{name: a}, {name: b}\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"(?s)is not valid YAML: .*line 3, column 10"):
        load_manifest(path)


def test_missing_manifest_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"manifest '.*nothing\.yaml' does not exist; give the path of a dataset"):
        load_manifest(tmp_path / "nothing.yaml")
    with pytest.raises(InputError, match="does not exist"):
        load_manifest(tmp_path)  # a folder is not a manifest


# --- ${VAR} expansion and relative paths ----------------------------------------------------------


def test_expand_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_TEST_SET", "/data/set")
    monkeypatch.setenv("WSI_TEST_EMPTY", "")
    monkeypatch.delenv("WSI_TEST_UNSET", raising=False)
    assert expand_env("${WSI_TEST_SET}/camvid", where="w") == "/data/set/camvid"
    assert expand_env("${WSI_TEST_SET:-/elsewhere}/camvid", where="w") == "/data/set/camvid"
    assert expand_env("${WSI_TEST_UNSET:-../shared/data}/camvid", where="w") == "../shared/data/camvid"
    assert expand_env("${WSI_TEST_EMPTY:-fallback}", where="w") == "fallback"  # empty counts as unset, as in sh
    assert expand_env("${WSI_TEST_UNSET:-}x", where="w") == "x"
    assert expand_env("a/${WSI_TEST_SET}/${WSI_TEST_UNSET:-b}/c", where="w") == "a//data/set/b/c"
    assert expand_env("$WSI_TEST_SET and plain text", where="w") == "$WSI_TEST_SET and plain text"


@pytest.mark.parametrize("variable", ["WSI_TEST_UNSET", "WSI_TEST_EMPTY"])
def test_expand_env_without_default_needs_the_variable(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_TEST_EMPTY", "")
    monkeypatch.delenv("WSI_TEST_UNSET", raising=False)
    message = f"my place uses ${{{variable}}} but {variable} is not set; set it (export {variable}=...) and retry."
    with pytest.raises(InputError) as error:
        expand_env(f"${{{variable}}}/data", where="my place")
    assert str(error.value) == message


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/manifests/sub`` (the manifest's folder) and ``tmp_path/cwd`` (the working directory)."""
    (tmp_path / "manifests" / "sub").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def load_with_root(layout: Path, root: str) -> DatasetManifest:
    return load_manifest(
        write_yaml(layout / "manifests" / "sub" / "m.yaml", edited(base_manifest(), {"sources.0.root": root}))
    )


@pytest.mark.parametrize(
    ("root", "environment", "expected"),
    [
        ("../data", {}, "manifests/data"),
        ("${WSI_TEST_UNSET:-../data}", {}, "manifests/data"),
        ("${WSI_TEST_UNSET:-data}/../../data", {}, "manifests/data"),
        ("${WSI_TEST_REL}/data", {"WSI_TEST_REL": "rel"}, "cwd/rel/data"),
        ("${WSI_TEST_REL:-../data}", {"WSI_TEST_REL": "rel/data"}, "cwd/rel/data"),
        ("${WSI_TEST_EMPTY:-../data}", {"WSI_TEST_EMPTY": ""}, "manifests/data"),
        ("../${WSI_TEST_REL}", {"WSI_TEST_REL": "data"}, "manifests/data"),  # not leading: the manifest's folder
        ("~/data", {"HOME": "{tmp}/home"}, "home/data"),
        ("${WSI_TEST_ABS}/data", {"WSI_TEST_ABS": "{tmp}/abs"}, "abs/data"),
    ],
    ids=["relative", "default", "default-then-up", "set-relative", "set-over-default", "empty-set", "inner", "home",
         "absolute"],
)  # fmt: skip
def test_root_resolution(
    layout: Path, root: str, environment: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WSI_TEST_UNSET", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value.replace("{tmp}", str(layout)))
    (layout / expected).mkdir(parents=True)
    (source,) = load_with_root(layout, root).sources
    assert source.root == (layout / expected).resolve()
    assert source.root.is_absolute()


def test_missing_root_names_the_resolved_folder(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_TEST_REL", "rel")
    with pytest.raises(InputError) as error:
        load_with_root(layout, "${WSI_TEST_REL}/data")
    expected = str((layout / "cwd" / "rel" / "data").resolve())
    assert f"root folder {expected!r} does not exist; fix 'root' or the variables it uses" in str(error.value)


def test_split_and_slide_paths_are_relative_to_the_root(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_TEST_ABS", str(layout / "annotations"))
    (layout / "manifests" / "slides").mkdir()
    data = edited(
        base_manifest(),
        {
            "sources.0": {
                "layout": "annotated_slides",
                "root": "../slides",
                "splits": {
                    "train": {
                        "slides": [
                            {"slide": "a.svs", "annotations": "a.geojson", "mpp": 0.5},
                            {"slide": "sub/b.tif", "annotations": "${WSI_TEST_ABS}/b.geojson"},
                        ]
                    }
                },
            }
        },
    )
    manifest = load_manifest(write_yaml(layout / "manifests" / "sub" / "m.yaml", data))
    (source,) = manifest.sources
    split = source.splits["train"]
    assert isinstance(split, SlideSplit)
    root = (layout / "manifests" / "slides").resolve()
    assert [(e.slide, e.annotations, e.mpp) for e in split.slides] == [
        (root / "a.svs", root / "a.geojson", 0.5),
        (root / "sub" / "b.tif", (layout / "annotations" / "b.geojson").resolve(), None),
    ]
    assert source.tile_size == 512


# --- decode_mask ----------------------------------------------------------------------------------


def decode(raw: list[Any], encoding: MaskEncoding, num_classes: int = 3, ignore: int | None = 255) -> list[Any]:
    array = np.array(raw, dtype=np.uint8)
    before = array.copy()
    labels = decode_mask(array, encoding, num_classes, ignore, where="mask 'm.png'")
    np.testing.assert_array_equal(array, before)  # input arrays are never modified
    assert labels.dtype == np.uint8
    assert labels.shape == array.shape[:2]
    result: list[Any] = labels.tolist()
    return result


def test_decode_passes_class_indices_and_the_ignore_index() -> None:
    assert decode([[0, 1, 2, 255]], MaskEncoding()) == [[0, 1, 2, 255]]
    assert decode([[[2, 9, 9], [0, 9, 9]]], MaskEncoding()) == [[2, 0]]  # a 3-channel mask uses its first channel


def test_decode_threshold() -> None:
    raw = [[0, 1, 127, 128, 200, 255]]
    assert decode(raw, MaskEncoding(threshold=128)) == [[0, 0, 0, 1, 1, 1]]
    assert decode(raw, MaskEncoding(threshold=1)) == [[0, 1, 1, 1, 1, 1]]
    # Threshold first, then remap: 0/1 after thresholding.
    assert decode(raw, MaskEncoding(threshold=128, remap={0: 2, 1: 0})) == [[2, 2, 2, 0, 0, 0]]
    assert decode([[[250, 0, 0], [3, 255, 255]]], MaskEncoding(threshold=128)) == [[1, 0]]  # JPEG RGB mask: channel 0


def test_decode_remap() -> None:
    encoding = MaskEncoding(remap={0: 255, 1: 1, 2: 0})  # breast-tumour's bcss-224 remap
    assert decode([[0, 1, 2, 2, 1]], encoding) == [[255, 1, 0, 0, 1]]
    assert decode([[1, 1]], encoding) == [[1, 1]]  # mapped values that do not occur change nothing
    assert decode([[0, 7]], MaskEncoding(remap={7: 2, 300: 1})) == [[0, 2]]  # keys beyond the mask's values


@pytest.mark.parametrize(("unmapped", "expected"), [("keep", [[11, 1, 0, 2, 1]]), ("ignore", [[11, 11, 0, 11, 11]])])
def test_decode_remap_unmapped_values(unmapped: Unmapped, expected: list[list[int]]) -> None:
    # 1 and 2 (valid classes) are absent from remap: kept, or made the ignore index (here 11); 40 does not occur.
    encoding = MaskEncoding(remap={0: 11, 3: 0, 40: 1}, unmapped=unmapped)
    assert decode([[0, 1, 3, 2, 1]], encoding, ignore=11) == expected


def test_decode_remap_with_unmapped_error_names_the_values() -> None:
    encoding = MaskEncoding(remap={0: 0, 255: 1}, unmapped="error")
    assert decode([[0, 255, 0]], encoding) == [[0, 1, 0]]
    with pytest.raises(InputError, match=r"^mask 'm\.png': mask values \[3, 128\] are not in mask\.remap; add them\.$"):
        decode([[0, 3, 255, 128, 3]], encoding)


def test_decode_colours() -> None:
    encoding = MaskEncoding(colors=(((128, 64, 128), 0), ((0, 0, 142), 2), ((255, 255, 255), 1)))
    raw = [[[128, 64, 128], [0, 0, 142]], [[255, 255, 255], [128, 64, 128]]]
    assert decode(raw, encoding) == [[0, 2], [1, 0]]
    rgba = [[[0, 0, 142, 0], [255, 255, 255, 255]]]  # alpha does not take part
    assert decode(rgba, encoding) == [[2, 1]]


@pytest.mark.parametrize("unmapped", ["keep", "error"])
def test_decode_unmatched_colours_is_an_error(unmapped: Unmapped) -> None:
    encoding = MaskEncoding(colors=(((128, 64, 128), 0),), unmapped=unmapped)
    raw = [[[128, 64, 128], [1, 2, 3]], [[1, 2, 3], [128, 64, 129]]]
    with pytest.raises(InputError) as error:
        decode(raw, encoding)
    assert str(error.value) == (
        "mask 'm.png': 3 pixels have colours not in mask.colors, e.g. (1, 2, 3); "
        "add them to 'colors' or set mask.unmapped: ignore."
    )


@pytest.mark.parametrize(("ignore", "expected"), [(255, 255), (11, 11)])
def test_decode_unmatched_colours_ignored(ignore: int, expected: int) -> None:
    encoding = MaskEncoding(colors=(((128, 64, 128), 0), ((0, 0, 0), 1)), unmapped="ignore")
    raw = [[[128, 64, 128], [1, 2, 3], [0, 0, 0]]]
    assert decode(raw, encoding, ignore=ignore) == [[0, expected, 1]]


@pytest.mark.parametrize(
    ("raw", "num_classes", "ignore", "values", "classes"),
    [
        ([[0, 1, 7]], 2, None, "[7]", "0..1; "),
        ([[0, 3, 4, 255, 3]], 3, 255, "[3, 4]", "0..2 or the ignore index 255; "),
        ([[0, 11, 12]], 11, 11, "[12]", "0..10 or the ignore index 11; "),
    ],
)
def test_decode_out_of_range_values_suggest_remap_or_threshold(
    raw: list[list[int]], num_classes: int, ignore: int | None, values: str, classes: str
) -> None:
    with pytest.raises(InputError) as error:
        decode(raw, MaskEncoding(), num_classes=num_classes, ignore=ignore)
    message = str(error.value)
    assert message.startswith(f"mask 'm.png': mask values {values} are not class indices {classes}")
    assert "mask.remap (e.g. {255: 1})" in message
    assert "mask.threshold for lossy masks" in message


def test_decode_out_of_range_after_remap() -> None:
    with pytest.raises(InputError, match=r"mask values \[9\] are not class indices"):
        decode([[0, 9]], MaskEncoding(remap={0: 1}))  # 9 is unmapped and kept, and no class


def test_decode_without_ignore_index_rejects_255() -> None:
    with pytest.raises(InputError, match=r"mask values \[255\] are not class indices 0\.\.1; "):
        decode([[0, 1, 255]], MaskEncoding(), num_classes=2, ignore=None)


def test_decode_unmapped_ignore_alone_ignores_values_that_are_no_class() -> None:
    assert decode([[0, 2, 5]], MaskEncoding(unmapped="ignore")) == [[0, 2, 255]]


# --- CamVid -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def camvid(shared_data: Path) -> DatasetManifest:
    return load_shipped("camvid.yaml", shared_data)


def test_camvid_pairs(camvid: DatasetManifest) -> None:
    assert camvid.class_names[:4] == ("sky", "building", "pole", "road")
    assert (camvid.num_classes, camvid.ignore_index, camvid.target_mpp) == (11, 11, None)
    for split, images, masks, count in (("train", "train", "trainannot", 367), ("val", "val", "valannot", 101)):
        samples = list_samples(camvid, split)
        assert len(samples) == count
        assert len({s.name for s in samples}) == count
        for sample in samples:
            assert sample.image_path is not None
            assert sample.mask_path is not None
            assert (sample.image_path.parent.name, sample.mask_path.parent.name) == (images, masks)
            assert sample.image_path.stem == sample.mask_path.stem == sample.name
    with pytest.raises(InputError, match=r"has no split 'test'; its splits are: train, val\."):
        list_samples(camvid, "test")


def test_camvid_samples_are_480x360_with_classes_and_void(camvid: DatasetManifest) -> None:
    found: set[int] = set()
    for split in ("train", "val"):
        for sample in list_samples(camvid, split):
            image, labels = load_sample(camvid, sample)
            assert image.shape == (360, 480, 3)
            assert image.dtype == np.uint8
            assert labels.shape == (360, 480)
            assert labels.dtype == np.uint8
            found.update(np.unique(labels).tolist())
    assert found == set(range(12))  # classes 0..10 and void (11), nothing else


# --- breast tumour --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def breast_tumour(shared_data: Path) -> DatasetManifest:
    return load_shipped("breast-tumour.yaml", shared_data)


@pytest.fixture(scope="module")
def breast_samples(breast_tumour: DatasetManifest) -> dict[str, list[Sample]]:
    return {split: list_samples(breast_tumour, split) for split in ("train", "val", "test")}


def test_breast_tumour_manifest(breast_tumour: DatasetManifest) -> None:
    assert breast_tumour.class_names == ("other tissue", "tumour")
    assert (breast_tumour.kind, breast_tumour.target_mpp, breast_tumour.ignore_index) == ("histology", 1.0, IGNORE)
    sources = {s.name: s for s in breast_tumour.sources}
    assert {name: s.mpp for name, s in sources.items()} == {
        "bcss-roi-binary": 0.25,
        "camelyon-tiles": 0.97,
        "bcss-224": 0.25,
    }
    assert sources["bcss-roi-binary"].mask == MaskEncoding(threshold=128)
    assert sources["bcss-224"].mask.remap == {0: IGNORE, 1: TUMOUR, 2: OTHER}
    assert breast_tumour.split_names == ("train", "val", "test")


def test_breast_tumour_held_out_splits(breast_samples: dict[str, list[Sample]], shared_data: Path) -> None:
    files = {split: {s.image_path for s in samples} for split, samples in breast_samples.items()}
    assert files["train"].isdisjoint(files["val"])
    assert files["test"].isdisjoint(files["train"] | files["val"])
    val: dict[str, set[str]] = {}
    for sample in breast_samples["val"]:
        val.setdefault(sample.source.name, set()).add(sample.name)
    assert val == BREAST_VAL
    assert {s.source.name for s in breast_samples["test"]} == {"bcss-224"}
    # Every image of the folders is in exactly one split.
    biopsy = shared_data.resolve() / "biopsy"
    for folder in ("bcss-roi-binary", "camelyon-tiles", "bcss-224"):
        on_disk = set((biopsy / folder / "images").iterdir())
        listed = [s.image_path for split in breast_samples.values() for s in split if s.source.name == folder]
        assert sorted(on_disk) == sorted(listed)  # type: ignore[type-var]
    assert len(breast_samples["test"]) == 8


@pytest.mark.parametrize(("source", "name"), [("bcss-roi-binary", "1019"), ("camelyon-tiles", "10072")])
def test_jpeg_masks_are_thresholded_to_0_and_1(
    breast_tumour: DatasetManifest, breast_samples: dict[str, list[Sample]], source: str, name: str
) -> None:
    sample = by_name(breast_samples["val"])[source, name]
    raw = read_raw(sample.mask_path)
    assert raw.ndim == 3  # JPEG masks are RGB ...
    assert np.count_nonzero((raw > 0) & (raw < 255)) > 0  # ... and lossy: not only 0 and 255
    image, labels = load_sample(breast_tumour, sample, target_mpp=sample.source.mpp)  # native: no resampling
    assert labels.shape == image.shape[:2] == raw.shape[:2]
    assert set(np.unique(labels).tolist()) == {OTHER, TUMOUR}
    np.testing.assert_array_equal(labels, raw[..., 0] >= 128)


@pytest.mark.parametrize(
    ("split", "source", "name", "shape"),
    [
        ("val", "bcss-roi-binary", "1019", (640, 768)),  # 3072x2560 at 0.25 um/px
        ("train", "bcss-roi-binary", "1008", (640, 896)),  # 3584x2560
        ("train", "bcss-roi-binary", "1015", (512, 1024)),  # 4096x2048
        ("val", "camelyon-tiles", "10073", (497, 497)),  # 512x512 at 0.97 um/px
        ("test", "bcss-224", "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0_0_1120_size224", (56, 56)),
    ],
)
def test_breast_samples_are_resampled_to_1_um_per_pixel(
    breast_tumour: DatasetManifest,
    breast_samples: dict[str, list[Sample]],
    split: str,
    source: str,
    name: str,
    shape: tuple[int, int],
) -> None:
    image, labels = load_sample(breast_tumour, by_name(breast_samples[split])[source, name])
    assert image.shape == (*shape, 3)
    assert labels.shape == shape
    assert image.dtype == labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {OTHER, TUMOUR, IGNORE}
    assert 50 < image.mean() < 250  # stained tissue, not a blank or garbled resize


def test_resampling_keeps_the_tumour_share(
    breast_tumour: DatasetManifest, breast_samples: dict[str, list[Sample]]
) -> None:
    shares = []
    for sample in breast_samples["train"] + breast_samples["val"]:
        _, full = load_sample(breast_tumour, sample, target_mpp=sample.source.mpp)
        _, resampled = load_sample(breast_tumour, sample)
        assert resampled.size < full.size
        shares.append((np.mean(full == TUMOUR), np.mean(resampled == TUMOUR)))
    full_shares, resampled_shares = np.array(shares).T
    np.testing.assert_allclose(resampled_shares, full_shares, atol=0.01)
    assert (full_shares > 0.05).sum() >= 10  # most samples hold tumour, so the check means something


def test_mpp_within_1_percent_of_the_target_is_not_resampled(
    breast_tumour: DatasetManifest, breast_samples: dict[str, list[Sample]]
) -> None:
    sample = by_name(breast_samples["val"])["camelyon-tiles", "10072"]
    assert load_sample(breast_tumour, sample, target_mpp=0.975)[1].shape == (512, 512)
    assert load_sample(breast_tumour, sample, target_mpp=0.95)[1].shape == (523, 523)  # 512 * 0.97 / 0.95


def test_bcss_224_remap_in_breast_tumour(
    breast_tumour: DatasetManifest, breast_samples: dict[str, list[Sample]]
) -> None:
    found: set[int] = set()
    for sample in breast_samples["test"]:
        raw = read_raw(sample.mask_path)
        _, labels = load_sample(breast_tumour, sample, target_mpp=0.25)
        expected = np.select([raw == 0, raw == 1, raw == 2], [IGNORE, TUMOUR, OTHER], default=99)
        np.testing.assert_array_equal(labels, expected)
        found.update(np.unique(raw).tolist())
    assert found == {0, 1, 2}  # every remapped value occurs


def test_bcss_224_manifest(shared_data: Path) -> None:
    manifest = load_shipped("bcss-224.yaml", shared_data)
    assert manifest.class_names == ("other", "tumour", "stroma")
    train, val = list_samples(manifest, "train"), list_samples(manifest, "val")
    assert [s.name for s in val] == [BCSS_224_VAL]
    assert len(train) == 7
    assert BCSS_224_VAL not in {s.name for s in train}
    for sample in [*train, *val]:
        image, labels = load_sample(manifest, sample)  # target_mpp 0.25: native size, raw ids kept
        assert image.shape == (224, 224, 3)
        np.testing.assert_array_equal(labels, read_raw(sample.mask_path))


# --- user datasets built in tmp_path ---------------------------------------------------------------


def cityscapes_label_ids() -> NDArray[np.uint8]:
    """``(1024, 2048)`` labelIds: four 256-row bands, see CITYSCAPES_BANDS."""
    return np.repeat(np.array([label_id for label_id, _ in CITYSCAPES_BANDS], dtype=np.uint8), 256)[:, None].repeat(
        2048, axis=1
    )


@pytest.fixture(scope="module")
def cityscapes_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Cityscapes layout with the two real sample frames (one per split) and written labelIds masks."""
    root = tmp_path_factory.mktemp("cityscapes")
    frames = shared_data / "espnet-original" / "cityscapes-samples"
    for split, name in CITYSCAPES_FRAMES.items():
        images = root / "leftImg8bit" / split / "frankfurt"
        masks = root / "gtFine" / split / "frankfurt"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        shutil.copyfile(frames / f"{name}_leftImg8bit.png", images / f"{name}_leftImg8bit.png")
        Image.fromarray(cityscapes_label_ids()).save(masks / f"{name}_gtFine_labelIds.png")
        # Cityscapes' other ground-truth files sit beside the labelIds and must not be taken for them.
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(masks / f"{name}_gtFine_instanceIds.png")
    return root


def test_cityscapes_layout(
    cityscapes_root: Path, cityscapes_frame: NDArray[np.uint8], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CITYSCAPES_ROOT", str(cityscapes_root))
    manifest = load_manifest(MANIFESTS / "cityscapes.yaml")
    for split, name in CITYSCAPES_FRAMES.items():
        (sample,) = list_samples(manifest, split)
        assert sample.name == f"frankfurt/{name}"
        assert sample.mask_path == cityscapes_root.resolve() / "gtFine" / split / "frankfurt" / (
            f"{name}_gtFine_labelIds.png"
        )
        image, labels = load_sample(manifest, sample)  # no target_mpp: full size
        assert image.shape == (1024, 2048, 3)
        assert labels.shape == (1024, 2048)
        if split == "train":
            np.testing.assert_array_equal(image, cityscapes_frame)
        for band, (_, train_id) in enumerate(CITYSCAPES_BANDS):
            assert np.all(labels[band * 256 : (band + 1) * 256] == train_id)


def test_user_breast_biopsy_folders(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bcss = shared_data / "biopsy" / "bcss-224"
    name = f"{BCSS_224_VAL}.png"
    for split in ("train", "val", "test"):
        for folder in ("images", "masks"):
            (tmp_path / split / folder).mkdir(parents=True)
            shutil.copyfile(bcss / folder / name, tmp_path / split / folder / name)
    monkeypatch.setenv("BREAST_BIOPSY_ROOT", str(tmp_path))
    manifest = load_manifest(MANIFESTS / "breast-biopsy-8class.yaml")
    (sample,) = list_samples(manifest, "test")
    image, labels = load_sample(manifest, sample)  # 224 px at 0.5 um/px -> 112 px at 1.0
    assert image.shape == (112, 112, 3)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}


@pytest.fixture
def camvid_copy(shared_data: Path, tmp_path: Path) -> Path:
    """camvid.yaml over three real CamVid pairs copied to ``tmp_path/data/{images,masks}`` (changeable)."""
    camvid = shared_data / "street" / "camvid"
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for name in CAMVID_PAIRS:
        shutil.copyfile(camvid / "train" / f"{name}.png", tmp_path / "data" / "images" / f"{name}.png")
        shutil.copyfile(camvid / "trainannot" / f"{name}.png", tmp_path / "data" / "masks" / f"{name}.png")
    raw = yaml.safe_load((MANIFESTS / "camvid.yaml").read_text(encoding="utf-8"))
    raw["sources"][0].update(root="data", splits={"train": {"images": "images", "masks": "masks"}})
    return write_yaml(tmp_path / "camvid-copy.yaml", raw)


def test_folder_pairs_ignore_other_files(camvid_copy: Path) -> None:
    images = camvid_copy.parent / "data" / "images"
    (images / "README.txt").write_text("not an image", encoding="utf-8")
    (images / "Thumbs.db").write_bytes(b"")
    shutil.copyfile(images / f"{CAMVID_PAIRS[0]}.png", images / "._hidden.png")
    (images / "sub").mkdir()  # not recursive: sub-folders are not searched
    shutil.copyfile(images / f"{CAMVID_PAIRS[0]}.png", images / "sub" / "deep.png")
    assert [s.name for s in list_samples(load_manifest(camvid_copy), "train")] == list(CAMVID_PAIRS)


def test_files_and_exclude_select_pairs(camvid_copy: Path) -> None:
    data = yaml.safe_load(camvid_copy.read_text(encoding="utf-8"))
    data["sources"][0]["splits"] = {
        "train": {"images": "images", "masks": "masks", "exclude": [CAMVID_PAIRS[1]]},
        "val": {"images": "images", "masks": "masks", "files": [CAMVID_PAIRS[1]]},
    }
    manifest = load_manifest(write_yaml(camvid_copy, data))
    assert [s.name for s in list_samples(manifest, "train")] == [CAMVID_PAIRS[0], CAMVID_PAIRS[2]]
    assert [s.name for s in list_samples(manifest, "val")] == [CAMVID_PAIRS[1]]


def test_missing_mask_is_an_input_error(camvid_copy: Path) -> None:
    (camvid_copy.parent / "data" / "masks" / f"{CAMVID_PAIRS[1]}.png").unlink()
    with pytest.raises(InputError) as error:
        list_samples(load_manifest(camvid_copy), "train")
    image = camvid_copy.parent.resolve() / "data" / "images" / f"{CAMVID_PAIRS[1]}.png"
    assert str(error.value) == (
        f"source 'camvid', split 'train': 1 image(s) have no mask in "
        f"{str(camvid_copy.parent.resolve() / 'data' / 'masks')!r}, e.g. {str(image)!r}; "
        "masks must have the image's name."
    )


def test_missing_mask_with_a_suffix_names_the_suffix(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "leftImg8bit" / "val" / "lindau"
    images.mkdir(parents=True)
    (tmp_path / "gtFine" / "val" / "lindau").mkdir(parents=True)
    shutil.copyfile(shared_data / "street" / "camvid" / "val" / "0016E5_07959.png", images / "lindau_1_leftImg8bit.png")
    (tmp_path / "gtFine" / "val" / "lindau_1_gtFine_labelIds.png").write_bytes(b"")  # in the wrong folder
    monkeypatch.setenv("CITYSCAPES_ROOT", str(tmp_path))
    message = r"1 image\(s\) have no mask in .*lindau_1_leftImg8bit\.png'; masks must have the image's name \+ '_gtFine"
    with pytest.raises(InputError, match=message + r"_labelIds\.png'\.$"):
        list_samples(load_manifest(MANIFESTS / "cityscapes.yaml"), "val")


def test_listed_file_that_does_not_exist_is_an_input_error(camvid_copy: Path) -> None:
    data = yaml.safe_load(camvid_copy.read_text(encoding="utf-8"))
    data["sources"][0]["splits"]["train"]["files"] = [CAMVID_PAIRS[0], "0001TP_999999", "0001TP_006690.png"]
    with pytest.raises(InputError) as error:
        list_samples(load_manifest(write_yaml(camvid_copy, data)), "train")
    assert str(error.value) == (
        "source 'camvid', split 'train' lists files that are not there: ['0001TP_006690.png', '0001TP_999999']."
    )


def test_exclude_entry_that_names_no_pair_is_an_input_error(camvid_copy: Path) -> None:
    data = yaml.safe_load(camvid_copy.read_text(encoding="utf-8"))
    data["sources"][0]["splits"]["train"]["exclude"] = ["0001TP_00669"]  # a typo of CAMVID_PAIRS[0]
    with pytest.raises(InputError, match="0001TP_00669"):
        list_samples(load_manifest(write_yaml(camvid_copy, data)), "train")


def test_mask_of_another_size_is_an_input_error(camvid_copy: Path) -> None:
    mask = camvid_copy.parent / "data" / "masks" / f"{CAMVID_PAIRS[2]}.png"
    with Image.open(mask) as full:
        full.resize((240, 180), Image.Resampling.NEAREST).save(mask)
    manifest = load_manifest(camvid_copy)
    sample = list_samples(manifest, "train")[2]
    with pytest.raises(InputError) as error:
        load_sample(manifest, sample)
    assert str(error.value) == (
        f"mask {str(sample.mask_path)!r} is 240x180 but its image is 480x360; image and mask must have the same size."
    )


def test_unreadable_image_and_mask_are_input_errors(camvid_copy: Path) -> None:
    manifest = load_manifest(camvid_copy)
    first, second, _ = list_samples(manifest, "train")
    assert first.image_path is not None
    assert second.mask_path is not None
    first.image_path.write_bytes(first.image_path.read_bytes()[:500])  # truncated PNG
    second.mask_path.write_text("not a PNG", encoding="utf-8")
    with pytest.raises(InputError, match=r"cannot read image .*is it a complete PNG/JPEG/TIFF\?"):
        load_sample(manifest, first)
    with pytest.raises(InputError, match=r"cannot read mask .*is it a complete PNG/JPEG/TIFF\?"):
        load_sample(manifest, second)


def test_out_of_range_mask_value_names_the_mask(camvid_copy: Path) -> None:
    mask = camvid_copy.parent / "data" / "masks" / f"{CAMVID_PAIRS[0]}.png"
    labels = read_raw(mask).copy()
    labels[:10, :10] = 200
    Image.fromarray(labels).save(mask)
    manifest = load_manifest(camvid_copy)
    with pytest.raises(InputError, match=rf"^mask '.*{CAMVID_PAIRS[0]}\.png': mask values \[200\] .*mask\.remap"):
        load_sample(manifest, list_samples(manifest, "train")[0])


def test_missing_and_empty_folders_are_input_errors(camvid_copy: Path) -> None:
    data = yaml.safe_load(camvid_copy.read_text(encoding="utf-8"))
    data["sources"][0]["splits"] = {
        "train": {"images": "imgs", "masks": "masks"},
        "val": {"images": "empty", "masks": "empty"},
    }
    (camvid_copy.parent / "data" / "empty").mkdir()
    manifest = load_manifest(write_yaml(camvid_copy, data))  # folders are checked when listed
    with pytest.raises(InputError, match=r"^source 'camvid', split 'train': images folder '.*imgs' does not exist\.$"):
        list_samples(manifest, "train")
    with pytest.raises(InputError, match=r"^split 'val' of manifest '.*' has no samples; check its folders\.$"):
        list_samples(manifest, "val")


def test_colour_coded_masks_through_a_manifest(tmp_path: Path) -> None:
    colours = {(200, 0, 0): 1, (0, 200, 0): 2, (0, 0, 0): 0}
    mask = np.zeros((6, 8, 3), dtype=np.uint8)
    mask[:3] = (200, 0, 0)
    mask[3:, :4] = (0, 200, 0)
    mask[5, 7] = (9, 9, 9)  # no class: ignored
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    Image.fromarray(np.full((6, 8, 3), 128, dtype=np.uint8)).save(tmp_path / "data" / "images" / "a.jpg")
    Image.fromarray(mask).save(tmp_path / "data" / "masks" / "a.png")
    path = write_base(
        tmp_path,
        {
            "sources.0.mask": {
                "colors": [{"color": list(c), "class": k} for c, k in colours.items()],
                "unmapped": "ignore",
            }
        },
    )
    manifest = load_manifest(path)
    image, labels = load_sample(manifest, *list_samples(manifest, "train"))
    expected = np.zeros((6, 8), dtype=np.uint8)
    expected[:3], expected[3:, :4], expected[5, 7] = 1, 2, IGNORE
    np.testing.assert_array_equal(labels, expected)
    assert image.shape == (6, 8, 3)


def test_palette_mask_is_decoded_by_its_colours(tmp_path: Path) -> None:
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    Image.fromarray(np.full((2, 2, 3), 128, dtype=np.uint8)).save(tmp_path / "data" / "images" / "a.png")
    mask = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    mask.putpalette([0, 200, 0, 200, 0, 0])  # index 0 is green, index 1 red
    mask.save(tmp_path / "data" / "masks" / "a.png")
    colors = [{"color": [200, 0, 0], "class": 0}, {"color": [0, 200, 0], "class": 1}]
    manifest = load_manifest(write_base(tmp_path, {"sources.0.mask": {"colors": colors, "unmapped": "error"}}))
    _, labels = load_sample(manifest, *list_samples(manifest, "train"))
    np.testing.assert_array_equal(labels, [[1, 0], [0, 1]])


# --- annotated slides -----------------------------------------------------------------------------


def label_at(samples: list[Sample], scale: float, x: float, y: float) -> int:
    """The label of the tile pixel covering level-0 point (x, y); a tile's origin is in its name."""
    for sample in samples:
        assert sample.labels is not None
        origin_x, origin_y = (float(v) for v in sample.name.rsplit("@", 1)[1].split(","))
        col, row = math.floor((x - origin_x) / scale), math.floor((y - origin_y) / scale)
        if 0 <= row < sample.labels.shape[0] and 0 <= col < sample.labels.shape[1]:
            return int(sample.labels[row, col])
    raise AssertionError(f"no tile covers ({x}, {y})")


@pytest.fixture
def cmu_manifest(shared_data: Path, tmp_path: Path) -> dict[str, Any]:
    """An annotated-slides manifest in tmp_path: CMU-1-Small-Region with the fixture's QuPath export."""
    write_cmu_annotations(tmp_path / "cmu.geojson")
    slide = str((shared_data / CMU_SLIDE).resolve())
    return {
        "manifest_version": 1,
        "name": "cmu",
        "kind": "histology",
        "target_mpp": 1.0,
        "classes": [{"name": "other tissue"}, {"name": "tumour"}],
        "ignore_index": IGNORE,
        "sources": [
            {
                "layout": "annotated_slides",
                "root": ".",
                "tile_size": 256,
                "class_map": {"Stroma": "other tissue"},
                "splits": {"train": {"slides": [{"slide": slide, "annotations": "cmu.geojson"}]}},
            }
        ],
    }


@pytest.mark.parametrize("unannotated", [None, "other tissue"])
def test_annotated_slides_manifest(cmu_manifest: dict[str, Any], tmp_path: Path, unannotated: str | None) -> None:
    if unannotated is not None:
        cmu_manifest["sources"][0]["unannotated"] = unannotated
    manifest = load_manifest(write_yaml(tmp_path / "cmu.yaml", cmu_manifest))
    samples = list_samples(manifest, "train")
    assert len(samples) >= 4
    found: set[int] = set()
    for sample in samples:
        assert sample.name.startswith("CMU-1-Small-Region@")
        assert sample.image_path is None
        assert sample.image is not None
        assert sample.labels is not None
        assert sample.image.shape == (256, 256, 3)
        assert sample.image.dtype == sample.labels.dtype == np.uint8
        image, labels = load_sample(manifest, sample)
        assert image is sample.image
        assert labels is sample.labels
        found.update(np.unique(sample.labels).tolist())
    assert found == {OTHER, TUMOUR, IGNORE}  # past the slide's lower edge stays ignored even with unannotated

    scale = 1.0 / 0.499  # level-0 pixels per tile pixel
    (x0, y0), _, (x1, y1), _ = TUMOUR_IN_STROMA[0]
    assert label_at(samples, scale, (x0 + x1) / 2, (y0 + y1) / 2) == TUMOUR  # small tumour wins over the stroma around
    assert label_at(samples, scale, 1500, 2800) == OTHER  # "Stroma" via class_map
    assert label_at(samples, scale, 900, 1800) == TUMOUR
    hole = TUMOUR_WITH_HOLE[1]
    hole_x, hole_y = (sum(v) / 4 for v in zip(*hole, strict=True))
    assert label_at(samples, scale, hole_x, hole_y) == (IGNORE if unannotated is None else OTHER)


def test_annotated_slides_manifest_matches_sample_annotated_tiles(
    cmu_manifest: dict[str, Any], shared_data: Path, tmp_path: Path
) -> None:
    manifest = load_manifest(write_yaml(tmp_path / "cmu.yaml", cmu_manifest))
    samples = list_samples(manifest, "train", target_mpp=2.0)  # target_mpp overrides the manifest's
    tiles = sample_annotated_tiles(
        shared_data / CMU_SLIDE,
        tmp_path / "cmu.geojson",
        manifest.class_names,
        target_mpp=2.0,
        tile_size=256,
        ignore_index=IGNORE,
        class_map={"Stroma": "other tissue"},
    )
    assert len(samples) == len(tiles)
    for sample, tile in zip(samples, tiles, strict=True):
        assert sample.name == f"CMU-1-Small-Region@{round(tile.origin_xy[0])},{round(tile.origin_xy[1])}"
        np.testing.assert_array_equal(sample.labels, tile.labels)
        np.testing.assert_array_equal(sample.image, tile.image)


def test_annotated_slides_need_a_target_mpp(cmu_manifest: dict[str, Any], tmp_path: Path) -> None:
    del cmu_manifest["target_mpp"]
    manifest = load_manifest(write_yaml(tmp_path / "cmu.yaml", cmu_manifest))
    with pytest.raises(InputError, match="annotated slides need a target_mpp to sample tiles at; add one"):
        list_samples(manifest, "train")


def test_annotated_slides_example_with_real_files(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copyfile(shared_data / CMU_SLIDE, tmp_path / "slide-03.svs")  # the val slide; train's are not read
    write_cmu_annotations(tmp_path / "slide-03.geojson")
    monkeypatch.setenv("ANNOTATED_SLIDES_ROOT", str(tmp_path))
    manifest = load_manifest(MANIFESTS / "annotated-slides-example.yaml")
    samples = list_samples(manifest, "val")
    assert samples
    assert all(s.name.startswith("slide-03@") and s.labels is not None for s in samples)
    assert {v for s in samples if s.labels is not None for v in np.unique(s.labels).tolist()} == {
        manifest.class_names.index("other tissue"),
        manifest.class_names.index("tumour"),
        IGNORE,
    }


# --- the cross-source folds of the breast model (benchmarks/breast_folds.py) --------------------
FOLDS = sorted((MANIFESTS / "breast-tumour-folds").glob("held-out-*.yaml"))
FOLD_NAMES = {
    "bcss-224": "held-out-bcss-224", "bcss-roi-binary": "held-out-bcss-regions", "camelyon-tiles": "held-out-camelyon",
}  # fmt: skip


def test_the_shipped_model_trains_on_every_source_and_validates_on_each(shared_data):
    manifest = load_shipped("breast-tumour-all.yaml", shared_data)
    assert manifest.class_names == load_shipped("breast-tumour.yaml", shared_data).class_names
    train, val = list_samples(manifest, "train"), list_samples(manifest, "val")
    sources = {"bcss-224", "bcss-roi-binary", "camelyon-tiles"}
    assert {s.source.name for s in train} == {s.source.name for s in val} == sources
    assert not {(s.source.name, s.name) for s in train} & {(s.source.name, s.name) for s in val}
    assert "test" not in manifest.split_names  # the folds are its test


def test_breast_folds_each_hold_out_one_whole_source(shared_data):
    assert len(FOLDS) == 3
    held_out = []
    for path in FOLDS:
        manifest = load_shipped(str(path.relative_to(MANIFESTS)), shared_data)
        assert manifest.class_names == load_shipped("breast-tumour.yaml", shared_data).class_names
        (test_source,) = [s.name for s in manifest.sources if "test" in s.splits]
        held_out.append(test_source)
        assert path.stem == FOLD_NAMES[test_source]
        test = list_samples(manifest, "test")
        assert test
        assert {s.source.name for s in test} == {test_source}
        for split in ("train", "val"):
            samples = list_samples(manifest, split)
            assert samples, f"{path.name} has no {split} samples"
            assert test_source not in {s.source.name for s in samples}, f"{path.name} trains on its test source"
        # Every file of the held-out source is tested, not a part of it.
        source = next(s for s in manifest.sources if s.name == test_source)
        assert len(test) == len(list((source.root / "images").iterdir()))
    assert sorted(held_out) == ["bcss-224", "bcss-roi-binary", "camelyon-tiles"]
