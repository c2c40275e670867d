"""Random-weight stand-ins for the networks we cannot download here, written in their upstream
file formats (what `stylebot weights fetch` would put in the cache): OpenAI's TorchScript CLIP
archive with float16 weights, torchvision's VGG16 and facenet-pytorch's InceptionResnetV1 state
dicts in torch's legacy serialisation (both files predate torch 1.6). The unit tests use them at
small size, the GPU smoke and the chat rehearsal at full size.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from engine.clip_model import clip  # imported there with its pkg_resources warning silenced

__all__ = ["CLIP_VIT_B32", "random_facenet_state", "random_vgg16_state", "save_clip_torchscript",
           "write_weights_cache"]

# clip.model.CLIP's arguments for ViT-B/32 (what build_model reads off OpenAI's file).
CLIP_VIT_B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                    vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
                    transformer_heads=8, transformer_layers=12)


def save_clip_torchscript(model: nn.Module, path: Path, *, input_resolution: int,
                          half: bool = False) -> None:
    """Trace a CLIP into a real TorchScript archive laid out like OpenAI's released files.

    We trace the CLIP module itself (its forward(image, text)), so the archive's module tree
    and parameter names are CLIP's own (visual.conv1.weight, ...). Like OpenAI's files it also
    carries input_resolution / context_length / vocab_size as buffers; ``half`` stores the
    weights as float16, as ViT-B-32.pt does.
    """
    net = copy.deepcopy(model)
    del net.context_length, net.vocab_size  # plain ints on clip's CLIP; buffers in OpenAI's files
    for name, value in (("input_resolution", input_resolution), ("context_length", 77),
                        ("vocab_size", 49408)):
        net.register_buffer(name, torch.tensor(value))
    image = torch.zeros(1, 3, input_resolution, input_resolution)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace(_method)?` is deprecated", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks frozen into the trace
        traced = torch.jit.trace(net, (image, clip.tokenize(["a face"])))
    if half:
        traced.half()
    traced.save(str(path))


def random_vgg16_state(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision-vgg16-shaped state dict with random trunk weights.

    The model is built on the meta device and only ``features`` is materialised: initialising
    the 120M-parameter classifier on CPU would cost seconds and the loader ignores it anyway
    (one small classifier key stays in to show that).
    """
    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    features = vgg.features.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
                assert m.bias is not None
                m.bias.uniform_(-0.01, 0.01, generator=g)
    state = features.state_dict(prefix="features.")  # an OrderedDict with _metadata, as published
    state["classifier.6.bias"] = torch.zeros(1000)
    return state


def random_facenet_state(seed: int) -> dict[str, torch.Tensor]:
    """facenet-pytorch's InceptionResnetV1 (VGGFace2) state dict, random, with the classifier the
    published file carries."""
    from facenet_pytorch import InceptionResnetV1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = InceptionResnetV1(pretrained=None, classify=False).state_dict()
    state["logits.weight"] = torch.zeros(8631, 512)
    state["logits.bias"] = torch.zeros(8631)
    return state


def write_weights_cache(weights_dir: Path, *, seed: int = 0) -> None:
    """Full-size CLIP ViT-B/32, VGG16 and FaceNet stand-ins under the names `weights fetch` uses."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = clip.model.CLIP(**CLIP_VIT_B32)
    save_clip_torchscript(model, weights_dir / "ViT-B-32.pt", input_resolution=224, half=True)
    legacy = {"_use_new_zipfile_serialization": False}
    torch.save(random_vgg16_state(seed), weights_dir / "vgg16-397923af.pth", **legacy)
    torch.save(random_facenet_state(seed), weights_dir / "20180402-114759-vggface2.pt", **legacy)
