"""The Triton Python-backend model of a `bitdance-rt triton-repo` repository (copied to <name>/1/model.py).

A thin shell: one bitdance_rt Pipeline per model instance, loaded in-process (ONNX Runtime sessions
or TensorRT engines, like Triton's vLLM backend runs vLLM), whose continuous-batching scheduler
runs every request in flight. The model is decoupled: `execute` submits each request and returns
at once; previews and the final image are sent from the scheduler's callbacks through
bitdance_rt.triton.requests (the inputs' parsing, preview steps and response order live there,
tested without Triton). It needs bitdance_rt importable by the Python backend's interpreter.
"""

import json
import logging
import threading

import triton_python_backend_utils as pb_utils

from bitdance_rt.errors import BitDanceError
from bitdance_rt.triton.requests import (
    ModelInfo,
    Responder,
    ServeParams,
    Stream,
    input_specs,
    instance_device,
    load_pipeline,
    parse_inputs,
)


# this file runs as Triton's "model" module: name the logger so that the handler below sees it
logger = logging.getLogger("bitdance_rt.triton.model")


class _TritonLog(logging.Handler):
    """The records of the `bitdance_rt` loggers into Triton's log (pb_utils.Logger), by level."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                pb_utils.Logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                pb_utils.Logger.log_warn(message)
            else:
                pb_utils.Logger.log_info(message)
        except Exception:
            self.handleError(record)


def _log_to_triton() -> None:
    """bitdance_rt's INFO records (what loading does, failed sends) go to Triton's log (once per process)."""
    package = logging.getLogger("bitdance_rt")
    if not any(isinstance(h, _TritonLog) for h in package.handlers):
        package.addHandler(_TritonLog())
    package.setLevel(logging.INFO)


def _error(message: str):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "bitdance-rt streams its images: set model_transaction_policy { decoupled: true } in config.pbtxt"
            )
        self.params = ServeParams.from_parameters(config.get("parameters", {}))
        device = instance_device(self.params, args.get("model_instance_kind"), args.get("model_instance_device_id"))
        _log_to_triton()
        self.pipe = load_pipeline(self.params, device)
        logger.info("bitdance-rt: %s runs %r", args.get("model_instance_name"), self.pipe)
        self.info = ModelInfo.of(self.pipe, self.params.max_images)
        self.names = [spec.name for spec in input_specs(self.info.t2i)]
        self.responder = Responder()
        self.lock = threading.Lock()
        self.streams = set()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for name in self.names:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    inputs[name] = None if tensor is None else tensor.as_numpy()
                stream = Stream(
                    self.pipe,
                    parse_inputs(inputs, self.info),
                    self._sender(sender),
                    self.responder,
                    cancelled=getattr(request, "is_cancelled", lambda: False),
                    on_finish=self._finished,
                )
                with self.lock:
                    self.streams.add(stream)
                try:
                    stream.start()
                except BaseException:
                    self._finished(stream)
                    raise
            except BitDanceError as exc:  # a bad request: the message names the input
                sender.send(_error(str(exc)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:  # anything else still ends this request, not the others
                sender.send(
                    _error(f"bitdance-rt: {type(exc).__name__}: {exc}"),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
        return None  # decoupled: the responses come from the scheduler's callbacks

    def _sender(self, sender):
        def send(outputs, error, final):
            if error is not None:
                response = _error(error)
            else:
                response = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]
                )
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

        return send

    def _finished(self, stream) -> None:
        with self.lock:
            self.streams.discard(stream)

    def finalize(self):
        with self.lock:
            running = [s.future for s in self.streams if s.future is not None]
        for future in running:  # stop at the next AR step; each still gets its final (error) response
            self.pipe.cancel(future)
        self.pipe.close()
        self.responder.close()
