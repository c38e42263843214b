"""ONNX export of a model of any family, optionally with the mel frontend, and an onnxruntime check.

Two parts of the PyTorch graph do not export as they are, so the export works on equivalent
export-only modules:

- The frontend's torch.stft (complex output) becomes `DFTMelFrontend`: the same pre-emphasis,
  reflect padding and windowed one-sided DFT, written as a strided conv1d whose kernels are the
  window times cosine and sine rows (only the frequency bins the mel filterbank uses), then power,
  mel projection, log and normalization.
- A layer that does not export as it is gets the export twin its family's record names
  (`Family.export_twins`), e.g. DyMN's `BatchFreeDynamicConv` for `DynamicConv`, whose batch
  folded into the channel axis would fix the batch size in the graph (models/dymn/fast.py).

`quantize_onnx` turns an exported float model into an int8 one with ONNX Runtime: static
quantization (activation ranges measured on calibration inputs the user provides) of the network's
convolutions and matrix products, or dynamic quantization (weights only; activation ranges found
per run) where no calibration inputs are given. The frontend, when inside, stays in float32 (its
power spectrum and logarithm do not survive 8 bits). `agreement` reports how far a quantized
model's tags move from PyTorch's.

The exported graph takes waveforms (batch, samples) with the frontend, or spectrograms
(batch, 1, n_mels, frames) without, and returns raw logits (batch, classes) and the pooled
embedding (batch, D); batch and time axes are dynamic. The TorchScript-based exporter is used
(the dynamo exporter needs onnxscript, which this project does not install).
"""
from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from common.files import atomic_path, atomic_write
from models.factory import FAMILIES
from models.frontend_twins import DFTMelFrontend
from models.preprocess import AugmentMelSTFT

DEFAULT_OPSET = 17
OPSETS = range(13, 21)  # what the TorchScript exporter writes for these models (13: Pad with a dynamic size)
# the metadata key holding the spectrogram settings the exported model was trained with (JSON)
FRONTEND_KEY = "efficientat_frontend"


def exportable_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every layer its family names an export twin for replaced by
    it (`Family.export_twins`)."""
    twins = {layer: twin for family in FAMILIES.values() for layer, twin in family.export_twins.items()}
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in twins:
                setattr(parent, name, twins[type(child)](child))
    return model


class ExportWrapper(nn.Module):
    """(waveforms or spectrograms) -> (logits, embedding) for export."""

    def __init__(self, model: nn.Module, frontend: Optional[AugmentMelSTFT] = None) -> None:
        super().__init__()
        self.frontend = DFTMelFrontend(frontend) if frontend is not None else None
        self.model = exportable_model(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frontend is not None:
            x = self.frontend(x).unsqueeze(1)
        return self.model(x)


def export_onnx(model: nn.Module, path: str | os.PathLike, frontend: Optional[AugmentMelSTFT] = None,
                opset: int = DEFAULT_OPSET, n_mels: int = 128, settings: Optional[dict] = None) -> None:
    """Export `model` (with `frontend` in front when given) to `path`, written atomically, with
    dynamic batch and time axes; the graph is checked with onnx.checker before it is written.
    `settings` (the frontend settings the model was trained with) are stored in the model's
    metadata, so that `OnnxModel` users can refuse a different spectrogram. An opset outside
    OPSETS is a ValueError; an exporter failure a RuntimeError of one line."""
    import onnx

    if opset not in OPSETS:
        raise ValueError(f"opset {opset} is not supported: use {OPSETS.start}-{OPSETS.stop - 1}")

    wrapper = ExportWrapper(model, frontend).eval()
    if frontend is not None:  # a dummy input of an odd size, so no size is taken for a constant
        dummy, name, axes = torch.randn(2, 3 * frontend.sr + 17) * 0.1, "waveform", {0: "batch", 1: "samples"}
    else:
        dummy, name, axes = torch.randn(2, 1, n_mels, 301), "spectrogram", {0: "batch", 3: "frames"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1")  # reflect padding's Slice
        try:
            torch.onnx.export(wrapper, (dummy,), buffer, dynamo=False, opset_version=opset,
                              input_names=[name], output_names=["logits", "embedding"],
                              dynamic_axes={name: axes, "logits": {0: "batch"}, "embedding": {0: "batch"}})
        except Exception as e:  # the exporter's messages carry the whole TorchScript graph
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"ONNX export failed at opset {opset}: {first}") from None
    exported = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(exported, full_check=True)
    if settings is not None:
        onnx.helper.set_model_props(exported, {FRONTEND_KEY: json.dumps(settings, sort_keys=True)})
    with atomic_write(path, "wb") as f:
        f.write(exported.SerializeToString())


class OnnxModel(nn.Module):
    """An exported model (float or int8) run by onnxruntime on the CPU, called like the PyTorch
    models: forward(x) -> (logits, embedding) as float32 tensors, where x is what the graph takes:
    waveforms (B, L) if `takes_waveforms` (exported with the frontend), else spectrograms (B, 1, F, T)."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # no spinning between runs: the PyTorch frontend shares the cores with onnxruntime's threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = _session(Path(path), options)
        graph_input = self.session.get_inputs()[0]
        self.input_name, self.takes_waveforms = graph_input.name, graph_input.name == "waveform"
        # mel bands of a spectrogram input (batch, 1, n_mels, frames); None for waveforms
        self.n_mels = None if self.takes_waveforms else graph_input.shape[2]
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if set(outputs) != {"logits", "embedding"}:
            raise ValueError(f"{path}: not a model written by export_onnx (outputs {sorted(outputs)})")
        self.num_classes, self.embedding_dim = outputs["logits"][1], outputs["embedding"][1]
        stored = self.session.get_modelmeta().custom_metadata_map.get(FRONTEND_KEY)
        # the spectrogram settings it was trained with; None for files exported before they were stored
        self.frontend_settings: Optional[dict] = json.loads(stored) if stored else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {self.input_name: x.detach().cpu().numpy().astype(np.float32, copy=False)}
        logits, embedding = self.session.run(["logits", "embedding"], feed)
        return torch.from_numpy(logits), torch.from_numpy(embedding)


