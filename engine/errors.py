"""Every error the engine raises, in one place, one type per layer.

    EngineError         base of them all: a caller that only wants "the engine said no" catches it
    InputTooLong        encoding: a request that cannot be cut to fit (the API answers 413)
    InstructionNotAccepted  encoding: an instruction for a family that takes none (400)
    OutOfMemory         a backend: the batch did not fit in device memory (the batcher splits it;
                        a single pair that still does not fit fails its request with it)
    Expired, Cancelled  the batcher: the request's deadline passed, or its job was cancelled
    ScoringError        a batch failed for another reason (the message says why)
    EngineFailed        the transport: the engine process could not start, or is gone

The same types are raised whether the engine runs in the caller's process or in an engine
process: errors cross the socket as a code (`CODES`) and a message, and come out as the type
they went in as.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises."""


class InputTooLong(EngineError, ValueError):
    """A request whose inputs cannot be cut to fit the model (the caller's mistake: 413)."""


class InstructionNotAccepted(EngineError, ValueError):
    """An instruction was given for a model whose family takes none (a cross-encoder, gemma)."""


class OutOfMemory(EngineError):
    """The device ran out of memory on a batch; a smaller one may fit."""


class Expired(EngineError):
    """The request's deadline passed before it was scored (its caller has given up)."""


class Cancelled(EngineError):
    """The request was cancelled (its bulk job was cancelled)."""


class ScoringError(EngineError, RuntimeError):
    """A batch failed in the engine; the message says why."""


class EngineFailed(EngineError, RuntimeError):
    """The engine process could not start (model not loadable, device missing) or is gone."""


#: Wire codes of the errors a request can end with (engine/transport.py); anything else is 0.
CODES: dict[int, type[EngineError]] = {1: Expired, 2: Cancelled, 3: OutOfMemory, 4: EngineFailed}


def code_of(error: BaseException) -> int:
    return next((code for code, kind in CODES.items() if isinstance(error, kind)), 0)


def error_of(code: int, text: str) -> EngineError:
    return CODES.get(code, ScoringError)(text)
