"""Tests of workers/models.py: real loading code on tiny random models saved to tmp dirs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# No hub access: every load must resolve local paths. Set before transformers/diffusers import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from workers.errors import UserError
from workers.classifier import Classifier
from workers.denoiser import Denoiser
from workers.models import describe_source, load_classifier, load_denoiser
from workers.schedule import NoiseSchedule, openai_schedule

ROOT = Path(__file__).resolve().parents[2]
DIGITS_DENOISER = ROOT / "workers" / "assets" / "digits" / "denoiser.safetensors"


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: OpenAI's UNet zero-inits its output conv, which would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _assert_inference_ready(module: torch.nn.Module) -> None:
    assert not module.training
    assert all(not m.training for m in module.modules())
    assert all(not p.requires_grad for p in module.parameters())


def _one_line_user_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# Hugging Face classifiers


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10,
    )
    ViTForImageClassification(cfg).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def beit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor

    d = tmp_path_factory.mktemp("beit")
    torch.manual_seed(1)
    cfg = BeitConfig(
        image_size=48, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10, use_relative_position_bias=True,
    )
    BeitForImageClassification(cfg).save_pretrained(d)
    BeitImageProcessor(
        size={"height": 48, "width": 48}, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(d)
    return d


def _hf_reference(model_dir: Path, x01: torch.Tensor, size: int) -> torch.Tensor:
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir, local_files_only=True).eval()
    x = x01
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        return model(pixel_values=(x - 0.5) / 0.5).logits


def test_hf_vit_matches_manual_forward(vit_dir: Path) -> None:
    clf = load_classifier(f"hf:{vit_dir}")
    assert isinstance(clf, Classifier) and clf.num_classes == 10
    _assert_inference_ready(clf)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = clf(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, _hf_reference(vit_dir, x, 32), rtol=1e-5, atol=1e-5)

    # A larger input is downsized; grey input is repeated to the model's 3 channels.
    big = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out_big = clf(big)
    torch.testing.assert_close(out_big, _hf_reference(vit_dir, big.expand(-1, 3, -1, -1), 32), rtol=1e-5, atol=1e-5)


def test_hf_beit_upsizes_like_pil_bicubic(beit_dir: Path) -> None:
    from PIL import Image

    clf = load_classifier(f"hf:{beit_dir}")
    assert clf.num_classes == 10 and clf.size == (48, 48)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = clf(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, _hf_reference(beit_dir, x, 48), rtol=1e-5, atol=1e-5)

    # The documented reason for antialias=True: it reproduces PIL's bicubic, also when upsizing.
    pre = clf.preprocess(x)[0, 0] * 0.5 + 0.5
    pil = Image.fromarray(x[0, 0].numpy()).resize((48, 48), Image.BICUBIC)
    np.testing.assert_allclose(pre.numpy(), np.asarray(pil), atol=1e-4)


def test_hf_missing_preprocessor_config(vit_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "no_proc"
    d.mkdir()
    for f in vit_dir.iterdir():
        if f.name != "preprocessor_config.json":
            (d / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError) as e:
        load_classifier(f"hf:{d}")
    _one_line_user_error(e, "preprocessor_config.json", str(d))


# --------------------------------------------------------------------------------------------
# TorchScript classifiers


class _TinyNet(torch.nn.Module):
    def __init__(self, with_attr: bool):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 7)
        if with_attr:
            self.num_classes = 7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) * 2.0 - 1.0)


def test_torchscript_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(5)
    net = _TinyNet(with_attr=True).eval()
    path = tmp_path / "clf.pt"
    torch.jit.script(net).save(str(path))
    clf = load_classifier(f"torchscript:{path}")
    assert clf.num_classes == 7
    _assert_inference_ready(clf)
    x = torch.rand(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), net(x))


def test_torchscript_num_classes_by_probe(tmp_path: Path) -> None:
    path = tmp_path / "clf.pt"
    torch.jit.script(_TinyNet(with_attr=False)).save(str(path))
    with pytest.raises(UserError) as e:
        load_classifier(f"torchscript:{path}")
    _one_line_user_error(e, str(path), "num_classes")
    assert load_classifier(f"torchscript:{path}", input_shape=(3, 4, 4)).num_classes == 7


def test_torchscript_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a torchscript archive")
    with pytest.raises(UserError) as e:
        load_classifier(f"torchscript:{path}")
    _one_line_user_error(e, str(path))


# --------------------------------------------------------------------------------------------
# diffusers denoisers


def _tiny_unet2d(out_channels: int):
    from diffusers import UNet2DModel

    torch.manual_seed(6)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )
    _randomize(unet, 7)
    return unet.eval()


@pytest.mark.parametrize(
    "beta_schedule,variance_type,name,learn_sigma,sigma_small,pipeline_layout",
    [
        ("linear", "fixed_small", "linear", False, True, False),
        ("squaredcos_cap_v2", "learned_range", "cosine", True, False, True),
    ],
)
def test_diffusers_denoiser(
    tmp_path: Path, beta_schedule: str, variance_type: str, name: str, learn_sigma: bool, sigma_small: bool,
    pipeline_layout: bool,
) -> None:
    from diffusers import DDPMScheduler

    unet = _tiny_unet2d(2 if learn_sigma else 1)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, variance_type=variance_type)
    if pipeline_layout:
        unet.save_pretrained(tmp_path / "unet")
        sched.save_pretrained(tmp_path / "scheduler")
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    else:
        unet.save_pretrained(tmp_path)
        sched.save_pretrained(tmp_path)

    den = load_denoiser(f"diffusers:{tmp_path}")
    assert isinstance(den, Denoiser)
    _assert_inference_ready(den)
    assert den.schedule.name == name and den.schedule.T == 1000
    assert den.schedule.betas.dtype == np.float64
    np.testing.assert_allclose(den.schedule.betas, sched.betas.double().numpy(), rtol=1e-6)
    if name == "cosine":
        np.testing.assert_array_equal(den.schedule.betas, NoiseSchedule.from_name("cosine", 1000).betas)
    assert (den.learn_sigma, den.sigma_small, den.rescale_timesteps) == (learn_sigma, sigma_small, False)
    assert (den.in_channels, den.image_size) == (1, 8)

    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0, 250, 999])
    with torch.no_grad():
        eps, v = den(x, t)
        raw = unet(x, t).sample
    assert eps.shape == x.shape
    torch.testing.assert_close(eps, raw[:, :1])
    if learn_sigma:
        torch.testing.assert_close(v, raw[:, 1:])
    else:
        assert v is None


def test_diffusers_rejects_v_prediction(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    _tiny_unet2d(1).save_pretrained(tmp_path)
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path)
    with pytest.raises(UserError) as e:
        load_denoiser(f"diffusers:{tmp_path}")
    _one_line_user_error(e, "prediction_type", "epsilon")


def test_diffusers_missing_scheduler(tmp_path: Path) -> None:
    _tiny_unet2d(1).save_pretrained(tmp_path)
    with pytest.raises(UserError) as e:
        load_denoiser(f"diffusers:{tmp_path}")
    _one_line_user_error(e, "scheduler_config.json", str(tmp_path))


# --------------------------------------------------------------------------------------------
# OpenAI denoisers


def _tiny_flags(learn_sigma: bool, **extra: object) -> dict:
    return {
        "in_channels": 1, "image_size": 8, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
        "attention_resolutions": "2", "num_heads": 2, "learn_sigma": learn_sigma, **extra,
    }


def _save_openai(tmp_path: Path, flags: dict, suffix: str, seed: int = 9) -> tuple[Path, torch.nn.Module]:
    from workers.unet import build_openai_unet

    net = build_openai_unet(flags)
    _randomize(net, seed)
    path = tmp_path / f"model{suffix}"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, net.eval()


@pytest.mark.parametrize("suffix,learn_sigma", [(".safetensors", True), (".pt", False)])
def test_openai_denoiser(tmp_path: Path, suffix: str, learn_sigma: bool) -> None:
    flags = _tiny_flags(learn_sigma, diffusion_steps=4000, noise_schedule="cosine", rescale_timesteps=True)
    path, net = _save_openai(tmp_path, flags, suffix)
    flags_file = tmp_path / "flags.json"
    flags_file.write_text(json.dumps({"flags": flags}))

    den = load_denoiser(f"openai:{path}", str(flags_file))
    _assert_inference_ready(den)
    assert den.schedule.name == "cosine" and den.schedule.T == 4000
    # The chain create_gaussian_diffusion builds: through SpacedDiffusion even without respacing, so
    # the betas are recomputed from abar (~1e-12 relative) while abar itself is the training one.
    np.testing.assert_array_equal(den.schedule.betas, openai_schedule("cosine", 4000).betas)
    np.testing.assert_array_equal(den.schedule.alphas_cumprod, NoiseSchedule.from_name("cosine", 4000).alphas_cumprod)
    assert (den.learn_sigma, den.sigma_small, den.rescale_timesteps) == (learn_sigma, False, True)
    assert (den.in_channels, den.image_size) == (1, 8)

    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    t = torch.tensor([100.0, 2345.6])  # real timesteps of the 4000-step chain
    with torch.no_grad():
        eps, v = den(x, t)
        raw = net(x, t * 1000.0 / 4000.0)
        unscaled = net(x, t)
    assert eps.shape == x.shape
    torch.testing.assert_close(eps, raw[:, :1])
    assert not torch.allclose(raw, unscaled)  # the rescaling is visible, so the check above means something
    if learn_sigma:
        assert v is not None and v.shape == x.shape
        torch.testing.assert_close(v, raw[:, 1:])
    else:
        assert v is None


def test_openai_flags_dict_and_linear_schedule(tmp_path: Path) -> None:
    flags = _tiny_flags(False, sigma_small=True)
    path, net = _save_openai(tmp_path, flags, ".safetensors")
    den = load_denoiser(f"openai:{path}", flags)
    assert den.schedule.name == "linear" and den.schedule.T == 1000
    assert den.sigma_small and not den.rescale_timesteps
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(den(x, torch.tensor([7]))[0], net(x, torch.tensor([7])))


def test_openai_errors(tmp_path: Path) -> None:
    flags = _tiny_flags(True)
    path, _ = _save_openai(tmp_path, flags, ".safetensors")

    with pytest.raises(UserError) as e:
        load_denoiser(f"openai:{path}")
    _one_line_user_error(e, "--model-flags", str(path))

    with pytest.raises(UserError) as e:
        load_denoiser(f"openai:{path}", {**flags, "num_channels": 64})
    _one_line_user_error(e, str(path), "does not match")

    # timestep_respacing is honoured (SpacedDiffusion); only strings OpenAI cannot space are refused.
    assert load_denoiser(f"openai:{path}", {**flags, "timestep_respacing": "100"}).schedule.T == 100
    with pytest.raises(UserError) as e:
        load_denoiser(f"openai:{path}", {**flags, "timestep_respacing": "2000"})
    _one_line_user_error(e, "timestep_respacing", str(path))

    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError) as e:
        load_denoiser(f"openai:{missing}", flags)
    _one_line_user_error(e, str(missing))

    with pytest.raises(UserError) as e:
        load_denoiser(f"openai:{path}", str(tmp_path / "no_flags.json"))
    _one_line_user_error(e, "no_flags.json")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError) as e:
        load_denoiser(f"openai:{corrupt}", flags)
    _one_line_user_error(e, str(corrupt))


# --------------------------------------------------------------------------------------------
# shared behaviour


def test_unknown_schemes_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_denoiser("x:whatever")
    _one_line_user_error(e, "unknown denoiser source 'x:whatever'", "openai:PATH", "diffusers:DIR", "digits")
    with pytest.raises(UserError) as e:
        load_classifier("onnx:model.onnx")
    _one_line_user_error(e, "unknown classifier source", "hf:DIR", "torchscript:FILE")
    for source, loader in (
        (f"diffusers:{tmp_path / 'absent'}", load_denoiser),
        (f"hf:{tmp_path / 'absent'}", load_classifier),
        (f"torchscript:{tmp_path / 'absent.pt'}", load_classifier),
    ):
        with pytest.raises(UserError) as e:
            loader(source)
        _one_line_user_error(e, str(tmp_path / "absent"))


def test_uri_sources_go_through_storage_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "clf.pt"
    torch.jit.script(_TinyNet(with_attr=True)).save(str(path))
    fetched: list[str] = []

    def fake_fetch(uri: str) -> str:
        fetched.append(uri)
        return str(path)

    import workers.storage as storage

    real_fetch = storage.fetch
    monkeypatch.setattr(storage, "fetch", fake_fetch)
    assert load_classifier("torchscript:s3://bucket/models/clf.pt").num_classes == 7
    assert fetched == ["s3://bucket/models/clf.pt"]

    # file:// URIs are resolved by the real storage layer.
    monkeypatch.setattr(storage, "fetch", real_fetch)
    assert load_classifier(f"torchscript:{path.as_uri()}").num_classes == 7


def test_describe_source(vit_dir: Path, tmp_path: Path) -> None:
    desc = describe_source(f"hf:{vit_dir}")
    assert desc["source"] == f"hf:{vit_dir}"
    assert set(desc["files"]) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    expected = hashlib.sha256((vit_dir / "config.json").read_bytes()).hexdigest()
    assert desc["files"]["config.json"] == expected

    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"abc")
    flags = tmp_path / "flags.json"
    flags.write_text("{}")
    desc = describe_source(f"openai:{ckpt}", str(flags))
    assert desc["files"] == {
        "m.pt": hashlib.sha256(b"abc").hexdigest(),
        "flags.json": hashlib.sha256(b"{}").hexdigest(),
    }
    with pytest.raises(UserError):
        describe_source("bogus:thing")


def test_digits_loaders_read_the_asset_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``digits`` plumbing, on random stand-in assets (the trained ones are tested below)."""
    import workers.digits as digits
    from workers.unet import build_openai_unet

    net = build_openai_unet(digits.DIGITS_UNET_FLAGS)
    _randomize(net, 11)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / digits.DENOISER_FILE))
    (tmp_path / digits.DENOISER_FLAGS_FILE).write_text(json.dumps(digits.DIGITS_UNET_FLAGS))
    cnn = digits.DigitsCNN()
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(tmp_path / digits.CLASSIFIER_FILE))
    monkeypatch.setattr(digits, "ASSET_DIR", tmp_path)

    den = load_denoiser("digits")
    assert (den.in_channels, den.image_size, den.schedule.name, den.learn_sigma) == (1, 8, "linear", False)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(den(x, torch.tensor([5, 500]))[0], net.eval()(x, torch.tensor([5, 500])))
        clf = load_classifier("digits")
        torch.testing.assert_close(clf(x.sigmoid()), cnn.eval()(x.sigmoid()))
    assert clf.num_classes == 10
    assert set(describe_source("digits")["files"]) == {
        digits.DENOISER_FILE, digits.DENOISER_FLAGS_FILE, digits.CLASSIFIER_FILE
    }

    (tmp_path / digits.CLASSIFIER_FILE).unlink()
    with pytest.raises(UserError) as e:
        load_classifier("digits")
    _one_line_user_error(e, digits.CLASSIFIER_FILE, "train_digits.py")


@pytest.mark.skipif(
    not DIGITS_DENOISER.is_file(),
    reason="workers/assets/digits/denoiser.safetensors absent: run scripts/train_digits.py",
)
def test_digits_sources() -> None:
    den = load_denoiser("digits")
    _assert_inference_ready(den)
    assert den.in_channels == 1 and den.image_size == 8
    x = torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        eps, _ = den(x, torch.tensor([10, 20]))
    assert eps.shape == x.shape

    clf = load_classifier("digits")
    _assert_inference_ready(clf)
    assert clf.num_classes == 10
    with torch.no_grad():
        assert clf(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert set(describe_source("digits")["files"]) >= {"denoiser.safetensors", "classifier.safetensors"}
