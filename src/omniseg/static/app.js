// The omniseg page: pick a model and task, send an image to /v1/segment, draw the overlay.
// The server returns the overlay at full opacity without its legend strip; the page blends it
// over the original itself, so the opacity slider needs no second request.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], file: null, original: null, overlay: null, result: null, seq: 0 };

function setStatus(text) { $("status").textContent = text; }

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function rgb(color) { return `rgb(${color[0]}, ${color[1]}, ${color[2]})`; }

async function loadModels() {
  const response = await fetch("/v1/models");
  const body = await response.json();
  state.models = body.models;
  const select = $("model");
  select.replaceChildren(...body.models.map((m) => new Option(m.name, m.name, m.name === body.default)));
  select.value = body.default;
  fillTasks();
  setStatus(`${body.models.length} model(s) served; choose an image`);
}

function currentModel() { return state.models.find((m) => m.name === $("model").value); }

function fillTasks() {
  const model = currentModel();
  const select = $("task");
  select.replaceChildren(...model.tasks.map((t) => new Option(t, t)));
  select.value = model.default_task;
  select.disabled = model.tasks.length < 2;
}

function decodeDataUrl(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the overlay PNG did not decode"));
    image.src = url;
  });
}

async function segment() {
  if (!state.file) return;
  const seq = ++state.seq; // a newer request makes older answers stale
  showError("");
  setStatus(`segmenting ${state.file.name}…`);
  $("overlay").dataset.state = "busy";
  const params = new URLSearchParams({
    model: $("model").value, task: $("task").value, score_thresh: $("score").value,
    overlay: "true", alpha: "1", legend: "false",
  });
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  const started = performance.now();
  let response, body;
  try {
    response = await fetch(`/v1/segment?${params}`, { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    if (seq !== state.seq) return;
    $("overlay").dataset.state = "error";
    showError(`request failed: ${err.message}`);
    setStatus("error");
    return;
  }
  if (seq !== state.seq) return;
  if (!response.ok) {
    $("overlay").dataset.state = "error";
    const choices = body.choices ? ` (choices: ${body.choices.join(", ")})` : "";
    showError(`${response.status}: ${body.detail}${choices}`);
    setStatus("error");
    return;
  }
  let original = null;
  try { // browsers cannot decode every format the server reads (TIFF): then only the overlay is shown
    original = await createImageBitmap(state.file);
    if (original.width !== body.width || original.height !== body.height) original = null;
  } catch (err) { original = null; }
  const overlay = await decodeDataUrl(`data:image/png;base64,${body.overlay.png_base64}`);
  if (seq !== state.seq) return;
  Object.assign(state, { original, overlay, result: body });
  draw();
  fillLegend(body);
  fillTable(body);
  $("result").hidden = false;
  $("opacity").disabled = !original;
  const ms = Math.round(performance.now() - started);
  setStatus(`${body.model}: ${body.segments.length} segment(s) in ${body.width}×${body.height} px, ${ms} ms`);
  $("overlay").dataset.state = "done";
}

function draw() {
  const { original, overlay, result } = state;
  if (!overlay) return;
  const canvas = $("overlay");
  canvas.width = result.width;
  canvas.height = result.height;
  const ctx = canvas.getContext("2d");
  ctx.globalAlpha = 1;
  if (original) {
    ctx.drawImage(original, 0, 0);
    ctx.globalAlpha = Number($("opacity").value);
  }
  ctx.drawImage(overlay, 0, 0);
  ctx.globalAlpha = 1;
}

function fillLegend(result) {
  const items = result.overlay.legend.map((c) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = rgb(c.color);
    li.append(swatch, c.name);
    return li;
  });
  if (!items.length) items.push(Object.assign(document.createElement("li"), { textContent: "(no segments)" }));
  $("legend").replaceChildren(...items);
}

function fillTable(result) {
  const colors = new Map(result.overlay.legend.map((c) => [c.category_id, c.color]));
  const rows = [...result.segments].sort((a, b) => b.area - a.area).map((s) => {
    const tr = document.createElement("tr");
    const cells = [String(s.id), s.category_name, s.score.toFixed(3), String(s.area)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      if (i === 1 && colors.has(s.category_id)) {
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = rgb(colors.get(s.category_id));
        td.append(swatch);
      }
      td.append(text);
      if (i !== 1) td.className = "num";
      tr.append(td);
    });
    return tr;
  });
  $("segments").tBodies[0].replaceChildren(...rows);
}

function useFile(file) {
  if (!file) return;
  state.file = file;
  segment();
}

$("file").addEventListener("change", (e) => useFile(e.target.files[0]));
$("model").addEventListener("change", () => { fillTasks(); segment(); });
$("task").addEventListener("change", segment);
$("score").addEventListener("change", segment);
$("opacity").addEventListener("input", () => {
  $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
  draw();
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  useFile(e.dataTransfer.files[0]);
});
loadModels().catch((err) => { showError(`cannot list models: ${err.message}`); setStatus("error"); });
