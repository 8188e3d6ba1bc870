"""Frozen discrete tokenizers (megafusion.encoders.discrete): exact code round trips of the weight-free ones, WAV
I/O, the plumbing of the two model-backed ones on tiny random models, the registry and spec() rebuilds."""

import json
import math
import os

import numpy as np
import pytest
import torch

from megafusion.encoders.discrete import (DiscreteTokenizer, build_discrete_tokenizer, discrete_tokenizer_names,
                                          register_discrete_tokenizer)
from megafusion.encoders.discrete.audio_io import read_wav, resample, write_wav


def _rebuilt(tok):
    spec = tok.spec()
    json.dumps(spec)  # JSON-able
    again = build_discrete_tokenizer(json.loads(json.dumps(spec)))
    assert again == tok and again.spec() == spec
    return again


# ---------------------------------------------------------------------------------------------------- palette
def test_palette_exact_round_trip_over_all_codes():
    tok = build_discrete_tokenizer({"name": "palette", "config": {"resolution": 16, "patch": 2, "levels": 4}})
    assert tok.modality == "image" and tok.codebook_size == 64 and tok.grid == (8, 8) and tok.tokens_per_item == 64
    codes = np.arange(64, dtype=np.int64)  # every code once
    image = tok.decode(codes)
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    np.testing.assert_array_equal(tok.encode(image), codes)
    random = np.random.default_rng(0).integers(0, 64, size=64)
    np.testing.assert_array_equal(tok.encode(tok.decode(random)), random)
    for levels in (2, 3, 7, 256):  # level centres stay inside their bins for any level count
        side = min(64, math.ceil(math.sqrt(levels ** 3)))  # one image holds every code (a random 4096 for 256)
        t = build_discrete_tokenizer({"name": "palette", "config": {"resolution": side, "patch": 1, "levels": levels}})
        assert levels == 256 or t.palette().shape == (levels ** 3, 3)
        sample = np.random.default_rng(levels).permutation(levels ** 3)[:side * side]
        codes = np.resize(sample, side * side)
        np.testing.assert_array_equal(t.encode(t.decode(codes)), codes)
    _rebuilt(tok)


