// InstantID's page: plain JavaScript, everything from this server, no external fetch.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "instantid-api-key"; // sessionStorage: this tab only
const COLORS = ["rgb(255,0,0)", "rgb(0,255,0)", "rgb(0,0,255)", "rgb(255,255,0)", "rgb(255,0,255)"];
const state = {
  photos: [], picture: null, mask: null, control: null, reading: Promise.resolve(), job: null, controller: null,
  options: null,
};

class ApiError extends Error {
  constructor(status, body, headers) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.field = error.field || null;
    this.retryAfter = headers ? headers.get("Retry-After") : null;
  }
}

function authHeaders() {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Content-Type": "application/json", ...authHeaders(), ...(options.headers || {}) },
  });
  let body = null;
  try { body = await response.json(); } catch (_) { /* an empty or non-JSON answer */ }
  if (!response.ok) throw new ApiError(response.status, body, response.headers);
  return { body, response };
}

function photoName(field) {
  const match = /face_images\[(\d+)\]/.exec(field || "");
  return match && state.photos[Number(match[1])] ? state.photos[Number(match[1])].name : "a photo";
}

function explain(error) {
  switch (error.code) {
    case "no_face": return `No face was found in ${photoName(error.field)}. Use a photo where one face is clearly visible.`;
    case "invalid_image": return `${photoName(error.field)} is not an image this service can read.`;
    case "image_too_large": return `${photoName(error.field)} is too large. Use a smaller photo.`;
    case "payload_too_large": return "The photos are too large together. Use fewer or smaller photos.";
    case "unauthorized": return $("api-key").value.trim()
      ? "The API key was not accepted. Check it and try again."
      : "This server needs an API key: type it in the Access box above.";
    case "forbidden": return "This API key is not allowed to do that.";
    case "overloaded": return `The service is busy right now. Try again in ${error.retryAfter || "a few"} seconds.`;
    case "timeout": return "The generation took too long and was stopped. Try fewer steps or a smaller size.";
    case "canceled": return "The generation was canceled.";
    case "invalid_parameter": return `Please check a setting: ${error.message}`;
    default: return `Something went wrong: ${error.message}`;
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) { $("status").textContent = text; }

// ---------------------------------------------------------------------------- photos

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function drawFace(canvas, image, face) {
  const width = image.naturalWidth, height = image.naturalHeight;
  canvas.width = width; canvas.height = height;
  const ctx = canvas.getContext("2d");
  const [frameWidth, frameHeight] = face.image_size;
  const sx = width / frameWidth, sy = height / frameHeight;
  const [x1, y1, x2, y2] = face.bbox;
  const line = Math.max(2, Math.round(width / 150));
  ctx.lineWidth = line;
  ctx.strokeStyle = "rgb(0,220,120)";
  ctx.strokeRect(x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy);
  face.kps.forEach(([x, y], i) => {
    ctx.fillStyle = COLORS[i];
    ctx.beginPath();
    ctx.arc(x * sx, y * sy, line * 1.8, 0, 2 * Math.PI);
    ctx.fill();
  });
}

function choosePicture(files, name) {
  // generate() waits for every picture still being read
  const reading = readPicture(files, name);
  state.reading = Promise.all([state.reading, reading]);
  return reading;
}

async function readPicture(files, name) {
  const file = files && files[0];
  state[name] = file ? await readAsDataURL(file) : null;
  if (name === "mask" && state.mask) {  // inpainting repaints the masked area from noise by default
    $("strength").value = "1";
    $("strength-value").textContent = "1";
  }
}

async function addPhotos(files) {
  const list = $("previews");
  list.replaceChildren();
  state.photos = [];
  showError("");
  const max = state.options ? state.options.limits.max_face_images : 4;
  for (const file of Array.from(files).slice(0, max)) {
    const dataUrl = await readAsDataURL(file);
    const item = document.createElement("li");
    const frame = document.createElement("div");
    frame.className = "photo";
    const image = document.createElement("img");
    image.alt = `Face photo ${file.name}`;
    image.src = dataUrl;
    const canvas = document.createElement("canvas");
    canvas.setAttribute("aria-hidden", "true");
    const caption = document.createElement("p");
    caption.className = "caption";
    caption.textContent = `${file.name}: looking for the face…`;
    frame.append(image, canvas);
    item.append(frame, caption);
    list.append(item);
    const photo = { name: file.name, dataUrl, face: null, caption };
    state.photos.push(photo);
    await new Promise((resolve) => (image.complete ? resolve() : image.addEventListener("load", resolve, { once: true })));
    try {
      const { body } = await api("v1/faces/analyze", { method: "POST", body: JSON.stringify({ face_images: [dataUrl] }) });
      photo.face = body.face;
      drawFace(canvas, image, body.face);
      caption.textContent = `${file.name}: face found (score ${body.face.det_score.toFixed(2)})`;
    } catch (error) {
      const message = error instanceof ApiError ? explain({ ...error, field: `face_images[${state.photos.length - 1}]` })
        : String(error);
      caption.textContent = message;
      caption.classList.add("error");
      if (error instanceof ApiError) showError(message);
    }
  }
}

// ---------------------------------------------------------------------------- generation

function requestBody() {
  const body = {
    face_images: state.photos.map((p) => p.dataUrl),
    prompt: $("prompt").value,
    num_inference_steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    ip_adapter_scale: Number($("ip-scale").value),
    controlnet_conditioning_scale: Number($("cn-scale").value),
  };
  const negative = $("negative-prompt").value.trim();
  if (negative) body.negative_prompt = negative;
  if ($("prompt-weighting").checked) body.prompt_weighting = true;
  if ($("style").value) body.style = $("style").value;
  if (state.picture) {
    body.image = state.picture;
    body.strength = Number($("strength").value);
    if (state.mask) body.mask_image = state.mask;
  }
  if ($("control-type").value && state.control) {
    body.controlnets = [{
      type: $("control-type").value,
      image: state.control,
      scale: Number($("control-scale").value),
      preprocessed: $("control-preprocessed").checked,
    }];
  }
  const size = $("size").value;
  if (size) { const [w, h] = size.split("x").map(Number); body.width = w; body.height = h; }
  if ($("random-seed").checked) $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
  body.seed = Number($("seed").value);
  return body;
}

function parseEvents(buffer, onEvent) {
  let index;
  while ((index = buffer.indexOf("\n\n")) >= 0) {
    const chunk = buffer.slice(0, index);
    buffer = buffer.slice(index + 2);
    let name = "message", data = "";
    for (const line of chunk.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (data) onEvent(name, JSON.parse(data));
  }
  return buffer;
}

async function follow(jobId, onEvent) {
  // EventSource cannot send an Authorization header: read the event stream with fetch.
  state.controller = new AbortController();
  const response = await fetch(`v1/generations/${jobId}/events`, { headers: authHeaders(), signal: state.controller.signal });
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* ignore */ }
    throw new ApiError(response.status, body, response.headers);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), onEvent);
  }
}

