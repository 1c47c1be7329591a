"""Models by Hugging Face Hub id (``hf:ORG/NAME``, ``diffusers:ORG/NAME``), offline.

Nothing is downloaded: each test lays tiny real models (a transformers ViT with its image
processor, a diffusers UNet2DModel with its DDPM scheduler) into a temporary Hub cache exactly
as huggingface_hub lays one out (``models--ORG--NAME/{blobs,snapshots/<commit>,refs/main}``,
snapshot files symlinked to content-addressed blobs), checks with huggingface_hub's own
``scan_cache_dir`` that the layout is one it recognises, and loads by id with
``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from workers.errors import UserError
from workers.models import describe_source, load_classifier, load_denoiser, parse_hub_id, pin_source


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _save_vit(folder: Path, num_labels: int = 10) -> None:
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit import ViTImageProcessorPil

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, num_labels=num_labels, num_channels=1)
    model = ViTForImageClassification(cfg)
    _randomize(model, 1)
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)


def _save_ddpm(folder: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(2)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    _randomize(unet, 3)
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small").save_pretrained(folder / "scheduler")


def lay_into_hub_cache(cache: Path, repo_id: str, files: Path, commit: str) -> Path:
    """Put the files under ``files`` into ``cache`` as huggingface_hub stores a downloaded
    snapshot of ``repo_id`` at ``commit`` (branch main); returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for src in sorted(p for p in files.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / src.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


VIT_COMMIT = hashlib.sha1(b"vit").hexdigest()
DDPM_COMMIT = hashlib.sha1(b"ddpm").hexdigest()


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME whose hub cache holds tiny-org/vit and tiny-org/ddpm."""
    from huggingface_hub import scan_cache_dir

    home = tmp_path_factory.mktemp("hf_home")
    staging = tmp_path_factory.mktemp("staging")
    _save_vit(staging / "vit")
    _save_ddpm(staging / "ddpm")
    lay_into_hub_cache(home / "hub", "tiny-org/vit", staging / "vit", VIT_COMMIT)
    lay_into_hub_cache(home / "hub", "tiny-org/ddpm", staging / "ddpm", DDPM_COMMIT)
    # huggingface_hub itself must recognise the layout (else the test would test our guess).
    info = scan_cache_dir(home / "hub")
    assert not info.warnings, info.warnings
    found = {r.repo_id: {rev.commit_hash for rev in r.revisions} for r in info.repos}
    assert found == {"tiny-org/vit": {VIT_COMMIT}, "tiny-org/ddpm": {DDPM_COMMIT}}
    return home


@pytest.fixture
def offline(hub_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder named tiny-org/... unless a test makes one
    return hub_home


def test_parse_hub_id() -> None:
    assert str(parse_hub_id("org/name")) == "org/name"
    ref = parse_hub_id("facebook/deit-tiny-patch16-224@v1.0")
    assert (ref.repo_id, ref.revision) == ("facebook/deit-tiny-patch16-224", "v1.0")
    for not_an_id in ("name", "/abs/dir", "a/b/c", "org/na--me", "./x", "org/"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_hf_classifier_by_id_from_the_offline_cache(offline: Path) -> None:
    snapshot = offline / "hub" / "models--tiny-org--vit" / "snapshots" / VIT_COMMIT
    local = load_classifier(f"hf:{snapshot}")
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = local(x)
        for source in ("hf:tiny-org/vit", "hf:tiny-org/vit@main", f"hf:tiny-org/vit@{VIT_COMMIT}"):
            clf = load_classifier(source)
            assert clf.num_classes == 10
            torch.testing.assert_close(clf(x), want, rtol=0, atol=0)


def test_diffusers_denoiser_by_id_from_the_offline_cache(offline: Path) -> None:
    den = load_denoiser("diffusers:tiny-org/ddpm")
    assert (den.in_channels, den.image_size, den.schedule.name, den.sigma_small) == (1, 8, "linear", True)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eps, v = den(x, torch.tensor([3, 700]))
    assert eps.shape == x.shape and v is None


def test_manifest_records_the_resolved_commit(offline: Path) -> None:
    desc = describe_source("hf:tiny-org/vit")
    assert desc["source"] == "hf:tiny-org/vit" and desc["revision"] == VIT_COMMIT
    assert set(desc["files"]) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    snapshot = offline / "hub" / "models--tiny-org--vit" / "snapshots" / VIT_COMMIT
    assert desc["files"]["config.json"] == hashlib.sha256((snapshot / "config.json").read_bytes()).hexdigest()
    ddpm = describe_source("diffusers:tiny-org/ddpm")
    assert ddpm["revision"] == DDPM_COMMIT
    assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= set(ddpm["files"])
    # Pinning rewrites a moving revision into the commit, and leaves everything else alone.
    assert pin_source("hf:tiny-org/vit@main") == f"hf:tiny-org/vit@{VIT_COMMIT}"
    assert pin_source("diffusers:tiny-org/ddpm") == f"diffusers:tiny-org/ddpm@{DDPM_COMMIT}"
    for unchanged in ("digits", None, "torchscript:/m.pt", f"hf:{snapshot}"):
        assert pin_source(unchanged) == unchanged
    assert "revision" not in describe_source(f"hf:{snapshot}")


def test_a_local_directory_wins_over_the_hub(offline: Path, tmp_path: Path) -> None:
    _save_vit(tmp_path / "tiny-org" / "vit", num_labels=7)
    assert load_classifier("hf:tiny-org/vit").num_classes == 7
    assert "revision" not in describe_source("hf:tiny-org/vit")


def test_an_id_missing_from_the_cache_says_how_to_populate_it(offline: Path) -> None:
    for source, loader in (("hf:tiny-org/absent", load_classifier), ("diffusers:tiny-org/absent", load_denoiser),
                           (f"hf:tiny-org/vit@{'0' * 40}", load_classifier)):
        with pytest.raises(UserError) as excinfo:
            loader(source)
        msg = str(excinfo.value)
        assert "\n" not in msg and source in msg, msg
        for needle in (str(offline / "hub"), "hf download tiny-org/", "HF_HOME", "HF_HUB_OFFLINE=1"):
            assert needle in msg, msg


def test_hf_hub_cache_overrides_hf_home(offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    with pytest.raises(UserError, match="empty-cache"):
        load_classifier("hf:tiny-org/vit")


def test_loading_prints_no_progress_bars_or_accelerate_advice(offline: Path, capfd: pytest.CaptureFixture) -> None:
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    before = (tlog.get_verbosity(), dlog.get_verbosity(), tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled())
    capfd.readouterr()
    load_classifier("hf:tiny-org/vit")
    load_denoiser("diffusers:tiny-org/ddpm")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    # The libraries' own settings are back as they were.
    assert (tlog.get_verbosity(), dlog.get_verbosity(), tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()) == before
