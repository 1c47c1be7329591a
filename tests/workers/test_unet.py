"""Tests for workers/unet.py: OpenAI UNet rebuilt from flags, checkpoint loading, flag handling."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from workers.checkpoint import load_openai_checkpoint
from workers.unet import build_openai_unet, qkv_attention, timestep_embedding
from workers.unet_flags import DiffusionSettings, diffusion_settings, resolve_unet_flags, unet_flags_from_json

# Copies of shared/reference/checkpoints (key names, shapes and flags of OpenAI's released files).
REFERENCE = Path(__file__).resolve().parents[2] / "configs" / "checkpoints"
MANIFESTS = [
    "improved-diffusion_cifar10_uncond_50M_500K.json",
    "guided-diffusion_256x256_uncond.json",
]

# Smallest flag set that still exercises every block type (two levels, attention, scale-shift).
TINY: dict[str, Any] = {
    "image_size": 8,
    "in_channels": 1,
    "num_channels": 32,
    "channel_mult": "1,2",
    "num_res_blocks": 1,
    "attention_resolutions": "4",
    "num_head_channels": 16,
    "use_scale_shift_norm": True,
    "learn_sigma": False,
}


def _manifest(name: str) -> dict[str, Any]:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference manifest {path} not available")
    return json.loads(path.read_text())


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: the zero-initialised output layers would hide most bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _inputs(flags: dict[str, Any], n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c, s = flags.get("in_channels", 3), flags["image_size"]
    x = torch.randn(n, c, s, s, generator=gen)
    t = torch.tensor([3.0, 731.5][:n])
    return x, t


# ---------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_state_dict_matches_exactly(name: str) -> None:
    manifest = _manifest(name)
    with torch.device("meta"):
        model = build_openai_unet(manifest["flags"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    expected = [(e["key"], list(e["shape"])) for e in manifest["state_dict"]]
    assert got == expected  # same keys, same order, same shapes
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_forward_flops_match(name: str) -> None:
    manifest = _manifest(name)
    size = manifest["flags"]["image_size"]
    with torch.device("meta"):
        model = build_openai_unet(manifest["flags"])
        counter = FlopCounterMode(display=False)
        with counter:
            out = model(torch.empty(1, 3, size, size), torch.tensor([5.0]))
    assert tuple(out.shape) == (1, 6, size, size)
    assert counter.get_total_flops() == manifest["forward_flops_per_image"]


def test_manifest_file_works_as_flags_file() -> None:
    path = REFERENCE / MANIFESTS[0]
    if not path.exists():
        pytest.skip("reference manifest not available")
    flags = unet_flags_from_json(path)
    assert flags == _manifest(MANIFESTS[0])["flags"]
    settings = diffusion_settings(flags)
    assert settings.noise_schedule == "cosine" and settings.diffusion_steps == 4000
    assert settings.rescale_timesteps and settings.learn_sigma


def test_plain_flags_json(tmp_path: Path) -> None:
    path = tmp_path / "flags.json"
    path.write_text(json.dumps(TINY))
    assert unet_flags_from_json(path) == TINY
    path.write_text(json.dumps({**TINY, "num_chanels": 3}))
    with pytest.raises(ValueError, match="num_chanels"):
        unet_flags_from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError):
        unet_flags_from_json(path)
    with pytest.raises(FileNotFoundError):
        unet_flags_from_json(tmp_path / "absent.json")


# ---------------------------------------------------------------------------------- flags


def test_unknown_flag_names_the_flag() -> None:
    with pytest.raises(ValueError, match="num_chanels"):
        build_openai_unet({**TINY, "num_chanels": 64})
    with pytest.raises(ValueError, match="bogus"):
        diffusion_settings({"bogus": 1})


def test_training_only_flags_are_accepted() -> None:
    model = build_openai_unet({**TINY, "use_checkpoint": True, "use_fp16": True, "dropout": 0.3})
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.3 for m in dropouts)


def test_bad_values_raise_value_error() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        build_openai_unet({**TINY, "num_channels": 48})
    with pytest.raises(ValueError, match="channel_mult"):
        build_openai_unet({**TINY, "channel_mult": ""})  # no default for image size 8
    with pytest.raises(ValueError, match="image_size"):
        build_openai_unet({**TINY, "image_size": 9})
    with pytest.raises(ValueError, match="boolean"):
        build_openai_unet({**TINY, "learn_sigma": "maybe"})


def test_diffusion_settings_defaults_and_validation() -> None:
    guided = diffusion_settings({"num_head_channels": 64})
    assert guided == DiffusionSettings(
        diffusion_steps=1000,
        noise_schedule="linear",
        learn_sigma=False,
        rescale_timesteps=False,
        timestep_respacing="",
        sigma_small=False,
        predict_xstart=False,
        use_kl=False,
        rescale_learned_sigmas=False,
    )
    # improved-diffusion-style flag sets keep that repository's defaults (rescaled timesteps).
    improved = diffusion_settings({"image_size": 32, "learn_sigma": "True", "noise_schedule": "cosine"})
    assert improved.rescale_timesteps and improved.rescale_learned_sigmas and improved.learn_sigma
    with pytest.raises(ValueError, match="predict_xstart"):
        diffusion_settings({"predict_xstart": True})
    with pytest.raises(ValueError, match="'linear' and 'cosine'"):
        diffusion_settings({"noise_schedule": "sqrt"})
    with pytest.raises(Exception):
        guided.diffusion_steps = 5  # type: ignore[misc]  # frozen


def test_resolve_fills_every_flag() -> None:
    resolved = resolve_unet_flags({})
    assert resolved["num_head_channels"] == -1 and resolved["resblock_updown"] is False
    assert resolved["in_channels"] == 3 and resolved["channel_mult"] == ""


# ---------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_forward_shapes(learn_sigma: bool) -> None:
    flags = {**TINY, "learn_sigma": learn_sigma}
    model = _randomise(build_openai_unet(flags))
    x, t = _inputs(flags)
    with torch.no_grad():
        out = model(x, t)
        scalar_t = model(x, 7)
    assert out.shape == (2, 2 if learn_sigma else 1, 8, 8)
    assert torch.isfinite(out).all()
    assert scalar_t.shape == out.shape


def test_three_channel_default_and_resblock_updown() -> None:
    flags = {**TINY, "in_channels": 3, "resblock_updown": True, "learn_sigma": True}
    model = _randomise(build_openai_unet(flags))
    x, t = _inputs(flags)
    with torch.no_grad():
        assert model(x, t).shape == (2, 6, 8, 8)
    assert "input_blocks.2.0.in_layers.0.weight" in model.state_dict()  # down ResBlock


def test_class_cond_has_label_emb_and_needs_labels() -> None:
    model = _randomise(build_openai_unet({**TINY, "class_cond": True}))
    assert model.state_dict()["label_emb.weight"].shape == (1000, 128)
    x, t = _inputs(TINY)
    with torch.no_grad():
        assert model(x, t, y=torch.tensor([1, 999])).shape == (2, 1, 8, 8)
        with pytest.raises(ValueError):
            model(x, t)


def test_timestep_embedding_closed_form() -> None:
    t = torch.tensor([0.0, 1.0, 17.25, 999.0])
    for dim in (8, 9):
        emb = timestep_embedding(t, dim)
        half = dim // 2
        assert emb.shape == (4, dim)
        for n, tn in enumerate(t.tolist()):
            for i in range(half):
                freq = math.exp(-math.log(10000.0) * i / half)
                assert emb[n, i].item() == pytest.approx(math.cos(tn * freq), abs=1e-4)
                assert emb[n, half + i].item() == pytest.approx(math.sin(tn * freq), abs=1e-4)
        if dim % 2:
            assert torch.all(emb[:, -1] == 0)
    # Integer timesteps embed exactly like their float values.
    as_int = timestep_embedding(torch.tensor([3, 40]), 16)
    assert torch.equal(as_int, timestep_embedding(torch.tensor([3.0, 40.0]), 16))


@pytest.mark.parametrize("legacy", [True, False])
def test_qkv_attention_matches_einsum_formula(legacy: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    batch, heads, ch, length = 2, 3, 4, 5
    qkv = torch.randn(batch, 3 * heads * ch, length, generator=gen)
    if legacy:
        q, k, v = qkv.reshape(batch * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (p.reshape(batch * heads, ch, length) for p in qkv.chunk(3, dim=1))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    expected = torch.einsum("bts,bcs->bct", weight, v).reshape(batch, heads * ch, length)
    torch.testing.assert_close(qkv_attention(qkv, heads, legacy_order=legacy), expected)


def test_new_and_legacy_attention_orders_both_run_and_differ() -> None:
    outs = []
    for new_order in (False, True):
        model = _randomise(build_openai_unet({**TINY, "use_new_attention_order": new_order}))
        x, t = _inputs(TINY)
        with torch.no_grad():
            outs.append(model(x, t))
    assert outs[0].shape == outs[1].shape
    assert not torch.allclose(outs[0], outs[1])  # same weights, different head packing


def test_channels_last_and_autocast() -> None:
    model = _randomise(build_openai_unet(TINY))
    x, t = _inputs(TINY)
    with torch.no_grad():
        ref = model(x, t)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.to(memory_format=torch.channels_last), t)
        torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert low.shape == ref.shape
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ---------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    model = _randomise(build_openai_unet(TINY))
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    loaded = load_openai_checkpoint(str(path), TINY)
    assert not loaded.training
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2) and v2.device.type == "cpu"
    x, t = _inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_fp16_checkpoint_loads_as_float32(tmp_path: Path) -> None:
    model = _randomise(build_openai_unet(TINY))
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    loaded = load_openai_checkpoint(path, TINY)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_wrong_flags_give_one_line_value_error(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(build_openai_unet(TINY).state_dict(), str(path))
    with pytest.raises(ValueError) as info:
        load_openai_checkpoint(path, {**TINY, "num_res_blocks": 2, "learn_sigma": True})
    message = str(info.value)
    assert "\n" not in message
    assert f"checkpoint {path} does not match --model-flags" in message
    assert "missing keys" in message and "shape mismatches" in message
    assert re.search(r"[\w.]+: ckpt \[\d+(, \d+)*\] vs model \[\d+(, \d+)*\]", message)
    assert message.endswith("check that the flags file belongs to this checkpoint")

    # Only the output width differs: exactly the final convolution's two tensors.
    with pytest.raises(ValueError) as info:
        load_openai_checkpoint(path, {**TINY, "learn_sigma": True})
    message = str(info.value)
    assert "2 shape mismatches (e.g. out.2.weight: ckpt [1, 32, 3, 3] vs model [2, 32, 3, 3]" in message
    assert "missing" not in message and "unexpected" not in message

    with pytest.raises(ValueError, match="unexpected keys") as info:
        load_openai_checkpoint(path, {**TINY, "num_res_blocks": 0})
    assert "\n" not in str(info.value)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_openai_checkpoint(tmp_path / "absent.pt", TINY)
    for name in ("junk.pt", "junk.safetensors"):
        bad = tmp_path / name
        bad.write_bytes(b"definitely not a checkpoint\n" * 10)
        with pytest.raises(ValueError) as info:
            load_openai_checkpoint(bad, TINY)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        load_openai_checkpoint(other, TINY)
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match="state dict"):
        load_openai_checkpoint(not_a_state_dict, TINY)
