"""Loading Hugging Face checkpoints (hub id or local directory) as the reference Decoder; folded artifacts are
read by artifacts/folded.py on top of this."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .dtypes import resolve_dtype
from .errors import EigenExportError
from .families import get_adapter, spec_from_config
from .modeling import LATENTS, Decoder, alibi_slopes

log = logging.getLogger("eigen_export")

def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).exists() or source.count("/") > 1


def load_hf_config(source: str | Path):
    from transformers import AutoConfig

    source = str(source)
    if _looks_local(source) and not Path(source).expanduser().is_dir():
        raise EigenExportError(f"model path {source} does not exist: pass an existing model directory or a hub id")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:     # ValueError: a directory without a model config
        raise EigenExportError(f"cannot read a model config from {source!r} ({str(e).splitlines()[0]}): "
                               "pass a directory with config.json or a reachable hub id") from None


def decoder_from_hf_model(hf_model, dtype=torch.float32, device="cpu") -> Decoder:
    """Convert a loaded transformers causal LM into the reference Decoder (uncompressed)."""
    config = hf_model.config
    spec = spec_from_config(config)
    adapter = get_adapter(config.model_type)
    state = adapter.to_canonical(dict(hf_model.state_dict()), spec)
    if spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    return build_decoder(config, state, ranks=None, rope_mode=None, dtype=dtype, device=device)


def folded_spec(config, num_kv_heads: int | None = None, latents: str = "heads"):
    """The ModelSpec a folded model runs: num_kv_heads, the manifest's count where it differs from the config (KV
    heads merged in a family whose transformers config cannot state it); latents, heads | joint."""
    spec = spec_from_config(config)
    if num_kv_heads is not None:
        spec = spec.replace(num_kv_heads=num_kv_heads)
    if latents not in LATENTS:
        raise EigenExportError(f"latents must be one of {LATENTS}, got {latents!r}")
    return spec.replace(joint_latents=latents == "joint")


def build_decoder(config, state, ranks, rope_mode, dtype=torch.float32, device="cpu",
                  num_kv_heads: int | None = None, kv_dtype: str | None = None, kv_layout=None,
                  latents: str = "heads") -> Decoder:
    """num_kv_heads, latents: see folded_spec. kv_dtype, kv_layout: the manifest's quantized cache, if any."""
    spec = folded_spec(config, num_kv_heads, latents)
    adapter = get_adapter(config.model_type)
    inv_freq, scaling = adapter.rope_inv_freq(config) if adapter.rope_inv_freq else (None, 1.0)
    model = Decoder(spec, ranks, rope_mode, state, inv_freq=inv_freq, rope_scaling=scaling, kv_dtype=kv_dtype,
                    kv_layout=kv_layout)
    return model.to(device=device, dtype=resolve_dtype(dtype)).eval()


