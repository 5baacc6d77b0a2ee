"""Fault injection for the server tests, loaded at interpreter start when tests put this folder on PYTHONPATH.

While the file named by DEEPSEEK_OCR_TEST_OOM_FLAG exists, the next attention call of the part it names
("encode": the vision encoder; "decode": the decoder, prefill or decode step) raises CUDA's
out-of-memory error class, as a GPU would; the flag is removed when it fires.

With DEEPSEEK_OCR_TEST_STATE_FILE set, a thread writes what every engine of the process holds (rows,
cache blocks, pages waiting, predictions) to that file as JSON every 0.1 s, so that a test can check
the server's scheduler state from outside the process.
"""
import os
import sys

_FLAG = os.environ.get("DEEPSEEK_OCR_TEST_OOM_FLAG")
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

if _STATE_FILE:
    import json
    import threading
    import time

    def _watch_engines():
        engines = []
        while not engines:  # the engine module is imported when the predictor's setup runs
            module = sys.modules.get("ocr_service.engine")
            serving_loop = getattr(module, "ServingLoop", None)  # None while the module is half imported
            if serving_loop is not None and not hasattr(serving_loop, "_instances"):
                real_init = serving_loop.__init__
                serving_loop._instances = engines

                def recording_init(self, *args, **kwargs):
                    real_init(self, *args, **kwargs)
                    engines.append(self)

                serving_loop.__init__ = recording_init
            time.sleep(0.01)
        while True:
            state = [serving.holdings() for serving in engines]
            with open(_STATE_FILE + ".tmp", "w") as handle:
                json.dump(state, handle)
            os.replace(_STATE_FILE + ".tmp", _STATE_FILE)
            time.sleep(0.1)

    threading.Thread(target=_watch_engines, name="test-state-watch", daemon=True).start()
