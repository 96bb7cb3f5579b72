"""Typed errors. Each carries the problem and the remedy; the CLI prints them as one line."""

from __future__ import annotations


class MtError(Exception):
    """Base of every error mt reports to a user. `remedy` says how to proceed."""

    def __init__(self, problem: str, remedy: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.remedy = remedy

    def one_line(self) -> str:
        text = self.problem.rstrip(".")
        if self.remedy:
            text += f"; {self.remedy}"
        return " ".join(text.split())


class CheckpointError(MtError):
    """The source folder or one of its files is missing or malformed."""


class CorruptTensorFile(CheckpointError):
    """A safetensors file is truncated or its header lies about its contents."""


class UnsupportedArchitecture(MtError):
    """config.json names an architecture mt has no module for."""


class UnknownTensor(MtError):
    """A checkpoint tensor that the architecture's name table does not cover."""


class MissingTensor(CheckpointError):
    """A tensor the model needs (e.g. one half of a weight-norm pair) is not in the checkpoint."""


class TokenizerError(MtError):
    """The tokenizer files are missing or not understood."""


class OutputExists(MtError):
    """The output path exists and --force was not given."""


class QuantizationError(MtError):
    """A tensor cannot be quantized (NaN/Inf, bad shape)."""


class NonFiniteWeights(QuantizationError):
    """A weight is NaN or Inf, or becomes Inf in the output type (an F16 overflow)."""

    def __init__(self, tensor: str, where: tuple[int, ...] | None = None, overflow: str | None = None) -> None:
        at = f" (first at {list(where)})" if where is not None else ""
        what = f"values too large for {overflow}{at}, which become Inf" if overflow else f"NaN or Inf values{at}"
        super().__init__(f"tensor {tensor!r} holds {what}",
                         "fix the checkpoint, or pass --allow-non-finite to write such values as they are")


class GGUFError(MtError):
    """A GGUF file cannot be read."""


class DeviceUnavailable(MtError):
    """The requested compute device (e.g. --device cuda) cannot be used here."""


class VerifyError(MtError):
    """A GGUF and a reference folder that cannot be compared at all (e.g. different architectures)."""


class AdapterError(MtError):
    """A PEFT adapter folder is missing, unsupported, or does not fit the base checkpoint."""


class TensorWriteError(MtError):
    """Tensors handed to a writer do not match what it planned (names, order, dtype, byte count)."""


class DataError(MtError):
    """Training data that cannot be used: unreadable, malformed JSONL (with the line), no usable rows."""


class TrainingError(MtError):
    """Finetuning cannot go on: out of memory, a non-finite loss, options that contradict each other or a resume folder."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised in the main thread so that every output in progress is cleaned up, as for
    Ctrl-C (a BaseException, so no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