def fake_decoder(config, shapes: dict[str, torch.Tensor], dtype: torch.dtype, ranks, rope_mode,
                 num_kv_heads: int | None = None, kv_dtype: str | None = None, kv_layout=None,
                 latents: str = "heads") -> Decoder:
    """The Decoder of these weight shapes (canonical names -> meta tensors) with fake weights in `dtype`: a
    graph capture traces it without one byte of weights; ONNXProgram initializers are then pointed at the
    real ones. RoPE frequencies and ALiBi slopes are real (computed from the config) and stay fp32: rounding
    inv_freq to fp16 turns into radians of angle error at positions in the thousands."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = folded_spec(config, num_kv_heads, latents)
    adapter = get_adapter(config.model_type)
    inv_freq, scaling = adapter.rope_inv_freq(config) if adapter.rope_inv_freq else (None, 1.0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = {k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in shapes.items()}
        model = Decoder(spec, ranks, rope_mode, fake, inv_freq=inv_freq, rope_scaling=scaling, kv_dtype=kv_dtype,
                        kv_layout=kv_layout)
    # the buffers were made in fake mode too: their real values back
    if spec.positions == "rope":
        model.inv_freq = inv_freq.float().clone()
    if spec.positions == "alibi":
        model.alibi = alibi_slopes(spec.num_heads, spec.alibi_bias_max)
    return model.eval()


def load_hf(source: str | Path, dtype="float32", device="cpu"):
    """(HF config, Decoder) for a hub id or a local HF directory."""
    from transformers import AutoModelForCausalLM

    config = load_hf_config(source)
    spec_from_config(config)  # fail on an unsupported family before loading gigabytes
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(source), dtype=resolve_dtype(dtype))
    except OSError as e:
        raise EigenExportError(f"cannot load weights from {source} ({str(e).splitlines()[0]}): "
                               "the directory needs model.safetensors (or pytorch_model.bin) next to config.json"
                               ) from None
    model = decoder_from_hf_model(hf_model, dtype=dtype, device=device)
    del hf_model
    return config, model


def local_checkpoint(source: str | Path) -> Path:
    """The directory holding a model's weights: a local path as is, a hub id downloaded (safetensors where the
    repository has them, else .bin)."""
    if _looks_local(str(source)):
        return Path(source).expanduser()
    from huggingface_hub import snapshot_download

    meta = ["*.json", "*.model", "*.txt", "*.tiktoken"]
    try:
        local = Path(snapshot_download(str(source), allow_patterns=meta + ["*.safetensors"]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(str(source), allow_patterns=meta + ["*.bin"]))
    except Exception as e:      # huggingface_hub raises one type per HTTP failure
        raise EigenExportError(f"cannot download {source} ({str(e).splitlines()[0]}): check the id and the "
                               "network, or pass a local directory") from None
    return local


class Checkpoint:
    """The tensors of a local HF checkpoint by name, read one file region at a time: model.safetensors,
    sharded safetensors with their index, or pytorch_model*.bin (memory-mapped)."""

    def __init__(self, directory: str | Path):
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

        self.directory = Path(directory)
        self.files: dict[str, Path] = {}
        for index, single in ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (WEIGHTS_INDEX_NAME, WEIGHTS_NAME)):
            if (self.directory / index).is_file():
                try:
                    weight_map = json.loads((self.directory / index).read_text())["weight_map"]
                except (ValueError, KeyError, TypeError):
                    raise EigenExportError(f"{self.directory / index} is not a weight index: the download is "
                                           "damaged; fetch the model again") from None
                self.files = {name: self.directory / file for name, file in weight_map.items()}
            elif (self.directory / single).is_file():
                self.files = dict.fromkeys(self._names_in(self.directory / single), self.directory / single)
            if self.files:
                break
        if not self.files:
            raise EigenExportError(f"no weights in {self.directory}: the directory needs model.safetensors (or "
                                   "its shards and index, or pytorch_model.bin) next to config.json")
        missing = sorted({str(f.name) for f in self.files.values() if not f.is_file()})
        if missing:
            raise EigenExportError(f"{self.directory} lacks the weight file {missing[0]} its index names: the "
                                   "download is incomplete; fetch the model again")
        self._bins: dict[Path, dict] = {}

    @staticmethod
    def _names_in(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        return list(torch.load(path, mmap=True, weights_only=True, map_location="cpu"))

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors, read from disk now (each file opened once per call)."""
        from safetensors import safe_open

        out = {}
        for path, wanted in self._by_file(names).items():
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    out |= {name: f.get_tensor(name) for name in wanted}
            else:       # memory-mapped: only the pages of the tensors read here are loaded, and copied out
                out |= {name: self._bin(path)[name].clone() for name in wanted}
        return out

    def _by_file(self, names) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        return by_file

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bins:
            self._bins[path] = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        return self._bins[path]

    def placeholders(self, names) -> dict[str, torch.Tensor]:
        """Meta tensors with the shapes and dtypes of the named tensors: nothing is read but headers."""
        from safetensors import safe_open

        out = {}
        for path, wanted in self._by_file(names).items():
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    for name in wanted:
                        piece = f.get_slice(name)
                        out[name] = torch.empty(piece.get_shape(), dtype=_SAFETENSORS_DTYPES[piece.get_dtype()],
                                                device="meta")
            else:
                out |= {name: torch.empty_like(self._bin(path)[name], device="meta") for name in wanted}
        return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to: the first all-digit component of its name (model.layers.3.mlp.up
    -> 3, transformer.blocks.3.attn.Wqkv -> 3), None for embeddings, final norm and head."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


# the canonical weights embed_tokens reads: all a layer-by-layer pass needs besides the layers
_INPUT_SIDE = {"embed.weight", "pos_embed.weight", "proj_in.weight"}


