"""Frozen encoders: pixel (exact), diffusers VAE and transformers vision models on tiny random local folders."""

import builtins

import numpy as np
import pytest
import torch

from megafusion.encoders import build_encoder, register_encoder
from megafusion.encoders.transforms import pixels_to_uint8


def _image(w, h, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_pixel_encoder_is_exact_and_crops():
    enc = build_encoder("pixel", resolution=8, crop="center")
    assert enc.latent_shape == (3, 8, 8)
    square = _image(8, 8)
    x = enc.prepare(square)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(pixels_to_uint8(x), np.asarray(square))  # no resampling at the native size
    z = enc.encode(torch.from_numpy(x)[None])
    assert torch.equal(enc.decode(z), z) and torch.equal(z[0], torch.from_numpy(x))
    wide = _image(32, 8)
    np.testing.assert_array_equal(pixels_to_uint8(enc.prepare(wide)), np.asarray(wide)[:, 12:20])  # centre cut
    squashed = build_encoder("pixel", resolution=8, crop="resize").prepare(_image(32, 16))
    assert squashed.shape == (3, 8, 8)


def test_registry_errors_name_the_choices():
    with pytest.raises(ValueError, match="pixel"):
        build_encoder("nope")
    with pytest.raises(ValueError, match="crop"):
        build_encoder("pixel", crop="zoom")
    with pytest.raises(ValueError, match="bad configuration"):
        build_encoder("pixel", not_an_option=1)
    register_encoder("pixel-16", lambda **kw: build_encoder("pixel", resolution=16, **kw))
    assert build_encoder("pixel-16").latent_shape == (3, 16, 16)
    assert build_encoder("megafusion.encoders.pixel:PixelEncoder", resolution=4).latent_shape == (3, 4, 4)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers", reason="pip install diffusers to test the vae encoder")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=16, scaling_factor=0.7, shift_factor=0.2)
    path = tmp_path_factory.mktemp("vae") / "vae"
    model.save_pretrained(str(path))
    return str(path), model.eval()


def test_vae_encoder_scaling_shift_and_decode(tiny_vae):
    path, reference = tiny_vae
    enc = build_encoder("vae", path=path, resolution=16, batch_size=2)
    assert enc.latent_shape == (4, 8, 8)
    assert enc.config["scaling_factor"] == 0.7 and enc.config["shift_factor"] == 0.2
    pixels = torch.from_numpy(np.stack([enc.prepare(_image(20, 16, s)) for s in range(3)]))
    z = enc.encode(pixels)  # 3 images in batches of 2
    with torch.no_grad():
        mean = reference.encode(pixels).latent_dist.mean
        expected = (mean - 0.2) * 0.7
        decoded = reference.decode(mean).sample
    assert z.shape == (3, 4, 8, 8)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.decode(z), decoded, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        build_encoder("vae", path=str(path) + "-missing")
    with pytest.raises(ValueError, match="divisible"):
        build_encoder("vae", path=path, resolution=15)


def test_vae_missing_package_names_pip(tiny_vae, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("diffusers"):
            raise ImportError("no diffusers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    enc = build_encoder("vae", path=tiny_vae[0], resolution=16)  # lazy: building does not import diffusers
    with pytest.raises(ImportError, match="pip install diffusers"):
        enc.encode(torch.zeros(1, 3, 16, 16))


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="pip install transformers to test hf-vision")
    torch.manual_seed(0)
    cfg = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=16, patch_size=4)
    model = transformers.SiglipVisionModel(cfg)
    path = tmp_path_factory.mktemp("siglip") / "siglip"
    model.save_pretrained(str(path))
    return str(path), model.eval()


def test_hf_vision_patch_features_and_no_decoder(tiny_siglip):
    path, reference = tiny_siglip
    enc = build_encoder("hf-vision", path=path)
    assert enc.resolution == 16 and enc.latent_shape == (16, 4, 4)
    pixels = torch.from_numpy(np.stack([enc.prepare(_image(16, 16, s)) for s in range(2)]))
    z = enc.encode(pixels)
    with torch.no_grad():
        hidden = reference(pixel_values=pixels).last_hidden_state  # [b, 16 patches, 16]; mean = std = 0.5
    assert z.shape == (2, 16, 4, 4)
    # latent[:, d, i, j] is the feature d of patch (i, j) in raster order
    torch.testing.assert_close(z.permute(0, 2, 3, 1).reshape(2, 16, 16), hidden, rtol=1e-5, atol=1e-5)
    assert not enc.has_decoder
    with pytest.raises(RuntimeError, match="no decoder"):
        enc.decode(z)
