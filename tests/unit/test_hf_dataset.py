"""`data.hf_dataset`: rows of a `datasets` dataset -> the same records and samples a folder gives.

Datasets are built here (save_to_disk folders, parquet files, imagefolders) from tiny images; nothing loads a model
and only the test marked `hub` talks to the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from stylekit.data import hub
from stylekit.data.dataset import dataset_hash, prepare_samples
from stylekit.errors import UsageError

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def own_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The stylekit cache and datasets' own cache of converted files, per test."""
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path / "stylekit-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    datasets.disable_progress_bars()
    yield tmp_path / "stylekit-cache" / hub.MATERIALIZED_DIR


def png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def short_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def image_table(columns: dict[str, list[Any]], image_columns: tuple[str, ...] = ("image",)) -> Any:
    """A Dataset whose image columns hold encoded bytes, as datasets pulled from the hub do."""
    table = {
        name: [None if v is None else {"bytes": v, "path": None} for v in values]
        if name in image_columns
        else values
        for name, values in columns.items()
    }
    ds = datasets.Dataset.from_dict(table)
    for name in image_columns:
        ds = ds.cast_column(name, datasets.Image())
    return ds


def saved(tmp: Path, columns: dict[str, list[Any]], **kwargs: Any) -> Path:
    folder = tmp / "saved"
    image_table(columns, **kwargs).save_to_disk(str(folder))
    return folder


def cfg(source: Path | str, **overrides: Any) -> dict[str, Any]:
    data = {"mode": "resize", "hf_dataset": str(source), "resolution": 32, "max_upscale": 2.0}
    data.update(overrides)
    return data


def records(source: Path | str, **overrides: Any) -> list:
    return list(dict.fromkeys(s.record for s in prepare_samples(cfg(source, **overrides))))


def error(source: Path | str, **overrides: Any) -> str:
    with pytest.raises(UsageError) as raised:
        prepare_samples(cfg(source, **overrides))
    message = str(raised.value)
    assert "\n" not in message
    return message


def imagefolder(tmp: Path) -> Path:
    """Two images captioned in metadata.jsonl, each with a control image named by control_file_name."""
    folder = tmp / "imagefolder"
    folder.mkdir()
    rows = []
    for i in range(2):
        (folder / f"photo{i}.png").write_bytes(png(i))
        (folder / f"source{i}.png").write_bytes(png(50 + i))
        rows.append(
            {
                "file_name": f"photo{i}.png",
                "text": f"[trigger] photo {i}",
                "control_file_name": f"source{i}.png",
            }
        )
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


# --------------------------------------------------------------------------- rows -> records


def test_saved_dataset_rows_become_records_with_text_captions_triggers_and_the_instance_prompt(
    tmp_path: Path, own_caches: Path
) -> None:
    images = [png(0), png(1), png(2)]
    source = saved(tmp_path, {"image": images, "text": ["a [trigger] cat", "  a dog  ", ""]})

    found = records(source, trigger="sks", instance_prompt="a photo")

    assert [r.caption for r in found] == ["a sks cat", "a dog", "a photo"]
    assert [r.content_hash for r in found] == [short_sha(b) for b in images]
    assert all(r.size == (48, 40) and r.control_path is None for r in found)
    for record, data in zip(found, images, strict=True):
        assert record.path.is_relative_to(own_caches) and record.path.suffix == ".png"
        assert record.path.read_bytes() == data


def test_caption_column_is_used_and_without_a_text_column_captions_come_from_the_instance_prompt(
    tmp_path: Path,
) -> None:
    source = saved(tmp_path, {"image": [png(0), png(1)], "text": ["t0", "t1"], "caption": ["c0", "c1"]})
    assert [r.caption for r in records(source, caption_column="caption")] == ["c0", "c1"]
    assert [r.caption for r in records(source)] == ["t0", "t1"]

    bare = tmp_path / "bare"
    image_table({"image": [png(0)], "label": [3]}).save_to_disk(str(bare))
    assert [r.caption for r in records(bare, instance_prompt="a [trigger] photo", trigger="zxq")] == [
        "a zxq photo"
    ]


def test_rows_left_without_a_caption_are_counted_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = saved(tmp_path, {"image": [png(0), png(1), png(2)], "text": ["a cat", None, " "]})
    with caplog.at_level(logging.WARNING):
        assert [r.caption for r in records(source)] == ["a cat", "", ""]
    (warning,) = [r.getMessage() for r in caplog.records if "no caption" in r.getMessage()]
    assert warning.startswith(
        f"2 of 3 rows of data.hf_dataset={source} have no caption (nothing in column 'text'"
    )