class StreamedModel:
    """An uncompressed HF checkpoint as the reference Decoder for layer-by-layer passes (calibrate and fold):
    only the input embeddings are loaded, `block(i)` reads layer i, `global_state()` the rest. Peak memory:
    the embeddings plus one layer, whatever the depth. Its final norm and head are placeholders: the model
    cannot run forward to logits."""

    def __init__(self, source: str | Path, dtype="float32", device="cpu"):
        from transformers import AutoModelForCausalLM

        self.config = load_hf_config(source)
        self.spec = spec_from_config(self.config)
        self.adapter = get_adapter(self.config.model_type)
        self.checkpoint = Checkpoint(local_checkpoint(source))
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)
        with torch.device("meta"):      # the names transformers expects; nothing is allocated
            expected = AutoModelForCausalLM.from_config(self.config)
        self._hf_names = _expected_names(self.checkpoint.names(), expected)
        self._layers: dict[int | None, list[str]] = {}
        for name in self._hf_names:
            self._layers.setdefault(layer_of(self._hf_names[name]), []).append(name)
        # only what embed_tokens reads is loaded: the layers, final norm and head are placeholders (the head of a
        # 7B model alone is 0.5 GB in fp32); global_state() reads them for the fold
        placeholders = self.placeholders()
        input_side = [n for n in self._layers.get(None, [])
                      if _INPUT_SIDE & set(self._canonical(self.checkpoint.placeholders([n])))]
        real = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                for k, v in self._canonical(self.checkpoint.read(input_side)).items()}
        inv_freq, scaling = self.adapter.rope_inv_freq(self.config) if self.adapter.rope_inv_freq else (None, 1.0)
        self.model = Decoder(self.spec, None, None, {**placeholders, **real}, inv_freq=inv_freq,
                             rope_scaling=scaling)
        self._cached: tuple[int | None, dict | None] = (None, None)
        for name, buffer in self.model.named_buffers(recurse=False):     # RoPE frequencies, ALiBi slopes
            setattr(self.model, name, buffer.to(self.device))

    def _canonical(self, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.adapter.to_canonical({self._hf_names[k]: v for k, v in hf.items()}, self.spec)

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's weights with in-layer canonical names ("attn.q.weight", ...) in the model's dtype, on the CPU."""
        prefix = f"layers.{i}."
        state = self._canonical(self.checkpoint.read(self._layers.get(i, [])))
        return {k[len(prefix):]: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}

    def block(self, i: int):
        return self.model.make_block(self.model.ranks[i], None, self.layer_state(i))

    def load_head(self) -> None:
        """Read the final norm and output head into the model, so that it can make logits (the calibration
        loss); the layers stay placeholders."""
        head = {k: v.to(self.device) for k, v in self.global_state().items() if k not in _INPUT_SIDE}
        self.model.load_state_dict(head, strict=False, assign=True)     # the rest is loaded or a placeholder

    def placeholders(self) -> dict[str, torch.Tensor]:
        """Meta tensors of every canonical weight (nothing read but headers)."""
        state = self._canonical(self.checkpoint.placeholders(self._hf_names))
        if self.spec.tie_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def read(self, name: str) -> torch.Tensor:
        """One canonical weight ("layers.3.attn.q.weight") in the model's dtype. The layer (or the weights outside
        the layers) it belongs to is read whole, since a family may split a fused tensor, and kept until a
        tensor of another one is asked for: read in layer order, each is read once."""
        i = layer_of(name)
        if self._cached[0] != i or self._cached[1] is None:
            self._cached = (i, None)        # the previous layer is freed before the next is read
            state = self.global_state() if i is None else {f"layers.{i}.{k}": v for k, v in self.layer_state(i).items()}
            self._cached = (i, state)
        return self._cached[1][name]

    def global_state(self) -> dict[str, torch.Tensor]:
        """The canonical weights outside the layers (embeddings, final norm, head), read now, on the CPU."""
        state = self._canonical(self.checkpoint.read(self._layers.get(None, [])))
        if self.spec.tie_embeddings:
            state.pop("lm_head.weight", None)
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}


def _expected_names(names: list[str], model) -> dict[str, str]:
    """checkpoint name -> the name transformers' `model` (built on meta) gives it when loading: its renamings
    (GPT-NeoX's embed_out -> lm_head, legacy gamma/beta) and the base-model prefix that checkpoints saved from
    the base model lack (facebook/opt-*: "decoder.layers.0..."). Tensors the model does not hold (rotary
    caches, masked_bias) are left out."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    expected = model.state_dict()
    out = {}
    for name in names:
        renamed, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, expected)
        if converter is not None:
            raise EigenExportError(f"{name} is combined with other tensors when transformers loads this "
                                   f"{model.config.model_type} checkpoint ({converter}): calibrate from a checkpoint "
                                   "saved by this transformers version (save_pretrained)")
        if renamed in expected:
            out[name] = renamed
    return out


def load_tokenizer(source: str | Path):
    """The tokenizer saved with a model directory (or a hub id's), or a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise EigenExportError(f"no tokenizer in {source} ({str(e).splitlines()[0]}): "
                               "use a model directory that has one") from None
