import pytest
import torch

from retailklip.devices import PRECISIONS, DeviceError, autocast, resolve_device
from retailklip.errors import RetailKlipError


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match=r"invalid device 'toaster'.*'cpu' or 'cuda'"):
        resolve_device("toaster")
    assert issubclass(DeviceError, RetailKlipError) and issubclass(DeviceError, ValueError)

    class OptionError(Exception):
        pass

    with pytest.raises(OptionError, match="invalid device"):
        resolve_device("toaster", error=OptionError)


def test_unavailable_devices_fail_in_one_line():
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(DeviceError, match=rf"has {n} CUDA device"):
            resolve_device(f"cuda:{n}")
    else:
        with pytest.raises(DeviceError, match=r"'cuda:1' requested but CUDA is not available here; use --device cpu"):
            resolve_device("cuda:1")
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="MPS is not available"):
            resolve_device("mps")


def test_autocast():
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert set(PRECISIONS) == {"fp32", "bf16", "fp16"}
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast("cpu", "int8")
