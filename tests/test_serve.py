"""`onebit serve` as a real server on a loopback port (a subprocess), driven by the real `openai`
client, plain HTTP (httpx) for the error cases, a bounded abuse run, and the chat page in
headless Chromium (selenium)."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install 'onebit[dev]')")
openai = pytest.importorskip("openai", reason="the serve tests need openai (pip install 'onebit[dev]')")
pytest.importorskip("fastapi", reason="onebit serve needs fastapi (pip install 'onebit[serve]')")

import onebit  # noqa: E402
from onebit.engine import Runtime, SamplingParams, default_model_path  # noqa: E402
from serve_util import start_server, stop_server  # noqa: E402

KEY = "test-key-123"
MSGS = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--api-key", KEY, "--parallel", "4", "--max-queue", "16")
    yield url
    assert proc.poll() is None, "the server died during the tests"
    stop_server(proc)


@pytest.fixture(scope="module")
def model():
    return onebit.load(default_model_path())


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _solo(model, ids, max_tokens, **kw) -> list[int]:
    """The engine's answer with nothing beside it (in this process)."""
    eng = model.batch(slots=1)
    return eng.generate([ids], SamplingParams(max_tokens=max_tokens, **kw))[0]


def _headers(**extra):
    return {"Authorization": f"Bearer {KEY}", **extra}


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers=_headers()).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# -- the openai client --------------------------------------------------------------------------
def test_chat_stream_and_not(client, model):
    want = model.decode(_solo(model, model.chat_ids(MSGS), 40, temperature=0))
    r = client.chat.completions.create(model="onebit-default", messages=MSGS, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(model.chat_ids(MSGS))
    assert r.choices[0].finish_reason in ("stop", "length")
    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(messages=MSGS, model="onebit-default", max_tokens=40,
                                                temperature=0, stream=True):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == want and finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens


def test_completions_stop_and_seed(client, model):
    ids = model.encode("Once upon a time")
    full = model.decode(_solo(model, ids, 60, temperature=0, ignore_eos=True))
    r = client.completions.create(model="onebit-default", prompt="Once upon a time", max_tokens=60,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == full and r.choices[0].finish_reason == "length"
    stop = full[10:14]
    r = client.completions.create(model="onebit-default", prompt="Once upon a time", max_tokens=60,
                                  temperature=0, stop=[stop, "never-there"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="onebit-default", prompt="Once upon a time", max_tokens=60, temperature=0, stop=stop,
        stream=True, extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == full[:full.find(stop)]
    a, b = (client.completions.create(model="onebit-default", prompt="The sea", max_tokens=20,
                                      temperature=1.0, seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_logprobs_chat_and_echo(client, model):
    r = client.chat.completions.create(model="onebit-default", messages=MSGS, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == t.top_logprobs[0].logprob <= 0  # greedy: the top
    # lm-eval's local-completions: token ids, echo, max_tokens 1, logprobs 1
    ids = model.encode("The old man and the sea")
    r = client.completions.create(model="onebit-default", prompt=ids, max_tokens=1, temperature=0,
                                  echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    assert r.choices[0].text.startswith(model.decode(ids))
    rt = Runtime(default_model_path(), batch_invariant=True)
    rt.reset(64)
    logits = rt.forward(ids, 0, last_only=False).astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = [logits[i, ids[i + 1]] - lse[i] for i in range(len(ids) - 1)]
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, atol=1e-9, rtol=0)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    r0 = client.completions.create(model="onebit-default", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r0.choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    # a batch of token lists (lm-eval sends its requests so): one choice per prompt, in order
    other = model.encode("Once upon a time")
    rb = client.completions.create(model="onebit-default", prompt=[other, ids], max_tokens=1,
                                   temperature=0, echo=True, logprobs=1)
    assert [c.index for c in rb.choices] == [0, 1]
    assert rb.choices[1].logprobs.token_logprobs == lp.token_logprobs
    assert len(rb.choices[0].logprobs.token_logprobs) == len(other) + 1


def test_models_tokenize_metrics_page(server, model):
    h = _headers()
    assert httpx.get(server + "/v1/models", headers=h).json()["data"][0]["id"] == "onebit-default"
    toks = httpx.post(server + "/tokenize", headers=h, json={"prompt": "Hello there"}).json()["tokens"]
    assert toks == model.encode("Hello there")
    assert httpx.post(server + "/detokenize", headers=h, json={"tokens": toks}).json()["content"] == "Hello there"
    m = httpx.get(server + "/metrics", headers=h)
    assert m.status_code == 200
    for name in ("onebit_requests_total", "onebit_queue_depth", "onebit_tokens_per_second",
                 "onebit_time_to_first_token_seconds_bucket"):
        assert name in m.text
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<script>")[1]


# -- plain HTTP errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,needle", [
    (b'{"messages": [', 400, "not valid JSON"),
    (b'[1, 2]', 400, ""),
    (b'{"messages": []}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', 400, "max_tokens"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "role"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}', 400, "n=1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}', 400, "gpt-9"),
    (b'{"messages": [{"role": "user", "content": "' + b"word " * 400 + b'"}]}', 400, "context"),
])
def test_chat_bad_requests(server, body, status, needle):
    r = httpx.post(server + "/v1/chat/completions", content=body,
                   headers=_headers(**{"Content-Type": "application/json"}))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] + str(err.get("param")) and err["type"] == "invalid_request_error"


def test_auth_size_and_unknown(server):
    body = {"prompt": "hi", "max_tokens": 1}
    assert httpx.post(server + "/v1/completions", json=body).status_code == 401
    r = httpx.post(server + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server + "/metrics").status_code == 401
    assert httpx.get(server + "/health").status_code == 200          # no key needed
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    r = httpx.post(server + "/v1/completions", content=big, headers=_headers(**{"Content-Type": "application/json"}))
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    r = httpx.get(server + "/v2/nothing", headers=_headers())
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(server + "/v1/completions", json={"prompt": [0, 99999]}, headers=_headers())
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]


# -- abuse: everything at once, bounded, loopback ----------------------------------------------------
def test_abuse(server, model):
    """16 streaming clients + malformed bodies + clients that disconnect mid-stream + a burst that
    over-fills the queue, at once: the server stays up, every accepted request completes, the
    temperature-0 streams equal the solo answers, the burst's rejections are 503 + Retry-After,
    and the disconnected requests end "cancelled" (their slots freed)."""
    prompts = ["Once upon a time", "The sea was", "He said that", "In the morning"]
    solo = {p: model.decode(_solo(model, model.encode(p), 48, temperature=0, ignore_eos=True)) for p in prompts}
    cancelled0 = _metric(server, 'onebit_requests_total{finish_reason="cancelled"}')
    results, errors, started = {}, [], threading.Barrier(16 + 4 + 1, timeout=60)

    def streamer(i):
        body = {"prompt": prompts[i % 4], "max_tokens": 48, "temperature": 0, "stream": True, "ignore_eos": True}
        text = ""
        with httpx.stream("POST", server + "/v1/completions", json=body, headers=_headers(), timeout=120) as r:
            started.wait()
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    import json
                    for ch in json.loads(line[6:])["choices"]:
                        text += ch["text"]
        results[i] = text

    def disconnecter(i):
        body = {"prompt": "The sea", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server + "/v1/completions", json=body, headers=_headers(), timeout=120) as r:
            started.wait()
            for n, _ in enumerate(r.iter_lines()):
                if n >= 2:
                    break  # leaves mid-stream: the connection closes

    def guard(fn, i):
        try:
            fn(i)
        except Exception as e:  # collected: the assertion below names it
            errors.append(f"{fn.__name__}[{i}]: {type(e).__name__}: {e}")

    ts = [threading.Thread(target=guard, args=(streamer, i)) for i in range(16)]
    ts += [threading.Thread(target=guard, args=(disconnecter, i)) for i in range(4)]
    for t in ts:
        t.start()
    burst = []

    def one(i):
        r = httpx.post(server + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0},
                       headers=_headers(), timeout=120)
        burst.append((r.status_code, r.headers.get("retry-after"), r.json()))

    bt = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    started.wait()  # all 20 streams accepted: 4 slots busy, the 16-deep queue full. The burst goes
    for t in bt:    # first (on a fast machine the streams drain within a second), then the junk
        t.start()
    junk = [b"{", b"\x00\xff" * 100, b'{"prompt": {"a": 1}}', b'{"prompt": "x", "max_tokens": 1e99}',
            b'{"prompt": "x", "logprobs": 99}', b'{"prompt": "x", "stop": [' + b'"a",' * 40 + b'"b"]}',
            b"[" * 5000 + b"]" * 5000]
    for body in junk:
        r = httpx.post(server + "/v1/completions", content=body, headers=_headers(), timeout=30)
        assert r.status_code in (400, 413) and "error" in r.json(), (body[:30], r.status_code, r.text[:200])
    for t in bt + ts:
        t.join(120)
    assert not errors, errors
    assert all(results[i] == solo[prompts[i % 4]] for i in range(16))
    codes = [c for c, _, _ in burst]
    assert set(codes) <= {200, 503} and codes.count(503) > 0, codes
    assert all(ra == "1" and body["error"]["code"] == "overloaded" for c, ra, body in burst if c == 503)
    assert all(len(body["choices"]) == 1 for c, _, body in burst if c == 200)
    deadline = time.time() + 5  # a step's last answers leave their slots just after they are sent
    while (health := httpx.get(server + "/health").json())["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert health["status"] == "ok" and health["active"] == 0 and health["queue_depth"] == 0
    assert _metric(server, 'onebit_requests_total{finish_reason="cancelled"}') - cancelled0 >= 4


# -- the web page in a real browser ----------------------------------------------------------------
def _chromium():
    for b, d in (("chromium", "chromedriver"), ("chromium-browser", "chromedriver")):
        if shutil.which(b) and shutil.which(d):
            return shutil.which(b), shutil.which(d)
    return None


def test_chat_page_in_headless_chromium(server):
    selenium = pytest.importorskip("selenium", reason="the page test needs selenium (pip install 'onebit[dev]')")
    found = _chromium()
    if found is None:
        pytest.skip("chromium + chromedriver are not installed (Debian: apt-get install chromium "
                    "chromium-driver; scripts/test.sh installs them in CI)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(found[1]), options=opts)
    try:
        drv.get(server + "/")
        drv.find_element(By.ID, "key").send_keys(KEY)
        wait = WebDriverWait(drv, 60)

        def say(text):
            box = drv.find_element(By.ID, "input")
            box.send_keys(text)
            drv.find_element(By.ID, "send").click()
            return wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
                              if d.find_elements(By.CSS_SELECTOR, ".msg.assistant") else False)

        drv.execute_script("window.onebitExtra = {max_tokens: 40, ignore_eos: true}")  # never empty
        first = say("Hello, who are you?")
        wait.until(lambda d: first.get_attribute("data-state") == "done")
        assert first.text.strip() and "tok/s" in drv.find_element(By.ID, "stats").text
        # multi-turn: the second request carries the first exchange
        # press stop as soon as the second answer shows its first text (a DOM observer: the tiny
        # model would finish before a round trip of the driver)
        cancelled0 = _metric(server, 'onebit_requests_total{finish_reason="cancelled"}')
        drv.execute_script("""
            window.onebitExtra = {max_tokens: 240, ignore_eos: true};
            const log = document.getElementById('log');
            const obs = new MutationObserver(() => {
              const b = log.lastElementChild;
              if (b && b.classList.contains('assistant') && b.dataset.state === 'streaming' && b.textContent) {
                obs.disconnect();
                document.getElementById('stop').click();
              }
            });
            obs.observe(log, {subtree: true, childList: true, characterData: true});""")
        second = say("And then?")
        wait.until(lambda d: second.get_attribute("data-state") in ("stopped", "done"))
        assert second.get_attribute("data-state") == "stopped" and second.text
        assert drv.execute_script("return messages.length") == 4  # the stopped reply is kept
        deadline = time.time() + 10  # the server saw the disconnect: the request ended "cancelled"
        while _metric(server, 'onebit_requests_total{finish_reason="cancelled"}') == cancelled0:
            assert time.time() < deadline, "the stopped request was not cancelled on the server"
            time.sleep(0.1)
    finally:
        drv.quit()


def test_bench_serve_reads_sse_lines_at_newlines_only():
    """`onebit bench serve` splits llama-server's SSE stream at "\\n" only: its JSON strings carry
    U+2028 / U+0085 unescaped, where httpx's iter_lines() would cut a line (the benchmark died
    with a JSONDecodeError at 16 streams on random weights)."""
    import json as json_

    from onebit.benchmarks.serve import sse_lines

    events = [{"choices": [{"text": "a\u2028b\x85c\u2029d\x1ce"}]}, {"choices": [{"text": "é✓"}]}]
    data = "".join(f"data: {json_.dumps(e, ensure_ascii=False)}\r\n\n" for e in events) + "data: [DONE]"
    raw = data.encode()

    class Response:
        def iter_bytes(self):  # cut anywhere, also inside a UTF-8 sequence
            for i in range(0, len(raw), 5):
                yield raw[i:i + 5]

    lines = [x for x in sse_lines(Response()) if x]
    assert [json_.loads(x[6:]) for x in lines[:2]] == events and lines[2] == "data: [DONE]"
