"""Checkpoint blobs: round trips, livingai 0.4.x blobs, and every way a blob can be bad."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest

from livingai_tasks import Codec, CodecError, decode, encode
from livingai_tasks.codec import codec_of

pytestmark = pytest.mark.timeout(30)

STATE = json.dumps(
    {"messages": [{"role": "user", "content": f"step {i}: ünïcode ✓"} for i in range(200)]}
).encode()
NODE = "3f2a9c1e-node"


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("state", [b"", b"x", STATE, os.urandom(70_000)], ids=len)
def test_round_trip(codec: Codec, state: bytes) -> None:
    blob = encode(state, codec)
    assert blob[0] == codec.value
    assert codec_of(blob) is codec
    assert decode(blob) == state


def test_zstd_compresses_and_carries_a_crc_of_the_kind_byte_and_the_raw_bytes() -> None:
    blob = encode(STATE, Codec.ZSTD)
    assert len(blob) < len(STATE) / 3
    assert struct.unpack(">I", blob[1:5])[0] == zlib.crc32(b"\x12" + STATE)


def test_reads_blobs_of_earlier_livingai_tasks() -> None:
    # 0x02: zstd under a CRC of the raw bytes only, as written before the kind byte was covered
    import zstandard

    frame = zstandard.ZstdCompressor().compress(STATE)
    old = b"\x02" + struct.pack(">I", zlib.crc32(STATE)) + frame
    assert decode(old) == STATE


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("kind", [0x00, 0x01, 0x02, 0x10, 0x11, 0x12])
def test_a_flipped_kind_byte_is_caught_never_decoded_as_another_codec(codec: Codec,
                                                                       kind: int) -> None:
    blob = encode(STATE, codec)
    if kind == blob[0]:
        return
    with pytest.raises(CodecError, match=NODE):
        decode(bytes([kind]) + blob[1:], node_id=NODE)


def test_encode_accepts_bytearray_and_memoryview() -> None:
    assert decode(encode(bytearray(STATE))) == STATE
    assert decode(encode(memoryview(STATE))) == STATE


def test_reads_livingai_04_raw_blob_when_asked() -> None:
    assert decode(b"\x00" + STATE, legacy=True) == STATE


def test_reads_livingai_04_zlib_blob_when_asked() -> None:
    assert decode(b"\x01" + zlib.compress(STATE, 6), legacy=True) == STATE


def test_a_livingai_04_blob_is_refused_unless_asked_for() -> None:
    with pytest.raises(CodecError, match="no integrity check.*legacy=True"):
        decode(b"\x00" + STATE, node_id=NODE)


@pytest.mark.parametrize("name", ["none", "ZLIB", "zstd", 0x12, Codec.ZLIB])
def test_codec_parse_accepts_names_and_numbers(name: object) -> None:
    assert isinstance(Codec.parse(name), Codec)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["lz4", 7, ""])
def test_codec_parse_rejects_unknown(name: object) -> None:
    with pytest.raises(CodecError, match="Accepted: none, zlib, zstd"):
        Codec.parse(name)  # type: ignore[arg-type]


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0xFF]) + blob[index + 1 :]


ZSTD_BLOB = encode(STATE, Codec.ZSTD)
ZLIB_BLOB = encode(STATE, Codec.ZLIB)

BAD_BLOBS = {
    "zstd-garbage-payload": b"\x02" + struct.pack(">I", 0) + b"not a zstd frame at all",
    "zstd-flipped-crc": _flip(ZSTD_BLOB, 2),
    "zstd-flipped-payload-byte": _flip(ZSTD_BLOB, len(ZSTD_BLOB) // 2),
    "zstd-truncated": ZSTD_BLOB[: len(ZSTD_BLOB) // 2],
    "zstd-header-only": ZSTD_BLOB[:5],
    "zlib-garbage": b"\x11" + struct.pack(">I", 0) + b"garbage",
    "zlib-flipped-byte": _flip(ZLIB_BLOB, len(ZLIB_BLOB) // 2),
    "zlib-truncated": ZLIB_BLOB[:-10],
    "empty": b"",
    "unknown-codec-byte": b"\x07" + STATE,
}


@pytest.mark.parametrize("blob", list(BAD_BLOBS.values()), ids=list(BAD_BLOBS))
def test_bad_blob_raises_codec_error_naming_the_node(blob: bytes) -> None:
    with pytest.raises(CodecError) as info:
        decode(blob, node_id=NODE)
    assert NODE in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_codec_byte_says_what_is_accepted() -> None:
    with pytest.raises(CodecError, match=r"0x07.*Accepted: 0x10 \(none\), 0x11 \(zlib\), 0x12"):
        decode(b"\x07abc", node_id=NODE)


def test_crc_mismatch_is_reported_as_such() -> None:
    # A valid zstd frame under a wrong CRC: only the CRC can catch it.
    blob = b"\x12" + struct.pack(">I", zlib.crc32(b"\x12" + STATE) ^ 1) + ZSTD_BLOB[5:]
    with pytest.raises(CodecError, match=f"{NODE} is corrupt: CRC mismatch"):
        decode(blob, node_id=NODE)


@pytest.mark.parametrize("value", ["text", {"a": 1}, 3, None])
def test_non_bytes_raise_codec_error(value: object) -> None:
    with pytest.raises(CodecError, match="must be bytes"):
        encode(value)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match=f"of node {NODE} must be bytes"):
        decode(value, node_id=NODE)  # type: ignore[arg-type]


def test_without_a_node_id_the_message_still_reads() -> None:
    with pytest.raises(CodecError, match="^Checkpoint cannot be decoded"):
        decode(b"")
