/* The drawing made into the Net's input as s5/digits.py's preprocess_digit makes an image into one: grey levels as
   PIL's convert("L"), the background from the border's median (dark on light or light on dark), the ink cropped,
   fitted into 20x20 by PIL's Lanczos resize (its fixed-point arithmetic), its centre of mass moved to the middle of
   28x28, normalised with MNIST's mean and std. Each step in numpy's arithmetic (float32 where it is float32, its
   pairwise sums, round half to even), so the page and Python agree; tests/test_web.py checks that they do.
   A classic script (window.S5Preprocess) and a CommonJS module (for the test's node). */
'use strict';

const S5Preprocess = (function () {
  const f32 = Math.fround;
  const MEAN = f32(0.1307), STD = f32(0.3081);  // s5/data.py: MNIST's training pixels
  const BLANK = f32(0.15), INK = f32(0.2);  // preprocess_digit's thresholds, compared in float32 as numpy does
  const DOT = 0.1;  // the page's own: ink spanning under a tenth of the canvas is a dot (a tap), not a digit
  const PRECISION = 1 << 22;  // PIL's fixed-point coefficients for 8-bit images (Resample.c, PRECISION_BITS)

  function roundHalfEven(x) {  // Python's round()
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  function median(values) {  // np.median of float32 values
    const s = Float32Array.from(values).sort(), m = s.length >> 1;
    return s.length % 2 ? s[m] : f32(f32(s[m - 1] + s[m]) / 2);
  }

  function pairwiseSum(a, lo, n, round) {  // numpy's add.reduce of a contiguous array; round = f32 for float32
    if (n < 8) {
      let s = -0;
      for (let i = lo; i < lo + n; i++) s = round(s + a[i]);
      return s;
    }
    if (n <= 128) {
      const r = Array.from(a.subarray(lo, lo + 8));
      let i = 8;
      for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] = round(r[j] + a[lo + i + j]);
      let s = round(round(round(r[0] + r[1]) + round(r[2] + r[3])) + round(round(r[4] + r[5]) + round(r[6] + r[7])));
      for (; i < n; i++) s = round(s + a[lo + i]);
      return s;
    }
    const half = Math.floor(n / 2) - (Math.floor(n / 2) % 8);
    return round(pairwiseSum(a, lo, half, round) + pairwiseSum(a, lo + half, n - half, round));
  }

  function sinc(x) {
    if (x === 0) return 1;
    x *= Math.PI;
    return Math.sin(x) / x;
  }

  function coefficients(inSize, outSize) {  // Resample.c's precompute_coeffs and normalize_coeffs_8bpc, Lanczos-3
    const scale = inSize / outSize, filterscale = Math.max(scale, 1), support = 3 * filterscale;
    const ksize = Math.ceil(support) * 2 + 1, kk = new Int32Array(outSize * ksize), bounds = [];
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const xmin = Math.max(0, Math.trunc(center - support + 0.5));
      const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
      const k = [];
      let ww = 0;
      for (let x = 0; x < xmax; x++) {
        const t = (x + xmin - center + 0.5) / filterscale;
        const w = t >= -3 && t < 3 ? sinc(t) * sinc(t / 3) : 0;
        k.push(w);
        ww += w;
      }
      for (let x = 0; x < xmax; x++) {
        const v = ww !== 0 ? k[x] / ww : k[x];
        kk[xx * ksize + x] = Math.trunc(v < 0 ? -0.5 + v * PRECISION : 0.5 + v * PRECISION);
      }
      bounds.push([xmin, xmax]);
    }
    return {ksize, kk, bounds};
  }

  function resample(src, w, h, outW, outH, horizontal) {  // one pass of PIL's two-pass resize of an 8-bit image
    const [n, m] = horizontal ? [w, outW] : [h, outH];
    const {ksize, kk, bounds} = coefficients(n, m);
    const out = new Uint8Array(horizontal ? outW * h : w * outH);
    for (let i = 0; i < out.length; i++) {
      const [x, y] = horizontal ? [i % outW, Math.floor(i / outW)] : [i % w, Math.floor(i / w)];
      const along = horizontal ? x : y, [min, len] = bounds[along];
      let s = PRECISION / 2;
      for (let j = 0; j < len; j++) {
        s += src[horizontal ? y * w + min + j : (min + j) * w + x] * kk[along * ksize + j];
      }
      out[i] = Math.min(255, Math.max(0, s >> 22));
    }
    return out;
  }

  function resizeLanczos(src, w, h, outW, outH) {  // Image.resize(..., LANCZOS) of a mode "L" image
    if (outW !== w) [src, w] = [resample(src, w, h, outW, h, true), outW];
    if (outH !== h) [src, h] = [resample(src, w, h, w, outH, false), outH];
    return src;
  }

  /* RGBA pixels (ImageData.data) of an opaque canvas -> {pixels: Float32Array(784) in [0, 1] (the 28x28 image),
     input: the same normalised, as the Net takes it}, or {empty: "blank" | "dot"} when there is no digit to read. */
  function preprocess(rgba, width, height) {
    const n = width * height, gray = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      const L = (rgba[4 * i] * 19595 + rgba[4 * i + 1] * 38470 + rgba[4 * i + 2] * 7471 + 0x8000) >> 16;
      gray[i] = L / 255;
    }
    const border = [];
    for (let x = 0; x < width; x++) border.push(gray[x]);
    for (let x = 0; x < width; x++) border.push(gray[(height - 1) * width + x]);
    for (let y = 0; y < height; y++) border.push(gray[y * width]);
    for (let y = 0; y < height; y++) border.push(gray[y * width + width - 1]);
    const background = median(border), ink = new Float32Array(n);
    for (let i = 0; i < n; i++) ink[i] = Math.max(0, background > 0.5 ? background - gray[i] : gray[i] - background);
    const peak = ink.reduce((a, b) => Math.max(a, b), 0);
    if (peak < BLANK) return {empty: 'blank'};
    let top = height, bottom = -1, left = width, right = -1;
    for (let i = 0; i < n; i++) {
      ink[i] = ink[i] / peak;
      if (ink[i] > INK) {
        const y = Math.floor(i / width), x = i % width;
        top = Math.min(top, y); bottom = Math.max(bottom, y); left = Math.min(left, x); right = Math.max(right, x);
      }
    }
    const cropW = right - left + 1, cropH = bottom - top + 1, longest = Math.max(cropW, cropH);
    if (longest < DOT * Math.max(width, height)) return {empty: 'dot'};
    const crop = new Uint8Array(cropW * cropH);  // np.uint8(ink * 255): truncated
    for (let i = 0; i < crop.length; i++) {
      crop[i] = Math.trunc(f32(ink[(top + Math.floor(i / cropW)) * width + left + (i % cropW)] * 255));
    }
    const w = Math.max(1, roundHalfEven(cropW * 20 / longest)), h = Math.max(1, roundHalfEven(cropH * 20 / longest));
    const digit = Float32Array.from(resizeLanczos(crop, cropW, cropH, w, h), (v) => v / 255);
    const rows = new Float64Array(w * h), cols = new Float64Array(w * h);  // np.indices(...) * digit, in float64
    for (let i = 0; i < w * h; i++) { rows[i] = Math.floor(i / w) * digit[i]; cols[i] = (i % w) * digit[i]; }
    const mass = pairwiseSum(digit, 0, w * h, f32), same = (x) => x;
    const y0 = Math.min(Math.max(roundHalfEven(14 - pairwiseSum(rows, 0, w * h, same) / mass), 0), 28 - h);
    const x0 = Math.min(Math.max(roundHalfEven(14 - pairwiseSum(cols, 0, w * h, same) / mass), 0), 28 - w);
    const pixels = new Float32Array(784), input = new Float32Array(784);
    for (let i = 0; i < w * h; i++) pixels[(y0 + Math.floor(i / w)) * 28 + x0 + (i % w)] = digit[i];
    for (let i = 0; i < 784; i++) input[i] = f32(pixels[i] - MEAN) / STD;
    return {pixels, input};
  }

  return {preprocess, MEAN, STD};
})();

if (typeof module === 'object' && module.exports) module.exports = S5Preprocess;
