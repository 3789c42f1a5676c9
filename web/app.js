// NanoDiT in the browser: a class-conditional pixel model exported by `export.py`, sampled on ONNX
// Runtime Web with sample.py's Euler loop: the same time grid (time_grid, with shift), the guidance inside the
// exported graph, and torch's float32 roundings, so given the same noise the grid matches sample.py's.
"use strict";
const FORMAT = "nanodit-onnx/1";   // sample.py's ONNX_FORMAT
const ZOOM = 3;                    // screen pixels per image pixel
const PAD = 2;                     // pixels between grid cells, as sample.save_grid
const $ = (id) => document.getElementById(id);
const f32 = Math.fround;
const params = new URLSearchParams(location.search);
let info, session;

function show(state, status, message = "") {
  document.body.dataset.state = state;           // loading | ready | running | done | error (tests wait on it)
  $("status").textContent = status;
  $("message").textContent = message;
  $("message").hidden = !message;
}

// sample.time_grid in float32: torch.linspace(1, 0, steps + 1) (two halves, each a fused multiply-add: one
// rounding), then model.shift_time, one float32 rounding per torch op.
function timeGrid(steps, shift) {
  const n = steps + 1, step = f32(-1 / steps), half = Math.floor(n / 2), ts = new Float32Array(n);
  for (let i = 0; i < n; i++) ts[i] = i < half ? f32(1 + step * i) : f32(-(step * (n - 1 - i)));
  if (shift !== 1) {
    for (let i = 0; i < n; i++) ts[i] = f32(f32(f32(shift) * ts[i]) / f32(1 + f32(f32(shift - 1) * ts[i])));
  }
  return ts;
}

// The page's own N(0, 1) noise: Box-Muller on mulberry32 (not torch.randn: pass ?noise= to match Python exactly).
function gaussian(count, seed) {
  let a = seed >>> 0;
  const rand = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - rand())), th = 2 * Math.PI * rand();
    out[i] = r * Math.cos(th);
    if (i + 1 < count) out[i + 1] = r * Math.sin(th);
  }
  return out;
}

const roundEven = (v) => { const r = Math.round(v); return r - v === 0.5 && r % 2 ? r - 1 : r; };   // torch.round

// prepare_data.decode (pixels in [-1, 1]) + sample.save_grid: one row of `per` images per class on white
function draw(x, n, per, [C, H, W]) {
  const rows = Math.ceil(n / per), GW = per * (W + PAD) + PAD, GH = rows * (H + PAD) + PAD;
  const canvas = $("grid"), img = new ImageData(GW, GH);
  img.data.fill(255);
  for (let k = 0; k < n; k++) {
    const top = PAD + Math.floor(k / per) * (H + PAD), left = PAD + (k % per) * (W + PAD);
    for (let ch = 0; ch < 3; ch++) {
      for (let i = 0; i < H * W; i++) {
        const v = Math.min(Math.max(f32(f32(x[(k * C + (C === 1 ? 0 : ch)) * H * W + i] + 1) / 2), 0), 1);
        img.data[((top + Math.floor(i / W)) * GW + left + (i % W)) * 4 + ch] = roundEven(f32(v * 255));
      }
    }
  }
  canvas.width = GW;
  canvas.height = GH;
  canvas.style.width = `${GW * ZOOM}px`;
  canvas.getContext("2d").putImageData(img, 0, 0);
}

// What this page can sample, or why not: a class-conditional model in pixel space, 1 or 3 channels.
function understand(json) {
  if (json.format !== FORMAT) return `it is not a NanoDiT ONNX export (format ${JSON.stringify(json.format)}, expected "${FORMAT}")`;
  if (json.space !== "pixels") return `it generates ${json.space}, which need the VAE decoder (${json.vae && json.vae.name}); this page draws pixel-space models only`;
  if (!json.num_classes || !json.inputs.y) return "it is not class-conditional; this page picks a class (text and image conditions need their encoders)";
  if (json.inputs.text || json.inputs.image_emb) return "it also takes text or image conditions, which this page cannot encode";
  if (![1, 3].includes(json.inputs.xt[1])) return `its images have ${json.inputs.xt[1]} channels; this page draws 1 or 3`;
  return "";
}

