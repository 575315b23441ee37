"""The record of files already hashed: valid only while the file is unchanged and the manifest's sha256 agrees."""

import os

import pytest

from lowvram import verified


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWVRAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_file_stays_verified_until_it_changes(cache, tmp_path):
    f = tmp_path / "block_000.safetensors"
    f.write_bytes(b"x" * 100)
    assert not verified.is_verified(f, "aa")
    verified.mark_verified(f, "aa")
    assert verified.is_verified(f, "aa")
    assert not verified.is_verified(f, "bb")  # the manifest now lists another hash
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched (or rewritten with the same size)
    assert not verified.is_verified(f, "aa")
    verified.mark_verified(f, "aa")
    f.write_bytes(b"x" * 101)  # rewritten
    assert not verified.is_verified(f, "aa")
    assert not verified.is_verified(tmp_path / "missing.safetensors", "aa")


def test_an_unusable_cache_only_costs_the_hashing(cache, tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"1")
    cache.mkdir()
    (cache / "verified-files.json").write_text("{not json")
    assert not verified.is_verified(f, "aa")
    verified.mark_verified(f, "aa")  # a damaged record file is replaced
    assert verified.is_verified(f, "aa")
    assert [p.name for p in cache.iterdir()] == ["verified-files.json"]  # no temp file left


def test_a_cache_that_cannot_be_written_is_no_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("LOWVRAM_CACHE_DIR", str(blocker / "cache"))  # mkdir fails (even as root)
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"1")
    verified.mark_verified(f, "aa")
    assert not verified.is_verified(f, "aa")


def test_a_quantized_file_is_hashed_once_then_again_when_it_changes(cache, tmp_path, monkeypatch):
    import hashlib

    import torch
    from safetensors.torch import save_file

    from lowvram import quantized
    from lowvram.errors import CheckpointError

    path = tmp_path / "block_000.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(path))
    manifest = {"files": {path.name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}}
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(quantized.hashlib, "sha256", lambda data=b"": hashed.append(len(data)) or real(data))
    first = quantized.read_listed(tmp_path, path.name, manifest, "cpu")
    second = quantized.read_listed(tmp_path, path.name, manifest, "cpu")  # another run: the record says intact
    assert torch.equal(first["w"], second["w"]) and len(hashed) == 1
    save_file({"w": torch.arange(6, dtype=torch.float32) + 1}, str(path))  # changed behind the manifest's back
    with pytest.raises(CheckpointError, match="does not match manifest.json"):
        quantized.read_listed(tmp_path, path.name, manifest, "cpu")
    assert len(hashed) == 2
