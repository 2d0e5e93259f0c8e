"""The reference model on CUDA in fp16 / bf16: cached generation still equals recomputation, and the
low-precision logits stay close to fp32. Skips without a CUDA GPU (CI has none)."""
import pytest
import torch

from eigen_export.method.calibrate import calibrate
from eigen_export.method.fold import fold_state
from eigen_export.loading import StreamedModel, build_decoder, decoder_from_hf_model
from eigen_export.modeling import LayerRanks, default_position_ids
from tests.helpers.tiny_models import ptb_like_ids, tiny_hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

# bf16 keeps 8 mantissa bits: logits of O(1) differ from fp32 by a few 1e-2
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,mode", [("llama-gqa", "pre"), ("llama-gqa", "post"), ("opt", None), ("mpt", None)])
def test_folded_model_on_cuda(name, mode, dtype):
    hf = tiny_hf_model(name)
    model = decoder_from_hf_model(hf)
    layers = calibrate(model, ptb_like_ids(4, 24), mode, progress=False)
    d = model.spec.head_dim
    ranks = [LayerRanks(d // 2, 3 * d // 4)] * model.spec.num_layers
    state = fold_state(model.state_dict(), [c.projections() for c in layers], ranks, model.spec, mode)
    reference = build_decoder(hf.config, state, ranks, mode)                        # fp32 on CPU
    gpu = build_decoder(hf.config, state, ranks, mode, dtype=dtype, device="cuda")
    ids = ptb_like_ids(2, 12, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        want = reference(ids, mask)[0]
        got, past = gpu(ids.cuda(), mask.cuda())
        assert past[0][0].dtype == dtype and past[0][0].shape[-1] == d // 2
        real = mask.bool()
        assert (got.float().cpu() - want)[real].abs().max().item() <= TOLERANCE[dtype]
        # one cached decode step equals recomputing the longer sequence, in the same dtype
        nxt = got[:, -1].argmax(-1, keepdim=True)
        mask2 = torch.cat([mask.cuda(), torch.ones_like(nxt)], 1)
        step = gpu(nxt, mask2, default_position_ids(mask2, ids.shape[1]), past)[0][:, -1]
        full = gpu(torch.cat([ids.cuda(), nxt], 1), mask2)[0][:, -1]
        assert (step.float() - full.float()).abs().max().item() <= TOLERANCE[dtype]


def _cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _cuda_provider(), reason="onnxruntime-gpu (the `gpu` extra) is not installed")
def test_onnxruntime_gpu_keeps_the_cache_on_the_gpu(exports):
    """With onnxruntime-gpu the backend takes the CUDA provider, binds CUDA memory, returns presents on the GPU,
    and matches the CPU session of the same export (fp32; kernels differ: 1e-3)."""
    from eigen_export.backends import OnnxRuntimeBackend

    _, onnx_dir, _, _ = exports.get("llama-gqa", "post")
    gpu = OnnxRuntimeBackend(onnx_dir)
    cpu = OnnxRuntimeBackend(onnx_dir, providers=["CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu.device.type == "cuda"
    ids = ptb_like_ids(2, 9, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    positions = default_position_ids(mask, 0)
    logits, past = gpu.forward(ids.cuda(), mask.cuda(), positions.cuda(), None)
    assert logits.is_cuda and all(k.is_cuda and v.is_cuda for k, v in past)
    want, want_past = cpu.forward(ids, mask, positions, None)
    assert (logits.cpu() - want)[mask.bool()].abs().max().item() <= 1e-3
    step = torch.tensor([[3], [4]])
    mask2 = torch.cat([mask, torch.ones_like(step)], 1)
    positions2 = default_position_ids(mask2, 9)
    got, _ = gpu.forward(step.cuda(), mask2.cuda(), positions2.cuda(), past)      # the cache never left the GPU
    want, _ = cpu.forward(step, mask2, positions2, want_past)
    assert (got.cpu() - want).abs().max().item() <= 1e-3


def test_streamed_calibration_on_a_gpu_equals_the_cpu_one_wherever_the_inputs_are_kept(tmp_path):
    """What `calibrate --device cuda` runs: layers streamed from shards onto the GPU, the kept layer inputs on
    the GPU or in host memory (method.calibrate.activation_home), the same bases as on CPU."""
    hf = tiny_hf_model("llama-gqa")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    ids = ptb_like_ids(4, 24)
    results = {}
    for device, home in (("cpu", None), ("cuda", "cuda"), ("cuda", "cpu")):
        streamed = StreamedModel(tmp_path, dtype="float32", device=device)
        streamed.load_head()
        results[device, home] = calibrate(streamed.model, ids, "pre", progress=False, layer=streamed.block,
                                          activations=home)
    want = results["cpu", None]
    for got in (results["cuda", "cuda"], results["cuda", "cpu"]):
        for a, b in zip(want, got):
            assert b.eig_k.device.type == "cpu"
            torch.testing.assert_close(b.eig_k, a.eig_k, rtol=1e-3, atol=1e-5 * a.eig_k.max().item())
            torch.testing.assert_close(b.cost_v, a.cost_v, rtol=1e-3, atol=1e-5 * a.cost_v.max().item())
