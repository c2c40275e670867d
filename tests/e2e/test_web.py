"""Web chat end to end: the real `stylebot run` (no tokens, so the local web chat; its own engine
process on the demo model) driven through Debian's chromium with playwright, as a newcomer would.

One world for the module (one server, one browser); the tests run in order and build on each other:
alice and bob each open a tab and send a selfie (button and drag and drop), then morph and edit.
The server has an access token (each tab opens the chat once with ``?token=``) and logs at DEBUG, its
engine process too; everything they wrote is then checked for the token, the cookie and face data.
A full-page screenshot goes to ``$STYLEBOT_ARTIFACTS`` (default ``tests/artifacts``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import skimage.data
from log_privacy import assert_no_private_data, read_log
from PIL import Image
from playwright.sync_api import Browser, Page, WebSocket, expect, sync_playwright
from sqlalchemy.engine import make_url

from settings import load_config

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
JOB_TIMEOUT_MS = 120_000
WEB_TOKEN = "web-access-SECRET-token-for-e2e"

CONFIG = """
[bot]
log_level = "DEBUG"

[web]
port = {port}

[engine]
model = "demo"
device = "cpu"
invert_steps = 100
edit_steps = 5
clip = "demo"
batch_wait_ms = 500
direction_samples = 1

[limits]
per_user_per_minute = 30
"""


@dataclass
class World:
    url: str
    browser: Browser
    alice: Page
    tmp: Path  # config.toml, home/, stdout.log and stderr.log (the server's and its engine's)
    events: list[dict[str, Any]] = field(default_factory=list)  # what alice's tab received

    def open(self, page: Page) -> None:
        """A tab's first visit: with the access token, which the server swaps for a cookie."""
        page.goto(f"{self.url}?token={WEB_TOKEN}")
        expect(page).to_have_url(self.url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _astronaut(path: Path, rotate: float = 0) -> Path:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).rotate(rotate).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return path


def _run_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "STYLEBOT_HOME": str(home), "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    for name in ("TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN", "STYLEBOT_WEB_TOKEN"):
        env.pop(name, None)
    return env


def _wait_for_url(proc: subprocess.Popen[bytes], stdout: Path, stderr: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(r"^stylebot web chat: (http://\S+)$", stdout.read_text(), re.MULTILINE):
            return m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no web chat URL on stdout:\n{stdout.read_text()}\n{stderr.read_text()[-3000:]}")


def _record(events: list[dict[str, Any]]) -> Callable[[WebSocket], None]:
    def on_socket(ws: WebSocket) -> None:
        ws.on("framereceived", lambda frame: events.append(json.loads(frame)))
    return on_socket


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is needed (`make test` installs it: apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("web")
    config = tmp / "config.toml"
    config.write_text(CONFIG.format(port=_free_port()))
    stdout, stderr = tmp / "stdout.log", tmp / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--config", str(config)],
                                env={**_run_env(tmp / "home"), "STYLEBOT_WEB_TOKEN": WEB_TOKEN},
                                stdout=out, stderr=err)
    try:
        url = _wait_for_url(proc, stdout, stderr, timeout=60)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                alice = browser.new_page(viewport={"width": 1100, "height": 1800})
                world = World(url=url, browser=browser, alice=alice, tmp=tmp)
                alice.on("websocket", _record(world.events))
                world.open(alice)
                yield world
            finally:
                browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    logs = stderr.read_text()
    assert proc.returncode == 0, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]


# --- helpers: the page as a user sees it ----------------------------------------------------------

