"""The e4e encoder: same latents as the authors' code for the same checkpoint, loaded safely.

The fixture in tests/unit/data was made by ``bench/make_e4e_fixture.py`` (its docstring says how)
with the authors' repository (github.com/omertov/encoder4editing at 99ea505), run on the CPU:

* ``e4e_random_stylegan32.pt`` (1.5 MB): THEIR ``pSp`` model (``Encoder4Editing``, IR-SE 50 body,
  plus their rosinality decoder) for ``--stylegan_size 32`` (8 W+ layers: the fewest that use all
  three pyramid levels), with seeded random weights, saved by THEIR ``Coach.__get_save_dict`` and
  ``torch.save`` as their training loop saves a checkpoint (``opts`` from their parser with the
  README's FFHQ flags). Every tensor views a few small random pools, which keeps the file small.
* ``e4e_reference.npz``: uint8 inputs (64 px x2, 256 px x1) and the latents THEIR
  ``pSp.forward(x, return_latents=True)`` returned for them (encoder + ``latent_avg``).
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from bench.make_e4e_fixture import to_input
from engine.encoder import Encoder, EncoderConfig, encoder_input
from engine.encoder_cmd import encoder_config
from engine.encoder_io import encoder_path, load_encoder, open_encoder, read_e4e_checkpoint, save_encoder
from engine.encoder_train import new_encoder
from engine.errors import CheckpointError
from engine.generators import LoadedGenerator, load_generator
from engine.runner import Engine, JobInput, _jpeg
from storage.specs import InvertSpec

DATA = Path(__file__).parent / "data"
CKPT = DATA / "e4e_random_stylegan32.pt"
TOL = 1e-4
SMALL = EncoderConfig(num_ws=10, w_dim=32, input_size=64, stage_units=(1, 2, 2, 1),
                      stage_channels=(8, 16, 24, 32), head_channels=24, se=True, se_reduction=4)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    data = np.load(DATA / "e4e_reference.npz")
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def theirs() -> dict[str, Any]:
    """Their checkpoint dict, as it loads (for re-saving variants of it)."""
    data = torch.load(CKPT, map_location="cpu", weights_only=True)
    assert isinstance(data, dict)
    return data


def _small_checkpoint(path: Path, **changes: Any) -> dict[str, Any]:
    """An e4e-layout checkpoint of a small random encoder (for the cheap loader cases)."""
    torch.manual_seed(0)
    enc = Encoder(SMALL)
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items() if k != "latent_avg"}
    state["decoder.style.1.weight"] = torch.randn(4, 4)
    data: dict[str, Any] = {
        "state_dict": state, "latent_avg": torch.randn(SMALL.num_ws, SMALL.w_dim),
        "opts": {"encoder_type": "Encoder4Editing", "start_from_latent_avg": True,
                 "stylegan_size": 64},
    }
    data.update(changes)
    torch.save(data, path)
    return data


def test_latents_match_the_authors_code(reference: dict[str, np.ndarray]) -> None:
    loaded = load_encoder(CKPT)
    enc = loaded.encoder
    assert loaded.source_format == "e4e-pt" and loaded.model_id is None
    assert enc.cfg == EncoderConfig(num_ws=8)  # IR-SE 50, 256 px, e4e's heads
    assert not enc.training
    for tag, batch in (("s64", 2), ("s256", 1)):
        x = to_input(reference[f"images_{tag}"])
        ref = torch.from_numpy(reference[f"latents_{tag}"])
        with torch.no_grad():
            ours = enc(x)
        assert ours.shape == ref.shape == (batch, 8, 512)
        assert float((ours - ref).abs().max()) <= TOL, tag
        # The comparison is not vacuous: the encoder's part is large next to TOL and differs
        # per layer and per image.
        part = ref - enc.latent_avg
        assert float(part.std()) > 0.1
        assert float((part[:, 1] - part[:, 0]).abs().max()) > 0.1
    assert float((enc.latent_avg[1] - enc.latent_avg[0]).abs().max()) > 0.1


def test_opts_as_namespace_and_training_extras_load_the_same(
    theirs: dict[str, Any], tmp_path: Path
) -> None:
    """Some forks save ``opts`` as an argparse.Namespace; ``--save_training_data`` adds the
    step, optimizer and discriminator states. The decoder keys are ignored either way."""
    variant = dict(theirs)
    variant["opts"] = argparse.Namespace(**theirs["opts"])
    variant.update(global_step=200000, best_val_loss=0.25,
                   optimizer={"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [
                       {"lr": 1e-4, "betas": (0.95, 0.999), "params": [0]}]},
                   discriminator_state_dict={"0.weight": torch.zeros(2, 2)})
    variant["state_dict"] = {k: v for k, v in theirs["state_dict"].items()
                             if not k.startswith("decoder.")}
    torch.save(variant, tmp_path / "ns.pt")
    a = read_e4e_checkpoint(tmp_path / "ns.pt").state_dict()
    b = read_e4e_checkpoint(CKPT).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_would_run_code_is_refused(theirs: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for where in ("opts", "state_dict"):
        bad = dict(theirs)
        if where == "opts":
            bad["opts"] = {**theirs["opts"], "stylegan_weights": _RunsCode(marker)}
        else:
            bad["state_dict"] = {**theirs["state_dict"], "encoder.extra": _RunsCode(marker)}
        torch.save(bad, tmp_path / f"{where}.pt")
        with pytest.raises(CheckpointError, match=r"refusing to load .*system"):
            load_encoder(tmp_path / f"{where}.pt")
        assert not marker.exists()


def test_other_encoders_and_broken_files_are_refused(tmp_path: Path) -> None:
    _small_checkpoint(tmp_path / "psp.pt", opts={"encoder_type": "GradualStyleEncoder"})
    with pytest.raises(CheckpointError, match="GradualStyleEncoder"):
        load_encoder(tmp_path / "psp.pt")
    _small_checkpoint(tmp_path / "size.pt", opts={"stylegan_size": 1024})
    with pytest.raises(CheckpointError, match="stylegan_size 1024"):
        load_encoder(tmp_path / "size.pt")
    data = _small_checkpoint(tmp_path / "ok.pt")
    state = dict(data["state_dict"])
    state["encoder.styles.3.linear.weight"] = torch.zeros(3, 3)
    torch.save({**data, "state_dict": state}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_encoder(tmp_path / "shape.pt")
    torch.save({"g_ema": {}}, tmp_path / "generator.pt")
    with pytest.raises(CheckpointError, match="not an e4e"):
        load_encoder(tmp_path / "generator.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_encoder(tmp_path / "junk.pt")


def test_latent_avg_follows_psp(tmp_path: Path) -> None:
    """pSp adds latent_avg only with start_from_latent_avg; without a saved one it uses the
    generator's mean latent."""
    data = _small_checkpoint(tmp_path / "ok.pt")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        full = load_encoder(tmp_path / "ok.pt").encoder(x)
    del data["latent_avg"]
    torch.save(data, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="no latent_avg"):
        load_encoder(tmp_path / "none.pt")
    w_avg = torch.randn(SMALL.w_dim)
    enc = load_encoder(tmp_path / "none.pt", w_avg=w_avg).encoder
    assert torch.equal(enc.latent_avg, w_avg.expand(SMALL.num_ws, -1))
    data["opts"] = {**data["opts"], "start_from_latent_avg": False}
    torch.save(data, tmp_path / "off.pt")
    with torch.no_grad():
        bare = load_encoder(tmp_path / "off.pt").encoder(x)
    saved = torch.load(tmp_path / "ok.pt", weights_only=True)["latent_avg"]
    assert torch.allclose(full - bare, saved.expand_as(full), atol=1e-5)


