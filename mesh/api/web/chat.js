// The topology page's chat box: streams a reply from this node's own
// /v1/chat/completions (server-sent events). That endpoint needs the API token, which no
// page can read by itself: the user pastes it, and it is kept in sessionStorage (this tab
// only). Replies reach the page through textContent only.
"use strict";

const TOKEN_KEY = "edgemesh.api_token";
const MAX_REPLY_TOKENS = 64;

function chatSetup() {
  const form = document.getElementById("chat");
  const token = document.getElementById("chat-token");
  const model = document.getElementById("chat-model");
  const prompt = document.getElementById("chat-prompt");
  const out = document.getElementById("chat-out");
  const send = document.getElementById("chat-send");
  try { token.value = sessionStorage.getItem(TOKEN_KEY) || ""; } catch { /* storage off */ }
  token.addEventListener("change", () => {
    try { sessionStorage.setItem(TOKEN_KEY, token.value.trim()); } catch { /* storage off */ }
  });
  const show = (state, text) => { out.setAttribute("data-state", state); out.textContent = text; };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!token.value.trim()) { show("error", "paste the API token (api.token in the node's data dir)"); return; }
    send.disabled = true;
    show("streaming", "");
    let chunks = 0;
    try {
      await stream(token.value.trim(), model.value.trim(), prompt.value, (piece) => {
        out.textContent += piece;
        chunks += 1;
        out.setAttribute("data-chunks", String(chunks));
      });
      out.setAttribute("data-state", "done");
    } catch (err) {
      show("error", String(err && err.message ? err.message : err));
    } finally {
      send.disabled = false;
    }
  });
}

async function stream(token, model, text, onPiece) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
    body: JSON.stringify({
      model, messages: [{ role: "user", content: text }], max_tokens: MAX_REPLY_TOKENS, stream: true,
    }),
  });
  if (resp.status === 401) throw new Error("the API token is not this node's");
  if (!resp.ok) throw new Error(`HTTP ${resp.status}: ${(await resp.text()).slice(0, 200)}`);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk && chunk.error) throw new Error(String(chunk.error.message || "error"));
        const choice = chunk && Array.isArray(chunk.choices) ? chunk.choices[0] : null;
        const piece = choice && choice.delta ? choice.delta.content : null;
        if (typeof piece === "string") onPiece(piece);
      }
    }
  }
}

chatSetup();
