// sdrt's web page: submits a job (POST /v1/jobs), follows its Server-Sent Events for the progress bar,
// shows the image and its parameters; Cancel posts /v1/jobs/{id}/cancel. No external resources.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;  // {id, source}

function setProgress(fraction, text) {
  const percent = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
  $("fill").style.width = percent + "%";
  $("bar").setAttribute("aria-valuenow", String(percent));
  if (text) $("status").textContent = text;
}

function finish(text) {
  if (current && current.source) current.source.close();
  current = null;
  $("generate").disabled = false;
  $("cancel").disabled = true;
  $("status").textContent = text;
}

async function load() {
  try {
    const info = await (await fetch("/v1/info")).json();
    $("model").textContent = info.model + " (" + info.family + ")";
    const sizes = info.sizes;
    for (const id of ["width", "height"]) {
      $(id).min = sizes.min_size; $(id).max = sizes.max_size; $(id).value = sizes.opt_size;
    }
    $("steps").max = info.max_steps;
    const samplers = await (await fetch("/sdapi/v1/samplers")).json();
    for (const s of samplers) {
      const option = document.createElement("option");
      option.value = option.textContent = s.name;
      $("sampler").appendChild(option);
    }
  } catch (err) {
    $("status").textContent = "could not load the server's settings: " + err;
  }
}

async function generate(event) {
  event.preventDefault();
  const seed = parseInt($("seed").value, 10);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    width: parseInt($("width").value, 10), height: parseInt($("height").value, 10),
    steps: parseInt($("steps").value, 10), guidance: parseFloat($("guidance").value),
    seed: Number.isNaN(seed) || seed === -1 ? null : seed, scheduler: $("sampler").value || null,
  };
  $("generate").disabled = true;
  setProgress(0, "submitting");
  const response = await fetch("/v1/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                             body: JSON.stringify(body)});
  const job = await response.json();
  if (response.status !== 202) { finish("error: " + (job.detail || response.status)); return; }
  current = {id: job.id, source: new EventSource(job.events_url)};
  $("cancel").disabled = false;
  const source = current.source;
  source.addEventListener("queued", (e) => setProgress(0, "queued, position " + JSON.parse(e.data).position));
  source.addEventListener("running", () => setProgress(0, "running"));
  source.addEventListener("step", (e) => {
    const d = JSON.parse(e.data);
    setProgress(d.step / d.steps, "step " + d.step + " / " + d.steps);
  });
  source.addEventListener("done", (e) => {
    const d = JSON.parse(e.data);
    $("image").src = d.images[0];
    $("parameters").textContent = d.infotexts[0];
    $("result").hidden = false;
    setProgress(1);
    finish("done (seed " + d.seeds[0] + ")");
  });
  source.addEventListener("error", (e) => {
    if (e.data) { finish("error: " + JSON.parse(e.data).error.detail); }
    else if (source.readyState === EventSource.CLOSED) { finish("connection closed"); }
  });
  source.addEventListener("cancelled", () => { setProgress(0); finish("cancelled"); });
}

async function cancel() {
  if (!current) return;
  $("cancel").disabled = true;
  await fetch("/v1/jobs/" + current.id + "/cancel", {method: "POST"});
}

$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
load();
