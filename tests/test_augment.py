import numpy as np
import pytest
from PIL import Image

from retailklip.augment import augment_reference
from retailklip.images import load_image


@pytest.fixture(scope="module")
def packshot(iconic):
    return load_image(iconic[0][2])


def test_k_views_deterministic_for_seed(packshot):
    a = augment_reference(packshot, 6, seed=3)
    b = augment_reference(packshot, 6, seed=3)
    c = augment_reference(packshot, 6, seed=4)
    assert len(a) == 6
    assert all(v.size == packshot.size and v.mode == packshot.mode for v in a)
    assert a[0] is packshot or np.array_equal(np.asarray(a[0]), np.asarray(packshot))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[1:], c[1:]))
    # Views differ from the reference and from each other.
    arrs = [np.asarray(v, dtype=np.int16) for v in a]
    assert all(np.abs(arrs[i] - arrs[0]).mean() > 1 for i in range(1, 6))


def test_global_rng_untouched(packshot):
    import torch

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    augment_reference(packshot, 3)
    assert torch.equal(torch.rand(3), expected)


def test_rgba_and_bad_arguments(packshot):
    views = augment_reference(packshot.convert("RGBA"), 3)
    assert all(v.mode == "RGBA" for v in views)
    with pytest.raises(ValueError, match=">= 1"):
        augment_reference(packshot, 0)
    with pytest.raises(ValueError, match="mode"):
        augment_reference(Image.new("L", (8, 8)), 2)
