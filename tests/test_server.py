import contextlib
import gc
import json
import socket
import threading
import time
import types

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from nanosae.generate import generate, generate_stream
from nanosae.runtime import Steer, Tracker, generate_tracked, logit_effects, residual_directions
from nanosae.server import Message, ServedModel, TurnLock, create_app, render_chat

LABELS = {5: "<img src=x onerror=alert(1)> five", 12: "twelve"}


@contextlib.contextmanager
def live(served):
    """A live uvicorn on a free port, in a thread: its base url."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(d4, hand_sae):
    """(base url, served model) of a live server shared by the tests of this module."""
    model, tok, _ = d4
    sae, _ = hand_sae
    served = ServedModel(model, tok, sae, labels=LABELS, temperature=0.0, max_tokens=16)
    with live(served) as url:
        yield url, served


def events(url, body, timeout=60):
    """The SSE events of one /chat/completions request, each with the time it arrived."""
    out = []
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                out.append((json.loads(line[6:]), time.time()))
    return out


def test_pages_health_and_stats(server):
    url, served = server
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "<title>nanosae chat</title>" in page.text
    assert "<script src" not in page.text and "http" not in page.text  # self-contained, no CDN
    assert "innerHTML" not in page.text
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["ready"] is True
    assert health["site"] == "blocks.2.resid_post" and health["d_sae"] == 256
    stats = httpx.get(f"{url}/stats").json()
    assert {"total_workers", "available_workers", "busy_workers", "workers"} <= set(stats)
    assert httpx.get(f"{url}/api/labels").json() == {str(k): v for k, v in LABELS.items()}


def test_stream_has_chat_web_shape_and_the_model_s_tokens(server, d4, hand_sae):
    url, served = server
    model, tok, _ = d4
    sae, _ = hand_sae
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    messages.append({"role": "user", "content": "What is Python?"})
    got = [e for e, _ in events(url, {"messages": messages, "temperature": 0, "max_tokens": 12, "top_n": 5})]
    assert got[-1]["done"] is True and "token" not in got[-1]
    tokens = got[:-1]
    assert tokens and all(set(e) >= {"token", "gpu", "ids", "latents"} and e["gpu"] == 0 for e in tokens)
    prompt = render_chat(tok, [Message(**m) for m in messages])
    sp = tok.encode_special
    assert prompt == [tok.bos_token_id, sp("<|user_start|>"), *tok.encode("Hi"), sp("<|user_end|>"),
                      sp("<|assistant_start|>"), *tok.encode("Hello!"), sp("<|assistant_end|>"),
                      sp("<|user_start|>"), *tok.encode("What is Python?"), sp("<|user_end|>"),
                      sp("<|assistant_start|>")]  # fmt: skip
    expected = generate(model, prompt, 12, stop_tokens=tok.stop_token_ids())
    shown = [t for t in expected if t not in tok.special_ids()]
    assert [i for e in tokens for i in e["ids"]] == shown
    assert "".join(e["token"] for e in tokens) == tok.decode(shown)
    # each token's latents are what the tracker reads at that position, in the same run
    reference = [r for _, r in generate_tracked(model, sae, prompt, 12, stop_tokens=tok.stop_token_ids(),
                                                tracker=Tracker(sae, 5))]  # fmt: skip
    lat = [lst for e in tokens for lst in e["latents"]]
    for lst, r in zip(lat, reference):
        assert [i for i, _ in lst] == r.ids and len(lst) == 5
        assert [v for _, v in lst] == pytest.approx(r.values, abs=1e-4)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": []}, "at least one message"),
        ({"messages": [{"role": "user", "content": "x"}] * 501}, "too many messages"),
        ({"messages": [{"role": "user", "content": "x" * 8001}]}, "message 0 is too long"),
        ({"messages": [{"role": "user", "content": "x" * 7000}] * 5}, "conversation too long"),
        ({"messages": [{"role": "system", "content": "x"}]}, "role must be"),
        ({"messages": [{"role": "user", "content": ""}]}, "content is empty"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature must be between"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature must be between"),
        ({"messages": [{"role": "user", "content": "x"}], "top_k": 201}, "top_k must be between"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens must be between"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4097}, "max_tokens must be between"),
        ({"messages": [{"role": "user", "content": "x"}], "steer": [{"latent": 256, "add": 1}]}, "does not exist"),
        ({"messages": [{"role": "user", "content": "x"}], "steer": [{"latent": 1, "add": 1, "clamp": 0}]}, "exactly"),
        ({"messages": [{"role": "user", "content": "x"}], "steer": [{"latent": 1}]}, "exactly one of"),
        ({"messages": [{"role": "user", "content": "x"}], "steer": [{"latent": 1, "add": 1e9}]}, "finite number"),
        ({"messages": [{"role": "user", "content": "x"}], "top_n": 0}, "top_n must be between"),
        ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed must be between"),
        ({"messages": [{"role": "user", "content": "😀 " * 2600}]}, "does not fit the model's context"),
        ({"messages": "hello"}, "bad request: messages"),
        ({"temperature": 1}, "bad request: messages"),
    ],
)
def test_bad_requests_get_clear_400s(server, body, message):
    url, _ = server
    r = httpx.post(f"{url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    assert message in r.json()["detail"]


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "body, named",
    [
        ({"messages": HI, "max_token": 5, "stear": [{"latent": 1, "add": 4}]}, ["max_token", "stear"]),
        ({"messages": HI, "steer": [{"latent": 1, "add": 4, "scale": 100}]}, ["steer[0].scale"]),
        ({"messages": [*HI, {"role": "user", "content": "x", "name": "bob"}]}, ["messages[1].name"]),
        ({"messages": HI, "stream": False}, ["stream"]),
    ],
)
def test_unknown_fields_are_refused_by_name(server, body, named):
    url, _ = server
    r = httpx.post(f"{url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert all(n in detail for n in named) and "\n" not in detail, detail


@pytest.mark.parametrize(
    "body",
    [  # what nanochat's chat_web page sent (nanochat/ui.html, 3a5e0bc of 2025-10-13 and later commits)
        {"messages": HI, "stream": True, "temperature": 0.8, "max_tokens": 3},
        {"messages": HI, "temperature": 0.8, "max_tokens": 3},
        {"messages": HI, "temperature": 0.8, "top_k": 50, "max_tokens": 3},
        {"messages": HI, "temperature": None, "top_k": None, "max_tokens": None},  # chat_web's optional fields
    ],
)
def test_every_field_chat_web_clients_send_is_accepted(server, body):
    url, _ = server
    got = [e for e, _ in events(url, body)]
    assert got[-1]["done"] is True and all("error" not in e for e in got)


def _suspended_generations() -> int:
    """Generators of a generation (nanosae.runtime / nanosae.generate) still holding a frame, so a KV cache."""
    codes = {generate_tracked.__code__, generate_stream.__code__}
    return sum(1 for o in gc.get_objects() if type(o) is types.GeneratorType and o.gi_code in codes and o.gi_frame)


def test_a_client_that_goes_away_frees_its_generation_at_once(d4, hand_sae, monkeypatch):
    model, tok, _ = d4
    sae, _ = hand_sae
    monkeypatch.setattr(tok, "stop_token_ids", lambda: [])  # only the disconnect can end this generation early
    served = ServedModel(model, tok, sae)
    body = json.dumps({"messages": HI, "max_tokens": 4096, "temperature": 1.0, "seed": 0}).encode()
    room = model.cos.size(1) - len(render_chat(tok, [Message(**m) for m in HI]))
    gc.disable()  # freed at once means without the cycle collector's help
    try:
        before = _suspended_generations()
        with live(served) as url:
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
                head = "POST /chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                seen = b""
                while seen.count(b"data: ") < 2:
                    seen += client.recv(4096)
                assert httpx.get(f"{url}/stats").json()["active_requests"] == 1
            deadline, stats = time.time() + 60, {}
            while time.time() < deadline:
                stats = httpx.get(f"{url}/stats").json()
                if stats["active_requests"] == 0 and _suspended_generations() == before:
                    break
                time.sleep(0.05)
            assert stats["active_requests"] == 0 and stats["requests"] == 1
            assert _suspended_generations() == before  # the generator and with it the KV cache are gone
            assert 2 <= stats["tokens_generated"] < min(4096, room)  # it stopped early, it did not run out
    finally:
        gc.enable()


def test_non_json_body_is_a_400(server):
    url, _ = server
    r = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith("bad request")


def test_concurrent_clients_keep_their_own_steering(server, d4, hand_sae):
    url, served = server
    model, tok, _ = d4
    sae, _ = hand_sae
    messages = [{"role": "user", "content": "Write a short poem."}]
    bodies = {
        "a": {"messages": messages, "temperature": 0, "max_tokens": 24, "steer": [{"latent": 5, "add": 4}]},
        "b": {"messages": messages, "temperature": 0, "max_tokens": 24, "steer": [{"latent": 12, "clamp": 9}]},
        "c": {"messages": messages, "temperature": 0, "max_tokens": 24},
    }
    prompt = [tok.bos_token_id] + [tok.encode_special("<|user_start|>"), *tok.encode("Write a short poem.")]
    prompt += [tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")]
    stop, special = tok.stop_token_ids(), tok.special_ids()
    steers = {"a": [Steer(5, add=4)], "b": [Steer(12, clamp=9)], "c": []}
    expected = {
        k: [t for t, _ in generate_tracked(model, sae, prompt, 24, stop_tokens=stop, steers=s) if t not in special]
        for k, s in steers.items()
    }
    assert len({tuple(v) for v in expected.values()}) == 3  # the three steerings really differ
    results = {}

    def client(name):
        results[name] = events(url, bodies[name])

    threads = [threading.Thread(target=client, args=(k,)) for k in bodies]
    with served.lock:  # hold the model until all three requests queue for their first step
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while served.lock.waiting() < 3 and time.time() < deadline:
            time.sleep(0.01)
        assert served.lock.waiting() == 3
    for t in threads:
        t.join(120)
    assert set(results) == set(bodies)
    for k, evs in results.items():
        assert [i for e, _ in evs[:-1] for i in e["ids"]] == expected[k], k
        assert evs[-1][0]["steer"] == [str(s) for s in steers[k]]
    spans = [(evs[0][1], evs[-1][1]) for evs in results.values()]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # the three streams took turns


def test_turn_lock_serves_in_arrival_order():
    lock, order = TurnLock(), []

    def take(i):
        with lock:
            order.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    with lock:
        assert lock.locked() and lock.waiting() == 0
        for n, t in enumerate(threads, 1):
            t.start()
            while lock.waiting() < n:  # each queues before the next starts
                time.sleep(0.001)
    for t in threads:
        t.join(10)
    assert order == list(range(6)) and not lock.locked()


def test_latent_info_and_search(server, d4, hand_sae):
    url, served = server
    model, tok, _ = d4
    sae, _ = hand_sae
    effects = logit_effects(model, residual_directions(model, sae))
    info = httpx.get(f"{url}/api/latents/5").json()
    assert info["label"] == LABELS[5] and info["unit"] is None and info["dashboard"] is None
    assert [t for t, _ in info["promoted"]] == [tok.id_to_token(i) for i in effects[5].topk(10).indices.tolist()]
    assert [t for t, _ in info["suppressed"]] == [
        tok.id_to_token(i) for i in effects[5].topk(10, largest=False).indices.tolist()
    ]
    assert httpx.get(f"{url}/api/latents/256").status_code == 404
    assert httpx.get(f"{url}/api/search", params={"q": "12"}).json()["results"][0] == {
        "id": 12,
        "label": "twelve",
        "match": "id",
    }
    assert [r["id"] for r in httpx.get(f"{url}/api/search", params={"q": "FIVE"}).json()["results"]] == [5]
    # by token: the latents whose directions promote that token most
    target = effects[7].argmax().item()
    word = tok.id_to_token(target)
    found = httpx.get(f"{url}/api/search", params={"q": word}).json()["results"]
    same = [t for t in range(model.config.vocab_size) if tok.id_to_token(t).strip().lower() == word.strip().lower()]
    best = effects[:, same].max(dim=1).values.topk(3).indices.tolist()
    assert [r["id"] for r in found[:3]] == best
    assert httpx.get(f"{url}/api/search", params={"q": "zzzz-nothing"}).json()["results"] == []


def test_dashboard_links_and_units(d4, hand_sae, tmp_path):
    model, tok, _ = d4
    sae, _ = hand_sae
    (tmp_path / "index.html").write_text("<title>dash</title>")
    units = torch.arange(256, dtype=torch.float32)
    client = TestClient(create_app(ServedModel(model, tok, sae, units=units, dashboard=tmp_path)))
    info = client.get("/api/latents/9").json()
    assert info["unit"] == 9.0 and info["dashboard"].startswith("/dashboard/")
    assert client.get(info["dashboard"].split("#")[0]).text == "<title>dash</title>"
    assert client.get("/api/info").json()["steer_unit"].startswith("max activation")


def test_browser_chat_latents_and_steering(server, browser, d4, hand_sae):
    url, _ = server
    model, tok, _ = d4
    sae, _ = hand_sae
    prompt = render_chat(tok, [Message(role="user", content="Hello there")])
    stop, special = tok.stop_token_ids(), tok.special_ids()

    def reply(steers):
        out = list(generate_tracked(model, sae, prompt, 12, stop_tokens=stop, steers=steers))
        return tok.decode([t for t, _ in out if t not in special]), [r for t, r in out if t not in special]

    plain_text, plain_recs = reply([])
    steered_text, _ = reply([Steer(5, add=4)])
    assert plain_text != steered_text

    page = browser.new_page()
    problems, dialogs = [], []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(url)
        page.wait_for_function("document.getElementById('info').textContent.includes('256 latents')")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        page.fill("#input", "Hello there")
        page.click("#send")
        page.wait_for_selector(".msg.assistant.done", timeout=30_000)
        reply_box = page.locator(".msg.assistant .body").last
        assert reply_box.text_content() == plain_text
        chips = page.locator(".msg.assistant .tok")
        assert chips.count() >= 2
        # a token's latents, largest first, as the tracker read them
        chips.first.click()
        rows = page.locator("#token-latents li[data-latent]")
        assert rows.count() == 8
        assert [int(rows.nth(i).get_attribute("data-latent")) for i in range(8)] == plain_recs[0].ids
        rows.first.click()
        page.wait_for_selector("#latent-detail:not([hidden])")
        assert page.text_content("#latent-title") == f"latent #{plain_recs[0].ids[0]}"
        assert page.locator("#latent-promoted span").count() == 10
        # steer latent 5 and generate the reply again: the text changes to the steered model's
        page.fill("#steer-latent", "5")
        page.select_option("#steer-mode", "add")
        page.fill("#steer-value", "4")
        page.click("#steer-apply")
        assert page.locator("#steer-list li").count() == 1
        page.click("#regenerate")
        page.wait_for_function(
            "(t) => { const m = document.querySelectorAll('.msg.assistant');"
            " return m.length === 1 && m[0].classList.contains('done') && m[0].querySelector('.body').textContent === t; }",
            arg=steered_text,
            timeout=30_000,
        )
        assert "steering 5:+4" in page.text_content(".msg.assistant .note")
        # search by label: the label holds markup, which must show as text
        page.fill("#search", "five")
        page.click("#search-form button")
        page.wait_for_selector("#search-results li[data-latent='5']")
        assert page.text_content("#search-results li[data-latent='5'] .label") == LABELS[5]
        assert page.locator("img").count() == 0 and not dialogs
        assert not problems, problems
    finally:
        page.close()