def test_cached_files_are_named_by_content_with_the_extension_of_their_format(
    tmp_path: Path, own_caches: Path
) -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(jpeg, format="JPEG")
    table = datasets.Dataset.from_dict({"image": [{"bytes": jpeg.getvalue(), "path": "photo.png"}]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))

    (record,) = records(tmp_path / "saved")

    digest = hashlib.sha256(jpeg.getvalue()).hexdigest()
    assert record.path == own_caches / digest[:2] / f"{digest[:32]}.jpg"


def test_trigger_in_a_caption_without_data_trigger_names_the_row_and_column(tmp_path: Path) -> None:
    source = saved(tmp_path, {"image": [png(0), png(1)], "text": ["plain", "a [trigger] cat"]})
    message = error(source)
    assert "row 1 column 'text'" in message and "data.trigger" in message


def test_parquet_file_folder_and_saved_copy_give_the_same_records_and_hash(tmp_path: Path) -> None:
    table = image_table({"image": [png(0), png(1)], "text": ["one", "two"]})
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "parquet").mkdir()
    table.to_parquet(str(tmp_path / "parquet" / "train-00000.parquet"))

    from_saved = records(tmp_path / "saved")
    from_file = records(tmp_path / "parquet" / "train-00000.parquet")
    from_folder = records(tmp_path / "parquet")

    assert from_saved == from_file == from_folder
    assert len({dataset_hash(from_saved), dataset_hash(from_file), dataset_hash(from_folder)}) == 1


def test_split_picks_the_rows_of_that_split(tmp_path: Path) -> None:
    train = image_table({"image": [png(0), png(1)], "text": ["train a", "train b"]})
    test = image_table({"image": [png(9)], "text": ["held out"]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "files").mkdir()
    train.to_parquet(str(tmp_path / "files" / "train-00000.parquet"))
    test.to_parquet(str(tmp_path / "files" / "test-00000.parquet"))

    for source in (tmp_path / "dict", tmp_path / "files"):
        assert [r.caption for r in records(source)] == ["train a", "train b"]
        assert [r.caption for r in records(source, split="test")] == ["held out"]
        assert [r.caption for r in records(source, split="train[1:]")] == ["train b"]
        assert [r.caption for r in records(source, split="test+train[:50%]")] == ["held out", "train a"]


def test_a_malformed_split_is_one_line_before_anything_loads(tmp_path: Path) -> None:
    assert error(tmp_path / "never-read", split="train[:") == (
        "data.split=train[:: not a split name or slice (Unrecognized instruction format: train[:); use e.g. "
        "train, train[:100] or train[:10%]"
    )


def test_imagefolder_images_are_read_in_place_with_their_captions_and_controls(
    tmp_path: Path, own_caches: Path
) -> None:
    folder = imagefolder(tmp_path)

    found = records(folder, trigger="sks", control_column="control")

    assert [r.path for r in found] == [folder / "photo0.png", folder / "photo1.png"]
    assert [r.control_path for r in found] == [folder / "source0.png", folder / "source1.png"]
    assert [r.caption for r in found] == ["sks photo 0", "sks photo 1"]
    assert [r.control_hash for r in found] == [short_sha(png(50)), short_sha(png(51))]
    assert not own_caches.exists()  # nothing was copied


def test_control_column_pairs_each_row_and_rows_without_one_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = saved(
        tmp_path,
        {"image": [png(0), png(1)], "source": [png(20), None], "text": ["a", "b"]},
        image_columns=("image", "source"),
    )
    with caplog.at_level(logging.WARNING):
        found = records(source, control_column="source")

    assert [(r.caption, r.control_hash) for r in found] == [("a", short_sha(png(20)))]
    assert found[0].control_path.read_bytes() == png(20)
    assert any("row 1: no control image in column 'source'" in r.getMessage() for r in caplog.records)


def test_undecodable_and_too_small_rows_are_skipped_with_a_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = saved(
        tmp_path, {"image": [png(0), b"not an image", png(2, size=(8, 8))], "text": ["a", "b", "c"]}
    )
    with caplog.at_level(logging.WARNING):
        found = records(source)

    assert [r.caption for r in found] == ["a"]
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 2
    assert f"data.hf_dataset={source} row 1: unreadable" in warnings[0]
    assert f"data.hf_dataset={source} row 2: too small" in warnings[1]


def test_a_dataset_with_no_usable_row_is_one_line_naming_the_counts(tmp_path: Path) -> None:
    source = saved(tmp_path, {"image": [b"junk", png(1, size=(8, 8))]})
    message = error(source)
    assert message.startswith(f"no usable training images in data.hf_dataset={source} (split train, 2 rows)")
    assert "1 unreadable, 1 too small" in message


# --------------------------------------------------------------------------- samples, cache and identity


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "resize", "repeats": 3, "caption_dropout": 0.5, "crop": "random", "random_flip": 0.5},
        {"mode": "tile", "tile_size": 32, "tile_overlap": 0.25},
    ],
    ids=["resize", "tile"],
)
def test_samples_match_those_of_a_folder_holding_the_same_images(tmp_path: Path, settings: dict) -> None:
    sizes = [(96, 64), (64, 80), (70, 70)]
    images = [png(i, size) for i, size in enumerate(sizes)]
    captions = ["first [trigger]", "second", "third"]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, (data, caption) in enumerate(zip(images, captions, strict=True)):
        (folder / f"img{i}.png").write_bytes(data)
        (folder / f"img{i}.txt").write_text(caption)
    source = saved(tmp_path, {"image": images, "text": captions})
    common = {"resolution": 32, "max_upscale": 4.0, "trigger": "sks", "seed": 3, **settings}

    from_folder = prepare_samples({"dataset_dir": str(folder), **common})
    from_dataset = prepare_samples(cfg(source, **common))

    def layout(samples: list) -> list[tuple]:
        return [(s.record.content_hash, s.box, s.size, s.flip, s.caption) for s in samples]

    assert len(from_dataset) > len(images)  # repeats / several tiles per image
    assert layout(from_dataset) == layout(from_folder)


