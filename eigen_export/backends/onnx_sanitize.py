"""Graph clean-up before TensorRT parses an export: Polygraphy's constant folding and dead-node removal (what
`polygraphy surgeon sanitize --fold-constants` runs), kept only where it removes nodes.

The export already folds constants with onnxscript's optimizer (backends/onnx_export.optimize), so this pass
usually finds nothing left; the node counts before and after go into build.json either way. Graphs whose
weights live in external data are not folded: the folded copy would hold every weight in memory and could
not be serialized past protobuf's 2 GB limit, while the parser reads external weights from beside the file.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import EigenExportError

log = logging.getLogger("eigen_export")

FOLD_LIMIT = 1 << 20            # bytes: the largest tensor constant folding may create


@dataclass
class Sanitized:
    model: object                 # onnx.ModelProto to parse: the folded graph where it is smaller, else the original
    nodes_before: int
    nodes_after: int | None       # None where folding was not tried
    folded: bool                  # whether `model` is the folded graph
    note: str | None = None       # why folding was not tried or not kept

    def record(self) -> dict:
        return {"before": self.nodes_before, "after": self.nodes_after, "folded": self.folded, "note": self.note}


def has_external_data(model) -> bool:
    import onnx

    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


@contextlib.contextmanager
def quiet_polygraphy():
    """Polygraphy and onnx-graphsurgeon log each step to stdout: keep their errors only (which also raise),
    unless -v."""
    from onnx_graphsurgeon.logger import G_LOGGER as GS_LOGGER
    from polygraphy.logger import G_LOGGER

    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    gs_severity = GS_LOGGER.severity
    GS_LOGGER.severity = GS_LOGGER.ERROR
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            yield
    finally:
        GS_LOGGER.severity = gs_severity


def fold(model):
    """Polygraphy's constant folding (every pass until nothing changes) and clean-up of a loaded graph."""
    try:
        from polygraphy.backend.onnx import fold_constants
    except ImportError:
        raise EigenExportError("graph clean-up needs polygraphy and onnx-graphsurgeon: pip install "
                               "'eigen_export[onnx]'") from None
    with quiet_polygraphy():
        try:
            # onnx's own shape inference: ONNX Runtime's symbolic one needs sympy, and the dims are named anyway.
            # No folded tensor over FOLD_LIMIT: folding the transpose of a tied embedding (lm_head = embed^T)
            # would store the 108 MiB SmolLM2 embedding twice to save one node TensorRT folds at build time.
            return fold_constants(model, copy=True, size_threshold=FOLD_LIMIT,
                                  allow_onnxruntime_shape_inference=False)
        except Exception as e:          # Polygraphy and onnx-graphsurgeon raise many types; one line for the user
            raise EigenExportError(f"constant folding failed ({type(e).__name__}: "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def sanitize(path: Path) -> Sanitized:
    """The graph at `path`, folded where that removes nodes (see the module docstring)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    before = len(model.graph.node)
    if has_external_data(model):
        return Sanitized(model, before, None, False, "weights in external data: not folded")
    folded = fold(model)
    after = len(folded.graph.node)
    if after < before:
        return Sanitized(folded, before, after, True)
    return Sanitized(model, before, after, False, "folding removed no node")
