import numpy as np
import pytest
from imagekinds import write_bad_files, write_odd_valid_files
from PIL import Image

from retailklip.errors import InvalidImageError
from retailklip.images import IMAGE_SUFFIXES, load_image, to_rgb

BAD_KINDS = [
    "truncated_jpeg", "zero_bytes", "text_as_jpg", "random_bytes", "html_as_png", "bomb_png",
    "jpeg_header_only", "animated_gif", "multipage_tiff", "directory", "missing",
]


@pytest.fixture(scope="module")
def photo(grocery):
    return grocery / "val/Fruit/Banana/Banana_001.jpg"


@pytest.fixture(scope="module")
def bad_files(photo, tmp_path_factory):
    return write_bad_files(photo, tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def odd_files(photo, tmp_path_factory):
    return write_odd_valid_files(photo, tmp_path_factory.mktemp("odd"))


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_one_clear_error(bad_files, kind):
    path = bad_files[kind]
    with pytest.raises(InvalidImageError) as ei:
        load_image(path)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg


def test_bomb_is_refused_from_header_without_decoding(bad_files):
    with pytest.raises(InvalidImageError, match="(30000x30000|900000000 pixels)"):
        load_image(bad_files["bomb_png"])


@pytest.mark.parametrize("kind", ["cmyk_jpeg", "grey16_png", "palette_transparency_png", "rgba_png", "la_png",
                                  "bilevel_png", "grey_jpeg", "exif_rotated_jpeg", "webp"])
def test_odd_valid_images_are_decoded(odd_files, photo, kind):
    path, mode = odd_files[kind]
    im = load_image(path)
    assert im.mode == mode
    if kind == "exif_rotated_jpeg":
        assert im.size == (64, 96)  # 96x64 stored, EXIF says rotate 90 degrees
    else:
        assert im.size == (96, 64)
    ref = np.asarray(Image.open(photo).convert("RGB").resize((96, 64)).convert("L"), dtype=np.float32)
    got = np.asarray(to_rgb(im).convert("L"), dtype=np.float32)
    if kind == "exif_rotated_jpeg":
        got = np.rot90(got, k=1)  # undo the display rotation to compare with the stored pixels
    if kind not in ("palette_transparency_png", "rgba_png", "la_png", "bilevel_png"):
        assert np.abs(got - ref).mean() < 6.0  # same picture, up to JPEG/colour-space rounding


def test_sixteen_bit_is_rescaled_not_clipped(odd_files):
    im = load_image(odd_files["grey16_png"][0])
    arr = np.asarray(im)
    assert arr.max() > 200 and arr.min() < 60  # a clipped conversion would be nearly all 255


def test_transparency_composited_onto_background(odd_files):
    im = load_image(odd_files["rgba_png"][0])
    rgb = np.asarray(to_rgb(im, background=(10, 20, 30)))
    assert (rgb[:, :20] == (10, 20, 30)).all()
    assert not (rgb[:, 20:] == (10, 20, 30)).all()


def test_numpy_and_bytes_sources(photo):
    arr = np.asarray(Image.open(photo).convert("RGB"))
    assert load_image(arr).size == (arr.shape[1], arr.shape[0])
    assert load_image(photo.read_bytes()).size == (arr.shape[1], arr.shape[0])
    with pytest.raises(InvalidImageError, match="uint8"):
        load_image(arr.astype(np.float32))
    with pytest.raises(InvalidImageError, match="shape"):
        load_image(np.zeros((4, 4, 2), np.uint8))


def test_pixel_limit_applies_to_pil_inputs():
    with pytest.raises(InvalidImageError, match="pixels"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=5000)


@pytest.mark.parametrize("suffix", sorted(IMAGE_SUFFIXES))
def test_every_image_suffix_is_decoded(tmp_path, suffix):
    """IMAGE_SUFFIXES lists only what load_image can read here: a file written with each decodes."""
    Image.init()
    fmt = Image.registered_extensions()[suffix]
    path = tmp_path / f"im{suffix}"
    Image.new("RGB", (16, 12), (200, 30, 30)).save(path, format=fmt)
    assert load_image(path).size == (16, 12)
