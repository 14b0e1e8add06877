// The playground: streams completions over the websocket (protocol: inference/consumers.py).
"use strict";
(() => {
  const root = document.getElementById("playground");
  const form = document.getElementById("run-form");
  const runButton = document.getElementById("run");
  if (!root || !runButton) return; // viewers get no Run button

  const $ = (id) => document.getElementById(id);
  const stopButton = $("stop");
  const output = $("output");
  const errorBox = $("error");
  const statusBadge = $("status");
  const tierBadge = $("route-tier");
  const degradedBadge = $("degraded");
  const tenant = Number(root.dataset.tenant);
  const PROVENANCE_LABEL = {
    drafted: "accepted draft token",
    verifier: "verifier token",
    edge: "edge token",
    cloud: "cloud text",
  };

  let socket = null;
  let opening = null;
  let runCounter = 0;
  let run = null; // the run in progress: {id, startedAt, firstAt, tokens, drafted, pending: [], frame, user}
  const history = []; // chat mode: the conversation so far, [{role, content}], each answer as the client received it

  // connection ---------------------------------------------------------------------------------
  function connect() {
    if (socket && socket.readyState === WebSocket.OPEN) return Promise.resolve(socket);
    if (opening) return opening;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    opening = new Promise((resolve, reject) => {
      const ws = new WebSocket(`${scheme}://${location.host}${root.dataset.wsPath}`);
      ws.addEventListener("open", () => { socket = ws; opening = null; resolve(ws); }, { once: true });
      ws.addEventListener("message", (event) => onFrame(JSON.parse(event.data)));
      ws.addEventListener("close", (event) => {
        const wasOpening = opening !== null;
        socket = null;
        opening = null;
        if (event.code === 4401) {
          fail("Your session has ended. Sign in again to keep going.", true);
        } else if (run) {
          fail("The connection to the server was lost; the run was stopped and charged only for the tokens it delivered.");
        }
        if (wasOpening) reject(new Error("could not connect"));
      });
    });
    return opening;
  }

  // frames in ---------------------------------------------------------------------------------
  function onFrame(frame) {
    if (frame.type === "ping" || frame.type === "pong") return;
    if (frame.type === "error" && frame.id === null && !run) {
      showError(frame.error.message);
      return;
    }
    if (!run || (frame.id !== run.id && frame.id !== null)) return; // a stopped run's late frames
    switch (frame.type) {
      case "started":
        run.requestId = frame.request_id;
        $("stat-request").textContent = frame.request_id;
        $("stat-request").title = frame.request_id;
        tierBadge.textContent = `tier: ${frame.route.tier}`;
        tierBadge.title = `why: ${frame.route.reason} (routing policy ${frame.route.policy_version})`;
        tierBadge.dataset.tier = frame.route.tier;
        tierBadge.hidden = false;
        $("route-reason").textContent = `${frame.route.reason} · policy ${frame.route.policy_version}`;
        $("route-reason").hidden = false;
        degradedBadge.hidden = !frame.route.degraded;
        break;
      case "delta": // one or more consecutive tokens, each with its provenance
        if (run.firstAt === null) run.firstAt = performance.now();
        frame.tokens.forEach((token, offset) => {
          run.tokens += 1;
          if (token.provenance === "drafted") run.drafted += 1;
          run.pending.push({ ...token, index: frame.index + offset });
        });
        if (!run.frame) run.frame = requestAnimationFrame(flush);
        break;
      case "done":
        finish(frame.usage);
        break;
      case "error":
        finish(frame.usage, frame.error);
        break;
    }
  }

  // Tokens can arrive far faster than the screen refreshes: paint them once per frame.
  function flush() {
    if (!run) return;
    run.frame = 0;
    const fragment = document.createDocumentFragment();
    for (const delta of run.pending) {
      const span = document.createElement("span");
      span.className = `tok tok-${delta.provenance}`;
      span.title = `${PROVENANCE_LABEL[delta.provenance] || delta.provenance} #${delta.index} (id ${delta.token_id})`;
      span.textContent = delta.text;
      fragment.append(span);
    }
    run.pending = [];
    const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 24;
    output.append(fragment);
    if (atBottom) output.scrollTop = output.scrollHeight;
    liveStats();
  }

  function liveStats() {
    const elapsed = (performance.now() - (run.firstAt ?? run.startedAt)) / 1000;
    $("stat-tokens").textContent = String(run.tokens);
    $("stat-tps").textContent = run.tokens > 1 && elapsed > 0 ? (run.tokens / elapsed).toFixed(1) : "–";
    $("stat-share").textContent = run.tokens ? percent(run.drafted / run.tokens) : "–";
  }

  // a run -------------------------------------------------------------------------------------
  async function start(event) {
    event.preventDefault();
    if (run) return;
    if (!form.reportValidity()) return;
    reset();
    const id = `run-${++runCounter}`;
    run = { id, startedAt: performance.now(), firstAt: null, tokens: 0, drafted: 0, pending: [], frame: 0 };
    setStatus("streaming");
    runButton.disabled = true;
    stopButton.disabled = false;
    output.setAttribute("aria-busy", "true");
    const message = {
      type: "start",
      id,
      model: $("model").value,
      max_tokens: Number.parseInt($("max-tokens").value, 10),
      temperature: Number.parseFloat($("temperature").value),
      tenant,
    };
    if ($("mode").value === "chat") {
      run.user = $("prompt").value;
      message.messages = [...history, { role: "user", content: run.user }];
      renderHistory(run.user);
    } else {
      message.prompt = $("prompt").value;
    }
    if ($("tier").value) message.tier = $("tier").value; // empty: the routing policy decides
    try {
      (await connect()).send(JSON.stringify(message));
    } catch {
      fail("Could not reach the server. Check your connection and try again.");
    }
  }

  function stop() {
    if (!run || !socket) return;
    stopButton.disabled = true;
    setStatus("stopping");
    socket.send(JSON.stringify({ type: "cancel", id: run.id }));
  }

  function finish(usage, error) {
    if (run.frame) cancelAnimationFrame(run.frame);
    flush();
    if (run.user !== undefined) {
      if (run.tokens > 0) {
        // the turn joins the conversation with the answer as it was received (a stopped one too)
        history.push({ role: "user", content: run.user }, { role: "assistant", content: output.textContent });
        $("prompt").value = "";
      }
      renderHistory();
    }
    if (usage) {
      $("stat-tokens").textContent = String(usage.completion_tokens);
      $("stat-tps").textContent = usage.tokens_per_s ? usage.tokens_per_s.toFixed(1) : "–";
      // A stream cut off mid-round carries only part of that round's drafts, which can put the
      // ratio a little over 1 for short runs; it is an acceptance rate, so it is shown as at most 100%.
      $("stat-acceptance").textContent =
        Number(usage.drafted_tokens) > 0 ? percent(Math.min(usage.acceptance_rate, 1)) : "–";
      $("stat-ttft").textContent = usage.ttft_ms === null ? "–" : `${usage.ttft_ms.toFixed(1)} ms`;
      showCost(usage);
    }
    if (error) {
      showError(`${error.message}${usage ? " You were charged only for the tokens shown." : " Nothing was charged."}`);
      setStatus("error");
    } else {
      setStatus(usage.outcome === "cancelled" ? "stopped" : "done");
    }
    endRun();
  }

  function fail(message, signIn = false) {
    if (run) {
      if (run.frame) cancelAnimationFrame(run.frame);
      flush();
      if (run.user !== undefined) renderHistory(); // the message was not answered: it leaves the list
      setStatus("error");
      endRun();
    }
    showError(message, signIn);
  }

  function endRun() {
    run = null;
    output.setAttribute("aria-busy", "false");
    runButton.disabled = false;
    stopButton.disabled = true;
    runButton.focus({ preventScroll: true });
  }

  // rendering ---------------------------------------------------------------------------------
  function reset() {
    output.replaceChildren();
    errorBox.hidden = true;
    errorBox.replaceChildren();
    $("cost").hidden = true;
    tierBadge.hidden = true;
    degradedBadge.hidden = true;
    $("route-reason").hidden = true;
    for (const id of ["stat-tokens", "stat-tps", "stat-share", "stat-acceptance", "stat-ttft", "stat-request"]) {
      $(id).textContent = "–";
    }
  }

  // Earlier turns are listed above the output, which holds the answer being streamed (or the last one):
  // while a run streams, every turn so far and the message just sent; after it, all but its answer.
  function renderHistory(pending) {
    const turns = pending === undefined ? history.slice(0, -1) : [...history, { role: "user", content: pending }];
    const list = $("history");
    list.replaceChildren(
      ...turns.map((turn) => {
        const item = document.createElement("li");
        item.className = `turn turn-${turn.role}`;
        const who = document.createElement("strong");
        who.textContent = turn.role === "user" ? "You" : "Assistant";
        item.append(who, document.createTextNode(` ${turn.content}`));
        return item;
      }),
    );
    list.hidden = turns.length === 0;
    $("new-chat").hidden = history.length === 0;
  }

  function newChat() {
    history.length = 0;
    renderHistory();
    if (!run) reset();
    $("prompt").focus();
  }

  function showCost(usage) {
    const cost = usage.cost;
    $("cost-total").textContent = dollars(cost.total);
    $("cost-edge").textContent = dollars(cost.edge);
    $("cost-verifier").textContent = dollars(cost.verifier);
    $("cost-cloud").textContent = dollars(cost.cloud);
    $("cost-note").textContent =
      `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens, ` +
      `${usage.accepted_tokens} of ${Number(usage.drafted_tokens)} drafted tokens accepted, ` +
      `${Number(usage.gpu_ms).toFixed(2)} ms of verifier GPU time · outcome ${usage.outcome}` +
      (usage.finish_reason ? ` (${usage.finish_reason})` : "");
    $("cost").hidden = false;
  }

  function showError(message, signIn = false) {
    errorBox.textContent = message;
    if (signIn) {
      const link = document.createElement("a");
      link.href = `${root.dataset.signinUrl}?next=${encodeURIComponent(location.pathname)}`;
      link.textContent = " Sign in";
      errorBox.append(link);
    }
    errorBox.hidden = false;
  }

  function setStatus(state) {
    statusBadge.dataset.state = state;
    statusBadge.textContent = state;
  }

  // Costs arrive as exact decimal strings, sometimes in exponent form ("2.67E-7", "0E-9"):
  // shown as plain decimals by moving the point in the string, never through a float.
  function dollars(amount) {
    let text = plainDecimal(String(amount));
    if (text.includes(".")) text = text.replace(/0+$/, "").replace(/\.$/, "");
    return `$${text === "-0" ? "0" : text}`;
  }

  function plainDecimal(text) {
    const match = /^(-?)(\d+)(?:\.(\d*))?[eE]([+-]?\d+)$/.exec(text);
    if (!match) return text;
    const [, sign, whole, fraction = "", exponent] = match;
    let digits = whole + fraction;
    let point = whole.length + Number(exponent);
    if (point <= 0) {
      digits = "0".repeat(1 - point) + digits;
      point = 1;
    } else if (point > digits.length) {
      digits += "0".repeat(point - digits.length);
    }
    const integer = digits.slice(0, point).replace(/^0+(?=\d)/, "");
    return sign + integer + (point < digits.length ? `.${digits.slice(point)}` : "");
  }

  function percent(fraction) {
    return `${(fraction * 100).toFixed(1)}%`;
  }

  form.addEventListener("submit", start);
  // example prompts: each lands on another tier under the default routing policy
  document.querySelectorAll(".examples [data-prompt]").forEach((button) => {
    button.addEventListener("click", () => {
      $("prompt").value = button.dataset.prompt;
      $("tier").value = "";
      $("prompt").focus();
    });
  });
  stopButton.addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("mode").addEventListener("change", newChat); // a conversation belongs to one mode
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  connect().catch(() => {}); // open early so the first Run starts at once
})();
