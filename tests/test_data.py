import logging
import sys

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from eigen_export.data import calibration_batch, eval_windows, load_text, pycode_files, token_ids
from eigen_export.errors import EigenExportError


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    # 20 lines x 10 distinct words = 200 tokens for the word tokenizer (unknown words map to [UNK], which is fine)
    path.write_text("".join(" ".join(f"w{i}_{j}" for j in range(10)) + "\n" for i in range(20)), encoding="utf-8")
    return path


def test_ptb_splits_are_the_standard_lm_files():
    # DESIGN 9: 887,521 / 70,390 / 78,669 words, one sentence per line
    for split, words in (("train", 887_521), ("valid", 70_390), ("test", 78_669)):
        assert len(load_text("ptb", split).split()) == words
    assert load_text("ptb", "test").startswith(" no it was n't black monday \n")
    assert load_text("ptb", "validation") == load_text("ptb", "valid")


def test_pycode_splits_are_disjoint_stdlib_source_without_the_held_out_reference():
    import pydoc_data.topics

    train, valid, test = (set(pycode_files(split)) for split in ("train", "valid", "test"))
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert len(valid) > 10 and len(test) > 10
    assert 4_000_000 <= sum(p.stat().st_size for p in train) < 4_500_000   # the cap, plus the file that crossed it
    assert not any({"test", "tests", "pydoc_data", "encodings"} & set(p.parts) for p in train | valid | test)
    text = load_text("pycode", "test")
    assert "def " in text and "import " in text
    train, valid, test = (load_text("pycode", split) for split in ("train", "valid", "test"))
    # the benches' second held-out text must not leak into calibration
    topic = pydoc_data.topics.topics["if"][:200]
    assert all(topic not in text for text in (train, valid, test))


