"""The committed-asset archive (services.assets): same bytes on every pack, content checked on unpack, and a
cached directory with other weights refused rather than overwritten."""

from __future__ import annotations

import json

import pytest

from services.assets import AssetMismatch, digest, pack, unpack


def _built(root, name="colour-abc", weight=b"\x00\x01weights"):
    d = root / name
    (d / "transformer").mkdir(parents=True)
    (d / "transformer" / "model.safetensors").write_bytes(weight)
    (d / "meta.json").write_text(json.dumps({"v": 3, "torch_threads": 1}))
    return d


def test_pack_is_deterministic_and_unpack_restores_the_same_content(tmp_path):
    src = _built(tmp_path / "cache")
    a = pack(src, tmp_path / "out1")
    b = pack(src, tmp_path / "out2")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "out1" / "colour-abc.sha256").read_text().split() == [digest(src), "colour-abc"]
    got = unpack(a, tmp_path / "fresh")
    assert got == tmp_path / "fresh" / "colour-abc" and digest(got) == digest(src)
    assert (got / "transformer" / "model.safetensors").read_bytes() == b"\x00\x01weights"
    assert unpack(a, tmp_path / "fresh") == got  # already there with the same content: kept
    assert not [p for p in (tmp_path / "fresh").iterdir() if p.name.startswith(".unpack-")]


def test_a_cached_build_with_other_weights_is_refused_not_overwritten(tmp_path):
    archive = pack(_built(tmp_path / "cache"), tmp_path / "out")
    other = _built(tmp_path / "local", weight=b"other rounding")
    with pytest.raises(AssetMismatch, match="holds other weights"):
        unpack(archive, tmp_path / "local")
    assert (other / "transformer" / "model.safetensors").read_bytes() == b"other rounding"


def test_an_archive_that_does_not_match_its_manifest_is_refused(tmp_path):
    archive = pack(_built(tmp_path / "cache"), tmp_path / "out")
    manifest = tmp_path / "out" / "colour-abc.sha256"
    manifest.write_text(f"{'0' * 64}  colour-abc\n")
    with pytest.raises(AssetMismatch, match="is not the manifest's"):
        unpack(archive, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "colour-abc").exists()
    assert not list((tmp_path / "fresh").iterdir())


def test_digest_sees_a_changed_byte_and_a_renamed_file(tmp_path):
    src = _built(tmp_path / "cache")
    before = digest(src)
    (src / "transformer" / "model.safetensors").write_bytes(b"\x00\x02weights")
    changed = digest(src)
    (src / "transformer" / "model.safetensors").rename(src / "transformer" / "other.safetensors")
    assert len({before, changed, digest(src)}) == 3


def test_prepare_on_an_empty_cache_unpacks_the_committed_colour_testbed_and_trains_nothing(tmp_path):
    """docs/tasks/colour_sweep/assets holds testbed v3 (docs/tasks/colour.md): ``prepare_colour`` at
    deploy/configs/colour_nft.yaml's settings, on an empty cache, takes every part from it and trains nothing."""
    from pathlib import Path

    from services.assets import COMMITTED
    from services.prepare_colour import prepare_colour

    (archive,) = COMMITTED.glob("colour-*.tar.gz")
    lines: list[str] = []
    assets = prepare_colour(pretrain_steps=1200, cache_dir=tmp_path, log=lines.append)
    cached = Path(assets.model_path)
    assert cached == tmp_path / archive.name.removesuffix(".tar.gz")
    assert digest(cached) == (COMMITTED / f"{cached.name}.sha256").read_text().split()[0]
    assert any("the committed testbed" in s for s in lines), lines
    assert not [s for s in lines if "pretraining" in s or "training the colour" in s], lines


def test_a_local_build_with_other_weights_is_kept_and_named(tmp_path, monkeypatch):
    import services.assets as assets

    archive = pack(_built(tmp_path / "cache"), tmp_path / "committed")
    monkeypatch.setattr(assets, "COMMITTED", archive.parent)
    local = _built(tmp_path / "local", weight=b"another machine's rounding")
    with pytest.warns(UserWarning, match="not on the committed testbed"):
        assert not assets.restore_committed(local)
    assert (local / "transformer" / "model.safetensors").read_bytes() == b"another machine's rounding"
    assert assets.restore_committed(tmp_path / "empty" / "colour-abc", log=lambda s: None)
    assert digest(tmp_path / "empty" / "colour-abc") == digest(tmp_path / "cache" / "colour-abc")


def test_a_copy_published_by_another_process_meanwhile_is_kept_when_it_is_the_same(tmp_path, monkeypatch):
    """Two trials unpacking at once on a fresh machine: the one whose rename loses keeps the winner's copy."""
    import os as os_mod

    import services.assets as assets

    src = _built(tmp_path / "cache")
    archive = pack(src, tmp_path / "out")
    real_replace = os_mod.replace

    def lose_the_race(a, b):
        real_replace(a, b)  # the other process's copy lands first ...
        raise OSError(39, "Directory not empty")  # ... so this one's rename fails

    monkeypatch.setattr(assets.os, "replace", lose_the_race)
    got = unpack(archive, tmp_path / "fresh")
    assert digest(got) == digest(src)
    assert not [p for p in (tmp_path / "fresh").iterdir() if p.name.startswith(".unpack-")]
