"""Fault injection for the server tests, loaded at interpreter start when tests put this folder on PYTHONPATH.

While the file named by DEEPSEEK_OCR_TEST_OOM_FLAG exists, the next attention call in the thread it names
("encode": the request's own thread, which runs the vision encoder; "decode": the batch worker) raises
CUDA's out-of-memory error class, as a GPU would; the flag is removed when it fires.
"""
import os
import threading

_FLAG = os.environ.get("DEEPSEEK_OCR_TEST_OOM_FLAG")

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
        in_worker = threading.current_thread().name == "deepseek-ocr-decode"
        if (where == "decode") == in_worker:
            os.unlink(_FLAG)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the tests)")
        return _real_sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = _sdpa_with_fault
