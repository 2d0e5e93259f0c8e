"""The PTB mini models shipped in models/ load with stock transformers and compute what they computed
right after training, so a changed or corrupted checkpoint is caught. No training here: the golden
numbers come from `python models/train_minis.py golden --model all`."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # loads trained checkpoints (pyproject's marker), ~2 s in all

MODELS = Path(__file__).resolve().parents[1] / "models"
MAX_FOLDER_BYTES = 12 * 10**6
EOS_ID = 1
# A PTB test sentence pair; the newline must become `</s>`.
TEXT = "no it was n't black monday\nbut while the new york stock exchange did n't fall apart"
INPUT_IDS = [388, 116, 189, 221, 1709, 1394, 1, 212, 658, 57, 217, 507, 274, 628, 742, 221, 1251, 3903]
GOLDEN_TOKENS = (1, 11, 100, 1000, 5000)
GOLDEN = {  # position -> logits of GOLDEN_TOKENS there, recorded from the fp16 checkpoints upcast to fp32
    "opt": {
        "argmax": [65, 1, 65, 65, 65, 1, 57, 57, 57, 65, 507, 274, 628, 1495, 221, 134, 1, 151],
        "logits": {0: [2.2465, -6.6298, -0.9326, -3.2312, -6.4418],
                   5: [7.3925, -10.3614, -2.344, -3.0474, -10.2903],
                   11: [3.1237, -7.0936, -2.274, -1.7908, -6.9256],
                   17: [4.7435, -10.1965, -3.1028, -2.9182, -10.0566]},
    },
    "llama": {
        "argmax": [65, 126, 221, 3316, 1, 1, 57, 57, 57, 252, 507, 274, 628, 1495, 221, 134, 87, 87],
        "logits": {0: [1.6814, -8.1542, -0.8194, -2.788, -8.0724],
                   5: [7.4484, -11.6294, -2.1923, -5.5242, -11.3708],
                   11: [0.1993, -7.2875, -1.0723, -3.038, -7.1622],
                   17: [4.3862, -6.5382, -2.7502, -4.531, -6.1674]},
    },
}


@pytest.fixture(scope="module", params=("opt", "llama"))
def mini(request):
    folder = MODELS / f"ptb-{request.param}-mini"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return request.param, folder, model, tokenizer


def test_config_is_multi_head_and_stored_in_fp16(mini):
    family, folder, model, _ = mini
    config = model.config
    assert config.model_type == family
    assert config.num_attention_heads == 4 and config.hidden_size // config.num_attention_heads == 64
    # MHA on purpose: the MHA -> GQA merge (DESIGN 3.4) needs a multi-head input.
    assert getattr(config, "num_key_value_heads", config.num_attention_heads) == config.num_attention_heads
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"


def test_folder_is_small(mini):
    _, folder, _, _ = mini
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= MAX_FOLDER_BYTES, f"{folder.name} is {size / 1e6:.2f} MB"


def test_tokenizer_turns_newline_into_eos(mini):
    _, _, _, tokenizer = mini
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == INPUT_IDS
    assert tokenizer.eos_token_id == EOS_ID and ids.count(EOS_ID) == 1
    assert tokenizer.decode(ids) == TEXT.replace("\n", "</s> ")


@torch.no_grad()
def test_golden_logits(mini):
    family, _, model, _ = mini
    golden = GOLDEN[family]
    logits = model(input_ids=torch.tensor([INPUT_IDS])).logits[0]
    assert logits.argmax(-1).tolist() == golden["argmax"]
    for position, expected in golden["logits"].items():
        got = logits[position, list(GOLDEN_TOKENS)]
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-3, rtol=0,
                                   msg=lambda m: f"{family} logits at position {position}: {m}")


def test_recipe_points_at_its_folder(mini):
    from eigen_export.settings import load_recipe

    family, folder, model, _ = mini
    path = MODELS / f"{folder.name}.toml"
    recipe = load_recipe(path)
    assert Path(recipe.resolved_source()) == folder
    assert recipe.family == family
    assert recipe.build.max_context <= model.config.max_position_embeddings
    # rope_mode only means something for RoPE models: written for llama only.
    assert ("rope_mode" in tomllib.loads(path.read_text())["compress"]) == (family == "llama")
