/* The page: a canvas drawn on with Pointer Events (mouse, pen, finger), made into the Net's input by preprocess.js
   and run by ONNX Runtime Web's WebAssembly build, single-threaded, from the files beside this one (make web copies
   them; nothing comes from elsewhere). Every failure a visitor can meet is said on the page, in words.
   For tests: window.s5Last is the last prediction ({input, pixels, probs, digit, count, ms}) or null,
   window.s5Settled() a promise of the predictions asked for so far, window.s5Timing.ready the milliseconds from
   navigation until the model could answer, body[data-state] the state (loading, ready, predicted, empty, error). */
'use strict';

(function () {
  const BRUSH = 22;  // px on the 280 px canvas: MNIST's strokes are about an eighth of a digit's height
  const MAX_MODEL = 64 * 2 ** 20;  // s5/export.py's MAX_ONNX_BYTES: an exported Net is 2.4 MB, a bigger file is not one
  const SAY = {
    draw: 'Draw a digit, 0 to 9, in the box: with a mouse, a pen or a finger.',
    dot: 'That is only a dot: draw a whole digit, as large as the box allows.',
    file: 'This page was opened as a file (file://), from which browsers will not load its model: serve the folder ' +
      '(make web-serve, or python3 -m http.server in it) and open http://127.0.0.1:8000/.',
    wasm: 'This browser cannot run WebAssembly (it is turned off or too old): open the page in a current Chrome, ' +
      'Edge, Firefox or Safari.',
    script: 'preprocess.js did not load: rebuild the folder with make web; if the address lacks its final / ' +
      '(…/REPO rather than …/REPO/), add it.',
  };
  const $ = (id) => document.getElementById(id);
  const pad = $('pad'), ctx = pad.getContext('2d', {willReadFrequently: true});
  const seen = $('seen').getContext('2d'), status = $('status'), invert = $('invert');
  let ort = null, session = null, stroke = null, count = 0;
  let generation = 0;  // changed with the drawing: a prediction made for an older drawing is dropped
  let queue = Promise.resolve();  // one run at a time: a session runs one request at once
  window.s5Last = null;
  window.s5Timing = {};
  window.s5Settled = () => queue;

  const firstLine = (e) => String((e && e.message) || e).split('\n')[0].slice(0, 200);

  function say(text, state) {
    status.textContent = text;
    document.body.dataset.state = state;
  }

  function fail(text) {
    showNothing();
    say(text, 'error');
  }

  function bug(e) {  // what no step above foresaw: on the page, not only in the console
    fail(`The page failed (${firstLine(e)}): reload it; if it fails again, rebuild the folder with make web.`);
  }

  window.addEventListener('error', (e) => bug(e.error || e.message));
  window.addEventListener('unhandledrejection', (e) => bug(e.reason));

  // --- the drawing ---------------------------------------------------------------------------------------------
  const colours = () => (invert.checked ? {paper: '#000', ink: '#fff'} : {paper: '#fff', ink: '#000'});

  function clearPad() {
    ctx.fillStyle = colours().paper;
    ctx.fillRect(0, 0, pad.width, pad.height);
  }

  function at(e) {  // canvas pixels, whatever size the page shows the canvas at (inside its border)
    const box = pad.getBoundingClientRect();
    return [(e.clientX - box.left - pad.clientLeft) * pad.width / pad.clientWidth,
            (e.clientY - box.top - pad.clientTop) * pad.height / pad.clientHeight];
  }

  function drawStroke() {  // the whole stroke as one path over the canvas it began on: even edges, no beads
    ctx.putImageData(stroke.before, 0, 0);
    Object.assign(ctx, {strokeStyle: colours().ink, fillStyle: colours().ink, lineWidth: BRUSH, lineCap: 'round',
                        lineJoin: 'round'});
    ctx.beginPath();
    if (stroke.points.length === 1) {  // a tap leaves a round dot
      ctx.arc(...stroke.points[0], BRUSH / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    stroke.points.forEach((point) => ctx.lineTo(...point));
    ctx.stroke();
  }

  function dropStroke() {  // Clear pressed (by another finger, or the keyboard) while a stroke is drawn: it ends there
    if (!stroke) return;
    const id = stroke.id;
    stroke = null;
    if (pad.hasPointerCapture(id)) pad.releasePointerCapture(id);
  }

  function invertImage(image) {
    for (let i = 0; i < image.data.length; i += 4) {
      for (let c = 0; c < 3; c++) image.data[i + c] = 255 - image.data[i + c];
    }
    return image;
  }

  pad.addEventListener('contextmenu', (e) => e.preventDefault());  // a long press draws, it opens no menu
  pad.addEventListener('pointerdown', (e) => {
    if (stroke || (e.pointerType === 'mouse' && e.button !== 0)) return;
    e.preventDefault();
    pad.setPointerCapture(e.pointerId);
    generation++;
    stroke = {id: e.pointerId, points: [at(e)], before: ctx.getImageData(0, 0, pad.width, pad.height)};
    drawStroke();
  });
  pad.addEventListener('pointermove', (e) => {
    if (!stroke || e.pointerId !== stroke.id) return;
    const events = (e.getCoalescedEvents && e.getCoalescedEvents()) || [];  // every sample of a fast pen
    for (const sample of events.length ? events : [e]) stroke.points.push(at(sample));
    drawStroke();
  });
  const endStroke = (e) => {
    if (!stroke || e.pointerId !== stroke.id) return;
    stroke = null;
    predictSoon();
  };
  for (const type of ['pointerup', 'pointercancel', 'lostpointercapture']) pad.addEventListener(type, endStroke);

  $('clear').addEventListener('click', () => {
    dropStroke();
    generation++;
    clearPad();
    showNothing();
    if (session) say(SAY.draw, 'ready');
  });

  invert.addEventListener('change', () => {  // the same drawing in the other colours: the same input
    ctx.putImageData(invertImage(ctx.getImageData(0, 0, pad.width, pad.height)), 0, 0);
    if (stroke) invertImage(stroke.before);  // a stroke being drawn goes on, in the new colours
    generation++;
    predictSoon();
  });

  // --- the answer ----------------------------------------------------------------------------------------------
  const bars = [];
  for (let d = 0; d < 10; d++) {
    const row = document.createElement('div');
    row.className = 'bar';
    row.innerHTML = `<span>${d}</span><span class="track"><span class="fill"></span></span><span class="pct"></span>`;
    $('bars').append(row);
    bars.push(row);
  }

  function showNothing() {
    window.s5Last = null;
    $('digit').textContent = '–';
    $('confidence').textContent = '';
    bars.forEach((row) => {
      row.classList.remove('top');
      row.querySelector('.fill').style.width = '0';
      row.querySelector('.pct').textContent = '';
    });
    seen.fillStyle = '#000';
    seen.fillRect(0, 0, 28, 28);
  }

  function show(result, probs, ms) {
    const digit = probs.indexOf(Math.max(...probs));
    $('digit').textContent = String(digit);
    $('confidence').textContent = `${(100 * probs[digit]).toFixed(1)}% sure`;
    bars.forEach((row, d) => {
      row.classList.toggle('top', d === digit);
      row.querySelector('.fill').style.width = `${(100 * probs[d]).toFixed(2)}%`;
      row.querySelector('.pct').textContent = `${(100 * probs[d]).toFixed(1)}%`;
    });
    const image = seen.createImageData(28, 28);
    result.pixels.forEach((v, i) => {
      image.data.fill(Math.round(255 * v), 4 * i, 4 * i + 3);
      image.data[4 * i + 3] = 255;
    });
    seen.putImageData(image, 0, 0);
    count++;
    window.s5Last = {input: result.input, pixels: result.pixels, probs, digit, count, ms};
    say(`The Net reads a ${digit}.`, 'predicted');
  }

  async function run(input) {  // the Net's probabilities (it outputs log-probabilities)
    const feed = {[session.inputNames[0]]: new ort.Tensor('float32', input, [1, 1, 28, 28])};
    const output = await session.run(feed);
    return Array.from(output[session.outputNames[0]].data, Math.exp);
  }

  async function predict(made) {
    if (!session || made !== generation) return;
    const started = performance.now();
    const image = ctx.getImageData(0, 0, pad.width, pad.height);
    const result = S5Preprocess.preprocess(image.data, image.width, image.height);
    if (result.empty) {
      showNothing();
      say(result.empty === 'dot' ? SAY.dot : SAY.draw, 'empty');
      return;
    }
    const probs = await run(result.input);
    if (made === generation) show(result, probs, performance.now() - started);
  }

  function predictSoon() {
    const made = generation;
    queue = queue.then(() => predict(made)).catch(bug);
  }

  // --- start-up: each thing a visitor's browser or folder can lack, said in words ----------------------------
  async function start() {
    clearPad();
    showNothing();
    if (location.protocol === 'file:') return fail(SAY.file);
    if (typeof WebAssembly !== 'object' || typeof WebAssembly.instantiate !== 'function') return fail(SAY.wasm);
    if (typeof S5Preprocess !== 'object') return fail(SAY.script);
    try {
      ort = await import('./ort.wasm.min.mjs');
    } catch (e) {
      return fail(`ONNX Runtime Web did not load (${firstLine(e)}): rebuild the folder with make web, and serve .mjs ` +
                  'files as JavaScript (every common static host does).');
    }
    ort.env.wasm.numThreads = 1;  // single-threaded: no SharedArrayBuffer, so no cross-origin-isolation headers
    ort.env.wasm.proxy = false;
    ort.env.wasm.wasmPaths = {mjs: new URL('ort-wasm-simd-threaded.mjs', document.baseURI).href,
                              wasm: new URL('ort-wasm-simd-threaded.wasm', document.baseURI).href};
    let model;
    try {
      const response = await fetch('model.onnx', {cache: 'no-cache'});  // a rebuilt folder's model, not a cached one
      if (response.status === 404) {
        return fail('model.onnx is missing from this folder: build the folder with make web (it exports the model).');
      }
      if (!response.ok) {
        return fail(`model.onnx could not be fetched (HTTP ${response.status} ${response.statusText}): ` +
                    'check the server, then reload the page.');
      }
      const size = Number(response.headers.get('Content-Length'));  // refused before it is read, when the host says
      if (size > MAX_MODEL) {
        if (response.body) response.body.cancel().catch(() => {});  // not read: nothing to say about it
        return fail(`model.onnx is ${Math.round(size / 1e6)} MB, so it is not this repo's Net (2.4 MB): rebuild the ` +
                    'folder with make web.');
      }
      model = new Uint8Array(await response.arrayBuffer());
      if (model.length > MAX_MODEL) {
        return fail(`model.onnx is ${Math.round(model.length / 1e6)} MB, so it is not this repo's Net (2.4 MB): ` +
                    'rebuild the folder with make web.');
      }
    } catch (e) {
      return fail(`model.onnx could not be fetched (${firstLine(e)}): check that the server still runs, then reload.`);
    }
    try {
      session = await ort.InferenceSession.create(model, {executionProviders: ['wasm']});
    } catch (e) {
      if (/no available backend/i.test(firstLine(e))) {
        return fail(`ONNX Runtime Web could not start (${firstLine(e)}): the folder is incomplete; rebuild it with ` +
                    'make web.');
      }
      return fail(`model.onnx is damaged or not an ONNX model (${firstLine(e)}): rebuild the folder with make web.`);
    }
    try {  // one run on a blank input: the model takes (1, 1, 28, 28) and gives ten probabilities
      const probs = await run(new Float32Array(784));
      const total = probs.reduce((a, b) => a + b, 0);
      if (probs.length !== 10 || !(Math.abs(total - 1) < 1e-3)) {
        throw new Error(`it gives ${probs.length} values summing to ${total}, not ten probabilities`);
      }
    } catch (e) {
      session = null;
      return fail(`model.onnx is not an export of this repo's Net (${firstLine(e)}): rebuild the folder with make ` +
                  'web.');
    }
    window.s5Timing.ready = performance.now();
    say(SAY.draw, 'ready');
    if (generation) predictSoon();  // drawn while the model loaded: read it now
  }

  start().catch(bug);
})();