def test_rerunning_reuses_the_materialized_files_and_keeps_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = saved(tmp_path, {"image": [png(0), png(1)], "text": ["a", "b"]})
    writes: list[Path] = []
    real_write = hub._write_atomically
    monkeypatch.setattr(
        hub, "_write_atomically", lambda target, data: (writes.append(target), real_write(target, data))
    )

    first = records(source)
    assert len(writes) == 2
    stamps = [r.path.stat().st_mtime_ns for r in first]
    again = records(source)

    assert len(writes) == 2  # nothing written the second time
    assert again == first
    assert [r.path.stat().st_mtime_ns for r in again] == stamps
    assert dataset_hash(again) == dataset_hash(first)


def test_a_changed_image_changes_the_dataset_hash_and_the_checkpoint_folder(tmp_path: Path) -> None:
    from stylekit.train.loop import checkpoint_root

    run_cfg = OmegaConf.create(
        {"task_name": "train", "data": cfg("x"), "trainer": {"checkpoint_root": "ckpt"}}
    )
    before = records(saved(tmp_path / "a", {"image": [png(0), png(1)], "text": ["a", "b"]}))
    same = records(saved(tmp_path / "b", {"image": [png(0), png(1)], "text": ["a", "b"]}))
    after = records(saved(tmp_path / "c", {"image": [png(0), png(7)], "text": ["a", "b"]}))

    assert dataset_hash(same) == dataset_hash(before)
    assert dataset_hash(after) != dataset_hash(before)
    assert checkpoint_root(run_cfg, dataset_hash(same)) == checkpoint_root(run_cfg, dataset_hash(before))
    assert checkpoint_root(run_cfg, dataset_hash(after)) != checkpoint_root(run_cfg, dataset_hash(before))


