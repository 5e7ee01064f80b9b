// The capability service's web page: load a capability with a bearer token, then generate with progress.
//
// One ES module, no framework, no build step. Everything the service says is shown with textContent, never
// parsed as HTML; the token travels only in the Authorization header and is kept (in sessionStorage) only when
// the user asks for it.

const GENERATE = "diffusers.generate";
const SMALL_IMAGE = 256; // narrower images are shown enlarged, their pixels sharp
const CANCEL_GRACE_MS = 5000; // how long a cancelled generation may take to end its stream before it is closed
const STORAGE = { token: "capability-service.token", capability: "capability-service.capability" };
// The option an invalid_option error names, and the field that holds it.
const OPTION_FIELDS = {
  prompt: "prompt", width: "width", height: "height", numInferenceSteps: "steps", guidanceScale: "guidance",
  negativePrompt: "negative", seed: "seed", modelId: "model",
};
const LIMITS = [
  ["max_width", "Max width"], ["max_height", "Max height"], ["max_steps", "Max steps"],
  ["max_concurrent", "Max concurrent"],
];

const $ = (id) => {
  const element = document.getElementById(id);
  if (!element) throw new Error(`the page has no #${id}`);
  return element;
};

const ui = {
  accessForm: $("access-form"), token: $("token"), remember: $("remember"), capability: $("capability"),
  load: $("load"), accessMessage: $("access-message"), identity: $("identity"),
  listBox: $("capability-list-box"), list: $("capability-list"),
  limitsBox: $("limits-box"), limitsId: $("limits-id"), limits: $("limits"),
  generateForm: $("generate-form"), prompt: $("prompt"), width: $("width"), height: $("height"),
  steps: $("steps"), guidance: $("guidance"), seed: $("seed"), negative: $("negative"),
  modelLabel: $("model-label"), modelSelect: $("model-select"), modelText: $("model-text"),
  widthHint: $("width-hint"), heightHint: $("height-hint"), stepsHint: $("steps-hint"), modelHint: $("model-hint"),
  generate: $("generate"), cancel: $("cancel"),
  progress: $("progress"), progressText: $("progress-text"), message: $("message"),
  result: $("result"), image: $("image"), resultSeed: $("result-seed"), resultModel: $("result-model"),
  resultSize: $("result-size"), reuseSeed: $("reuse-seed"), download: $("download"),
};

/** An error answer of the service: {status, code, message} (and option for invalid_option). */
class ServiceError extends Error {
  constructor(status, code, message, { retryAfter = null, option = null } = {}) {
    super(message);
    this.name = "ServiceError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.option = option;
  }
}

/** Something the page itself refuses to send (a field the browser could not read as a number). */
class InputError extends Error {
  constructor(field, message) {
    super(message);
    this.name = "InputError";
    this.field = field;
  }
}

const state = {
  capability: null, // the capability shown in the limits, as the service described it
  running: null, // {controller, generation, cancelled} while a generation runs
  lastSeed: null, // the last image's seed, as the digits the service sent
  downloadUrl: null,
};

// --- talking to the service -------------------------------------------------------------------------------

function call(method, path, { body = null, signal = undefined, accept = "application/json" } = {}) {
  const headers = { Accept: accept, Authorization: `Bearer ${ui.token.value.trim()}` };
  if (body !== null) headers["Content-Type"] = "application/json";
  return fetch(path, { method, headers, body, signal, cache: "no-store", credentials: "omit",
                       referrerPolicy: "no-referrer" });
}

async function errorOf(response) {
  const retryAfter = response.headers.get("Retry-After");
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say
  }
  if (body && typeof body.code === "string" && typeof body.message === "string") {
    return new ServiceError(response.status, body.code, body.message,
                            { retryAfter, option: typeof body.option === "string" ? body.option : null });
  }
  const reason = response.statusText ? ` ${response.statusText}` : "";
  return new ServiceError(response.status, `http_${response.status}`,
                          `HTTP ${response.status}${reason}, and the answer is not the service's JSON error`,
                          { retryAfter });
}

