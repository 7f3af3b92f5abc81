"""Finding 7: a FIFO or device given as the model or the text, a prompt that is not UTF-8 (in the arguments or typed
into the chat), and one LanguageModel used from several threads: each ends with one line or the right text, never a
hang, unbounded memory, a traceback or another request's text."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import runtime
from craft import REPO, TIMEOUT, command, limited, one_error_line


def test_a_fifo_as_the_model_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "m.nq"
    os.mkfifo(fifo)
    one_error_line(command("nqrun", fifo, "-p", "hi", timeout=10), "nqrun", "not a regular file")
    one_error_line(command("nqinfo", fifo, timeout=10), "nqinfo", "not a regular file")


def test_a_fifo_or_a_device_as_the_text_is_refused(text_model, tmp_path):
    fifo = tmp_path / "text"
    os.mkfifo(fifo)
    for text in (fifo, "/dev/zero"):
        one_error_line(command("nqeval", text_model, "--text", text, "--backend", "numpy", timeout=10), "nqeval",
                       "not a regular file")


def test_a_prompt_that_is_not_utf8_is_one_line(text_model):
    code = ("import sys; sys.argv[0] = 'nqrun'; from runtime.cli import run_main; run_main()")
    done = subprocess.run([sys.executable, "-c", code, str(text_model).encode(), b"-p", b"caf\xe9", b"--backend",
                           b"numpy"], capture_output=True, timeout=TIMEOUT, preexec_fn=limited, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    one_error_line(done, "nqrun", "UTF-8")


def test_the_chat_survives_a_line_that_is_not_utf8(text_model):
    """The bad line gets one error line; the next line is answered and the chat ends normally."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'nqrun'; from runtime.cli import run_main; run_main()",
         str(text_model), "--chat", "-n", "3", "--backend", "numpy", "--temperature", "0"],
        input=b"caf\xe9\nhello\n/exit\n", capture_output=True, timeout=TIMEOUT, preexec_fn=limited, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "UTF-8" in errors[0], err
    assert done.stdout.count(b"> ") >= 3  # prompted again after the bad line and after the answer


def test_one_model_from_four_threads_gives_each_its_own_text(text_model):
    m = runtime.load(text_model, backend="numpy")
    prompts = ["alpha", "bravo charlie", "delta echo foxtrot", "golf"]
    expected = [m.generate(p, max_tokens=12, temperature=0) for p in prompts]
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                got[i] = m.generate(prompts[i], max_tokens=12, temperature=0)
                assert got[i] == expected[i]
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [got[i] for i in range(4)] == expected


def test_a_stream_left_open_does_not_corrupt_the_next_generation(text_model):
    """The same thread starting a second generation while its first stream is still open: refused in one line,
    not interleaved."""
    m = runtime.load(text_model, backend="numpy")
    first = m.stream("alpha", max_tokens=64, temperature=0)
    next(first)
    try:
        m.generate("bravo", max_tokens=4, temperature=0)
        raised = None
    except runtime.NQRunError as e:
        raised = e
    assert raised is not None and "\n" not in str(raised)
    first.close()
    assert m.generate("bravo", max_tokens=4, temperature=0) == runtime.load(text_model, backend="numpy").generate(
        "bravo", max_tokens=4, temperature=0)
