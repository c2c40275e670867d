// stylebot web chat: one shared room. Every text from users or the bot is set with textContent.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const timeline = $("timeline");
  const nameInput = $("name");
  const textInput = $("text");
  const fileInput = $("file");
  const drop = $("drop");
  const NAME = /^[\p{L}\p{N}_][\p{L}\p{N}_.-]{0,31}$/u;
  const nodes = new Map(); // message id -> its element

  nameInput.value = sessionStorage.getItem("stylebot-name") || ""; // per tab: several people, one page
  nameInput.addEventListener("input", () => {
    sessionStorage.setItem("stylebot-name", nameInput.value.trim());
    for (const node of nodes.values()) mark(node);
  });

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function mark(node) {
    const me = nameInput.value.trim().toLowerCase();
    node.classList.toggle("mine", me !== "" && node.dataset.person === me);
  }

  function mediaNode(item) {
    const figure = el("figure");
    let node;
    if (item.kind === "video") {
      node = el("video");
      node.controls = node.muted = node.autoplay = node.loop = node.playsInline = true;
      node.setAttribute("muted", "");
      node.setAttribute("playsinline", "");
      node.src = item.url;
    } else if (item.kind === "photo" || item.kind === "animation") {
      node = el("img");
      node.alt = item.caption || "";
      node.src = item.url;
    } else {
      node = el("a", null, "Download");
      node.href = item.url;
      node.download = "";
    }
    node.addEventListener("error", () => figure.append(el("span", "gone", "(this file is no longer available)")));
    figure.append(node);
    if (item.caption) figure.append(el("figcaption", null, item.caption));
    return figure;
  }

  function withCode(text) { // `commands` as code, the rest as text (never as HTML)
    return text.split("`").map((part, i) => (i % 2 ? el("code", null, part) : document.createTextNode(part)));
  }

  function render(m) {
    const node = el("article", `msg ${m.role}`);
    node.dataset.id = m.id;
    node.dataset.person = (m.role === "user" ? m.name : m.reply_name || "").toLowerCase();
    if (m.in_reply_to) node.dataset.replyTo = m.in_reply_to;
    if (!m.final) node.classList.add("progress");
    const head = el("header");
    head.append(el("span", "who", m.name));
    if (m.reply_name) head.append(el("span", "to", `to ${m.reply_name}`));
    node.append(head);
    if (m.thumb) {
      const sent = el("figure", "sent");
      const thumb = el("img", "thumb");
      thumb.alt = `Photo: ${m.photo}`;
      thumb.src = m.thumb;
      sent.append(thumb, el("figcaption", null, m.photo));
      node.append(sent);
    } else if (m.photo) {
      node.append(el("p", "attachment", `Photo: ${m.photo}`));
    }
    const captions = new Set(m.media.map((item) => item.caption));
    if (m.text && !captions.has(m.text)) node.append(el("p", "text", m.text));
    for (const item of m.media) node.append(mediaNode(item));
    for (const row of m.buttons || []) {
      const bar = el("div", "buttons");
      for (const b of row) {
        const button = el("button", "", b.label);
        button.type = "button";
        button.addEventListener("click", () => press(m.id, b.data));
        bar.append(button);
      }
      node.append(bar);
    }
    mark(node);
    return node;
  }

  function press(messageId, data) {
    const form = new URLSearchParams({ name: nameInput.value.trim(), data, message: messageId });
    return post("api/press", form);
  }

  function atBottom() {
    const page = document.scrollingElement;
    return page.scrollHeight - page.scrollTop - page.clientHeight < 120;
  }

  function toBottom() {
    window.scrollTo(0, document.scrollingElement.scrollHeight);
  }

  function show(m) {
    const follow = atBottom();
    const node = render(m);
    const old = nodes.get(m.id);
    if (old) old.replaceWith(node);
    else timeline.append(node);
    nodes.set(m.id, node);
    if (!follow) return;
    toBottom();
    for (const media of node.querySelectorAll("img, video")) { // keep following as pictures arrive
      media.addEventListener(media.tagName === "IMG" ? "load" : "loadeddata", toBottom, { once: true });
    }
  }

  function notice(text) { // only in this tab: the server never saw the message
    const node = el("article", "msg notice");
    node.append(el("p", "text", text));
    timeline.append(node);
    toBottom();
  }

  function status(text) {
    $("status").textContent = text;
  }

  function onEvent(event) {
    if (event.type === "hello") {
      nodes.clear();
      timeline.replaceChildren();
      const banner = $("banner");
      banner.replaceChildren(...withCode(event.banner || ""));
      banner.hidden = !event.banner;
      event.messages.forEach(show);
    } else if (event.type === "message" || event.type === "edit") {
      show(event.message);
    }
  }

  function connect(delay) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${location.pathname.replace(/[^/]*$/, "")}ws`);
    ws.addEventListener("open", () => { status("connected"); delay = 500; });
    ws.addEventListener("message", (e) => onEvent(JSON.parse(e.data)));
    ws.addEventListener("close", () => {
      status("disconnected: reconnecting…");
      setTimeout(() => connect(Math.min(delay * 2, 10000)), delay);
    });
  }

  async function send(text, file) {
    const form = new FormData();
    form.append("name", nameInput.value.trim());
    form.append("text", text);
    if (file) form.append("photo", file, file.name || "photo");
    return post("api/send", form);
  }

  async function post(path, form) {
    const name = nameInput.value.trim();
    if (!NAME.test(name) || ["me", "myself"].includes(name.toLowerCase())) {
      notice("Type your name first (top right): one word of letters, digits, _ . or -.");
      nameInput.focus();
      return false;
    }
    let response;
    try {
      response = await fetch(path, { method: "POST", body: form, credentials: "same-origin" });
    } catch {
      notice("Could not reach stylebot. Is `stylebot run` still running?");
      return false;
    }
    if (!response.ok) {
      const body = await response.text();
      let message = body || `Error ${response.status}`;
      try { message = JSON.parse(body).error || message; } catch { /* plain text */ }
      notice(message);
      return false;
    }
    return true;
  }

  function sendPhoto(file) {
    if (!file) return;
    const caption = textInput.value.trim();
    const withCaption = caption.toLowerCase().startsWith("/selfie");
    send(withCaption ? caption : "", file).then((ok) => { if (ok && withCaption) textInput.value = ""; });
  }

  $("composer").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = textInput.value.trim();
    if (text && await send(text, null)) textInput.value = "";
    textInput.focus();
  });
  $("attach").addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    sendPhoto(fileInput.files[0]);
    fileInput.value = "";
  });

  // Drag and drop anywhere on the page: the overlay shows while a file is over the window.
  window.addEventListener("dragenter", (e) => {
    if (e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files")) drop.hidden = false;
  });
  drop.addEventListener("dragleave", () => { drop.hidden = true; });
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.hidden = true;
    sendPhoto(e.dataTransfer.files[0]);
  });

  connect(500);
})();
