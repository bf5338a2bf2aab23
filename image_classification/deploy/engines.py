"""Inference engines behind one interface: PyTorch, onnxruntime and OpenVINO, the last two running the file
that model2onnx.py writes (float, or the Q/DQ INT8 file of an efficientnet-quant-* model).

    engine = open_engine("openvino", onnx_path="b0.onnx")       # or "onnxruntime"
    logits = engine.run(images)                                 # float32 NCHW numpy in, float32 [N,C] numpy out
    engine.describe()                                           # what the engine does: threads, graph, INT8 ops

    engine = TorchEngine(model, ctx)                            # our model in PyTorch, under ctx's autocast/layout

The ONNX engines run on the CPU with one thread per core the process may use. This module imports neither
torch nor an engine package at import time, so a process that only runs an ONNX engine (a deployment, or
bench/peak_rss.py measuring one) carries none of PyTorch's memory; a missing engine package is one line
naming the package to install.
"""
from __future__ import annotations

import importlib
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cli import UserError
from ..registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..context import ExecutionContext
    from ..preprocessing import Preprocessing

# The versions requirements.txt pins, named in the message for a missing package.
class EngineError(UserError):
    """An engine that cannot run here (its package is missing) or a file it cannot load."""


def import_engine(engine: str, requirement: str, package: str | None = None):
    """The Python package of --engine `engine` (`package`, by default named as the engine); EngineError naming the
    `requirement` to install when it does not import."""
    package = package or engine
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise EngineError(f"--engine {engine} needs the {package} package, which does not import here ({err}); "
                          f"install it: pip install {requirement}") from None


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Engine:
    """One model ready to run: `run(float32 NCHW numpy) -> float32 logits numpy`; `engine(tensor)` for torch."""

    name = ""

    def run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor":
        """Logits of a float NCHW batch as a CPU tensor (numpy arrays shared without a copy)."""
        import torch
        return torch.from_numpy(self.run(np.ascontiguousarray(images.detach().cpu().float().numpy())))

    def describe(self) -> dict[str, Any]:
        """What the engine does, for reports: its settings and what it made of the model."""
        return {"engine": self.name}


class TorchEngine(Engine):
    """A PyTorch model in eval mode on the context's device, in its memory format, under its autocast."""

    name = "torch"

    def __init__(self, model: "nn.Module", ctx: "ExecutionContext") -> None:
        self.ctx = ctx
        self.model = model.to(ctx.device, memory_format=ctx.memory_format).eval()

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor":
        import torch
        with torch.inference_mode(), self.ctx.autocast():
            return self.model(images.to(self.ctx.device).contiguous(memory_format=self.ctx.memory_format))

    def run(self, images: np.ndarray) -> np.ndarray:
        import torch
        return self(torch.from_numpy(images)).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        import torch
        return {"engine": self.name, "device": str(self.ctx.device), "threads": torch.get_num_threads(),
                "layout": "nhwc" if self.ctx.channels_last else "nchw",
                "precision": str(self.ctx.amp_dtype).replace("torch.", "") if self.ctx.amp else "float32"}


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"--onnx {path}: no such file (write one with model2onnx.py)")
    if path.stat().st_size == 0:
        raise EngineError(f"--onnx {path}: empty file (0 bytes; an export that did not finish?)")
    return path