def test_palette_flat_colour_and_inputs():
    from PIL import Image

    tok = build_discrete_tokenizer({"name": "palette", "config": {}})  # defaults: 32 px, patch 4, 4 levels
    assert tok.spec() == {"name": "palette", "config": {"resolution": 32, "patch": 4, "levels": 4, "crop": "center"}}
    colour = np.array([200, 30, 120], dtype=np.uint8)
    array = np.broadcast_to(colour, (48, 64, 3)).copy()  # not square, not R: resized + center-cropped
    codes = tok.encode(array)
    assert codes.dtype == np.int64 and codes.shape == (64,) and len(set(codes.tolist())) == 1
    decoded = tok.decode(codes)
    assert np.abs(decoded.astype(int) - colour.astype(int)).max() <= 256 // 4 // 2  # within one level (half a bin)
    np.testing.assert_array_equal(tok.encode(Image.fromarray(array)), codes)  # PIL and arrays agree
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(array.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(np.full(64, 64))
    with pytest.raises(ValueError, match="expected 64 codes"):
        tok.decode(np.zeros(10, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------- mulaw
def test_mulaw_exact_round_trip():
    for cfg in ({"levels": 64}, {"levels": 256, "hop": 3}, {"levels": 2}, {"levels": 4096, "hop": 2}):
        tok = build_discrete_tokenizer({"name": "mulaw", "config": cfg})
        assert tok.modality == "audio" and tok.codebook_size == cfg["levels"]
        every = np.arange(tok.codebook_size)
        wave = tok.decode(every)
        assert wave.dtype == np.float32 and wave.shape == (every.size * tok.hop,) and np.abs(wave).max() <= 1.0
        np.testing.assert_array_equal(tok.encode(wave), every)
        random = np.random.default_rng(1).integers(0, tok.codebook_size, size=500)
        np.testing.assert_array_equal(tok.encode(tok.decode(random)), random)
        _rebuilt(tok)


def test_mulaw_sine_snr_and_lengths():
    tok = build_discrete_tokenizer({"name": "mulaw", "config": {"sample_rate": 4000, "levels": 256}})
    t = np.arange(4000) / 4000.0
    sine = (0.8 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    recon = tok.decode(tok.encode(sine))
    snr = 10 * math.log10(np.sum(sine.astype(np.float64) ** 2) / np.sum((recon - sine).astype(np.float64) ** 2))
    assert snr > 20.0, snr
    assert tok.tokens_for_seconds(1.0) == tok.encode(sine).size == 4000
    hop = build_discrete_tokenizer({"name": "mulaw", "config": {"hop": 4}})
    assert hop.encode(np.zeros(4001, np.float32)).size == hop.tokens_for_seconds(4001 / 4000) == 1001
    assert hop.encode(np.zeros(0, np.float32)).size == 0
    with pytest.raises(ValueError, match="mono 1-D"):
        tok.encode(np.zeros((2, 100), np.float32))


# ---------------------------------------------------------------------------------------------------- WAV I/O
def test_wav_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    wave = np.clip(rng.normal(0, 0.3, 3001), -0.99, 0.99).astype(np.float32)  # +1.0 itself clips to 32767
    path = write_wav(tmp_path / "a.wav", wave, 8000)
    assert os.listdir(tmp_path) == ["a.wav"]  # the temporary file was renamed away
    back, rate = read_wav(path)
    assert rate == 8000 and back.dtype == np.float32 and back.shape == wave.shape
    assert np.abs(back - wave).max() <= 0.5 / 32768 + 1e-7  # 16-bit quantisation: half a step
    with open(path, "rb") as f:
        back2, _ = read_wav(f.read())  # bytes work too
    np.testing.assert_array_equal(back, back2)

    import wave as wavemod  # stereo 8-bit is averaged to mono
    stereo = tmp_path / "s.wav"
    with wavemod.open(str(stereo), "wb") as w:
        w.setnchannels(2), w.setsampwidth(1), w.setframerate(1000)
        w.writeframes(np.array([[192, 64], [255, 255], [128, 0]], dtype=np.uint8).tobytes())
    mono, rate = read_wav(stereo)
    assert rate == 1000
    np.testing.assert_allclose(mono, [0.0, 127 / 128, -0.5])

    bad = tmp_path / "not.wav"
    bad.write_text("hello, not a wav file")
    with pytest.raises(ValueError, match="not.wav.*not a readable PCM WAV"):
        read_wav(bad)
    with pytest.raises(ValueError, match="bytes of WAV data"):
        read_wav(b"RIFF0000")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_wav(tmp_path / "missing.wav")


def test_resample_and_encode_wav(tmp_path):
    t = np.arange(16000) / 16000.0
    sine = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    down = resample(sine, 16000, 4000)
    assert down.dtype == np.float32 and down.shape == (4000,)
    expected = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(4000) / 4000.0)
    assert np.abs(down[10:-10] - expected[10:-10]).max() < 0.05  # box pre-filter: ~1% amplitude loss at 440 Hz
    up = resample(down, 4000, 16000)
    assert up.shape == (16000,)
    np.testing.assert_array_equal(resample(sine, 16000, 16000), sine)
    path = write_wav(tmp_path / "sine.wav", sine, 16000)
    tok = build_discrete_tokenizer({"name": "mulaw", "config": {"levels": 256}})
    np.testing.assert_array_equal(tok.encode_wav(path), tok.encode(read_wav_resampled(path, 4000)))
    assert tok.encode_wav(path).size == tok.tokens_for_seconds(1.0)


def read_wav_resampled(path, rate):
    wave, src = read_wav(path)
    return resample(wave, src, rate)


# ---------------------------------------------------------------------------------------------------- registry
def test_registry_errors_and_custom():
    assert {"palette", "vq", "mulaw", "encodec"} <= set(discrete_tokenizer_names())
    with pytest.raises(ValueError, match=r"unknown name 'nope'.*palette"):
        build_discrete_tokenizer({"name": "nope", "config": {}})
    with pytest.raises(ValueError, match=r"bad config keys \['colours'\].*'levels'"):
        build_discrete_tokenizer({"name": "palette", "config": {"colours": 3}})
    with pytest.raises(ValueError, match="not divisible by config.patch=5"):
        build_discrete_tokenizer({"name": "palette", "config": {"resolution": 32, "patch": 5}})
    with pytest.raises(ValueError, match="must be a dict"):
        build_discrete_tokenizer("palette")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_discrete_tokenizer({"name": "vq", "config": {"path": "/nowhere"}})

    from megafusion.encoders.discrete.palette import PaletteTokenizer

    class Tiny(PaletteTokenizer):
        name = "tiny-palette"

    from megafusion.encoders import discrete

    register_discrete_tokenizer("tiny-palette", lambda **cfg: Tiny(**cfg))
    try:
        tok = build_discrete_tokenizer({"name": "tiny-palette", "config": {"resolution": 8}})
        assert isinstance(tok, DiscreteTokenizer) and tok.grid == (2, 2)
        assert _rebuilt(tok) != build_discrete_tokenizer({"name": "palette", "config": {"resolution": 8}})
    finally:
        discrete._REGISTRY.pop("tiny-palette", None)


# ---------------------------------------------------------------------------------------------------- vq
def _tiny_vq(folder):
    from diffusers import VQModel

    torch.manual_seed(0)
    model = VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=16,
                    norm_num_groups=4, layers_per_block=1, sample_size=16)
    model.save_pretrained(folder)
    return model.eval()


def test_vq_plumbing(tmp_path):
    folder = str(tmp_path / "vq")
    model = _tiny_vq(folder)
    tok = build_discrete_tokenizer({"name": "vq", "config": {"path": folder, "resolution": 16}})
    assert tok.modality == "image" and tok.codebook_size == 16 and tok.grid == (8, 8) and tok.tokens_per_item == 64
    image = np.random.default_rng(3).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    codes = tok.encode(image)
    assert codes.dtype == np.int64 and codes.shape == (64,) and codes.min() >= 0 and codes.max() < 16
    # the same indices by hand: encoder + quant_conv, nearest codebook vector
    with torch.no_grad():
        x = torch.from_numpy(tok.prepare(image).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        z = model.encode(x).latents[0].permute(1, 2, 0).reshape(-1, 4)
        manual = torch.cdist(z, model.quantize.embedding.weight).argmin(1)
    np.testing.assert_array_equal(codes, manual.numpy())
    decoded = tok.decode(codes)
    assert decoded.dtype == np.uint8 and decoded.shape == (16, 16, 3)
    with torch.no_grad():  # decode == model.decode of the codebook vectors looked up by hand
        zq = model.quantize.embedding.weight[torch.from_numpy(codes)].reshape(1, 8, 8, 4).permute(0, 3, 1, 2)
        reference = model.decode(zq, force_not_quantize=True).sample[0].numpy()
    expected = np.clip(np.rint((reference + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1
    again = _rebuilt(tok)
    np.testing.assert_array_equal(again.encode(image), codes)
    with pytest.raises(ValueError, match="not divisible"):
        build_discrete_tokenizer({"name": "vq", "config": {"path": folder, "resolution": 15}})
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    other = tmp_path / "kl"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(cfg, _class_name="AutoencoderKL")))
    with pytest.raises(ValueError, match=r"kl.*not a diffusers VQModel"):
        build_discrete_tokenizer({"name": "vq", "config": {"path": str(other)}})


# ---------------------------------------------------------------------------------------------------- encodec
def _tiny_encodec(folder):
    from transformers import EncodecConfig, EncodecModel

    cfg = EncodecConfig(sampling_rate=4000, hidden_size=8, num_filters=4, upsampling_ratios=[2, 2], codebook_size=16,
                        target_bandwidths=[4.0, 8.0], num_lstm_layers=1, num_residual_layers=1, kernel_size=3,
                        last_kernel_size=3, residual_kernel_size=3)
    torch.manual_seed(0)
    model = EncodecModel(cfg)
    with torch.no_grad():  # transformers initialises codebooks to zeros: seed them from encoder outputs (k-means
        frames = model.encoder(0.5 * torch.randn(1, 1, 256))[0].T  # style), then smaller residual codebooks
        for k, layer in enumerate(model.quantizer.layers):
            embed = layer.codebook.embed
            embed.copy_(frames[:16] if k == 0 else 0.3 * frames.std() * torch.randn_like(embed))
    model.save_pretrained(folder)
    return model.eval()


def test_encodec_plumbing(tmp_path):
    folder = str(tmp_path / "encodec")
    model = _tiny_encodec(folder)  # frame rate 1000 Hz, 4 kbps per codebook
    tok = build_discrete_tokenizer({"name": "encodec", "config": {"path": folder, "bandwidth": 8.0}})
    assert tok.modality == "audio" and tok.sample_rate == 4000 and tok.num_quantizers == 2
    assert tok.codebook_size == 2 * 16 and tok.hop_length == 4
    assert build_discrete_tokenizer({"name": "encodec", "config": {"path": folder}}).num_quantizers == 1  # 4 kbps

    grid = np.random.default_rng(4).integers(0, 16, size=(2, 37))  # layout: exact flatten / unflatten
    flat = tok.flatten_codes(grid)
    assert flat.shape == (74,) and flat[0] == grid[0, 0] and flat[1] == 16 + grid[1, 0] and flat[2] == grid[0, 1]
    np.testing.assert_array_equal(tok.unflatten_codes(flat), grid)
    ranges = [tok.code_range(j) for j in range(len(flat))]  # what generation restricts each position to
    assert all(lo <= c < hi for (lo, hi), c in zip(ranges, flat)) and ranges[:2] == [(0, 16), (16, 32)]
    with pytest.raises(ValueError, match="belongs to codebook 1"):
        tok.unflatten_codes(np.array([16, 16]))
    with pytest.raises(ValueError, match="whole number of frames"):
        tok.unflatten_codes(np.array([0, 16, 3]))

    wave = (0.5 * np.sin(2 * np.pi * 300 * np.arange(1001) / 4000)).astype(np.float32)
    codes = tok.encode(wave)
    frames = math.ceil(1001 / 4)
    assert codes.dtype == np.int64 and codes.shape == (2 * frames,) == (tok.tokens_for_seconds(1001 / 4000),)
    assert codes.min() >= 0 and codes.max() < tok.codebook_size
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(wave)[None, None], bandwidth=8.0).audio_codes[0, 0].numpy()
    np.testing.assert_array_equal(tok.unflatten_codes(codes), ref)
    assert len(set(ref[0].tolist())) > 1  # the random codebooks give non-trivial codes
    audio = tok.decode(codes)
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size == frames * tok.hop_length
    assert np.abs(audio).max() <= 1.0
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(ref)[None, None], [None]).audio_values.reshape(-1).numpy()
    np.testing.assert_allclose(audio, np.clip(expected, -1, 1), atol=1e-5)
    again = _rebuilt(tok)
    assert again.spec()["config"]["bandwidth"] == 8.0
    with pytest.raises(ValueError, match=r"bandwidth=3.0 is not one of .*\[4.0, 8.0\]"):
        build_discrete_tokenizer({"name": "encodec", "config": {"path": folder, "bandwidth": 3.0}})