def test_hf_dataset_replaces_dataset_dir_which_is_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "other.png").write_bytes(png(30))
    source = saved(tmp_path, {"image": [png(0)], "text": ["from the dataset"]})

    with caplog.at_level(logging.INFO):
        found = records(source, dataset_dir=str(folder))

    assert [r.caption for r in found] == ["from the dataset"]
    assert any(f"data.dataset_dir={folder} is not read" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- errors


def test_a_missing_column_names_the_columns_there_are(tmp_path: Path) -> None:
    source = saved(tmp_path, {"image": [png(0)], "text": ["a"], "label": [1]})
    assert error(source, image_column="picture") == (
        f"data.image_column=picture: data.hf_dataset={source} has no column 'picture'; its columns are image, "
        "text, label"
    )
    assert error(source, caption_column="caption").startswith("data.caption_column=caption: ")
    assert error(source, control_column="before").startswith("data.control_column=before: ")


def test_a_column_that_holds_no_images_says_its_type_and_names_the_image_columns(tmp_path: Path) -> None:
    source = saved(
        tmp_path,
        {"image": [png(0)], "source": [png(1)], "label": [1], "text": ["a"]},
        image_columns=("image", "source"),
    )
    assert error(source, image_column="label") == (
        f"data.image_column=label: column 'label' of data.hf_dataset={source} holds int64 values, not images; "
        "its image columns are image, source"
    )
    assert "data.control_column=text: column 'text'" in error(source, control_column="text")
    assert "holds string values, not images" in error(source, control_column="text")
    assert error(source, caption_column="label").endswith(
        "holds int64 values, not text; its text columns are text"
    )


@pytest.mark.parametrize("kind", ["saved_dict", "parquet_file", "imagefolder"])
def test_an_unknown_split_names_the_splits_there_are(tmp_path: Path, kind: str) -> None:
    table = image_table({"image": [png(0)], "text": ["a"]})
    if kind == "saved_dict":
        source = tmp_path / "dict"
        datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(source))
        listed = "train, test"
    elif kind == "parquet_file":
        source = tmp_path / "rows.parquet"
        table.to_parquet(str(source))
        listed = "train"
    else:
        source, listed = imagefolder(tmp_path), "train"
    assert error(source, split="validation") == (
        f"data.split=validation: data.hf_dataset={source} has no such split; its splits are {listed}"
    )


@pytest.mark.parametrize("value", ["./no-such-folder", "/no/such/rows.parquet", "photos.parquet", "a/b/c"])
def test_a_path_that_does_not_exist_is_an_error_not_a_hub_lookup(value: str) -> None:
    message = error(value)
    assert message.startswith(f"data.hf_dataset={value}: ")
    assert "does not exist" in message


def test_a_folder_or_file_that_holds_no_dataset_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "rows.csv").write_text("a,b\n")
    assert "holds no dataset" in error(tmp_path / "empty")
    assert "is not a .arrow/.parquet file" in error(tmp_path / "rows.csv")


def test_a_damaged_dataset_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "rows.parquet").write_text("not parquet")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    for name in ("rows.parquet", "saved"):
        message = error(tmp_path / name)
        assert message.startswith(
            f"data.hf_dataset={tmp_path / name}: cannot read {tmp_path / name} as a dataset ("
        )
        assert message.endswith("fix or re-save it (Dataset.save_to_disk, to_parquet)")


def test_a_hub_id_offline_and_not_cached_is_one_line_saying_what_to_do() -> None:
    message = error("someone/not-downloaded")
    assert message.startswith("data.hf_dataset=someone/not-downloaded is not a local path")
    assert "HF_HUB_OFFLINE=1" in message


def test_control_dir_with_hf_dataset_points_at_control_column(tmp_path: Path) -> None:
    source = saved(tmp_path, {"image": [png(0)]})
    message = error(source, control_dir=str(tmp_path))
    assert "data.control_column" in message and "data.control_dir=null" in message


# --------------------------------------------------------------------------- the hub itself


