"""SIGTERM inside a training loop is a request to checkpoint and stop, not an exit."""

import os
import signal
import threading
import time

from dpfed.train import preemption


def _sigterm_self() -> None:
    """Sends this process SIGTERM and lets Python run its handler (at the next bytecode)."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)


def test_nothing_is_reached_without_a_sigterm():
    with preemption.armed():
        assert not preemption.reached(), "a loop without a SIGTERM must not stop"


def test_a_sigterm_inside_the_block_is_a_request_to_stop():
    with preemption.armed():
        _sigterm_self()  # with Python's default this test process would end here
        assert preemption.reached(), "a SIGTERM in the loop must make it stop at its step"


def test_the_previous_handler_is_back_after_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.armed():
        assert signal.getsignal(signal.SIGTERM) is not before, "the block installs a handler"
    assert signal.getsignal(signal.SIGTERM) is before, (
        "outside a loop SIGTERM must keep the handler it had (Python's default: exit)")


def test_a_request_of_an_earlier_loop_is_forgotten():
    with preemption.armed():
        _sigterm_self()
    with preemption.armed():
        assert not preemption.reached(), (
            "a second loop (fedgan_debug's second GAN after a finished first) must not stop "
            "for a SIGTERM the first loop already answered")


def test_a_loop_off_the_main_thread_installs_nothing():
    before, seen = signal.getsignal(signal.SIGTERM), []

    def loop():
        with preemption.armed():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    assert seen == [before], "only the main thread can set a handler; others must not try"


def test_the_message_names_the_step_and_where_it_is_saved():
    error = preemption.PreemptedError(12, "round", "/w/checkpoints")
    assert error.step == 12
    assert "round 12" in str(error) and "/w/checkpoints" in str(error), str(error)
    assert preemption.EXIT_CODE == 143, "128 + SIGTERM, as a shell reports a SIGTERMed process"
