"""The two-stage reply on Telegram: with an encoder for the model, a selfie gets the encoder's first
look while the optimisation refines it, then the result in its place (the real python-telegram-bot
client, the fake Bot API server, a real engine process on the demo model)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image
from sqlalchemy import select

from engine.encoder_cmd import encoder_config
from engine.encoder_io import save_encoder
from engine.encoder_train import new_encoder
from engine.generators import load_generator
from storage.models import Face

from .fake_telegram import FakeUser
from .telegram_world import CONFIG, World, astronaut, dm, replying_to, running_world

pytestmark = pytest.mark.asyncio(loop_scope="module")

ERIN = FakeUser(id=1005, first_name="Erin", username="erin")


def _encoder_for_demo(path: Path) -> Path:
    """A small encoder for the demo model (untrained: the flow, not its quality, is under test)."""
    loaded = load_generator("demo")
    save_encoder(new_encoder(loaded.G, encoder_config(loaded.G, "small", is_demo=True)), path,
                 model_id=loaded.model_id)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    tmp = tmp_path_factory.mktemp("first-look")
    encoder = _encoder_for_demo(tmp / "encoder.safetensors")
    # Enough refining steps on the CPU for the first look to be shown before the result.
    config = CONFIG.replace("invert_steps = 20\n",
                            f'invert_steps = 20\nencoder = "{encoder}"\nencoder_invert_steps = 120\n')
    async with running_world(tmp, config_text=config) as w:
        yield w


async def test_a_selfie_gets_a_first_look_then_the_result_in_its_place(world: World) -> None:
    tg = world.tg
    msg = await tg.send_photo(ERIN, dm(ERIN), astronaut())
    progress = await tg.wait_for("sendMessage", replying_to(msg), timeout=20)
    look = await tg.wait_for("sendPhoto", replying_to(msg), timeout=120)
    assert look.params["caption"].startswith("A first look")
    look_id = look.result["message_id"]
    final = await tg.wait_for("editMessageMedia", lambda c: c.params["message_id"] == look_id,
                              timeout=120)
    shown = tg.messages[(ERIN.id, look_id)]
    assert "Saved as your face" in shown["caption"] and "first look" not in shown["caption"]
    (first_png,) = look.files.values()
    (final_png,) = final.files.values()
    assert first_png != final_png
    assert Image.open(io.BytesIO(first_png)).size == Image.open(io.BytesIO(final_png)).size
    # One photo message in all: the result took the first look's place.
    assert len([c for c in tg.called("sendPhoto") if replying_to(msg)(c)]) == 1
    done = await tg.wait_for("editMessageText", lambda c: c.params["message_id"] ==
                             progress.result["message_id"] and c.params["text"] == "Done.", timeout=20)
    assert done.params.get("reply_markup")  # the result's buttons, where Telegram can show them
    async with world.service.sessions() as s:
        face = (await s.scalars(select(Face))).one()
    assert face.quality["steps"] == 120 and face.quality["psnr"] >= face.quality["encoder_psnr"]
