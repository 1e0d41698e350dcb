/*
 * dermkit web page: runs the served ONNX model in the browser with onnxruntime-web (files
 * served by dermkit itself from its local npm install; no CDN), and falls back to the
 * server's POST /predict when that is impossible (no WebAssembly, ort files missing, a
 * model that fails to load) or when the page is opened with ?engine=server.
 *
 * Once the page has said that images stay on the device (the browser engine), nothing is
 * uploaded without the user's explicit consent: an image the browser cannot decode or run
 * (a truncated file, a bomb) brings up a question, and only "Send" uploads it. Files that
 * are not one of the server's formats (GET /config image_formats, sniffed from the bytes
 * as the API does) are refused before anything else, in both engines.
 *
 * The preprocessing and post-processing live in core.js and mirror the server's
 * (dermkit.deploy.inference), so both answer the same for the same image.
 * The last result is in #result-json (and window.dermkitResult) for tests and debugging;
 * a browser-engine result carries inference_ms, the model's time on that image.
 */
(function () {
  "use strict";
  const core = window.DermkitCore;
  const $ = (id) => document.getElementById(id);
  const state = { cfg: null, engine: "server", why: "", session: null, segments: null };

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showError(text) {
    const el = $("error");
    el.textContent = text;
    el.hidden = !text;
  }

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error("could not load " + src));
      document.head.appendChild(s);
    });
  }

  async function initBrowserEngine(cfg) {
    if (typeof WebAssembly !== "object") throw new Error("this browser has no WebAssembly");
    if (!cfg.ort_available) throw new Error("onnxruntime-web is not installed on the server");
    await loadScript("/ort/ort.wasm.min.js");
    const ort = window.ort;
    ort.env.wasm.wasmPaths = "/ort/";
    ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one is deterministic
    ort.env.wasm.proxy = false;
    const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    if (cfg.exits) {
      state.segments = [];
      for (const url of cfg.exits.segments) {
        state.segments.push(await ort.InferenceSession.create(url, options));
      }
    } else {
      state.session = await ort.InferenceSession.create(cfg.model_url, options);
    }
  }

  async function init() {
    try {
      const r = await fetch("/config");
      if (!r.ok) throw new Error("GET /config: HTTP " + r.status);
      state.cfg = await r.json();
    } catch (e) {
      setStatus("");
      showError("The server is not reachable: " + e.message);
      return;
    }
    const cfg = state.cfg;
    $("model-name").textContent = "Model: " + cfg.name;
    $("disclaimer").textContent = cfg.not_a_diagnosis;
    // A model trained on phantom images is a demo: say so before anyone uploads a photo.
    $("demo-notice").hidden = !cfg.demo_notice;
    $("demo-notice").textContent = cfg.demo_notice || "";
    $("api-key-row").hidden = !cfg.api_key_required;
    const mimes = cfg.image_formats.map((f) => f.mime).join(",");
    $("file").accept = mimes;
    $("camera-file").accept = mimes;
    const names = cfg.image_formats.map((f) => f.name);
    $("formats-hint").textContent = names.slice(0, -1).join(", ") + " or " + names.slice(-1);
    const forced = new URLSearchParams(location.search).get("engine");
    if (forced === "server") {
      state.why = "requested with ?engine=server";
    } else {
      try {
        await initBrowserEngine(cfg);
        state.engine = "browser";
      } catch (e) {
        state.why = e.message;
        console.warn("in-browser inference unavailable, using the server:", e);
      }
    }
    setStatus(
      state.engine === "browser"
        ? "Ready. The model runs in your browser: your image stays on this device."
        : "Ready. Images are sent to the server for analysis (" + state.why + ")."
    );
    document.body.dataset.engine = state.engine;
    document.body.dataset.ready = "true";
  }

  // ------------------------------------------------------------------ decoding

  function checkSize(w, h) {
    const cfg = state.cfg;
    if (w * h > cfg.max_image_pixels || Math.max(w, h) > cfg.max_image_side) {
      throw new Error(`image too large: ${w}x${h} pixels`);
    }
  }

  /** Pixels of an image file: {rgb: Uint8Array h*w*3, w, h}, colours untouched. */
  async function decodeFile(file) {
    const bitmap = await createImageBitmap(file, {
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
      imageOrientation: "from-image",
    });
    try {
      checkSize(bitmap.width, bitmap.height);
      return pixelsOf(bitmap, bitmap.width, bitmap.height);
    } finally {
      bitmap.close();
    }
  }

  function pixelsOf(source, w, h) {
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(source, 0, 0);
    const rgb = core.rgbaToRgb(ctx.getImageData(0, 0, w, h).data, w, h);
    if (!rgb) throw new Error("the image has transparent pixels: lesion colours undefined");
    return { rgb, w, h };
  }

  // ------------------------------------------------------------------ inference

  async function predictInBrowser(pixels) {
    const cfg = state.cfg;
    const ort = window.ort;
    const S = cfg.image_size;
    const crop = core.cropImage(pixels.rgb, pixels.w, pixels.h, S, cfg.crop_policy, cfg.colour_constancy);
    const x = core.normalise(crop, S, cfg.mean, cfg.std, cfg.scale);
    // inference_ms: the model's calls (every segment run, exit decisions included), what
    // early exits change; preprocessing is the same either way and is left out.
    const start = performance.now();
    let h = new ort.Tensor("float32", x, [1, 3, S, S]);
    let probs;
    let exit = { index: 0, name: "final", blocks: null, of: 1 };
    let finalLogits = null; // the unfamiliar-image flag reads the final head's logits only
    if (state.segments) {
      const policy = cfg.exits.policy;
      const n = state.segments.length;
      for (let j = 0; j < n; j++) {
        const seg = state.segments[j];
        const out = await seg.run({ [seg.inputNames[0]]: h });
        const logits = Array.from(out.logits.data);
        // fused segments (dermkit exits export --fused) decide in the graph
        const leave = out.exit ? Boolean(out.exit.data[0]) : core.exitsNow(policy, logits, j);
        if (leave) {
          const last = j === n - 1;
          if (last) finalLogits = logits;
          probs = last
            ? core.decisionRule(logits, cfg.temperature, cfg.class_scales)
            : core.softmax(logits, policy.temperatures ? policy.temperatures[j] : 1.0);
          exit = {
            index: j,
            name: last ? "final" : "early exit " + (j + 1),
            blocks: cfg.exits.exit_depths[j],
            of: n,
          };
          break;
        }
        h = out.tokens_out;
      }
    } else {
      const out = await state.session.run({ [cfg.input_name]: h });
      const logits = Array.from(out[state.session.outputNames[0]].data);
      probs = core.decisionRule(logits, cfg.temperature, cfg.class_scales);
      finalLogits = logits;
    }
    const inferenceMs = performance.now() - start;
    return Object.assign(
      { classes: cfg.classes, probabilities: probs },
      core.summarise(probs, cfg),
      finalLogits ? core.familiarity(finalLogits, cfg.ood) : core.familiarity(null, null),
      { exit, model: cfg.name, crop, engine: "browser", inference_ms: inferenceMs }
    );
  }

  async function predictOnServer(blob, saliency) {
    const form = new FormData();
    form.append("file", blob, "upload");
    const headers = {};
    if (state.cfg.api_key_required) headers["X-API-Key"] = $("api-key").value;
    const r = await fetch("/predict" + (saliency ? "?saliency=true" : ""), {
      method: "POST",
      body: form,
      headers,
    });
    let body = null;
    try {
      body = await r.json();
    } catch (e) {
      body = null;
    }
    if (!r.ok) {
      const msg = body && body.error ? body.error.message : "HTTP " + r.status;
      throw new Error("the server refused the image: " + msg);
    }
    body.engine = "server";
    return body;
  }

  // ------------------------------------------------------------------ rendering

  function drawCrop(crop, S) {
    const canvas = $("crop");
    canvas.width = S;
    canvas.height = S;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(S, S);
    for (let i = 0; i < S * S; i++) {
      img.data[i * 4] = crop[i * 3];
      img.data[i * 4 + 1] = crop[i * 3 + 1];
      img.data[i * 4 + 2] = crop[i * 3 + 2];
      img.data[i * 4 + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function pct(p) {
    return (100 * p).toFixed(1) + "%";
  }

  function render(result) {
    const cfg = state.cfg;
    $("result").hidden = false;
    if (result.demo_notice === undefined) result.demo_notice = cfg.demo_notice || null;
    $("result-demo").hidden = !result.demo_notice;
    $("result-demo").textContent = result.demo_notice || "";
    const advice = $("advice");
    advice.className = "advice advice-" + result.advice;
    advice.setAttribute("role", result.advice === "standard" ? "note" : "alert");
    advice.textContent = result.message;
    $("unfamiliar").hidden = !result.unfamiliar;
    $("unfamiliar").textContent = result.unfamiliar ? result.unfamiliar_message : "";
    $("top").textContent = `${result.top_class} (${cfg.descriptions[result.top_class]})`;
    $("confidence").textContent = pct(result.confidence);
    $("confidence-meter").value = result.confidence;
    const words = {
      low: "low: the model is fairly sure (it can still be wrong)",
      moderate: "moderate: treat this answer with caution",
      high: "high: the model is unsure; this answer is unreliable",
    };
    $("uncertainty").textContent = words[result.uncertainty];
    const e = result.exit;
    $("exit").textContent =
      e.of > 1 ? `${e.name} of ${e.of} (${e.blocks} blocks)` : "the full model";
    $("engine").textContent =
      result.engine === "browser"
        ? "in your browser (onnxruntime-web); the image did not leave this device"
        : "on the server";
    const order = result.classes.map((c, i) => i).sort(
      (a, b) => result.probabilities[b] - result.probabilities[a]
    );
    const list = $("probs");
    list.textContent = "";
    for (const i of order) {
      const name = result.classes[i];
      const li = document.createElement("li");
      li.dataset.class = name;
      li.dataset.probability = String(result.probabilities[i]);
      const malignant = cfg.malignant_classes.includes(name);
      if (malignant) li.className = "malignant";
      const label = document.createElement("span");
      label.className = "name";
      label.textContent = name + " ";
      const small = document.createElement("small");
      small.textContent = cfg.descriptions[name];
      label.appendChild(small);
      if (malignant) {
        const tag = document.createElement("span");
        tag.className = "tag";
        tag.textContent = "possibly malignant";
        label.appendChild(tag);
      }
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = pct(result.probabilities[i]);
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = pct(result.probabilities[i]);
      bar.appendChild(fill);
      li.append(label, value, bar);
      list.appendChild(li);
    }
    const shown = Object.assign({}, result);
    delete shown.saliency_png_base64;
    delete shown.crop;
    $("result-json").textContent = JSON.stringify(shown);
    window.dermkitResult = shown;
    document.body.dataset.result = result.advice;
  }

  // ------------------------------------------------------------------ flow

  /** The format of ``blob`` by its first bytes, as the API sniffs it; throws when none. */
  async function checkFormat(blob) {
    const head = new Uint8Array(await blob.slice(0, 16).arrayBuffer());
    if (!core.sniffFormat(head, state.cfg.image_formats)) {
      throw new Error(state.cfg.unsupported_message);
    }
  }

  /** Ask before uploading an image the page promised to keep; resolves true for "Send". */
  function askToUpload(reason) {
    const box = $("consent");
    $("consent-text").textContent =
      "Your browser could not analyse this image (" + reason + "). It has not left this " +
      "device. Send it to the server to be analysed there?";
    box.hidden = false;
    return new Promise((resolve) => {
      const done = (answer) => {
        box.hidden = true;
        $("consent-send").onclick = null;
        $("consent-keep").onclick = null;
        resolve(answer);
      };
      $("consent-send").onclick = () => done(true);
      $("consent-keep").onclick = () => done(false);
    });
  }

  async function analyse(getPixels, blob) {
    showError("");
    $("consent").hidden = true;
    $("result").hidden = true;
    $("saliency-img").hidden = true;
    document.body.dataset.result = "";
    setStatus("Analysing…");
    const cfg = state.cfg;
    const wantSaliency = $("saliency").checked;
    try {
      await checkFormat(blob);
      if (blob.size > cfg.max_upload_bytes) {
        throw new Error(`the file is larger than ${(cfg.max_upload_bytes / 1048576).toFixed(0)} MB`);
      }
      let result;
      if (state.engine === "browser") {
        try {
          const pixels = await getPixels();
          result = await predictInBrowser(pixels);
          drawCrop(result.crop, cfg.image_size);
        } catch (err) {
          if (/too large|transparent/.test(err.message)) throw err;
          console.warn("in-browser inference failed:", err);
          setStatus("");
          if (!(await askToUpload(err.message || "unknown error"))) {
            setStatus("Not sent: your image stayed on this device.");
            return;
          }
          setStatus("Analysing on the server…");
          result = await predictOnServer(blob, false);
        }
      } else {
        result = await predictOnServer(blob, false);
        try {
          const pixels = await getPixels();
          const shown = core.cropImage(
            pixels.rgb, pixels.w, pixels.h, cfg.image_size, cfg.crop_policy, cfg.colour_constancy
          );
          drawCrop(shown, cfg.image_size);
        } catch (err) {
          console.warn("preview unavailable:", err);
        }
      }
      render(result);
      setStatus("Done.");
      if (wantSaliency) {
        const withMap = await predictOnServer(blob, true);
        if (withMap.saliency_png_base64) {
          const img = $("saliency-img");
          img.src = "data:image/png;base64," + withMap.saliency_png_base64;
          img.hidden = false;
        }
      }
    } catch (err) {
      setStatus("");
      showError(err.message);
    }
  }

  function analyseFile(file) {
    if (!file) return;
    analyse(() => decodeFile(file), file);
  }

  // camera: live preview with getUserMedia where available, else the capture input
  let stream = null;
  async function openCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      $("camera-file").click();
      return;
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        video: { facingMode: "environment" },
        audio: false,
      });
    } catch (e) {
      $("camera-file").click();
      return;
    }
    const video = $("video");
    video.srcObject = stream;
    $("camera").hidden = false;
    await video.play();
  }

  function closeCamera() {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    stream = null;
    $("camera").hidden = true;
  }

  function snap() {
    const video = $("video");
    const w = video.videoWidth;
    const h = video.videoHeight;
    if (!w || !h) return;
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => {
      closeCamera();
      analyse(() => decodeFile(blob), blob);
    }, "image/png");
  }

  function wire() {
    $("file").addEventListener("change", (e) => analyseFile(e.target.files[0]));
    $("camera-file").addEventListener("change", (e) => analyseFile(e.target.files[0]));
    $("camera-btn").addEventListener("click", openCamera);
    $("camera-stop").addEventListener("click", closeCamera);
    $("snap").addEventListener("click", snap);
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      analyseFile(e.dataTransfer.files[0]);
    });
  }

  wire();
  init();
})();