def test_our_format_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(1)
    enc = Encoder(SMALL).eval()
    enc.latent_avg.normal_()
    save_encoder(enc, tmp_path / "enc.safetensors", model_id="sg2-0123456789abcdef")
    loaded = load_encoder(tmp_path / "enc.safetensors")
    assert loaded.model_id == "sg2-0123456789abcdef" and loaded.encoder.cfg == SMALL
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encoder(x), enc(x))
    (tmp_path / "g.safetensors").write_bytes((tmp_path / "enc.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "g.safetensors")


def test_input_checks_and_resizing() -> None:
    torch.manual_seed(2)
    enc = Encoder(SMALL).eval()
    with torch.no_grad():
        assert enc(torch.zeros(2, 3, 64, 64)).shape == (2, 10, 32)
        with pytest.raises(ValueError, match="larger than this encoder"):
            enc(torch.zeros(1, 3, 128, 128))
        with pytest.raises(ValueError, match="multiple of 16"):
            enc(torch.zeros(1, 3, 40, 40))
        # Under bfloat16 autocast (as on a GPU) the output is float32 and latent_avg exact.
        enc.latent_avg.normal_()
        for name, param in enc.named_parameters():
            if ".linear." in name:
                param.zero_()  # every head predicts 0: the output is latent_avg itself
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = enc(torch.rand(2, 3, 64, 64))
        assert low.dtype == torch.float32 and torch.equal(low, enc.latent_avg.expand_as(low))
        assert not torch.equal(enc.latent_avg, enc.latent_avg.bfloat16().float())
    big = torch.rand(1, 3, 256, 256)
    small = encoder_input(big, 64)
    assert small.shape == (1, 3, 64, 64)
    assert torch.allclose(small[0, :, 0, 0], big[0, :, :4, :4].mean(dim=(1, 2)))  # area average
    assert encoder_input(small, 64) is small
    assert encoder_input(torch.rand(1, 3, 32, 32), 64).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError):
        EncoderConfig(input_size=48)


def _demo_with_encoder(home: Path, *, model_id: str | None = None) -> tuple[LoadedGenerator, Path]:
    """The demo generator and a small (untrained) encoder saved where the engine looks for it."""
    loaded = load_generator("demo", home=home)
    encoder = new_encoder(loaded.G, encoder_config(loaded.G, "small", is_demo=True))
    path = encoder_path(loaded.model_id, home=home)
    path.parent.mkdir(parents=True)
    save_encoder(encoder, path, model_id=model_id or loaded.model_id)
    return loaded, path


def test_the_engine_finds_the_encoder_trained_for_its_model(tmp_path: Path) -> None:
    loaded = load_generator("demo", home=tmp_path)
    G, model_id = loaded.G, loaded.model_id
    assert open_encoder("auto", G, model_id=model_id, home=tmp_path) is None  # none trained yet
    _, path = _demo_with_encoder(tmp_path)
    found = open_encoder("auto", G, model_id=model_id, home=tmp_path)
    assert found is not None and found.model_id == model_id and found.name == path.name
    assert open_encoder("none", G, model_id=model_id, home=tmp_path) is None
    assert open_encoder(str(path), G, model_id=model_id, home=tmp_path) is not None


def test_an_encoder_for_another_generator_is_refused(tmp_path: Path) -> None:
    loaded, path = _demo_with_encoder(tmp_path, model_id="someone-else")
    with pytest.raises(CheckpointError, match="trained for model someone-else"):
        open_encoder("auto", loaded.G, model_id=loaded.model_id, home=tmp_path)
    other = tmp_path / "wide.safetensors"
    save_encoder(Encoder(EncoderConfig(num_ws=loaded.G.num_ws + 1, w_dim=loaded.G.w_dim,
                                       input_size=32, stage_units=(1, 1, 1, 1),
                                       stage_channels=(16, 32, 48, 64), head_channels=16,
                                       se_reduction=4)), other, model_id=loaded.model_id)
    with pytest.raises(CheckpointError, match="latents; this generator takes"):
        open_encoder(str(other), loaded.G, model_id=loaded.model_id, home=tmp_path)


def test_with_an_encoder_each_selfie_gets_a_first_look_then_fewer_steps(
    tmp_path: Path, astronaut: Image.Image
) -> None:
    _demo_with_encoder(tmp_path)
    engine = Engine(model="demo", device="cpu", home=tmp_path, invert_steps=50,
                    encoder_invert_steps=2, clip="demo")
    assert engine.encoder is not None
    photos = [astronaut, ImageEnhance.Brightness(astronaut).enhance(0.5)]
    inputs = [JobInput(job_id=f"j{i}", spec=InvertSpec(photo_key=f"k{i}"), photo=_jpeg(p))
              for i, p in enumerate(photos)]
    looks: list[tuple[str, bytes]] = []
    steps: list[int] = []
    out = engine.run_batch("invert", inputs, preview=lambda job_id, jpeg: looks.append((job_id, jpeg)),
                           progress=lambda s, t, i: steps.append(s))
    assert all(o.error is None for o in out)
    assert [job_id for job_id, _ in looks] == ["j0", "j1"] and steps[-1] == 2
    for (_, jpeg), o in zip(looks, out, strict=True):
        look = Image.open(io.BytesIO(jpeg))
        panel = Image.open(io.BytesIO(o.files["panel_key"][0]))
        assert look.format == "JPEG" and look.size == panel.size  # replaced in place by the result
        assert o.result["steps"] == 2 and o.result["encoder_psnr"] > 0


def test_auto_takes_the_authors_encoder_only_for_the_generator_it_was_made_for(tmp_path: Path) -> None:
    """NVIDIA's ffhq.pkl is the StyleGAN2 FFHQ generator e4e was trained with: a downloaded e4e
    file serves it, and no other generator."""
    from engine import weights
    from engine.stylegan2 import Generator, GeneratorConfig

    asset = weights.MANIFEST["e4e-ffhq"]
    dest = weights.asset_path(asset, home=tmp_path)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(CKPT.read_bytes())  # the authors' format, 8 W+ layers (a 32 px generator)
    G = Generator(GeneratorConfig.from_channel_base(z_dim=512, w_dim=512, resolution=32,
                                                    channel_base=1024, channel_max=64))
    found = open_encoder("auto", G, model_id="sg2-x", generator_name=asset.for_generator or "",
                         home=tmp_path)
    assert found is not None and found.source_format == "e4e-pt"
    assert open_encoder("auto", G, model_id="sg2-x", generator_name="other.pkl", home=tmp_path) is None