async function load() {
  const url = new URL(params.get("model") || "model.json", location.href);
  show("loading", `Loading ${url.pathname}...`);
  if (typeof ort === "undefined") {
    throw new Error("onnxruntime-web did not load from ./node_modules: run `npm install --prefix web`, or use the CDN line at the top of index.html");
  }
  ort.env.wasm.numThreads = 1;                   // a plain http.server gives no cross-origin isolation
  const res = await fetch(url);
  if (!res.ok) throw new Error(`cannot load ${url.pathname}: HTTP ${res.status}`);
  let json;
  try { json = await res.json(); } catch (e) { throw new Error(`${url.pathname} is not JSON: ${e.message}`); }
  const why = understand(json);
  if (why) throw new Error(`This page does not understand ${url.pathname}: ${why}.`);
  info = json;
  session = await ort.InferenceSession.create(new URL(info.onnx, url).href, { executionProviders: ["wasm"] });
  const names = info.class_names.length ? info.class_names : [...Array(info.num_classes).keys()];
  $("class").innerHTML = `<option value="all">all (one row each)</option>` + names.map((c, i) => `<option value="${i}">${i}: ${c}</option>`).join("");
  $("class").value = params.get("class") || "all";
  $("per_class").value = params.get("per_class") || $("per_class").value;
  $("steps").value = params.get("steps") || info.sampler.steps;
  $("scale").value = params.get("scale") || info.sampler.text_scale;
  $("seed").value = params.get("seed") || 0;
  $("go").disabled = false;
  show("ready", `Model of step ${info.step}: ${info.height}x${info.width}, ${info.num_classes} classes; Euler, shift ${info.sampler.shift}, guidance for t in [${info.sampler.guidance_interval}], noise temperature ${info.sampler.temperature ?? 1}.`);
}

async function generate(noise) {
  const shape = info.inputs.xt.slice(1), size = shape[0] * shape[1] * shape[2];
  const labels = $("class").value === "all" ? [...Array(info.num_classes).keys()] : [Number($("class").value)];
  const per = Number($("per_class").value), steps = Number($("steps").value), seed = Number($("seed").value);
  const n = labels.length * per;
  const x0 = noise || gaussian(n * size, seed);
  if (x0.length !== n * size) throw new Error(`the noise has ${x0.length} values; ${n} images of ${shape.join("x")} need ${n * size}`);
  const fixed = {
    scales: new ort.Tensor("float32", Float32Array.of(Number($("scale").value), info.sampler.image_scale), [2]),
    interval: new ort.Tensor("float64", Float64Array.from(info.sampler.guidance_interval), [2]),
    y: new ort.Tensor("int64", BigInt64Array.from(labels.flatMap((c) => Array(per).fill(BigInt(c)))), [n]),
  };
  const ts = timeGrid(steps, info.sampler.shift);
  // sample_ode starts from temperature x noise, one float32 product (exact in a double, then rounded)
  const temperature = Math.fround(info.sampler.temperature ?? 1);
  let x = Float32Array.from(x0, (v) => (temperature === 1 ? v : Math.fround(v * temperature)));
  show("running", `Generating ${n} images...`);
  $("go").disabled = true;
  try {
    for (let i = 0; i < steps; i++) {
      const t = new ort.Tensor("float32", new Float32Array(n).fill(ts[i]), [n]);
      const v = (await session.run({ xt: new ort.Tensor("float32", x, [n, ...shape]), t, ...fixed })).v.data;
      const dt = f32(ts[i + 1] - ts[i]), next = new Float32Array(x.length);
      for (let j = 0; j < x.length; j++) next[j] = x[j] + f32(dt * v[j]);   // torch's x + dt * v, rounded twice
      x = next;
      $("progress").value = (i + 1) / steps;
      $("status").textContent = `Step ${i + 1} of ${steps}`;
      await new Promise((r) => setTimeout(r, 0));                         // let the progress bar paint
    }
  } finally {
    $("go").disabled = false;
  }
  draw(x, n, per, shape);
  show("done", `${n} images, ${steps} Euler steps, guidance ${$("scale").value}, ${noise ? "the given noise" : `seed ${seed}`}.`);
}

async function noiseFromUrl() {
  if (!params.get("noise")) return null;
  const res = await fetch(params.get("noise"));
  if (!res.ok) throw new Error(`cannot load the noise ${params.get("noise")}: HTTP ${res.status}`);
  return new Float32Array(await res.arrayBuffer());
}

$("controls").addEventListener("submit", (e) => {
  e.preventDefault();
  generate().catch((err) => show("error", "", String(err.message || err)));
});
window.nanodit = { timeGrid, generate, draw };
load()
  .then(async () => { if (params.get("autorun")) await generate(await noiseFromUrl()); })
  .catch((err) => show("error", "", String(err.message || err)));