class OnnxRuntimeEngine(Engine):
    """onnxruntime's CPU execution provider, every graph optimisation on (ORT_ENABLE_ALL), one thread per core.

    ORT_ENABLE_ALL adds, over the basic constant folding and node fusions, the CPU layout transformation that
    runs convolutions in a blocked channel layout (NCHWc) and fuses their activations. A Q/DQ graph runs in INT8
    only where onnxruntime can fuse a DequantizeLinear → op → QuantizeLinear group into a quantized kernel
    (QLinearConv ...); `describe()` counts those kernels in the optimised graph.
    """

    name = "onnxruntime"
    requirement = "onnxruntime==1.32.0"  # requirements.txt's pin, named when the package is missing

    def __init__(self, onnx_path: str | Path, threads: int | None = None) -> None:
        ort = import_engine(self.name, self.requirement)
        self.path = _check_file(onnx_path)
        self.threads = threads or cpu_cores()
        self._ort = ort
        try:
            self.session = ort.InferenceSession(str(self.path), self._options(), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid graphs
            raise EngineError(f"--onnx {self.path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def _options(self):
        options = self._ort.SessionOptions()
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        return options

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]

    def optimized_ops(self) -> Counter:
        """Operator types of the graph as onnxruntime optimised it (written to a temporary file and read back)."""
        import tempfile

        import onnx
        with tempfile.TemporaryDirectory() as tmp:
            options = self._options()
            options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            options.log_severity_level = 3  # its warning that the file fits this CPU only: it is read back here
            self._ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            graph = onnx.load(options.optimized_model_filepath).graph
        return Counter(node.op_type for node in graph.node)

    def describe(self) -> dict[str, Any]:
        ops = self.optimized_ops()
        return {"engine": self.name, "version": self._ort.__version__, "graph_optimization": "ORT_ENABLE_ALL",
                "intra_op_threads": self.threads, "layout": "NCHWc (onnxruntime's blocked CPU layout)"
                if ops.get("ReorderInput") else "nchw",
                "float_convolutions": sum(v for k, v in ops.items() if k in ("Conv", "FusedConv", "NchwcConv")),
                "int8_convolutions": sum(v for k, v in ops.items() if k in ("QLinearConv", "ConvInteger")),
                "int8_ops": sum(v for k, v in ops.items() if k.startswith("QLinear") or k.endswith("Integer"))}


class OpenVINOEngine(Engine):
    """OpenVINO's CPU plugin: float32 kept float32, one stream of one thread per core, static input shapes.

    INFERENCE_PRECISION_HINT f32: on a CPU with AVX512-BF16 or AMX, OpenVINO otherwise runs float models in
    bf16. PERFORMANCE_HINT LATENCY (one stream using every core): measured on the 2-core CPU, b0 at 224, one
    synchronous request, it ran 75-112 img/s where THROUGHPUT (two streams of one core) ran 58-67, at batch 1
    and at batch 32 alike; THROUGHPUT pays off only with requests in flight on every stream at once. The model
    is compiled once per batch size with that batch fixed in its shape (b0, batch 1: 112 img/s against 75 with
    the batch axis left dynamic). A Q/DQ graph becomes FakeQuantize nodes that OpenVINO's low-precision
    transformations turn into INT8 kernels; `describe()` counts the convolutions that run in u8/i8.
    """

    name = "openvino"
    requirement = "openvino==2026.4.1"  # requirements.txt's pin, named when the package is missing

    def __init__(self, onnx_path: str | Path, threads: int | None = None) -> None:
        ov = import_engine(self.name, self.requirement)
        self.path = _check_file(onnx_path)
        self.threads = threads or cpu_cores()
        self._ov = ov
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(self.path))
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own for unreadable graphs
            raise EngineError(f"--onnx {self.path}: OpenVINO cannot read it ({str(err).splitlines()[0]})") from None
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                       "INFERENCE_NUM_THREADS": self.threads}
        self._requests: dict[tuple[int, ...], Any] = {}

    def request(self, shape: tuple[int, ...]):
        """The infer request of a model compiled for inputs of exactly `shape` (compiled on first use)."""
        request = self._requests.get(shape)
        if request is None:
            model = self.model.clone()
            model.reshape({model.input(0): self._ov.PartialShape(list(shape))})
            compiled = self.core.compile_model(model, "CPU", self.config)
            request = self._requests[shape] = compiled.create_infer_request()
        return request

    def run(self, images: np.ndarray) -> np.ndarray:
        request = self.request(tuple(images.shape))
        request.infer({0: images}, share_inputs=True)
        return request.get_output_tensor(0).data.copy()

    def runtime_precisions(self, shape: tuple[int, ...]) -> Counter:
        """(layer type, precision it runs in) of every node OpenVINO compiled for `shape`."""
        runtime = self.request(shape).get_compiled_model().get_runtime_model()
        return Counter((op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
                       for op in runtime.get_ops())

    def describe(self, shape: tuple[int, ...] | None = None) -> dict[str, Any]:
        shape = shape or next(iter(self._requests), None) or self.static_shape(1)
        layers = self.runtime_precisions(shape)
        convolutions = {p: n for (kind, p), n in layers.items() if kind in ("Convolution", "GroupConvolution")}
        compiled = self.request(shape).get_compiled_model()
        return {"engine": self.name, "version": self._ov.__version__, "device": "CPU", **self.config,
                "streams": int(compiled.get_property("NUM_STREAMS")), "static_shape": list(shape),
                "layout": "blocked (OpenVINO's CPU plugin picks per layer)",
                "float_convolutions": sum(n for p, n in convolutions.items() if p in ("f32", "bf16", "f16")),
                "int8_convolutions": sum(n for p, n in convolutions.items() if p in ("u8", "i8"))}

    def static_shape(self, batch_size: int) -> tuple[int, ...]:
        """The input shape with the batch axis set to `batch_size` (the other axes as the file fixes them)."""
        dims = self.model.input(0).get_partial_shape()
        return (batch_size, *(d.get_length() for d in list(dims)[1:]))


# The engines that run model2onnx.py's files: name -> class of (onnx_path, threads). An engine is one entry.
ONNX_ENGINE_CLASSES: Registry[type[Engine]] = Registry("engine", flag="--engine")
ONNX_ENGINE_CLASSES.register("onnxruntime", OnnxRuntimeEngine)
ONNX_ENGINE_CLASSES.register("openvino", OpenVINOEngine)
ONNX_ENGINES = ONNX_ENGINE_CLASSES.names()
ENGINES = ("torch", *ONNX_ENGINES)  # torch: the PyTorch model itself (TorchEngine)


def open_engine(name: str, onnx_path: str | Path | None = None, threads: int | None = None) -> Engine:
    """An ONNX engine (an ONNX_ENGINE_CLASSES name) running `onnx_path`; EngineError for what cannot run."""
    if name not in ONNX_ENGINE_CLASSES:
        raise EngineError(f"unknown --engine {name!r}; choose from {', '.join(ENGINES)}")
    if onnx_path is None:
        raise EngineError(f"--engine {name} runs an ONNX file: give --onnx PATH (written by model2onnx.py)")
    return ONNX_ENGINE_CLASSES.get(name)(onnx_path, threads)


def onnx_preprocessing(onnx_path: str | Path) -> "Preprocessing":
    """The preprocessing model2onnx.py recorded in the file's metadata (the reference's for files without it)."""
    import onnx

    from ..preprocessing import Preprocessing
    path = _check_file(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    try:
        return Preprocessing.from_onnx_metadata(props)
    except ValueError as err:
        raise EngineError(f"--onnx {path}: unreadable preprocessing metadata ({err})") from None


def onnx_io_sizes(onnx_path: str | Path) -> tuple[int, int]:
    """(image size, number of classes) that an exported file fixes: input [N,3,S,S], output [N,C]."""
    import onnx
    path = _check_file(onnx_path)
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as err:  # onnx raises DecodeError and others for files that are not ONNX
        raise EngineError(f"--onnx {path}: not an ONNX model ({str(err).splitlines()[0]})") from None
    if not graph.input or not graph.output:  # protobuf reads many a non-ONNX file as an empty model
        raise EngineError(f"--onnx {path}: not an ONNX model (no graph inputs or outputs)")
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    classes = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or not dims[2] or dims[2] != dims[3] or len(classes) != 2 or not classes[1]:
        raise EngineError(f"--onnx {path}: expected input [batch, 3, S, S] and output [batch, classes], found "
                          f"{dims} and {classes}")
    return dims[2], classes[1]
