"use strict";
// The chat page. Everything below uses only the public HTTP API of the service (docs/api.md);
// Markdown goes through marked and then DOMPurify, both served from this origin (vendor/).
(() => {
  const state = {
    conversationId: null,
    replyId: null,
    source: null,
    sending: false,
    conversations: new Map(), // id -> conversation, as the last list showed them
  };
  const $ = (id) => document.getElementById(id);
  const messagesBox = $("messages");
  const input = $("input");
  const tokenInput = $("token");
  const narrow = window.matchMedia("(max-width: 720px)");
  // A touch keyboard has no Shift+Enter: there Enter starts a new line and Send sends.
  const touch = window.matchMedia("(pointer: coarse)");

  // --- Markdown ------------------------------------------------------------------------------

  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

  const toHtml = (() => {
    if (!window.marked || !window.DOMPurify || !window.DOMPurify.isSupported) return null;
    const parser = new window.marked.Marked({ gfm: true, breaks: false });
    parser.use({
      renderer: {
        // An image would be fetched from wherever the model points (a tracking pixel): it is
        // shown as a link to follow instead. The page's CSP would block it anyway.
        image({ href, text }) {
          return `<a href="${escapeHtml(href || "")}">${escapeHtml(text || href || "image")}</a>`;
        },
      },
    });
    const purify = window.DOMPurify(window); // an instance of our own, for our own hooks
    purify.addHook("uponSanitizeAttribute", (node, data) => {
      // Only the code blocks' language classes: a model's class="..." could dress its text
      // up as the page's own elements.
      if (data.attrName === "class" && !/^language-[\w+#.-]+$/.test(data.attrValue)) {
        data.keepAttr = false;
      }
    });
    purify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A" && node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
    const config = {
      FORBID_TAGS: ["style", "img", "picture", "video", "audio", "source", "track",
        "form", "input", "button", "textarea", "select", "option"],
      FORBID_ATTR: ["style"],
      ALLOW_DATA_ATTR: false,
      RETURN_DOM_FRAGMENT: true,
    };
    return (markdown) => purify.sanitize(parser.parse(markdown), config);
  })();

  function showText(content, text, asMarkdown) {
    if (asMarkdown && toHtml) {
      content.classList.add("markdown");
      content.replaceChildren(toHtml(text));
    } else {
      content.classList.remove("markdown");
      content.textContent = text;
    }
  }

  const nearBottom = () =>
    messagesBox.scrollHeight - messagesBox.scrollTop - messagesBox.clientHeight < 80;
  const toBottom = () => { messagesBox.scrollTop = messagesBox.scrollHeight; };

  // A streaming reply's text, parsed again as it grows: at most once a frame, and less often
  // as the parse gets slow on a long reply, never once per delta.
  function liveText(content) {
    let text = "";
    let frame = 0;
    let timer = 0;
    let cost = 0;
    const flush = () => {
      frame = 0;
      const stick = nearBottom();
      const started = performance.now();
      showText(content, text, true);
      cost = performance.now() - started;
      if (stick) toBottom();
    };
    const cancel = () => {
      cancelAnimationFrame(frame);
      clearTimeout(timer);
      frame = 0;
      timer = 0;
    };
    return {
      append(piece) {
        text += piece;
        if (frame || timer) return;
        const wait = cost > 8 ? Math.min(cost * 4, 1000) : 0;
        if (wait) {
          timer = setTimeout(() => { timer = 0; frame = requestAnimationFrame(flush); }, wait);
        } else {
          frame = requestAnimationFrame(flush);
        }
      },
      reset() { cancel(); text = ""; content.replaceChildren(); },
      cancel,
    };
  }

  // --- tool calls ------------------------------------------------------------------------------

  const toolNames = new Map(); // call id -> tool name: a `tool` message names only the call

  function pretty(text) {
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch {
      return text;
    }
  }

  function toolCall(container, callId, name) {
    if (callId) toolNames.set(callId, name);
    // One disclosure per call, wherever it is already shown (a stored round, or this stream).
    let details = callId
      ? messagesBox.querySelector(`details.tool[data-call-id="${CSS.escape(callId)}"]`)
      : null;
    if (details) return details;
    details = document.createElement("details");
    details.className = "tool";
    if (callId) details.dataset.callId = callId;
    const summary = document.createElement("summary");
    const label = document.createElement("span");
    label.className = "tool-label";
    label.textContent = "Tool";
    const code = document.createElement("code");
    code.className = "tool-name";
    code.textContent = name;
    const status = document.createElement("span");
    status.className = "tool-status running";
    status.textContent = "running…";
    summary.append(label, " ", code, " ", status);
    details.append(summary);
    container.append(details);
    return details;
  }

  function toolPart(details, part, caption, text) {
    let section = details.querySelector(`[data-part="${part}"]`);
    if (!section) {
      section = document.createElement("div");
      section.className = "tool-part";
      section.dataset.part = part;
      const heading = document.createElement("div");
      heading.className = "tool-caption";
      heading.textContent = caption;
      section.append(heading, document.createElement("pre"));
      details.append(section);
    }
    section.querySelector("pre").textContent = text;
  }

  function toolResult(details, status, result, truncated) {
    toolPart(details, "result", "Result", pretty(result) + (truncated ? "\n… (cut short)" : ""));
    const label = details.querySelector(".tool-status");
    label.className = `tool-status ${status === "ok" ? "ok" : "error"}`;
    label.textContent = status === "ok" ? "done" : "failed";
  }

  // --- the HTTP API -------------------------------------------------------------------------

  function authHeaders() {
    const token = tokenInput.value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  function newKey() {
    // crypto.randomUUID exists only in secure contexts; getRandomValues exists everywhere.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }
  let pendingSend = null; // {content, key}: a retry of the same text reuses its Idempotency-Key

  async function api(method, path, body, extraHeaders = {}) {
    const headers = { ...authHeaders(), ...extraHeaders };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    if (response.status !== 204) {
      try {
        data = await response.json();
      } catch {
        data = null; // a proxy's HTML error page, say
      }
    }
    if (!response.ok) {
      const error = new Error(data && data.detail ? data.detail : response.statusText);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function setStatus(text, isError = false) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "";
  }

  // --- messages -----------------------------------------------------------------------------

  function messageNode(message) {
    let node = messagesBox.querySelector(`.message[data-id="${CSS.escape(message.id)}"]`);
    if (!node) {
      node = document.createElement("div");
      node.dataset.id = message.id;
      for (const part of ["tools", "content", "meta"]) {
        const child = document.createElement("div");
        child.className = part;
        node.append(child);
      }
      messagesBox.append(node);
    }
    return node;
  }

  function renderMessage(message) {
    if (message.role === "tool") return renderToolMessage(message);
    const node = messageNode(message);
    const calls = message.tool_calls || [];
    node.className = `message ${message.role} ${message.status}`;
    node.classList.toggle("calls-only", calls.length > 0 && !message.content);
    node.dataset.status = message.status;
    // Screen readers wait for the whole reply instead of reading each re-render of it.
    node.setAttribute("aria-busy", String(message.status === "in_progress"));
    const tools = node.querySelector(".tools");
    for (const call of calls) {
      const details = toolCall(tools, call.id, call.function.name);
      toolPart(details, "arguments", "Arguments", pretty(call.function.arguments));
    }
    showText(node.querySelector(".content"), message.content, message.role === "assistant");
    const meta = [];
    if (message.role === "assistant" && !calls.length) {
      if (message.model) meta.push(message.model);
      if (message.status !== "completed") meta.push(message.status.replace("_", " "));
      if (message.error && message.error.detail) meta.push(message.error.detail);
    }
    node.querySelector(".meta").textContent = meta.join(" · ");
    return node;
  }

  function renderToolMessage(message) {
    // Shown inside the disclosure of the call it answers, not as a message of its own.
    let details = messagesBox.querySelector(
      `details.tool[data-call-id="${CSS.escape(message.tool_call_id || "")}"]`);
    if (!details) {
      const node = messageNode(message);
      node.className = `message tool ${message.status}`;
      details = toolCall(node.querySelector(".tools"), message.tool_call_id,
        toolNames.get(message.tool_call_id) || "tool");
    }
    details.dataset.resultId = message.id;
    toolResult(details, message.error ? "error" : "ok", message.content, false);
    return details;
  }

  function updateComposer() {
    const busy = Boolean(state.replyId) || state.sending;
    $("send").disabled = busy || !input.value.trim();
    $("stop").hidden = !state.replyId;
    $("composer").setAttribute("aria-busy", String(busy));
  }

  function setBusy(replyId) {
    state.replyId = replyId;
    updateComposer();
  }

  function follow(message, url) {
    // EventSource reconnects by itself with Last-Event-ID; the service resumes the same reply.
    if (state.source) state.source.close();
    const node = renderMessage(message);
    toBottom();
    const text = liveText(node.querySelector(".content"));
    const tools = node.querySelector(".tools");
    const source = new EventSource(url);
    state.source = source;
    setBusy(message.id);
    const finish = (final) => {
      source.close();
      text.cancel();
      if (state.source === source) state.source = null;
      if (final) {
        const stick = nearBottom();
        renderMessage(final);
        if (stick) toBottom();
      }
      setBusy(null);
      watchTitle(state.conversationId);
    };
    source.addEventListener("start", () => {
      text.reset(); // every character follows as a delta
      tools.replaceChildren();
    });
    source.addEventListener("delta", (event) => {
      text.append(JSON.parse(event.data).content);
    });
    // The model's tool calls and their results, as they happen, above the reply's text.
    source.addEventListener("tool_call", (event) => {
      const call = JSON.parse(event.data);
      const stick = nearBottom();
      toolPart(toolCall(tools, call.id, call.name), "arguments", "Arguments",
        pretty(call.arguments));
      if (stick) toBottom();
    });
    source.addEventListener("tool_result", (event) => {
      const result = JSON.parse(event.data);
      const details = toolCall(tools, result.call_id, result.name);
      toolResult(details, result.status, result.result, result.truncated);
    });
    source.addEventListener("done", (event) => {
      const data = JSON.parse(event.data);
      finish(data.assistant_message);
      setStatus("");
      // The calls are stored as messages of their own: show the turn as it is kept.
      if (data.tool_calls.length) openConversation(state.conversationId).catch(showError);
    });
    source.addEventListener("error", (event) => {
      if (event.data) { // the service's own error event, not a dropped connection
        const problem = JSON.parse(event.data);
        setStatus(problem.detail, true);
        finish(null);
        openConversation(state.conversationId).catch(showError);
      } else if (source.readyState === EventSource.CONNECTING) {
        setStatus("Connection lost, resuming…");
      } else { // the browser gave up (the service refused the stream): show what is stored
        setStatus("The reply stream closed; showing what is stored.", true);
        finish(null);
        openConversation(state.conversationId).catch(showError);
      }
    });
  }

  const showError = (error) => setStatus(error.message, true);

  // --- conversations ------------------------------------------------------------------------

  let listing = 0;

  async function loadConversations() {
    const mine = ++listing;
    let page;
    try {
      page = await api("GET", "/v1/conversations?limit=100");
    } catch (error) {
      setStatus(error.status === 401 ? "Enter an access token to sign in." : error.message, true);
      return null;
    }
    if (mine !== listing) return page.data; // a later listing is on its way: it draws
    state.conversations = new Map(page.data.map((conversation) => [conversation.id, conversation]));
    const list = $("conversations");
    list.replaceChildren();
    for (const conversation of page.data) {
      const item = document.createElement("li");
      item.dataset.id = conversation.id;
      item.classList.toggle("untitled", !conversation.title);
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = conversation.title || "Untitled conversation";
      button.title = button.textContent;
      button.addEventListener("click", () => {
        setDrawer(false);
        openConversation(conversation.id).catch(showError);
      });
      item.append(button);
      list.append(item);
    }
    markActive();
    return page.data;
  }

  function markActive() {
    for (const item of $("conversations").children) {
      const active = item.dataset.id === state.conversationId;
      item.classList.toggle("active", active);
      if (active) item.firstChild.setAttribute("aria-current", "true");
      else item.firstChild.removeAttribute("aria-current");
    }
    const conversation = state.conversations.get(state.conversationId);
    const title = conversation ? conversation.title || "Untitled conversation" : "New chat";
    $("conversation-title").textContent = title;
    document.title = conversation && conversation.title ? `${conversation.title} · chatbot` : "chatbot";
  }

  // The service names a new conversation in the background a moment after its first reply
  // ends: look again, less and less often, until the name is there.
  let titleWatch = 0;
  const TITLE_RETRIES_MS = [0, 500, 1000, 2000, 4000, 8000];
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function watchTitle(conversationId) {
    const mine = ++titleWatch;
    for (const delay of TITLE_RETRIES_MS) {
      if (delay) await sleep(delay);
      if (mine !== titleWatch) return;
      const conversations = await loadConversations();
      const conversation = conversations && conversations.find((c) => c.id === conversationId);
      if (!conversation || conversation.title) return;
    }
  }

  let opening = 0;

  async function openConversation(conversationId) {
    const mine = ++opening;
    if (state.source) { state.source.close(); state.source = null; }
    setBusy(null);
    setStatus("");
    state.conversationId = conversationId;
    history.replaceState(null, "", conversationId ? `#c=${conversationId}` : "#");
    messagesBox.replaceChildren();
    messagesBox.classList.toggle("new", !conversationId);
    toolNames.clear();
    markActive();
    if (!conversationId) return;
    const messages = [];
    let cursor = null;
    do {
      const page = await api("GET", `/v1/conversations/${conversationId}/messages?limit=100` +
        (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
      if (mine !== opening) return; // another conversation was opened meanwhile
      messages.push(...page.data);
      cursor = page.next_cursor;
    } while (cursor);
    for (const message of messages) renderMessage(message);
    toBottom();
    const last = messages[messages.length - 1];
    if (last && last.role === "assistant" && last.status === "in_progress") {
      // A reply still being generated (say, after a reload): follow it from the start,
      // through a fresh short-lived stream URL (never the access token in a URL).
      const { stream_url: url } = await api("POST", `/v1/messages/${last.id}/stream_url`);
      if (mine !== opening) return;
      follow({ ...last, content: "" }, url);
    }
  }

  // --- the drawer (narrow screens) ----------------------------------------------------------

  function setDrawer(open) {
    const wasOpen = document.body.classList.contains("drawer-open");
    document.body.classList.toggle("drawer-open", open);
    $("menu").setAttribute("aria-expanded", String(open));
    $("backdrop").hidden = !open;
    if (open && !wasOpen) $("new-chat").focus();
  }

  // --- wiring -------------------------------------------------------------------------------

  $("composer").addEventListener("submit", async (event) => {
    event.preventDefault();
    const content = input.value.trim();
    if (!content || state.replyId || state.sending) return;
    if (!pendingSend || pendingSend.content !== content) {
      pendingSend = { content, key: newKey() };
    }
    const idempotencyKey = pendingSend.key;
    state.sending = true;
    updateComposer();
    try {
      const turn = state.conversationId
        ? await api("POST", `/v1/conversations/${state.conversationId}/messages`,
          { content, background: true }, { "Idempotency-Key": idempotencyKey })
        : await api("POST", "/v1/chat", { message: content, background: true },
          { "Idempotency-Key": idempotencyKey });
      input.value = "";
      pendingSend = null;
      setStatus("");
      if (turn.conversation_id !== state.conversationId) {
        state.conversationId = turn.conversation_id;
        history.replaceState(null, "", `#c=${turn.conversation_id}`);
        loadConversations();
      }
      renderMessage(turn.user_message);
      follow(turn.assistant_message, turn.stream_url);
    } catch (error) {
      showError(error);
    } finally {
      state.sending = false;
      updateComposer();
    }
  });

  input.addEventListener("input", updateComposer);
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !touch.matches) {
      event.preventDefault();
      if (!$("send").disabled) $("composer").requestSubmit();
    }
  });

  $("stop").addEventListener("click", async () => {
    if (!state.replyId) return;
    try {
      await api("POST", `/v1/messages/${state.replyId}/cancel`);
    } catch (error) {
      showError(error);
    }
  });

  $("new-chat").addEventListener("click", () => {
    setDrawer(false);
    openConversation(null).then(() => input.focus()).catch(showError);
  });
  $("menu").addEventListener("click", () =>
    setDrawer(!document.body.classList.contains("drawer-open")));
  $("backdrop").addEventListener("click", () => setDrawer(false));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && document.body.classList.contains("drawer-open")) {
      setDrawer(false);
      $("menu").focus();
    }
  });
  narrow.addEventListener("change", () => setDrawer(false));

  tokenInput.value = localStorage.getItem("chatbot.token") || "";
  tokenInput.addEventListener("change", () => {
    localStorage.setItem("chatbot.token", tokenInput.value.trim());
    loadConversations();
  });

  updateComposer();
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("c");
  loadConversations();
  if (fromHash) openConversation(fromHash).catch(showError);
})();
