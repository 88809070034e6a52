"""benchmarks/xplane.py reads an XSpace's planes, lines and events from the wire format."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import xplane


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _event(meta_id: int, offset: int, duration: int) -> bytes:
    return _int(1, meta_id) + _int(2, offset) + _int(3, duration)


def _metadata(meta_id: int, name: str) -> bytes:
    return _bytes(4, _int(1, meta_id) + _bytes(2, _int(1, meta_id) + _bytes(2, name.encode())))


def _space() -> bytes:
    stream = _bytes(2, b"Stream #1") + b"".join(_bytes(4, e) for e in (
        _event(7, 0, 5_000_000), _event(8, 6_000_000, 1_000_000), _event(7, 9_000_000, 5_000_000)))
    copies = _bytes(2, b"Stream #2") + _bytes(4, _event(9, 2_000_000, 500_000))
    gpu = (_int(1, 3) + _bytes(2, b"/device:GPU:0") + _bytes(3, stream) + _bytes(3, copies)
           + _metadata(7, "gemm") + _metadata(8, "fusion") + _metadata(9, "memcpy")
           + _bytes(6, b"\x08\x01"))  # a plane-level stat, skipped
    host = _bytes(2, b"/host:CPU") + _bytes(3, _bytes(2, b"python"))
    return _bytes(1, gpu) + _bytes(1, host) + _bytes(4, b"vm")


def test_summary_sums_each_kernel_and_line():
    gpu, host = xplane.summarize_space(_space())
    assert (gpu.name, host.name) == ("/device:GPU:0", "/host:CPU")
    assert gpu.by_name == {"gemm": (2, 10_000_000), "fusion": (1, 1_000_000),
                           "memcpy": (1, 500_000)}, f"per-name (count, ps): {gpu.by_name}"
    stream = gpu.lines[0]
    assert (stream.name, stream.events, stream.busy_ps, stream.first_ps, stream.last_ps) == (
        "Stream #1", 3, 11_000_000, 0, 14_000_000), f"the stream's line: {stream}"
    assert host.lines[0].events == 0 and host.by_name == {}


def test_fields_refuse_an_unknown_wire_type():
    with pytest.raises(ValueError, match="wire type 3"):
        list(xplane.fields(bytes([1 << 3 | 3])))


def test_a_field_of_the_wrong_wire_type_is_refused():
    with pytest.raises(ValueError, match="expected a length-delimited field"):
        xplane.summarize_space(_int(1, 5))  # a plane as a varint
    with pytest.raises(ValueError, match="expected a varint field"):
        xplane.summarize_space(_bytes(1, _bytes(3, _bytes(4, _bytes(3, b"x")))))  # duration


def test_report_of_a_real_trace_names_the_compiled_function(tmp_path):
    f = jax.jit(lambda x: jnp.sin(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            f(x).block_until_ready()
    text = xplane.report(str(tmp_path), per=2, plane_prefix="/host:CPU")
    assert "plane /host:CPU (per 2)" in text and "us" in text, text
    assert xplane.report(str(tmp_path), plane_prefix="/device:TPU") == (
        "no plane named /device:TPU* in the trace")


def test_find_trace_names_the_folder_without_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="xplane.pb"):
        xplane.find_trace(str(tmp_path))
