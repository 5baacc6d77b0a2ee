"""Fault injection for the server tests, loaded at interpreter start when tests put this folder on PYTHONPATH.

While the file named by DEEPSEEK_OCR_TEST_OOM_FLAG exists, the next attention call of the part it names
("encode": the vision encoder; "decode": the decoder, prefill or decode step) raises CUDA's
out-of-memory error class, as a GPU would; the flag is removed when it fires.

While the file named by DEEPSEEK_OCR_TEST_HOLD_FLAG exists, every call of the step it names waits until the
file is removed (at most 120 s): "load" (predict.py reading the file), "prepare" (the engine sizing and
checking the job), "submit" (handing the job to the serving thread). Each held call appends "held STEP" to
the file FLAG.events when it starts waiting and "released STEP" when it goes on, so that a test knows where
a prediction is.

With DEEPSEEK_OCR_TEST_STATE_FILE set, a thread writes what every engine of the process holds (rows,
cache blocks, pages waiting, predictions) to that file as JSON every 0.1 s, so that a test can check
the server's scheduler state from outside the process.
"""
import os
import sys

_FLAG = os.environ.get("DEEPSEEK_OCR_TEST_OOM_FLAG")
_HOLD_FLAG = os.environ.get("DEEPSEEK_OCR_TEST_HOLD_FLAG")
_STATE_FILE = os.environ.get("DEEPSEEK_OCR_TEST_STATE_FILE")
_PART_OF_FILE = {"deepencoder.py": "encode", "paged_attention.py": "decode", "modeling_deepseekv2.py": "decode"}

if _FLAG:
    import torch
    import torch.nn.functional as F

    _real_sdpa = F.scaled_dot_product_attention

    def _sdpa_with_fault(*args, **kwargs):
        try:
            with open(_FLAG) as handle:
                where = handle.read().strip()
        except FileNotFoundError:
            return _real_sdpa(*args, **kwargs)
        caller = os.path.basename(sys._getframe(1).f_code.co_filename)
        if _PART_OF_FILE.get(caller) == where:
            os.unlink(_FLAG)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the tests)")
        return _real_sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = _sdpa_with_fault


def _held(step: str, function):
    import time

    def holding(*args, **kwargs):
        try:
            with open(_HOLD_FLAG) as handle:
                named = handle.read().strip()
        except FileNotFoundError:
            named = None
        if named == step:
            with open(_HOLD_FLAG + ".events", "a") as events:
                events.write(f"held {step}\n")
            deadline = time.monotonic() + 120
            while os.path.exists(_HOLD_FLAG) and time.monotonic() < deadline:
                time.sleep(0.02)
            with open(_HOLD_FLAG + ".events", "a") as events:
                events.write(f"released {step}\n")
        return function(*args, **kwargs)

    return holding


def _patches() -> list:
    """(module, owner's attribute path, wrapper) for each function to replace once its module is imported."""
    patches = []
    if _HOLD_FLAG:
        patches += [("predict", "read_document", lambda f: _held("load", f)),
                    ("ocr_service.engine", "OCREngine.prepare", lambda f: _held("prepare", f)),
                    ("ocr_service.engine", "ServingLoop.submit", lambda f: _held("submit", f))]
    if _STATE_FILE:
        patches.append(("ocr_service.engine", "ServingLoop.__init__", _recording_engines))
    return patches


_engines = []


def _recording_engines(real_init):
    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        _engines.append(self)

    return recording_init


def _apply(pending: list) -> list:
    """Applies the patches whose targets exist by now; returns those still waiting for their module."""
    waiting = []
    for module_name, path, wrap in pending:
        owner = sys.modules.get(module_name)  # the predictor's module is imported when the worker loads it
        *owners, name = path.split(".")
        for part in owners:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):  # not imported yet, or half imported
            waiting.append((module_name, path, wrap))
            continue
        setattr(owner, name, wrap(getattr(owner, name)))
    return waiting


def _watch():
    import json
    import time

    pending = _patches()
    while pending:
        pending = _apply(pending)
        time.sleep(0.01)
    while _STATE_FILE:
        state = [serving.holdings() for serving in _engines]
        with open(_STATE_FILE + ".tmp", "w") as handle:
            json.dump(state, handle)
        os.replace(_STATE_FILE + ".tmp", _STATE_FILE)
        time.sleep(0.1)


if _HOLD_FLAG or _STATE_FILE:
    import threading

    threading.Thread(target=_watch, name="test-faults-watch", daemon=True).start()