def _session(path: Path, options: "onnxruntime.SessionOptions") -> "onnxruntime.InferenceSession":
    """An onnxruntime session of `path`; ValueError of one line for a path that is no ONNX model."""
    import onnxruntime

    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not an ONNX model")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not an ONNX model written by export_onnx.py ({first[:200]})") from None


def run_onnx(path: str | os.PathLike, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embedding) of the exported model at `path` on `inputs`, with onnxruntime on CPU."""
    logits, embedding = OnnxModel(path)(torch.from_numpy(np.asarray(inputs, dtype=np.float32)))
    return logits.numpy(), embedding.numpy()


@torch.no_grad()
def _reference(model: nn.Module, frontend: AugmentMelSTFT, waveforms: np.ndarray,
               with_frontend: bool) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(the ONNX model's input, PyTorch logits, PyTorch embedding) for waveforms (B, L), with
    the eval-mode model and the original frontend."""
    x = torch.from_numpy(np.ascontiguousarray(waveforms, dtype=np.float32))
    spec = frontend.eval()(x).unsqueeze(1)
    logits, embedding = model.eval()(spec)
    return (x if with_frontend else spec).numpy(), logits, embedding


def compare_with_torch(path: str | os.PathLike, model: nn.Module, waveforms: np.ndarray,
                       frontend: AugmentMelSTFT, with_frontend: bool) -> tuple[dict[str, float], np.ndarray]:
    """Largest absolute differences between onnxruntime and the eval-mode PyTorch model (with the
    original frontend) on waveforms (B, L) — keys `logits` and `embedding` — and onnxruntime's
    logits."""
    onnx_input, ref_logits, ref_embedding = _reference(model, frontend, waveforms, with_frontend)
    logits, embedding = run_onnx(path, onnx_input)
    diffs = {"logits": float(np.abs(logits - ref_logits.numpy()).max()),
             "embedding": float(np.abs(embedding - ref_embedding.numpy()).max())}
    return diffs, logits

QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]


def _network_nodes(model_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Names of the quantizable nodes of the network and of the frontend (exported under /frontend/)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    nodes = [n.name for n in graph.node if n.op_type in QUANTIZED_OPS]
    frontend = [n for n in nodes if n.startswith("/frontend/")]
    return [n for n in nodes if n not in frontend], frontend


def quantize_onnx(path: str | os.PathLike, output: str | os.PathLike,
                  calibration: Optional[Sequence[np.ndarray]] = None) -> str:
    """Write an int8 version of the exported float model `path` to `output` (atomically) and
    return the method used: "static" with `calibration` inputs (each one batch, as the model takes
    them; per-channel int8 weights, int8 activations with min/max ranges, QDQ format), "dynamic"
    without. Only the network's Conv, MatMul and Gemm nodes are quantized, except the first
    convolution (on the log-mel input) and the frontend, which stay float32 (measured on mn04_as:
    these choices halve the probability error of quantizing everything with uint8 activations)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, inputs: Iterable[np.ndarray], name: str) -> None:
            self.batches = iter({name: np.ascontiguousarray(x, dtype=np.float32)} for x in inputs)

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
        network, frontend = _network_nodes(prepared)
        with atomic_path(output) as target:
            if calibration:
                import onnxruntime

                name = onnxruntime.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]
                                                    ).get_inputs()[0].name
                quantize_static(str(prepared), str(target), Reader(calibration, name),
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
                                per_channel=True, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=frontend + network[:1])
            else:
                quantize_dynamic(str(prepared), str(target), op_types_to_quantize=["MatMul", "Gemm"],
                                 per_channel=True, weight_type=QuantType.QInt8, nodes_to_quantize=network[1:])
            _copy_metadata(path, target)
    return "static" if calibration else "dynamic"


def _copy_metadata(source: str | os.PathLike, target: Path) -> None:
    """The metadata of `source` (the frontend settings) added to the model at `target`."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    if props:
        model = onnx.load(str(target))
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})
        onnx.save(model, str(target))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def agreement(path: str | os.PathLike, model: nn.Module, frontend: AugmentMelSTFT, with_frontend: bool,
              clips: Sequence[np.ndarray], k: int = 5) -> tuple[float, float]:
    """(top-k agreement, largest probability difference) of the ONNX model at `path` against the
    eval-mode PyTorch model on `clips` (1-D waveforms, run one at a time): agreement is the share
    of PyTorch's top-k classes that are also in onnxruntime's top-k, over all clips."""
    shared, largest = 0, 0.0
    session = OnnxModel(path)
    for clip in clips:
        onnx_input, reference, _ = _reference(model, frontend, clip[None], with_frontend)
        logits, reference = session(torch.from_numpy(onnx_input))[0].numpy(), reference.numpy()
        largest = max(largest, float(np.abs(_sigmoid(logits) - _sigmoid(reference)).max()))
        shared += len(set(np.argsort(-logits[0])[:k]) & set(np.argsort(-reference[0])[:k]))
    return shared / (k * len(clips)), largest
