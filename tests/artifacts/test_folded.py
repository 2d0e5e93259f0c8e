"""folded/ (eigen.json + weights): round trip, and every way a damaged or foreign artifact is refused."""
import json

import pytest
import torch

from eigen_export.artifacts.folded import load_folded
from eigen_export.artifacts.layout import MANIFEST, WEIGHTS, WEIGHTS_INDEX, weights_shard
from eigen_export.errors import EigenExportError
from tests.helpers.folds import write_tiny_folded as _write
from tests.helpers.tiny_models import ptb_like_ids


def test_folded_artifact_round_trips(tmp_path):
    out, folded = _write(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MANIFEST, WEIGHTS]
    loaded = load_folded(out)
    ids = ptb_like_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], folded(ids)[0])
    assert not list(tmp_path.glob(".folded.tmp-*"))


def test_weights_over_the_shard_size_are_sharded_with_an_index(tmp_path):
    """What a big fold writes (transformers' shard names and index), at a shard size a tiny model exceeds: it
    loads as the same model, and a damaged or missing shard is refused."""
    out, folded = _write(tmp_path, shard_bytes=40_000)
    index = json.loads((out / WEIGHTS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == weights_shard(0, len(shards)) and not (out / WEIGHTS).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", MANIFEST, WEIGHTS_INDEX, *shards])
    ids = ptb_like_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(load_folded(out)(ids)[0], folded(ids)[0])
    raw = bytearray((out / shards[1]).read_bytes())
    raw[-1] ^= 0xFF
    (out / shards[1]).write_bytes(bytes(raw))
    with pytest.raises(EigenExportError, match="does not match the sha256"):
        load_folded(out)
    (out / shards[1]).unlink()
    with pytest.raises(EigenExportError, match="does not match the sha256"):
        load_folded(out)


def test_manifest_rejects_unknown_keys_and_other_versions(tmp_path):
    out, _ = _write(tmp_path)
    data = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**data, "colour": "red"}))
    with pytest.raises(EigenExportError, match=r"unknown keys \['colour'\]"):
        load_folded(out)
    (out / MANIFEST).write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(EigenExportError, match="version 99"):
        load_folded(out)
    (out / MANIFEST).write_text(json.dumps({**data, "ranks": [[65, 8]] * data["num_layers"]}))
    with pytest.raises(EigenExportError, match="outside"):
        load_folded(out)


def test_weights_that_do_not_match_the_manifest_are_refused(tmp_path):
    out, _ = _write(tmp_path)
    raw = bytearray((out / WEIGHTS).read_bytes())
    raw[-1] ^= 0xFF
    (out / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(EigenExportError, match="does not match the sha256"):
        load_folded(out)
    # a manifest claiming other ranks than the tensors have is named precisely (hash check off)
    out2, _ = _write(tmp_path / "b")
    data = json.loads((out2 / MANIFEST).read_text())
    data["ranks"][0] = [data["ranks"][0][0] - 1, data["ranks"][0][1]]
    (out2 / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(EigenExportError, match="do not match their manifest"):
        load_folded(out2, verify=False)


def test_existing_output_is_kept_without_force(tmp_path):
    out, _ = _write(tmp_path)
    before = (out / MANIFEST).read_text()
    with pytest.raises(EigenExportError, match="already exists"):
        _write(tmp_path)
    assert (out / MANIFEST).read_text() == before
