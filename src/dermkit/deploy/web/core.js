/*
 * dermkit web core: preprocessing and post-processing shared by the page and its tests.
 *
 * Everything here is a pure function so that it can run in the browser (window.DermkitCore)
 * and in Node (module.exports) for the parity test against Python.
 *
 * The resize is a line-by-line port of Pillow's Resample.c (ImagingResample with the
 * BICUBIC filter, a = -0.5, 8-bit path): coefficients computed in double precision,
 * normalised, turned into 22-bit fixed point, a horizontal then a vertical pass with the
 * same rounding and clipping. The server resizes with PIL (short side to S, bicubic, then a
 * centre crop: dermkit.data.cache.resize_short_side_center_crop), so for the same decoded
 * pixels both sides produce the same uint8 crop, bit for bit, and the same float32 tensor
 * (normalisation emulates float32 arithmetic with Math.fround). A canvas resize would not:
 * browsers use their own filters.
 */
(function (root, factory) {
  const core = factory();
  if (typeof module === "object" && module.exports) module.exports = core;
  else root.DermkitCore = core;
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";

  const PRECISION_BITS = 32 - 8 - 2;
  const ONE = 1 << PRECISION_BITS;

  function bicubic(x) {
    const a = -0.5;
    if (x < 0) x = -x;
    if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
    if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
    return 0;
  }

  /** Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis. */
  function coefficients(inSize, outSize) {
    const support0 = 2.0;
    const scale = inSize / outSize;
    const filterscale = scale < 1 ? 1 : scale;
    const support = support0 * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2);
    const kk = new Int32Array(outSize * ksize);
    const k = new Float64Array(ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const ss = 1.0 / filterscale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0;
      for (let x = 0; x < xmax; x++) {
        const w = bicubic((x + xmin - center + 0.5) * ss);
        k[x] = w;
        ww += w;
      }
      for (let x = 0; x < ksize; x++) {
        let v = x < xmax ? (ww !== 0 ? k[x] / ww : k[x]) : 0;
        // (int)(±0.5 + v * 2^22): C truncates toward zero
        kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * ONE) : Math.trunc(0.5 + v * ONE);
      }
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    return { ksize, bounds, kk };
  }

  function clip8(v) {
    if (v >= ONE * 256) return 255;
    if (v <= 0) return 0;
    return Math.floor(v / ONE);
  }

  /**
   * One output pixel of a PIL bicubic pass: the fixed-point sums over n taps of RGB pixels
   * src[p0 + t * stride] (t < n) with weights kk[kOff + t], clipped into out[o .. o + 2].
   * The horizontal pass steps along a row (stride 3), the vertical one down a column.
   */
  function convolve3(src, p0, stride, n, kk, kOff, out, o) {
    let s0 = ONE / 2;
    let s1 = ONE / 2;
    let s2 = ONE / 2;
    for (let t = 0; t < n; t++) {
      const c = kk[kOff + t];
      const p = p0 + t * stride;
      s0 += src[p] * c;
      s1 += src[p + 1] * c;
      s2 += src[p + 2] * c;
    }
    out[o] = clip8(s0);
    out[o + 1] = clip8(s1);
    out[o + 2] = clip8(s2);
  }

  /**
   * Resize an RGB uint8 image (Uint8Array of h*w*3) to (outW, outH) exactly like
   * PIL's Image.resize(..., Image.Resampling.BICUBIC) on an RGB image.
   */
  function pilResizeBicubic(rgb, w, h, outW, outH) {
    if (outW === w && outH === h) return Uint8Array.from(rgb);
    const horiz = coefficients(w, outW);
    const vert = coefficients(h, outH);
    const needH = outW !== w;
    const needV = outH !== h;
    let src = rgb;
    let srcW = w;
    let rowOffset = 0;
    let tempH = h;
    if (needH) {
      // rows the vertical pass reads, as PIL does (ybox_first .. ybox_last)
      const first = vert.bounds[0];
      const last = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1];
      tempH = needV ? last - first : h;
      rowOffset = needV ? first : 0;
      const tmp = new Uint8Array(tempH * outW * 3);
      const { ksize, bounds, kk } = horiz;
      for (let yy = 0; yy < tempH; yy++) {
        const rowIn = (yy + rowOffset) * w * 3;
        for (let xx = 0; xx < outW; xx++) {
          const p0 = rowIn + bounds[xx * 2] * 3;
          const n = bounds[xx * 2 + 1];
          convolve3(rgb, p0, 3, n, kk, xx * ksize, tmp, (yy * outW + xx) * 3);
        }
      }
      src = tmp;
      srcW = outW;
    }
    if (!needV) return src;
    const out = new Uint8Array(outH * srcW * 3);
    const { ksize, bounds, kk } = vert;
    for (let yy = 0; yy < outH; yy++) {
      const ymin = bounds[yy * 2] - rowOffset;
      const n = bounds[yy * 2 + 1];
      for (let xx = 0; xx < srcW; xx++) {
        const p0 = (ymin * srcW + xx) * 3;
        convolve3(src, p0, srcW * 3, n, kk, yy * ksize, out, (yy * srcW + xx) * 3);
      }
    }
    return out;
  }

  /** Python's round(): halves go to the even neighbour. */
  function pyRound(x) {
    const f = Math.floor(x);
    const d = x - f;
    if (d > 0.5) return f + 1;
    if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  /**
   * dermkit.data.cache.resize_short_side_center_crop: short side to `size` (PIL bicubic),
   * then a centre crop size x size. rgb: Uint8Array (h*w*3). Returns Uint8Array size*size*3.
   */
  function resizeShortSideCenterCrop(rgb, w, h, size) {
    const scale = size / Math.min(h, w);
    const newW = Math.max(size, pyRound(w * scale));
    const newH = Math.max(size, pyRound(h * scale));
    const resized = pilResizeBicubic(rgb, w, h, newW, newH);
    const left = Math.floor((newW - size) / 2);
    const top = Math.floor((newH - size) / 2);
    const out = new Uint8Array(size * size * 3);
    for (let y = 0; y < size; y++) {
      const from = ((y + top) * newW + left) * 3;
      out.set(resized.subarray(from, from + size * 3), y * size * 3);
    }
    return out;
  }

  /**
   * dermkit.data.cache.resize_full_frame: long side to `size` (PIL bicubic), then the short
   * side padded to `size` by reflection (numpy's "reflect": the edge row is not repeated;
   * "edge" when the pad is not shorter than the image). Returns Uint8Array size*size*3.
   */
  function resizeFullFrame(rgb, w, h, size) {
    const scale = size / Math.max(h, w);
    const newW = Math.min(size, Math.max(1, pyRound(w * scale)));
    const newH = Math.min(size, Math.max(1, pyRound(h * scale)));
    const resized = pilResizeBicubic(rgb, w, h, newW, newH);
    const top = Math.floor((size - newH) / 2);
    const left = Math.floor((size - newW) / 2);
    const reflect = Math.max(top, size - newH - top) < newH && Math.max(left, size - newW - left) < newW;
    const source = (i, n) => {
      if (!reflect) return Math.min(n - 1, Math.max(0, i));
      const period = 2 * (n - 1);
      if (period === 0) return 0;
      let j = ((i % period) + period) % period;
      return j < n ? j : period - j;
    };
    const out = new Uint8Array(size * size * 3);
    for (let y = 0; y < size; y++) {
      const sy = source(y - top, newH);
      for (let x = 0; x < size; x++) {
        const from = (sy * newW + source(x - left, newW)) * 3;
        out.set(resized.subarray(from, from + 3), (y * size + x) * 3);
      }
    }
    return out;
  }

  /**
   * dermkit.data.cache.shades_of_gray: Shades of Gray colour constancy (p = 6) on a crop.
   * Illuminant e_c = mean(v^6)^(1/6) from a 256-bin histogram (exact integer powers, summed
   * in level order as numpy's cumsum), gain |e| / (sqrt(3) e_c), rounded half up, clipped.
   */
  function shadesOfGray(rgb) {
    const n = rgb.length / 3;
    const e = [0, 0, 0];
    for (let c = 0; c < 3; c++) {
      const counts = new Float64Array(256);
      for (let i = c; i < rgb.length; i += 3) counts[rgb[i]] += 1;
      let total = 0;
      for (let v = 0; v < 256; v++) {
        const v2 = v * v;
        total += counts[v] * (v2 * v2 * v2);
      }
      e[c] = Math.pow(total / n, 1 / 6);
    }
    const norm = Math.sqrt(e[0] * e[0] + e[1] * e[1] + e[2] * e[2]);
    if (norm === 0) return Uint8Array.from(rgb);
    const gains = e.map((ec) => (ec > 0 ? norm / (ec * Math.sqrt(3)) : 1));
    const out = new Uint8Array(rgb.length);
    for (let i = 0; i < rgb.length; i++) {
      out[i] = Math.min(255, Math.floor(rgb[i] * gains[i % 3] + 0.5));
    }
    return out;
  }

  /**
   * dermkit.data.cache.crop_image: the model card's crop policy applied to an image, then
   * its colour constancy ("none" or "shades_of_gray"; absent = none) on the crop.
   */
  function cropImage(rgb, w, h, size, policy, colourConstancy) {
    const crop =
      policy === "full_frame"
        ? resizeFullFrame(rgb, w, h, size)
        : resizeShortSideCenterCrop(rgb, w, h, size);
    return colourConstancy === "shades_of_gray" ? shadesOfGray(crop) : crop;
  }

  /**
   * The accepted format whose signature the first bytes match, else null. ``formats`` is
   * the server's list (GET /config image_formats: [{name, mime, magic: [[offset, hex]]}]),
   * the same table the API sniffs uploads with (dermkit.deploy.image_probe.IMAGE_FORMATS).
   */
  function sniffFormat(head, formats) {
    for (const f of formats) {
      const ok = f.magic.every(([offset, hex]) => {
        for (let i = 0; i < hex.length / 2; i++) {
          if (head[offset + i] !== parseInt(hex.substr(2 * i, 2), 16)) return false;
        }
        return true;
      });
      if (ok) return f.name;
    }
    return null;
  }

  /** RGBA bytes (canvas ImageData.data) -> RGB bytes; null if any pixel is transparent. */
  function rgbaToRgb(rgba, w, h) {
    const n = w * h;
    const out = new Uint8Array(n * 3);
    for (let i = 0; i < n; i++) {
      if (rgba[i * 4 + 3] !== 255) return null;
      out[i * 3] = rgba[i * 4];
      out[i * 3 + 1] = rgba[i * 4 + 1];
      out[i * 3 + 2] = rgba[i * 4 + 2];
    }
    return out;
  }

  /**
   * (size*size*3) uint8 HWC RGB -> Float32Array (3*size*size) NCHW, ((x * scale) - mean) / std
   * in float32 arithmetic, as numpy/torch compute it on the server.
   */
  function normalise(rgb, size, mean, std, scale) {
    const f = Math.fround;
    const n = size * size;
    const out = new Float32Array(3 * n);
    const s = f(scale);
    for (let c = 0; c < 3; c++) {
      const m = f(mean[c]);
      const sd = f(std[c]);
      for (let i = 0; i < n; i++) out[c * n + i] = f(f(f(rgb[i * 3 + c] * s) - m) / sd);
    }
    return out;
  }

  function softmax(logits, temperature) {
    const z = Array.from(logits, (v) => v / temperature);
    const mx = Math.max(...z);
    const e = z.map((v) => Math.exp(v - mx));
    const sum = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / sum);
  }

  /** DecisionRule.probs: softmax(logits / T) * class_scales, renormalised. */
  function decisionRule(logits, temperature, classScales) {
    let p = softmax(logits, temperature);
    if (classScales) {
      p = p.map((v, i) => v * classScales[i]);
      const sum = p.reduce((a, b) => a + b, 0);
      p = p.map((v) => v / sum);
    }
    return p;
  }

  /** ExitPolicy.confidence for one sample: [confidence in [0, 1], predicted class]. */
  function exitConfidence(logits, measure, temperature) {
    const p = softmax(logits, temperature);
    let pred = 0;
    for (let i = 1; i < p.length; i++) if (p[i] > p[pred]) pred = i;
    let conf;
    if (measure === "max_prob") conf = p[pred];
    else if (measure === "margin") {
      const s = [...p].sort((a, b) => a - b);
      conf = s[s.length - 1] - s[s.length - 2];
    } else if (measure === "neg_entropy") {
      const h = -p.reduce((a, v) => a + v * Math.log(Math.max(v, 1e-300)), 0);
      conf = 1 - h / Math.log(p.length);
    } else throw new Error("unknown confidence measure " + measure);
    return [Math.min(1, Math.max(0, conf)), pred];
  }

  /** ExitPolicy.exits_now for one sample at exit j. */
  function exitsNow(policy, logits, j) {
    const nExits = policy.thresholds.length + 1;
    if (j === nExits - 1) return true;
    const t = policy.temperatures ? policy.temperatures[j] : 1.0;
    const [conf, pred] = exitConfidence(logits, policy.measure, t);
    return conf >= policy.thresholds[j] && !policy.protected_classes.includes(pred);
  }

  function argmax(a) {
    let k = 0;
    for (let i = 1; i < a.length; i++) if (a[i] > a[k]) k = i;
    return k;
  }

  /** dermkit.eval.ood.energy: -T * logsumexp(logits / T); higher = less familiar. */
  function energy(logits, temperature) {
    const z = Array.from(logits, (v) => v / temperature);
    const m = Math.max(...z);
    return -temperature * (m + Math.log(z.reduce((a, v) => a + Math.exp(v - m), 0)));
  }

  /**
   * ServedModel.familiarity: the unfamiliar-image flag of the final logits, from the
   * config's ood entry (null: no flag fitted, every field null).
   */
  function familiarity(logits, ood) {
    if (!ood) {
      return { unfamiliar: null, ood_score: null, ood_threshold: null, unfamiliar_message: null };
    }
    const score = energy(logits, ood.temperature);
    const unfamiliar = score > ood.threshold;
    return {
      unfamiliar,
      ood_score: score,
      ood_threshold: ood.threshold,
      unfamiliar_message: unfamiliar ? ood.message : null,
    };
  }

  /**
   * The served answer from calibrated probabilities, as dermkit.deploy.inference does it:
   * confidence, normalised entropy, uncertainty level, malignant-suspect flag and advice.
   */
  function summarise(probs, cfg) {
    const c = probs.length;
    const top = argmax(probs);
    const confidence = probs[top];
    const entropy = -probs.reduce((a, v) => a + (v > 0 ? v * Math.log(v) : 0), 0) / Math.log(c);
    const malignantIdx = cfg.classes
      .map((name, i) => (cfg.malignant_classes.includes(name) ? i : -1))
      .filter((i) => i >= 0);
    const malignantProbability = malignantIdx.reduce((a, i) => a + probs[i], 0);
    const [lowBelow, highFrom] = cfg.confidence_levels;
    const uncertainty = confidence < lowBelow ? "high" : confidence < highFrom ? "moderate" : "low";
    const suspect =
      malignantIdx.includes(top) || malignantProbability >= cfg.malignant_threshold;
    const advice = suspect ? "malignant_suspect" : uncertainty === "high" ? "low_confidence" : "standard";
    return {
      top_class: cfg.classes[top],
      confidence,
      entropy,
      uncertainty,
      malignant_probability: malignantProbability,
      malignant_suspect: suspect,
      advice,
      message: cfg.messages[advice],
    };
  }

  return {
    pilResizeBicubic,
    resizeShortSideCenterCrop,
    resizeFullFrame,
    cropImage,
    shadesOfGray,
    rgbaToRgb,
    sniffFormat,
    normalise,
    softmax,
    decisionRule,
    exitConfidence,
    exitsNow,
    summarise,
    pyRound,
    energy,
    familiarity,
  };
});
