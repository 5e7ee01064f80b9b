"""capability.png: uint8 RGB arrays → PNG bytes that Pillow decodes to the same pixels, and every refusal."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from capability import png
from capability.png import encode_png, encode_png_base64

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    # What the tiny random-weight models produce; incompressible, so encode_png stores it.
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def gradient(height: int, width: int) -> np.ndarray:
    # Smooth like a real photograph's sky; compressible, so encode_png deflates it.
    rows = np.linspace(0, 255, height, dtype=np.float64)[:, None]
    columns = np.linspace(0, 255, width, dtype=np.float64)[None, :]
    channels = [rows + 0 * columns, columns + 0 * rows, (rows + columns) / 2]
    image: np.ndarray = np.stack(channels, axis=-1).round().astype(np.uint8)
    return image


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking each length and CRC on the way (PNG §5.3, §5.5)."""
    assert data[:8] == SIGNATURE
    found, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
        assert crc == zlib.crc32(kind + body), kind
        found.append((kind, body))
        offset += 12 + length
    assert offset == len(data)
    return found


SHAPES = [(1, 1), (1, 7), (7, 1), (2, 3), (17, 33), (31, 1), (64, 65), (256, 256)]


@pytest.mark.parametrize(("height", "width"), SHAPES)
@pytest.mark.parametrize("make", [noise, gradient], ids=["noise", "gradient"])
def test_encode_png_gives_back_the_same_pixels_when_decoded_by_pillow(
    height: int, width: int, make: Callable[[int, int], np.ndarray]
) -> None:
    image = make(height, width)
    decoded = decode(encode_png(image))
    assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (width, height))
    np.testing.assert_array_equal(np.asarray(decoded), image)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[::2, 1::3],  # strided rows and columns
        lambda a: a[:, ::-1],  # negative strides
        lambda a: a[5:30, 7:20],  # a crop, rows not adjacent in memory
        lambda a: np.transpose(a, (1, 0, 2)),  # transposed: column-major pixels
        np.asfortranarray,  # Fortran order throughout
        lambda a: np.ascontiguousarray(a[..., ::-1])[..., ::-1],  # channels reversed in memory
    ],
    ids=["strided", "reversed", "crop", "transposed", "fortran", "channels-reversed"],
)
def test_encode_png_reads_the_viewed_pixels_when_input_is_not_c_contiguous(
    view: Callable[[np.ndarray], np.ndarray],
) -> None:
    image = view(gradient(40, 50) ^ (noise(40, 50, seed=3) & 0x0F))  # smooth with grain: the compressing path
    assert not image.flags.c_contiguous
    np.testing.assert_array_equal(np.asarray(decode(encode_png(image))), image)


def test_encode_png_leaves_the_input_untouched_when_encoding() -> None:
    image = gradient(32, 32)
    before = image.copy()
    encode_png(image)
    np.testing.assert_array_equal(image, before)


def test_encode_png_returns_identical_bytes_when_called_twice_with_the_same_pixels() -> None:
    image = gradient(64, 48)
    assert encode_png(image) == encode_png(image.copy())


def test_encode_png_writes_rgb8_header_first_and_image_trailer_last_when_encoding() -> None:
    layout = chunks(encode_png(gradient(33, 65)))
    kinds = [kind for kind, _ in layout]
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert set(kinds[1:-1]) == {b"IDAT"}
    # width, height, bit depth 8, colour type 2 (truecolour), compression 0, filter method 0, no interlace
    assert layout[0][1] == struct.pack(">IIBBBBB", 65, 33, 8, 2, 0, 0, 0)
    assert layout[-1][1] == b""


def test_encode_png_filters_every_scanline_with_up_when_encoding() -> None:
    image = gradient(20, 9)
    idat = b"".join(body for kind, body in chunks(encode_png(image)) if kind == b"IDAT")
    scanlines = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(20, 1 + 9 * 3)
    assert set(scanlines[:, 0].tolist()) == {2}
    # Up: the first row as it is, then each row minus the one above, modulo 256 (PNG §9.2)
    flat = image.reshape(20, 27).astype(np.int16)
    np.testing.assert_array_equal(scanlines[0, 1:], flat[0])
    np.testing.assert_array_equal(scanlines[1:, 1:], (flat[1:] - flat[:-1]) % 256)