async function getJson(path) {
  const response = await call("GET", path);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function capabilityPath(id) {
  return `/v1/capabilities/${encodeURIComponent(id)}`;
}

/**
 * The server-sent events of a response body: {name, data} with data as the raw text. Lines end with CRLF, LF
 * or CR; lines starting with ":" are comments (keep-alives); an event ends at a blank line.
 */
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return; // an event not ended by a blank line is dropped, as EventSource does
      buffer += value;
      for (;;) {
        const end = /\r\n|\r|\n/.exec(buffer);
        if (!end || (end[0] === "\r" && end.index === buffer.length - 1)) break; // a CR may precede an LF
        const line = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        if (line === "") {
          if (data.length) yield { name: name || "message", data: data.join("\n") };
          name = "";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") name = text;
          else if (field === "data") data.push(text);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// --- messages -----------------------------------------------------------------------------------------------

function describe(error) {
  if (error instanceof ServiceError) {
    let label = "Refused";
    if (error.status === 401) label = "Not authenticated";
    else if (error.status === 404) label = "Not found";
    else if (error.code === "cancelled") label = "Cancelled";
    else if (error.status === 429 || error.status === 503) label = "Busy";
    else if (error.status >= 500) label = "Service error";
    const retry = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : "";
    return `${label} (${error.code}): ${error.message}${retry}`;
  }
  if (error instanceof InputError) return error.message;
  if (error instanceof TypeError) return `Could not reach the service: ${error.message}`;
  return `Something went wrong on this page: ${error?.message ?? error}`;
}

function show(box, text) {
  box.textContent = text;
  box.hidden = !text;
}

function markInvalid(field) {
  for (const element of ui.generateForm.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
  if (field) field.setAttribute("aria-invalid", "true");
}

// --- the token and the capability -------------------------------------------------------------------------

function remember() {
  if (ui.remember.checked) {
    sessionStorage.setItem(STORAGE.token, ui.token.value.trim());
    sessionStorage.setItem(STORAGE.capability, ui.capability.value.trim());
  } else {
    sessionStorage.removeItem(STORAGE.token);
    sessionStorage.removeItem(STORAGE.capability);
  }
}

function restore() {
  const token = sessionStorage.getItem(STORAGE.token);
  if (token) {
    ui.token.value = token;
    ui.capability.value = sessionStorage.getItem(STORAGE.capability) ?? "";
    ui.remember.checked = true;
  }
}

function needToken(box) {
  if (ui.token.value.trim()) return true;
  show(box, "Paste a token first (python -m capability token issue prints one).");
  ui.token.focus();
  return false;
}

async function load() {
  show(ui.accessMessage, "");
  if (!needToken(ui.accessMessage)) return;
  remember();
  ui.load.disabled = true;
  ui.accessForm.setAttribute("aria-busy", "true");
  try {
    const me = await getJson("/v1/me");
    ui.identity.textContent = `Signed in as ${me.entity}.`;
    const id = ui.capability.value.trim();
    const held = (await getJson("/v1/capabilities")).capabilities.filter((c) => c.type === GENERATE).reverse();
    renderList(held, id);
    if (id) showCapability(await getJson(capabilityPath(id)));
    else if (held.length === 1) pick(held[0]);
    else hideCapability();
  } catch (error) {
    show(ui.accessMessage, describe(error));
  } finally {
    ui.load.disabled = false;
    ui.accessForm.removeAttribute("aria-busy");
  }
}

function isExpired(capability) {
  return capability.expires_at !== null && capability.expires_at * 1000 <= Date.now();
}

function summary(capability) {
  const params = capability.params ?? {};
  const parts = [params.default_model ?? "?"];
  if (params.max_width || params.max_height) {
    parts.push(`up to ${params.max_width ?? "any"} × ${params.max_height ?? "any"}`);
  }
  if (capability.revoked) parts.push("revoked");
  else if (isExpired(capability)) parts.push("expired");
  return parts.join(" · ");
}

function renderList(held, selectedId) {
  ui.list.replaceChildren();
  if (!held.length) {
    const empty = document.createElement("li");
    empty.textContent = "This token holds no diffusers.generate capability.";
    ui.list.append(empty);
  }
  for (const capability of held) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.capability = capability.id;
    const id = document.createElement("code");
    id.textContent = capability.id;
    const details = document.createElement("span");
    details.className = "hint";
    details.textContent = summary(capability);
    button.append(id, details);
    if (capability.id === selectedId) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => {
      ui.capability.value = capability.id;
      remember();
      pick(capability);
    });
    item.append(button);
    ui.list.append(item);
  }
  ui.listBox.hidden = false;
}

function pick(capability) {
  for (const button of ui.list.querySelectorAll("button")) {
    if (button.dataset.capability === capability.id) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
  ui.capability.value = capability.id;
  showCapability(capability);
}

function relativeTime(seconds) {
  const future = seconds >= 0;
  const size = Math.abs(seconds);
  const [amount, unit] = size < 90 ? [size, "s"] : size < 5400 ? [size / 60, "min"]
    : size < 172800 ? [size / 3600, "h"] : [size / 86400, "days"];
  const rounded = Math.round(amount);
  return future ? `in ${rounded} ${unit}` : `${rounded} ${unit} ago`;
}

function addFact(list, term, value, { code = false, wide = false } = {}) {
  const row = document.createElement("div");
  if (wide) row.className = "wide";
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  if (code) {
    const inner = document.createElement("code");
    inner.textContent = value;
    dd.append(inner);
  } else {
    dd.textContent = value;
  }
  row.append(dt, dd);
  list.append(row);
}

function showCapability(capability) {
  state.capability = capability;
  const params = capability.params ?? {};
  ui.limitsId.textContent = capability.id;
  ui.limits.replaceChildren();
  addFact(ui.limits, "Owner", capability.owner);
  const status = capability.revoked ? "revoked" : isExpired(capability) ? "expired" : "active";
  addFact(ui.limits, "Status", status);
  if (capability.type !== GENERATE) {
    addFact(ui.limits, "Type", `${capability.type}: it cannot generate images`);
  }
  addFact(ui.limits, "Default model", params.default_model ?? "none", { code: true });
  addFact(ui.limits, "Allowed models",
          Array.isArray(params.allowed_models) ? params.allowed_models.join(", ") : "any the server serves");
  for (const [name, label] of LIMITS) {
    addFact(ui.limits, label, params[name] === undefined || params[name] === null ? "no limit" : String(params[name]));
  }
  if (capability.expires_at === null || capability.expires_at === undefined) {
    addFact(ui.limits, "Expires", "never");
  } else {
    const when = new Date(capability.expires_at * 1000);
    addFact(ui.limits, "Expires",
            `${when.toLocaleString()} (${relativeTime(capability.expires_at - Date.now() / 1000)})`);
  }
  if (capability.parent_id) addFact(ui.limits, "Delegated from", capability.parent_id, { code: true, wide: true });
  ui.limitsBox.hidden = false;
  fitOptions(params);
}

function hideCapability() {
  state.capability = null;
  ui.limitsBox.hidden = true;
  fitOptions({});
}

/** The option fields under a capability's limits: hints, a model list, and sizes a limited capability requires. */
function fitOptions(params) {
  const limitHint = (hint, base, limit, name) => {
    hint.textContent = limit ? `${base}, ≤ ${limit} (${name})` : base;
  };
  limitHint(ui.widthHint, "a multiple of 8", params.max_width, "max_width");
  limitHint(ui.heightHint, "a multiple of 8", params.max_height, "max_height");
  ui.stepsHint.textContent = params.max_steps ? `1 to ${params.max_steps} (max_steps)` : "denoising steps";
  // A limited size or step count must be given: the model's default could exceed the limit.
  const fill = (input, limit, preferred, multiple) => {
    if (limit && !input.value.trim()) {
      input.value = String(Math.max(multiple, Math.floor(Math.min(limit, preferred) / multiple) * multiple));
    }
  };
  fill(ui.width, params.max_width, 512, 8);
  fill(ui.height, params.max_height, 512, 8);
  fill(ui.steps, params.max_steps, 30, 1);

  const models = Array.isArray(params.allowed_models) ? params.allowed_models : null;
  ui.modelSelect.replaceChildren();
  if (models) {
    for (const model of models) {
      const option = document.createElement("option");
      option.value = model;
      option.textContent = model === params.default_model ? `${model} (default)` : model;
      option.selected = model === params.default_model;
      ui.modelSelect.append(option);
    }
  }
  ui.modelSelect.hidden = !models;
  ui.modelText.hidden = Boolean(models);
  ui.modelLabel.htmlFor = models ? "model-select" : "model-text";
  ui.modelText.placeholder = params.default_model ?? "";
  ui.modelHint.textContent = models ? "the models the capability allows" : "empty: the capability's default model";
}

// --- generating ---------------------------------------------------------------------------------------------

function numberField(input, label) {
  if (input.validity.badInput) throw new InputError(input, `${label} is not a number.`);
  const text = input.value.trim();
  if (text === "") return undefined;
  const value = Number(text);
  if (!Number.isFinite(value)) throw new InputError(input, `${label} is not a finite number.`);
  return JSON.stringify(value);
}

/** The request's JSON text. Built by hand so that a seed beyond 2^53 reaches the service digit for digit. */
function requestJson() {
  const options = [];
  const add = (name, json) => {
    if (json !== undefined) options.push(`${JSON.stringify(name)}:${json}`);
  };
  add("width", numberField(ui.width, "Width"));
  add("height", numberField(ui.height, "Height"));
  add("numInferenceSteps", numberField(ui.steps, "Steps"));
  add("guidanceScale", numberField(ui.guidance, "Guidance"));
  if (ui.negative.value.trim()) add("negativePrompt", JSON.stringify(ui.negative.value));
  const seed = ui.seed.value.trim();
  if (seed) add("seed", /^-?\d+$/.test(seed) ? seed.replace(/^(-?)0+(?=\d)/, "$1") : JSON.stringify(seed));
  const model = (ui.modelSelect.hidden ? ui.modelText.value : ui.modelSelect.value).trim();
  if (model && model !== state.capability?.params?.default_model) add("modelId", JSON.stringify(model));
  return `{"prompt":${JSON.stringify(ui.prompt.value)},"options":{${options.join(",")}}}`;
}

function setRunning(running) {
  ui.generate.disabled = running;
  ui.cancel.disabled = !running;
  ui.generateForm.setAttribute("aria-busy", String(running));
}

function setProgress(text, stepsDone = null, steps = null) {
  if (steps === null) {
    ui.progress.removeAttribute("value"); // indeterminate: waiting for the first step
  } else {
    ui.progress.max = steps;
    ui.progress.value = stepsDone;
  }
  ui.progressText.textContent = text;
}

function stopProgress(text) {
  if (!ui.progress.hasAttribute("value")) ui.progress.value = 0;
  ui.progressText.textContent = text;
}

function clearResult() {
  ui.result.hidden = true;
  ui.image.removeAttribute("src");
  delete ui.result.dataset.generation;
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state.downloadUrl = null;
  ui.download.removeAttribute("href");
}

async function generate() {
  if (state.running) return;
  show(ui.message, "");
  markInvalid(null);
  if (!needToken(ui.message)) return;
  const id = ui.capability.value.trim();
  if (!id) {
    show(ui.message, "Enter a capability id, or Load to list the capabilities of your token.");
    ui.capability.focus();
    return;
  }
  let json;
  try {
    json = requestJson();
  } catch (error) {
    markInvalid(error.field);
    show(ui.message, describe(error));
    return;
  }
  remember();
  const prompt = ui.prompt.value;
  const running = { controller: new AbortController(), generation: null, cancelled: false, abortTimer: undefined };
  state.running = running;
  setRunning(true);
  clearResult();
  setProgress("Sending the request…");
  ui.progress.scrollIntoView({ block: "nearest" }); // on a narrow screen the image is below the form
  let finished = false;
  let elapsed = null;
  try {
    const response = await call("POST", `${capabilityPath(id)}/text-to-image/stream`,
                                { body: json, signal: running.controller.signal, accept: "text/event-stream" });
    if (!response.ok) throw await errorOf(response);
    if (!(response.headers.get("Content-Type") ?? "").startsWith("text/event-stream")) {
      throw new ServiceError(response.status, "unexpected_answer", "the service did not answer with an event stream");
    }
    for await (const event of serverSentEvents(response.body)) {
      const data = JSON.parse(event.data);
      if (event.name === "started") {
        running.generation = data.generation;
        setProgress("Started: waiting for the first step…");
      } else if (event.name === "progress") {
        elapsed = data.elapsedS;
        const step = `step ${data.stepsDone} of ${data.steps}`;
        setProgress(running.cancelled ? `Cancelling… (${step})` : `S${step.slice(1)} (${data.elapsedS.toFixed(1)} s)`,
                    data.stepsDone, data.steps);
      } else if (event.name === "result") {
        showResult(data, event.data, prompt, running.generation);
        finished = true;
        stopProgress(elapsed === null ? "Done." : `Done in ${elapsed.toFixed(1)} s.`);
      } else if (event.name === "error") {
        throw new ServiceError(data.status, data.code, data.message,
                               { option: typeof data.option === "string" ? data.option : null,
                                 retryAfter: typeof data.retryAfterS === "number" ? data.retryAfterS : null });
      }
    }
    if (!finished && !running.cancelled) {
      throw new Error("the service closed the stream before the image was ready");
    }
  } catch (error) {
    if (running.cancelled) {
      const confirmed = error instanceof ServiceError && error.code === "cancelled";
      stopProgress(confirmed ? `Cancelled: ${error.message}` : "Cancelled.");
    } else {
      stopProgress("Failed.");
      show(ui.message, describe(error));
      if (error instanceof ServiceError && error.code === "invalid_option" && error.option in OPTION_FIELDS) {
        const name = OPTION_FIELDS[error.option];
        markInvalid(name === "model" ? (ui.modelSelect.hidden ? ui.modelText : ui.modelSelect) : ui[name]);
      }
    }
  } finally {
    clearTimeout(running.abortTimer);
    if (running.cancelled && !finished && !ui.progressText.textContent.startsWith("Cancelled")) {
      stopProgress("Cancelled.");
    }
    state.running = null;
    setRunning(false);
  }
}

async function cancel() {
  const running = state.running;
  if (!running || running.cancelled) return;
  running.cancelled = true;
  ui.cancel.disabled = true;
  ui.progressText.textContent = "Cancelling…";
  if (running.generation) {
    try {
      // Stops the work on the server after its current step; the stream then ends with its "cancelled" error,
      // which says at which step. Should that not come soon, the abort below closes the stream, which cancels too.
      const response = await call("DELETE", `/v1/generations/${encodeURIComponent(running.generation)}`);
      if (response.status === 202) {
        running.abortTimer = setTimeout(() => running.controller.abort(), CANCEL_GRACE_MS);
        return;
      }
    } catch {
      // unreachable service: closing the stream is all there is left to do
    }
  }
  running.controller.abort();
}

function base64Bytes(base64) {
  const binary = atob(base64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function showResult(data, raw, prompt, generation) {
  // The seed as the digits sent: a number beyond 2^53 would lose its last digits in a JavaScript number.
  const seed = /"seed":\s*(\d+)/.exec(raw)?.[1] ?? String(data.seed);
  const format = /^[a-z]+$/.test(data.format ?? "") ? data.format : "png";
  state.lastSeed = seed;
  ui.image.src = `data:image/${format};base64,${data.image}`;
  ui.image.width = data.width;
  ui.image.height = data.height;
  ui.image.alt = `Generated image for the prompt: ${prompt}`;
  ui.image.classList.toggle("small", data.width < SMALL_IMAGE && data.height < SMALL_IMAGE);
  ui.resultSeed.textContent = seed;
  ui.resultModel.textContent = data.model;
  ui.resultSize.textContent = `${data.width} × ${data.height}`;
  state.downloadUrl = URL.createObjectURL(new Blob([base64Bytes(data.image)], { type: `image/${format}` }));
  ui.download.href = state.downloadUrl;
  ui.download.download = `${String(data.model).replace(/[^A-Za-z0-9._-]+/g, "_")}-${seed}.${format}`;
  if (generation) ui.result.dataset.generation = generation;
  ui.result.hidden = false;
}

// --- wiring -------------------------------------------------------------------------------------------------

ui.accessForm.addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
ui.generateForm.addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});
ui.cancel.addEventListener("click", cancel);
ui.remember.addEventListener("change", remember);
ui.capability.addEventListener("input", () => {
  if (state.capability && ui.capability.value.trim() !== state.capability.id) hideCapability();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    ui.generateForm.requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.running) cancel();
});
ui.generateForm.addEventListener("input", (event) => {
  if (event.target instanceof Element) event.target.removeAttribute("aria-invalid");
});
ui.reuseSeed.addEventListener("click", () => {
  if (state.lastSeed === null) return;
  ui.seed.value = state.lastSeed;
  ui.seed.removeAttribute("aria-invalid");
  ui.seed.focus();
});

restore();
document.documentElement.dataset.ready = "true";