def test_a_mix_draws_an_equal_share_of_windows_from_each_text(word_tokenizer, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("".join(" ".join(f"v{i}_{j}" for j in range(10)) + "\n" for i in range(200)), encoding="utf-8")
    mix = f"{text_file}+{other}"
    ids_a, ids_b = token_ids(word_tokenizer, str(text_file)), token_ids(word_tokenizer, str(other))
    assert torch.equal(token_ids(word_tokenizer, mix), torch.cat([ids_a, ids_b]))
    batch = calibration_batch(word_tokenizer, mix, nsamples=5, seqlen=16, seed=3)
    assert batch.shape == (5, 16)
    # 3 windows from the first text, 2 from the second (10x larger), each as that text alone draws them
    assert torch.equal(batch[:3], calibration_batch(word_tokenizer, str(text_file), nsamples=3, seqlen=16, seed=3))
    assert torch.equal(batch[3:], calibration_batch(word_tokenizer, str(other), nsamples=2, seqlen=16, seed=3))
    assert load_text(mix) == text_file.read_text() + "\n\n" + other.read_text()
    assert eval_windows(word_tokenizer, mix, seqlen=100).shape == ((ids_a.numel() + ids_b.numel()) // 100, 100)
    plus = tmp_path / "c++.txt"               # a file whose name holds a + is one text, not a mix
    plus.write_text(text_file.read_text(), encoding="utf-8")
    assert load_text(str(plus)) == text_file.read_text()


def test_bad_mixes(word_tokenizer, text_file):
    assert "empty part" in _error(lambda: load_text("ptb++pycode"))
    assert "unknown dataset 'ptb2'" in _error(lambda: load_text("pycode+ptb2"))
    message = _error(lambda: calibration_batch(word_tokenizer, f"ptb+{text_file}", nsamples=1, seqlen=8))
    assert "mixes 2 texts" in message and "--nsamples 2" in message
    message = _error(lambda: calibration_batch(word_tokenizer, f"ptb+{text_file}", nsamples=8, seqlen=64))
    assert f"text file {text_file} has 200 tokens" in message and "4 x 64" in message


def test_calibration_batch_shape_and_determinism(word_tokenizer):
    a = calibration_batch(word_tokenizer, "ptb", nsamples=8, seqlen=64, seed=0)
    b = calibration_batch(word_tokenizer, "ptb", nsamples=8, seqlen=64, seed=0)
    c = calibration_batch(word_tokenizer, "ptb", nsamples=8, seqlen=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_windows_are_contiguous_text(word_tokenizer, text_file):
    ids = token_ids(word_tokenizer, str(text_file))
    batch = calibration_batch(word_tokenizer, str(text_file), nsamples=4, seqlen=16, seed=3)
    spans = ids.unfold(0, 16, 1)            # spans: [n_tokens - 15, 16], every contiguous window
    for row in batch:
        assert (spans == row).all(dim=1).any()


def test_eval_windows_are_consecutive_and_non_overlapping(word_tokenizer):
    ids = token_ids(word_tokenizer, "ptb", "test")
    windows = eval_windows(word_tokenizer, "ptb", seqlen=512)
    assert windows.shape == (ids.numel() // 512, 512)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    assert eval_windows(word_tokenizer, "ptb", seqlen=512, max_windows=3).shape == (3, 512)


def test_eval_windows_with_bos(word_tokenizer):
    ids = token_ids(word_tokenizer, "ptb", "test")
    windows = eval_windows(word_tokenizer, "ptb", seqlen=128, max_windows=5, bos=True)
    assert windows.shape == (5, 128)
    assert (windows[:, 0] == word_tokenizer.bos_token_id).all()
    assert torch.equal(windows[:, 1:].flatten(), ids[: 5 * 127])


def test_tokenized_split_is_cached_and_never_aliased(word_tokenizer):
    ids = token_ids(word_tokenizer, "ptb", "test")
    assert token_ids(word_tokenizer, "ptb", "test") is ids
    before = ids[:4].clone()
    eval_windows(word_tokenizer, "ptb", seqlen=4, max_windows=1)[0] += 1
    calibration_batch(word_tokenizer, "ptb", nsamples=1, seqlen=4, split="test")[0] += 1
    assert torch.equal(ids[:4], before)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    # transformers logs through its own handler and does not propagate, so caplog cannot see it
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    yield records.messages
    logger.removeHandler(records)


def test_long_text_gives_no_too_long_warning(word_tokenizer, text_file, transformers_log):
    # a fresh tokenizer: transformers warns once per tokenizer, so an earlier warning would hide this one
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer.backend_tokenizer, model_max_length=64)
    assert tokenizer.model_max_length < token_ids(tokenizer, str(text_file)).numel()
    assert not any("longer than the specified maximum" in m for m in transformers_log)
    tokenizer("a b c " * 100)              # the warning this test guards against does reach the handler
    assert any("longer than the specified maximum" in m for m in transformers_log)


def test_local_text_file(word_tokenizer, text_file):
    assert load_text(str(text_file)) == load_text(str(text_file), split="test") == text_file.read_text()
    assert eval_windows(word_tokenizer, str(text_file), seqlen=50).shape == (4, 50)
    assert calibration_batch(word_tokenizer, str(text_file), nsamples=4, seqlen=50).shape == (4, 50)
    # an edited file is tokenized afresh, not served from the cache
    text_file.write_text(text_file.read_text() * 2, encoding="utf-8")
    assert eval_windows(word_tokenizer, str(text_file), seqlen=50).shape == (8, 50)


def _error(call) -> str:
    with pytest.raises(EigenExportError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_dataset_names_and_files(tmp_path):
    assert "unknown dataset 'ptb2'" in _error(lambda: load_text("ptb2"))
    assert "wikitext2" in _error(lambda: load_text("ptb2"))
    assert "not found" in _error(lambda: load_text(str(tmp_path / "missing.txt")))
    assert "not a file" in _error(lambda: load_text(str(tmp_path)))
    assert "unknown split 'dev'" in _error(lambda: load_text("ptb", "dev"))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    assert "has no text" in _error(lambda: load_text(str(empty)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert "not UTF-8" in _error(lambda: load_text(str(latin1)))


def test_hub_datasets_explain_what_they_need(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)   # as if `datasets` were not installed
    message = _error(lambda: load_text("wikitext2", "test"))
    assert "pip install datasets" in message and "hub" in message and "ptb" in message


def test_bad_sizes(word_tokenizer, text_file):
    path = str(text_file)
    message = _error(lambda: calibration_batch(word_tokenizer, path, nsamples=8, seqlen=64))
    assert "has 200 tokens" in message and "8 x 64 = 512" in message and "--nsamples" in message
    assert "nsamples" in _error(lambda: calibration_batch(word_tokenizer, path, nsamples=0, seqlen=8))
    assert "seqlen" in _error(lambda: calibration_batch(word_tokenizer, path, nsamples=1, seqlen=0))
    assert "seqlen" in _error(lambda: eval_windows(word_tokenizer, path, seqlen=0))
    assert "max_windows" in _error(lambda: eval_windows(word_tokenizer, path, seqlen=8, max_windows=0))
    assert "fewer than one window" in _error(lambda: eval_windows(word_tokenizer, path, seqlen=201))
    assert "--seqlen" in _error(lambda: eval_windows(word_tokenizer, path, seqlen=1, bos=True))


def test_bos_needs_a_bos_token(word_tokenizer, text_file):
    no_bos = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer.backend_tokenizer, unk_token="[UNK]")
    assert no_bos.bos_token_id is None
    assert "no BOS token" in _error(lambda: eval_windows(no_bos, str(text_file), seqlen=8, bos=True))