def test_encode_png_compresses_well_when_the_image_is_smooth() -> None:
    image = gradient(256, 256)
    # Up leaves small repeating residuals here; Z_RLE codes them in about 1.5 bits a byte (measured 0.19)
    assert len(encode_png(image)) < image.nbytes / 4


def test_encode_png_stays_within_a_percent_of_the_raw_size_when_the_image_is_noise() -> None:
    image = noise(256, 256)
    assert len(encode_png(image)) < image.nbytes * 1.01


def deflate_levels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the zlib level of every deflate encode_png runs: the row sample's first, then the image's."""
    levels: list[int] = []
    real_deflate = png._deflate

    def spy(data: memoryview, level: int) -> bytes:
        levels.append(level)
        return real_deflate(data, level)

    monkeypatch.setattr(png, "_deflate", spy)
    return levels


def test_encode_png_stores_the_image_uncompressed_when_a_row_sample_does_not_shrink(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    levels = deflate_levels(monkeypatch)
    encode_png(noise(128, 128))
    assert levels == [1, 0]


def test_encode_png_deflates_the_image_when_a_row_sample_shrinks(monkeypatch: pytest.MonkeyPatch) -> None:
    levels = deflate_levels(monkeypatch)
    encode_png(gradient(128, 128))
    assert levels == [1, 1]


def test_encode_png_splits_image_data_into_several_idat_chunks_when_it_exceeds_the_chunk_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(png, "_MAX_CHUNK_LENGTH", 1000)
    image = noise(40, 30)
    data = encode_png(image)
    idat_lengths = [len(body) for kind, body in chunks(data) if kind == b"IDAT"]
    assert len(idat_lengths) > 1
    assert max(idat_lengths) == 1000
    np.testing.assert_array_equal(np.asarray(decode(data)), image)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int8, np.bool_, np.int64])
def test_encode_png_refuses_naming_the_dtype_when_it_is_not_uint8(dtype: type) -> None:
    image: np.ndarray = np.zeros((4, 5, 3), dtype=dtype)
    with pytest.raises(ValueError, match=rf"dtype {np.dtype(dtype).name}, shape \(4, 5, 3\): dtype must be uint8"):
        encode_png(image)


@pytest.mark.parametrize("shape", [(4, 5), (60,), (4, 5, 3, 1), ()])
def test_encode_png_refuses_naming_the_shape_when_it_is_not_three_dimensional(shape: tuple[int, ...]) -> None:
    image = np.zeros(shape, dtype=np.uint8)
    with pytest.raises(ValueError, match=rf"shape {re.escape(str(shape))}: {len(shape)} dimensions, expected 3"):
        encode_png(image)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_encode_png_refuses_naming_the_channels_when_they_are_not_rgb(channels: int) -> None:
    with pytest.raises(ValueError, match=rf"shape \(4, 5, {channels}\): {channels} channels, expected 3 \(RGB\)"):
        encode_png(np.zeros((4, 5, channels), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3), (0, 0, 3)])
def test_encode_png_refuses_naming_the_shape_when_the_image_is_empty(shape: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match=rf"shape {re.escape(str(shape))}: PNG needs at least one row and one column"):
        encode_png(np.zeros(shape, dtype=np.uint8))


def test_encode_png_refuses_naming_the_type_when_input_is_not_an_array() -> None:
    with pytest.raises(ValueError, match="got list"):
        encode_png([[[0, 0, 0]]])  # type: ignore[arg-type]


def test_encode_png_base64_decodes_to_the_png_bytes_when_given_an_image() -> None:
    image = noise(9, 11)
    text = encode_png_base64(image)
    assert text.isascii()
    assert "\n" not in text
    assert base64.b64decode(text, validate=True) == encode_png(image)


def test_encode_png_base64_refuses_like_encode_png_when_the_image_is_invalid() -> None:
    with pytest.raises(ValueError, match="4 channels"):
        encode_png_base64(np.zeros((2, 2, 4), dtype=np.uint8))