def _send(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def _user_message(page: Page, name: str, contains: str) -> str:
    """The id of the newest message ``name`` posted that shows ``contains``."""
    handle = page.wait_for_function(
        """([name, contains]) => {
            const mine = [...document.querySelectorAll('article.user')].filter(
                a => a.querySelector('.who').textContent === name && a.textContent.includes(contains));
            return mine.length ? mine[mine.length - 1].dataset.id : null;
        }""", arg=[name, contains])
    return str(handle.json_value())


def _reply(page: Page, message_id: str, check: str, timeout: float = JOB_TIMEOUT_MS) -> str:
    """Wait until a bot reply to ``message_id`` satisfies ``check`` (JS, on article ``a``)."""
    handle = page.wait_for_function(  # polled: a tab in the background gets no animation frames
        f"""(id) => {{
            const a = [...document.querySelectorAll(`article.bot[data-reply-to="${{id}}"]`)]
                .find(a => {check});
            return a ? a.dataset.id : null;
        }}""", arg=message_id, timeout=timeout, polling=50)
    return str(handle.json_value())


def _images_loaded(n: int) -> str:
    imgs = "[...a.querySelectorAll('img')]"
    return f"{imgs}.length >= {n} && {imgs}.every(i => i.complete && i.naturalWidth > 0)"


# --- the tests ------------------------------------------------------------------------------------

def test_the_page_says_it_runs_the_demo_model(world: World) -> None:
    banner = world.alice.locator("#banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Demo model: random weights, not a face model")
    expect(banner).to_contain_text("stylebot weights fetch stylegan2-ffhq-1024")
    expect(banner.locator("code")).to_have_count(2)  # the commands as code, no backticks shown
    assert "`" not in (banner.text_content() or "")
    expect(world.alice.locator("#status")).to_have_text("connected")


def test_selfies_by_button_and_by_drag_and_drop(world: World) -> None:
    alice = world.alice
    alice.fill("#name", "alice")
    alice.set_input_files("#file", str(_astronaut(world.tmp / "alice.jpg")))
    a_id = _user_message(alice, "alice", "alice.jpg")

    bob = world.browser.new_page()  # another tab, another person: the room's history is there
    world.open(bob)
    expect(bob.locator(f'article[data-id="{a_id}"]')).to_contain_text("alice.jpg")
    thumb = bob.locator(f'article[data-id="{a_id}"] img.thumb')  # what alice sent, small
    expect(thumb).to_have_count(1)
    bob.wait_for_function("(i) => i.complete && i.naturalWidth > 0", arg=thumb.element_handle())
    assert 0 < max(thumb.evaluate("i => [i.naturalWidth, i.naturalHeight]")) <= 160
    bob.fill("#name", "bob")
    jpeg = base64.b64encode(_astronaut(world.tmp / "bob.jpg", rotate=4).read_bytes()).decode()
    files = bob.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'bob.jpg', {type: 'image/jpeg'}));
            return dt;
        }""", jpeg)
    bob.dispatch_event("body", "dragenter", {"dataTransfer": files})
    expect(bob.locator("#drop")).to_be_visible()
    bob.dispatch_event("#drop", "drop", {"dataTransfer": files})
    expect(bob.locator("#drop")).to_be_hidden()
    b_id = _user_message(bob, "bob", "bob.jpg")

    for page, message_id in ((alice, a_id), (bob, b_id)):
        reply = _reply(page, message_id, _images_loaded(1))
        panel = page.locator(f'article[data-id="{reply}"]')
        expect(panel).to_contain_text("Saved as your face")
        size = panel.locator("img").first.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert size[0] >= 2 * size[1]  # aligned | reconstruction, side by side

    # The progress message was edited in place: "in the queue" became the result, in one message.
    queued = [e["message"] for e in world.events if e["type"] == "message"
              and e["message"]["in_reply_to"] == a_id and "queue" in e["message"]["text"]]
    assert len(queued) == 1, world.events
    edits = [e["message"] for e in world.events if e["type"] == "edit"
             and e["message"]["id"] == queued[0]["id"]]
    assert any(e["text"].startswith("Working") for e in edits)
    assert edits[-1]["media"] and edits[-1]["final"]
    assert alice.locator(f'article.bot[data-reply-to="{a_id}"]').count() == 1
    expect(alice.locator(f'article[data-id="{queued[0]["id"]}"] img')).to_have_count(1)


def test_a_file_that_is_not_a_photo_gets_a_clear_reply(world: World) -> None:
    alice = world.alice
    notes = world.tmp / "notes.txt"
    notes.write_text("not a photo")
    alice.set_input_files("#file", str(notes))
    message_id = _user_message(alice, "alice", "notes.txt")
    reply = _reply(alice, message_id, "a.textContent.includes('photo')", timeout=10_000)
    expect(alice.locator(f'article[data-id="{reply}"] .text')).to_have_text(
        "That doesn't look like a photo I can read. Please send a JPEG or PNG.")


def test_morph_plays_inline_as_mp4_and_as_gif(world: World) -> None:
    alice = world.alice
    _send(alice, "/morph @alice @bob 8")
    message_id = _user_message(alice, "alice", "/morph @alice @bob 8")
    reply = _reply(alice, message_id, "a.querySelector('video') && a.querySelector('video').readyState >= 2")
    video = alice.locator(f'article[data-id="{reply}"] video')
    state = video.evaluate("v => ({muted: v.muted, loop: v.loop, autoplay: v.autoplay, "
                           "controls: v.controls, width: v.videoWidth, error: v.error && v.error.code})")
    assert state == {"muted": True, "loop": True, "autoplay": True, "controls": True, "width": 64,
                     "error": None}  # H.264 decodes in Debian's chromium
    expect(alice.locator(f'article[data-id="{reply}"]')).to_contain_text("Morph: alice to bob, ")

    _send(alice, "/morph @alice @bob 8 gif")
    message_id = _user_message(alice, "alice", "/morph @alice @bob 8 gif")
    reply = _reply(alice, message_id, _images_loaded(1))
    src = alice.locator(f'article[data-id="{reply}"] img').get_attribute("src")
    assert src is not None
    response = alice.request.get(world.url + src)
    assert response.ok and response.headers["content-type"] == "image/gif"

    # Under the GIF: the same morph as MP4, turned round, slower, faster; Reverse makes bob's first.
    buttons = alice.locator(f'article[data-id="{reply}"] .buttons button')
    expect(buttons).to_have_text(["As MP4", "Reverse", "Slower", "Faster"])
    buttons.filter(has_text="Reverse").click()
    turned = _reply(alice, reply, _images_loaded(1))
    expect(alice.locator(f'article[data-id="{turned}"]')).to_contain_text("Morph: bob to alice, 14 frames")


def test_buttons_under_a_selfie_edit_it_for_its_owner_only(world: World) -> None:
    alice = world.alice
    selfie = alice.locator('article.bot[data-person="alice"]', has_text="Saved as your face").first
    expect(selfie.locator(".buttons button")).to_have_text(
        ["Smile", "Older", "Younger", "Glasses", "Morph with..."])
    selfie_id = selfie.get_attribute("data-id")
    assert selfie_id is not None

    bob = world.browser.new_page()
    world.open(bob)
    bob.fill("#name", "bob")
    bob.locator(f'article[data-id="{selfie_id}"] .buttons button', has_text="Smile").click()
    refusal = _reply(bob, selfie_id, "a.textContent.includes('Only the person whose face it is')")
    assert bob.locator(f'article[data-id="{refusal}"] img').count() == 0
    bob.close()

    # The engine builds the demo model's direction table while idle (one sample a channel): with
    # it, a one-tap edit is a global-direction edit, whose strength can slide.
    table = world.tmp / "home" / "directions"
    deadline = time.monotonic() + 120
    while not list(table.glob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.5)
    alice.locator(f'article[data-id="{selfie_id}"] .buttons button', has_text="Smile").click()
    edited = _reply(alice, selfie_id, "a.textContent.includes('a smiling face') && " + _images_loaded(2))
    result = alice.locator(f'article[data-id="{edited}"]')
    expect(result).to_contain_text("Before / after: a smiling face")
    expect(result.locator(".buttons button")).to_have_text(
        ["Weaker", "Stronger", "Thorough (slower)", "Morph with..."])
    m = re.search(r"\(strength (-?[0-9.]+), from -10 to 10\)", result.text_content() or "")
    assert m is not None
    _screenshot(alice, "web-buttons.png")
    result.locator(".buttons button", has_text="Stronger").click()
    stronger = _reply(alice, edited, _images_loaded(2))
    expect(alice.locator(f'article[data-id="{stronger}"]')).to_contain_text(
        f"(strength {float(m[1]) + 2:g}, from -10 to 10)")


def test_progress_moves_while_a_selfie_is_worked_on(world: World) -> None:
    """What the chat shows while the engine works: the note in the queue, then the step count moving
    (captured as it is shown), then the result in the same message."""
    alice = world.alice
    seen = len(world.events)
    alice.set_input_files("#file", str(_astronaut(world.tmp / "alice2.jpg", rotate=8)))
    message_id = _user_message(alice, "alice", "alice2.jpg")
    # Past its first step: the count has moved (the page shows each edit as it comes).
    shown = "(a.querySelector('.text')?.textContent ?? '')"
    working = _reply(alice, message_id,
                     f"{shown}.startsWith('Working') && !{shown}.startsWith('Working... 0%')")
    _screenshot(alice, "web-progress.png")
    done = _reply(alice, message_id, _images_loaded(1))
    assert done == working  # one message, edited: the note, its progress, the result
    texts = [e["message"]["text"] for e in world.events[seen:]
             if e["type"] in ("message", "edit") and e["message"]["id"] == done]
    assert "queue" in texts[0] and "Saved as your face" in texts[-1], texts
    percents = [int(t) for t in re.findall(r"Working\.\.\. (\d+)%", " ".join(texts))]
    assert len(set(percents)) >= 2 and percents == sorted(percents) and percents[-1] < 100, texts


def _screenshot(page: Page, name: str) -> None:
    artifacts = Path(os.environ.get("STYLEBOT_ARTIFACTS") or REPO / "tests" / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artifacts / name))


def test_edit_shows_before_and_after(world: World) -> None:
    alice = world.alice
    _send(alice, "/edit smile face")
    message_id = _user_message(alice, "alice", "/edit smile face")
    reply = _reply(alice, message_id, _images_loaded(2))  # before/after, and pasted into the photo
    result = alice.locator(f'article[data-id="{reply}"]')
    expect(result).to_contain_text("Before / after: smile face")
    expect(result).to_contain_text("In your photo")
    artifacts = Path(os.environ.get("STYLEBOT_ARTIFACTS") or REPO / "tests" / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    alice.evaluate("window.scrollTo(0, 0)")  # the sticky header and composer at their places
    alice.screenshot(path=str(artifacts / "web-chat.png"), full_page=True)


def test_logs_hold_neither_the_token_nor_face_data(world: World) -> None:
    """All of the above, as the server and its engine process logged it (at DEBUG)."""
    stdout, stderr = read_log(world.tmp / "stdout.log"), read_log(world.tmp / "stderr.log")
    assert "(the first time, add ?token=<your STYLEBOT_WEB_TOKEN> to it)" in stdout
    assert "engine process started" in stderr and "engine worker" in stderr  # both processes
    assert "DEBUG aiosqlite" not in stderr  # libraries log at INFO at most, whatever log_level says
    [cookie] = world.alice.context.cookies()  # what the token was swapped for: as good as the token
    config = load_config(world.tmp / "config.toml", env=_run_env(world.tmp / "home"))
    db = make_url(config.storage_url).database
    assert db is not None
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        latents = [row[0] for row in con.execute("SELECT latent FROM faces")]
    stored = [p.read_bytes() for p in sorted(config.media_dir.rglob("*")) if p.is_file()]
    uploads = [(world.tmp / name).read_bytes() for name in ("alice.jpg", "bob.jpg")]
    face_data = list(dict.fromkeys([*uploads, *stored, *latents]))  # sent, made (shown), kept
    assert len(latents) == 2 and len(face_data) > 10
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        scan = assert_no_private_data(text, secrets=[WEB_TOKEN, cookie["value"]], face_data=face_data)
        print(f"web {name}: {scan} scanned, {len(face_data)} blobs of face data")


def test_a_public_bind_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[web]\nhost = "0.0.0.0"\n')
    proc = subprocess.run([sys.executable, "-m", "cli", "run", "--config", str(config)],
                          env=_run_env(tmp_path / "home"), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stylebot: error:"), proc.stderr
    assert "access token is required" in lines[0] and "Traceback" not in proc.stderr
    assert "web chat" not in proc.stdout  # nothing was served