function showProgress(job) {
  const bar = $("progress");
  bar.hidden = false;
  const stage = job.stage || job.status;
  if (job.progress && job.progress.total) {
    bar.max = job.progress.total;
    bar.value = job.progress.step;
    setStatus(`Rendering: step ${job.progress.step} of ${job.progress.total}`);
  } else {
    setStatus({ queued: "Queued…", face: "Analysing the face…", rendering: "Rendering…", storing: "Saving the images…" }[stage] || `${stage}…`);
  }
}

function showResults(job) {
  const list = $("results");
  for (const image of job.images) {
    const item = document.createElement("li");
    if (!image.url) {  // the output safety check blocked it: nothing was stored
      const note = document.createElement("p");
      note.className = "caption";
      note.textContent = `Seed ${image.seed}: blocked by the output safety check.`;
      item.append(note);
      list.prepend(item);
      continue;
    }
    const picture = document.createElement("img");
    picture.src = image.url;
    picture.alt = `Generated image, seed ${image.seed}`;
    picture.width = image.width; picture.height = image.height;
    const link = document.createElement("a");
    link.href = image.url;
    link.download = `instantid-${job.id}-${image.seed}.png`;
    link.textContent = `Download (seed ${image.seed})`;
    const caption = document.createElement("p");
    caption.className = "caption";
    caption.append(link);
    item.append(picture, caption);
    list.prepend(item);
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  if (!state.photos.length) { showError("Choose at least one face photo first."); return; }
  const button = $("generate");
  button.disabled = true;
  $("cancel").hidden = false;
  $("progress").value = 0;
  setStatus("Sending…");
  try {
    await state.reading;
    const { body: job } = await api("v1/generations", {
      method: "POST", headers: { Prefer: "respond-async" }, body: JSON.stringify(requestBody()),
    });
    state.job = job.id;
    showProgress(job);
    let final = null;
    await follow(job.id, (name, view) => {
      showProgress(view);
      if (name === "done") final = view;
    });
    if (!final) throw new Error("the event stream ended early");
    if (final.status === "succeeded") {
      $("progress").value = $("progress").max;
      setStatus(`Done: ${final.images.length} image(s).`);
      showResults(final);
    } else {
      setStatus("");
      showError(explain(final.error || { code: final.status, message: final.status }));
    }
  } catch (error) {
    setStatus("");
    if (error.name !== "AbortError") showError(error instanceof ApiError ? explain(error) : `Something went wrong: ${error}`);
  } finally {
    button.disabled = false;
    $("cancel").hidden = true;
    state.job = null;
  }
}

async function cancel() {
  if (!state.job) return;
  try {
    await api(`v1/generations/${state.job}/cancel`, { method: "POST" });
    setStatus("Canceling…");
  } catch (error) {
    if (error instanceof ApiError) showError(explain(error));
  }
}

// ---------------------------------------------------------------------------- start

async function start() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  for (const id of ["steps", "guidance", "ip-scale", "cn-scale", "strength", "control-scale"]) {
    const input = $(id), output = $(`${id}-value`);
    input.addEventListener("input", () => { output.textContent = input.value; });
  }
  $("photos").addEventListener("change", (event) => addPhotos(event.target.files));
  $("image").addEventListener("change", (event) => choosePicture(event.target.files, "picture"));
  $("mask-image").addEventListener("change", (event) => choosePicture(event.target.files, "mask"));
  $("control-image").addEventListener("change", (event) => choosePicture(event.target.files, "control"));
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  try {
    const response = await fetch("v1/options");
    state.options = await response.json();
    const select = $("style");
    for (const name of state.options.styles) {
      const option = document.createElement("option");
      option.value = name === "(No style)" ? "" : name;
      option.textContent = name;
      select.append(option);
    }
    for (const name of state.options.controlnets || []) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      $("control-type").append(option);
    }
    $("steps").max = String(state.options.limits.max_steps);
    if (!state.options.auth_required) $("api-key").placeholder = "this server runs without API keys";
  } catch (error) {
    showError(`The service did not answer: ${error}`);
  }
}

document.addEventListener("DOMContentLoaded", start);
