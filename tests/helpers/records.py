"""Complete, valid stage records written by hand: tests change one field and watch the reader."""
from eigen_export.artifacts.onnx_io import IO_FORMAT, IO_VERSION

IO_INPUTS = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
             {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total"]},
             {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
             {"name": "past_key_values.0.key", "dtype": "float16", "shape": ["batch", 2, "past", 40]},
             {"name": "past_key_values.0.value", "dtype": "float16", "shape": ["batch", 2, "past", 56]}]
IO_OUTPUTS = [{"name": "logits", "dtype": "float16", "shape": ["batch", "seq", 96]},
              {"name": "present.0.key", "dtype": "float16", "shape": ["batch", 2, "past + seq", 40]},
              {"name": "present.0.value", "dtype": "float16", "shape": ["batch", 2, "past + seq", 56]}]


def io_record(**changes) -> dict:
    """io.json of a one-layer fp16 GQA export (2 KV heads, r_k 40, r_v 56)."""
    return {"format": IO_FORMAT, "version": IO_VERSION, "model": "model.onnx", "external_data": None,
            "plugin": True, "plugin_model": "model_plugin.onnx", "plugin_model_reason": None,
            "plugin_external_data": None, "exporter": "test", "source": "tiny", "source_sha256": "ab" * 32,
            "model_type": "llama", "family": "llama", "rope_mode": "post", "positions": "rope",
            "max_positions": None, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "head_dim": 64,
            "softmax_scale": 0.125, "vocab_size": 96, "ranks": [[40, 56]], "kv_ratio": 0.75,
            "kv_bytes_per_token": 384, "dtype": "fp16", "opset": 18, "inputs": IO_INPUTS, "outputs": IO_OUTPUTS,
            "export_seconds": 1.0, "export_cpu_seconds": 1.0, **changes}