@pytest.mark.hub
def test_a_public_hub_dataset_trains_from_its_images(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    found = records("diffusers/dog-example", instance_prompt="a photo of [trigger] dog", trigger="sks")
    assert found and all(r.caption == "a photo of sks dog" for r in found)
    assert error("diffusers/dog-example", split="validation").startswith("data.split=validation: ")


def test_an_edit_model_without_a_control_column_is_told_to_set_it(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from stylekit.train.run import _with_controls

    samples = prepare_samples(cfg(saved(tmp_path, {"image": [png(0)], "text": ["a"]})))
    family = SimpleNamespace(family="qwen_edit", needs_control=True)
    with pytest.raises(UsageError, match=r"qwen_edit trains on pairs: .* data\.control_column$"):
        _with_controls(samples, family, from_dataset=True)


# --------------------------------------------------------------------------- hydra: sweeps and remote jobs


def test_a_local_dataset_is_uploaded_for_remote_jobs_and_a_hub_id_is_left_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra_plugins.stylekit_launcher import _transfer as transfer
    from hydra_plugins.stylekit_launcher.config import DEFAULT_INPUTS

    monkeypatch.chdir(tmp_path)
    saved(tmp_path, {"image": [png(0)]})
    local = OmegaConf.create({"data": {"hf_dataset": "saved"}})
    staged, updates = transfer.plan_inputs(local, DEFAULT_INPUTS, "/workspace")
    assert [s.key for s in staged] == ["data.hf_dataset"]
    assert updates["data.hf_dataset"].startswith("/workspace/.inputs/")

    remote = OmegaConf.create({"data": {"hf_dataset": "user/photos"}})
    assert transfer.plan_inputs(remote, DEFAULT_INPUTS, "/workspace") == ([], {})


def test_the_data_keys_compose_with_their_defaults_and_stay_out_of_sweep_dir_names(conf_dir: Path) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        tile = compose(
            config_name="train", overrides=["data=tile", "model=tiny_flux"], return_hydra_config=True
        )
    assert {key: tile.data[key] for key in ("hf_dataset", "split", "revision", "image_column")} == {
        "hf_dataset": None,
        "split": "train",
        "revision": None,
        "image_column": "image",
    }
    assert tile.data.caption_column is None and tile.data.control_column is None
    assert "data.hf_dataset" in tile.hydra.job.config.override_dirname.exclude_keys


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (
            ConnectionError("Couldn't reach 'user/photos' on the Hub (ConnectError)"),
            "data.hf_dataset=user/photos: cannot reach the Hugging Face hub (Couldn't reach 'user/photos' on the "
            "Hub (ConnectError)): check the network, or download the dataset where there is one and set "
            "HF_HUB_OFFLINE=1",
        ),
        (
            "Dataset 'user/photos' is a gated dataset on the Hub.",
            "data.hf_dataset=user/photos is gated: accept its terms at https://huggingface.co/datasets/user/photos "
            "with your account, then `hf auth login` or set HF_TOKEN",
        ),
        (
            "Dataset 'user/photos' doesn't exist on the Hub or cannot be accessed.",
            "data.hf_dataset=user/photos is neither a local path nor a dataset on the Hugging Face hub: check the id "
            "or path (private datasets need HF_TOKEN)",
        ),
        (
            "Revision 'v9' doesn't exist for dataset 'user/photos' on the Hub.",
            "data.revision=v9 does not exist in https://huggingface.co/datasets/user/photos: use a branch, tag or "
            "commit of it",
        ),
    ],
    ids=["unreachable", "gated", "missing", "revision"],
)
def test_hub_access_problems_are_one_line_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch, raised: Exception | str, expected: str
) -> None:
    from huggingface_hub import constants

    if isinstance(raised, str):
        raised = datasets.exceptions.DatasetNotFoundError(raised)
    calls: list[tuple] = []

    def load_dataset(*args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))
        raise raised

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)

    assert error("user/photos", revision="v9") == expected
    assert calls == [(("user/photos",), {"split": "train", "revision": "v9"})]


def test_an_unwritable_cache_is_one_line_naming_stylekit_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = saved(tmp_path, {"image": [png(0)]})
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    message = error(source)
    assert message.startswith(f"cannot write dataset images to {tmp_path / 'a-file' / 'cache' / 'images'} (")
    assert message.endswith("set STYLEKIT_CACHE_DIR to a writable folder with free space")


def test_a_dataset_with_several_subsets_needs_data_subset(tmp_path: Path) -> None:
    # A repository whose README declares several configurations, loaded exactly as a hub id is (the folder
    # is passed to load_dataset the way `user/name` is).
    repo = tmp_path / "repo"
    for name, seed in (("alpha", 1), ("beta", 2)):
        (repo / name).mkdir(parents=True)
        image_table({"image": [png(seed)], "text": [name]}).to_parquet(str(repo / name / "train.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: alpha\n  data_files: alpha/*.parquet\n"
        "- config_name: beta\n  data_files: beta/*.parquet\n---\n"
    )
    opts = hub.HubOptions(source=str(repo))
    with pytest.raises(UsageError) as missing:
        hub._load_hub(opts)
    assert str(missing.value) == (
        f"data.hf_dataset={repo}: it has several subsets; pick one with data.subset=NAME: alpha, beta"
    )
    with pytest.raises(UsageError) as unknown:
        hub._load_hub(hub.HubOptions(source=str(repo), subset="gamma"))
    assert "data.subset=gamma is not one of its subsets; pick one with data.subset=NAME: alpha, beta" in str(
        unknown.value
    )
    rows = hub._load_hub(hub.HubOptions(source=str(repo), subset="beta"))
    assert rows["text"] == ["beta"]
