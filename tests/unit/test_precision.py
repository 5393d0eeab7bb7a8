"""fp16 training: one clear line where the device cannot do it; --full_fp16 gradients unscale."""

from __future__ import annotations

import types

import pytest
import torch

from library.errors import UserError
from library.training.precision import allow_fp16_gradients, check_mixed_precision_device


def test_fp16_on_the_cpu_is_one_clear_line_before_any_model_loads(tmp_path):
    """sdxl_train.py with --mixed_precision fp16 on this CPU-only machine: a UserError, not a traceback.

    The base model is an unreadable file, so the error must come before anything is loaded.
    """
    import sdxl_train
    from accelerate.state import AcceleratorState

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not a model")
    data = tmp_path / "train" / "1_x"
    data.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(data / "a.png")
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tmp_path / "train"),
            "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--max_train_steps", "1",
            "--max_data_loader_n_workers", "0", "--mixed_precision", "fp16"]
    try:
        with pytest.raises(UserError) as exc:
            sdxl_train.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    msg = str(exc.value)
    assert "--mixed_precision fp16 needs a GPU" in msg and "bf16" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("device, ok", [("cpu", False), ("cuda", True), ("mps", True)])
def test_check_mixed_precision_device(device, ok):
    if ok:
        check_mixed_precision_device("fp16", device)
    else:
        with pytest.raises(UserError, match="fp16 needs a GPU"):
            check_mixed_precision_device("fp16", device)
    check_mixed_precision_device("bf16", device)
    check_mixed_precision_device("no", device)


def _fp16_step(scaler: torch.amp.GradScaler) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler.scale((p.float() * 2).sum()).backward()
    scaler.unscale_(opt)  # what accelerate's clip_grad_norm_ does before clipping
    assert torch.equal(p.grad, torch.full((3,), 2.0, dtype=torch.float16))  # unscaled: d(2p)/dp
    scaler.step(opt)
    scaler.update()
    return p


def test_full_fp16_gradients_unscale_through_the_grad_scaler():
    # torch's real GradScaler (on the CPU here; the GPU one has the same check) refuses fp16 grads.
    with pytest.raises(ValueError, match="FP16 gradients"):
        _fp16_step(torch.amp.GradScaler("cpu", init_scale=4.0))
    acc = types.SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=4.0))
    assert allow_fp16_gradients(acc) is True and allow_fp16_gradients(acc) is False  # patched once
    p = _fp16_step(acc.scaler)
    assert torch.allclose(p.detach().float(), torch.full((3,), 0.8), atol=1e-3)
    assert allow_fp16_gradients(types.SimpleNamespace(scaler=None)) is False  # no scaler: nothing to do
