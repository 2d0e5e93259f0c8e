"""Tiny models exported to ONNX once per test run (whatever the xdist workers), shared by the backend tests."""
import json

from tests.helpers.stages import export
from eigen_export import load
from eigen_export.backends import OnnxRuntimeBackend
from tests.helpers.folds import write_tiny_folded
from tests.helpers.shared import built_once
from tests.helpers.tiny_models import tiny_hf_model


class Exports:
    """Lazily exported tiny models: (model dir, ONNX dir, reference Decoder, ORT backend) per case."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.cache = {}

    def get(self, name, kind, dtype="fp32"):
        key = (name, kind, dtype)
        if key not in self.cache:
            self.cache[key] = self._make(name, kind, dtype)
        return self.cache[key]

    def _make(self, name, kind, dtype):
        def make(base):
            if kind == "original":
                model_dir = base / "hf"
                tiny_hf_model(name).save_pretrained(model_dir)
            else:   # "pre", "post", "folded" (non-RoPE), each optionally "+int8" / "+int4": a quantized cache,
                # and "joint-" before the mode: one latent per layer side (issue 13)
                mode, _, kv_dtype = kind.partition("+")
                joint = mode.startswith("joint-")
                mode = mode.removeprefix("joint-")
                model_dir, _ = write_tiny_folded(base, name, None if mode == "folded" else mode, kv_dtype or None,
                                                 latents="joint" if joint else "heads")
            # one case also exercises the external-data layout, which large models need
            onnx_dir = export(model_dir, dtype=dtype, external_data=(name, kind) == ("opt", "original"))
            (base / "dirs.json").write_text(json.dumps([str(model_dir.relative_to(base)),
                                                        str(onnx_dir.relative_to(base))]))

        base = built_once(self.tmp_path_factory, f"onnx-exports/{name}-{kind}-{dtype}", make)
        model_dir, onnx_dir = (base / d for d in json.loads((base / "dirs.json").read_text()))
        reference = load(model_dir)
        return model_dir, onnx_dir, reference, OnnxRuntimeBackend(onnx_dir, threads=1)
