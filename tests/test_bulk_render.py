"""The bulk run's document reader (ocr_service/bulk_render.py): PDFs rendered by a worker process per reader
thread give what the predictor's own reading gives; a refused PDF is refused with the same message; workers
ignore Ctrl-C, a dead worker is replaced, and a document on which workers keep dying fails alone."""

import os
import signal
import threading

import numpy as np
import pytest

from input_corpus import encrypted_pdf_bytes, pdf_bytes, png_bytes, document, write
from ocr_service import bulk_render
from ocr_service.bulk_render import DocumentReader, RendererCrashed
from ocr_service.errors import InputError
from ocr_service.inputs import Limits, Page, load_pages
from ocr_service.pipeline import Options

LIMITS = Limits(max_pages=50, max_pixels=64_000_000, pdf_dpi=72)


@pytest.fixture
def reader():
    reader = DocumentReader()
    yield reader
    reader.close()


def same_pages(got, expected):
    assert [p.number for p in got] == [p.number for p in expected]
    for a, b in zip(got, expected):
        assert a.image.mode == b.image.mode and a.image.size == b.image.size
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_a_pdf_rendered_by_a_worker_equals_the_predictors_reading(reader, tmp_path):
    path = write(tmp_path, "three.pdf", pdf_bytes([(300, 400), (400, 300), (200, 200)]))
    same_pages(reader.read(path, Options(pages="1,3"), LIMITS), load_pages(path, pages="1,3", **LIMITS.as_kwargs()))
    assert len(reader._started) == 1  # this thread's worker, which stays for its next document
    same_pages(reader.read(path, Options(), LIMITS), load_pages(path, **LIMITS.as_kwargs()))
    assert len(reader._started) == 1


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_GETPIPE_SZ"), reason="pipe sizes are Linux's")
def test_a_workers_answers_come_through_a_wide_pipe(reader, tmp_path):
    import fcntl

    path = write(tmp_path, "one.pdf", pdf_bytes([(300, 400)]))
    reader.read(path, Options(), LIMITS)
    answers = reader._started[0].process.stdout
    with open("/proc/sys/fs/pipe-max-size") as limit:
        expected = min(bulk_render.ANSWER_PIPE_BYTES, int(limit.read()))
    assert fcntl.fcntl(answers.fileno(), fcntl.F_GETPIPE_SZ) >= expected


def test_pages_pixels_travel_beside_the_pickle_and_come_back_whole():
    import io

    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 47, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    rgb.info["dpi"] = (144, 144)
    stream = io.BytesIO()
    bulk_render._send(stream, (True, [Page(rgb, 1), Page(rgba, 2)]))
    sent = stream.getvalue()
    (pickle_length,) = bulk_render._LENGTH.unpack(sent[:bulk_render._LENGTH.size])
    assert pickle_length < 1024  # the pixels are not in the pickle
    assert len(sent) > rgb.width * rgb.height * 3 + rgba.width * rgba.height * 4
    stream.seek(0)
    ok, pages = bulk_render._receive(stream)
    assert ok and [p.number for p in pages] == [1, 2]
    for got, expected in zip([p.image for p in pages], [rgb, rgba]):
        assert got.mode == expected.mode and got.size == expected.size
        assert np.array_equal(np.asarray(got), np.asarray(expected))
        assert not got.readonly  # an image of its own, as the predictor's reading gives
    assert pages[0].image.info["dpi"] == (144, 144)
    stream.seek(0)
    stream.truncate(len(sent) - 5)  # a worker that died while answering
    with pytest.raises(EOFError):
        bulk_render._receive(stream)


def test_images_are_read_in_the_calling_thread(reader, tmp_path):
    path = write(tmp_path, "page.png", png_bytes(document(300, 200)))
    same_pages(reader.read(path, Options(), LIMITS), load_pages(path, **LIMITS.as_kwargs()))
    assert reader._started == []


def test_a_refused_pdf_is_refused_with_the_predictors_message(reader, tmp_path):
    path = write(tmp_path, "locked.pdf", encrypted_pdf_bytes())
    with pytest.raises(InputError) as expected:
        load_pages(path, **LIMITS.as_kwargs())
    with pytest.raises(InputError, match="password-protected") as got:
        reader.read(path, Options(), LIMITS)
    assert str(got.value) == str(expected.value)
    pages = write(tmp_path, "two.pdf", pdf_bytes([(300, 400), (300, 400)]))
    with pytest.raises(InputError, match="out of range"):
        reader.read(pages, Options(pages="3"), LIMITS)


def test_workers_ignore_ctrl_c_and_each_reader_thread_has_its_own(reader, tmp_path):
    path = write(tmp_path, "one.pdf", pdf_bytes([(300, 400)]))
    results = []

    def read():
        reader.start_worker()
        results.append(len(reader.read(path, Options(), LIMITS)))

    threads = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [1, 1] and len(reader._started) == 2
    if hasattr(os, "getpriority"):  # the renderers give way to the engine's threads
        for worker in reader._started:
            niceness = os.getpriority(os.PRIO_PROCESS, worker.process.pid)
            assert niceness == min(os.getpriority(os.PRIO_PROCESS, 0) + bulk_render.RENDERER_NICENESS, 19)
    for worker in reader._started:
        worker.process.send_signal(signal.SIGINT)
    assert len(reader.read(path, Options(), LIMITS)) == 1
    assert all(worker.alive() for worker in reader._started)


def test_a_thread_that_has_read_its_last_document_stops_its_worker(reader, tmp_path):
    path = write(tmp_path, "one.pdf", pdf_bytes([(300, 400)]))
    reader.read(path, Options(), LIMITS)
    (worker,) = reader._started
    reader.stop_worker()
    assert not worker.alive() and reader._started == []
    reader.stop_worker()  # nothing left to stop
    assert len(reader.read(path, Options(), LIMITS)) == 1  # a later document starts another
    assert len(reader._started) == 1


def test_a_dead_worker_is_replaced(reader, tmp_path):
    path = write(tmp_path, "one.pdf", pdf_bytes([(300, 400)]))
    reader.start_worker()
    first = reader._started[0]
    first.process.kill()
    first.process.wait()
    assert len(reader.read(path, Options(), LIMITS)) == 1
    assert len(reader._started) == 2 and reader._started[1].alive()


def test_a_document_whose_workers_keep_dying_fails_alone(reader, tmp_path, monkeypatch):
    path = write(tmp_path, "one.pdf", pdf_bytes([(300, 400)]))
    real_ask = bulk_render._Worker.ask

    def dies_on_this_document(worker, request):
        if request[0] == str(path):
            worker.process.kill()  # as PDFium crashing would
            worker.process.wait()
        return real_ask(worker, request)

    monkeypatch.setattr(bulk_render._Worker, "ask", dies_on_this_document)
    with pytest.raises(RendererCrashed, match="died on this document, twice"):
        reader.read(path, Options(), LIMITS)
    other = write(tmp_path, "other.pdf", pdf_bytes([(300, 400), (300, 400)]))
    assert len(reader.read(other, Options(), LIMITS)) == 2  # the run goes on


def test_a_closed_reader_leaves_no_worker_running(tmp_path):
    reader = DocumentReader()
    reader.read(write(tmp_path, "one.pdf", pdf_bytes([(300, 400)])), Options(), LIMITS)
    workers = list(reader._started)
    reader.close()
    assert workers and not any(worker.alive() for worker in workers)
