"""rm-serve as a real process on loopback, driven by a real HTTP client (aiohttp) with bounded loops:
scores equal score_texts, 64 concurrent one-text clients share forwards, 401 without the key, bad bodies
get 4xx while other clients are served, and SIGTERM lets queued requests finish."""

from __future__ import annotations

import asyncio
import json
import re
import signal

import pytest
import torch
from helpers import AUTH, Server
from hypothesis import given, settings
from hypothesis import strategies as st

from rm_trainer import load_reward_model

pytest.importorskip("aiohttp")
import aiohttp  # noqa: E402


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


async def post(session, url: str, body, headers=AUTH) -> tuple[int, dict]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with session.post(url, data=data, headers=headers) as r:
        return r.status, await r.json(content_type=None)


@pytest.fixture(scope="module")
def served(run):
    out = run("torchrun_z3_w2")
    server = Server(out / "reward.pt", "--max_wait_ms", "200", "--max_texts", "64", "--max_chars", "2000",
                    "--max_body_bytes", "100000")
    yield out, server
    server.stop()


@pytest.fixture(scope="module")
def texts(demo_assets):
    rows = [json.loads(line) for line in open(demo_assets["test"])]
    return rows


@pytest.mark.slow
def test_served_scores_equal_score_texts_and_one_text_clients_share_forwards(served, texts):
    out, server = served
    rm = load_reward_model(out / "reward.pt")
    queries = [r["prompt"] + r["chosen"] for r in texts[:16]]
    pairs = [(r["prompt"], r["rejected"]) for r in texts[:8]]

    async def scenario():
        async with aiohttp.ClientSession() as s:
            # one request alone in its batch: exactly score_texts' bits
            code, got = await post(s, server.url + "/get_reward", {"query": queries, "labels": ["x"] * 16})
            assert code == 200 and got["rewards"] == got["scores"]
            assert torch.equal(torch.tensor(got["rewards"]), rm.score_texts(queries))
            code, got = await post(s, server.url + "/score", {"rows": [{"prompt": p, "response": r} for p, r in pairs]
                                                             + [{"prompt": pairs[0][0], "responses": [q for _, q in
                                                                                                      pairs[:3]]}]})
            want = rm.score_texts(pairs + [(pairs[0][0], q) for _, q in pairs[:3]])
            assert code == 200 and torch.equal(torch.tensor([x["reward"] for x in got["results"][:8]]), want[:8])
            best = got["results"][8]
            assert torch.equal(torch.tensor(best["rewards"]), want[8:]) and best["best_index"] == int(want[8:].argmax())
            # 64 clients, one text each, all at once
            _, before = await server.get("/metrics", AUTH)
            many = [texts[i % len(texts)]["prompt"] + texts[i % len(texts)]["rejected"] + " x" * (i // len(texts))
                    for i in range(64)]
            answers = await asyncio.gather(*(post(s, server.url + "/get_reward", {"query": [q]}) for q in many))
            _, after = await server.get("/metrics", AUTH)
            return answers, before, after, many

    answers, before, after, many = asyncio.run(scenario())
    want = torch.stack([rm.score_texts([q])[0] for q in many])
    got = torch.tensor([a[1]["rewards"][0] for a in answers])
    assert all(code == 200 for code, _ in answers)
    # batched with others, a text's reward agrees with its own score_texts to fp32 rounding, and is
    # the answer to that client's text (not a neighbour's)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    distinct = (want[:, None] - want[None, :]).abs() + torch.eye(64) * 1e9
    assert (got - want).abs().max() < distinct.min() / 2 or distinct.min() == 0
    forwards = metric(after, "rm_forwards_total") - metric(before, "rm_forwards_total")
    rows = metric(after, "rm_rows_total") - metric(before, "rm_rows_total")
    assert rows == 64 and 1 <= forwards < 64, forwards


@pytest.mark.slow
def test_keys_limits_and_bad_bodies_get_4xx_while_others_are_served(served, texts):
    _, server = served
    good = {"query": [texts[0]["prompt"] + texts[0]["chosen"]]}

    async def scenario():
        async with aiohttp.ClientSession() as s:
            url = server.url + "/get_reward"
            bad = [
                post(s, url, good, headers={}),                                   # no key
                post(s, url, good, headers={"Authorization": "Bearer wrong"}),    # wrong key
                post(s, url, b"{not json"),                                       # bad JSON
                post(s, url, {"queries": ["a"]}),                                 # wrong schema
                post(s, url, {"query": ["a", 3]}),                                # not a text
                post(s, url, {"query": ["a"] * 65}),                              # too many texts
                post(s, url, {"query": ["a" * 2001]}),                            # text too long
                post(s, url, {"query": ["a " * 60000]}),                          # body too big
                post(s, server.url + "/score", {"rows": [{"prompt": "p"}]}),      # no response field
            ]
            results = await asyncio.gather(*bad, *(post(s, url, good) for _ in range(8)))
            return results, await server.get("/health"), await server.get("/metrics", AUTH)

    results, health, metrics = asyncio.run(scenario())
    codes = [c for c, _ in results[:9]]
    assert codes == [401, 401, 400, 422, 422, 413, 413, 413, 422], codes
    assert "Bearer" in results[0][1]["error"] and "query[1]" in results[4][1]["error"]
    assert "--max_texts" in results[5][1]["error"] and "--max_chars" in results[6][1]["error"]
    assert "rows[0]" in results[8][1]["error"]
    assert all(c == 200 and len(b["rewards"]) == 1 for c, b in results[9:])
    assert health[0] == 200 and json.loads(health[1])["status"] == "ok"
    assert metrics[0] == 200 and 'rm_requests_total{endpoint="/get_reward",code="401"} 2' in metrics[1]
    assert re.search(r'rm_request_latency_seconds\{endpoint="/get_reward",quantile="0.99"\} \d', metrics[1])


VALID_BODIES = [("/get_reward", {"query": ["Human: hi Assistant: hello", "x"], "labels": ["a", "b"]}),
                ("/score", {"rows": [{"prompt": "Human: hi Assistant:", "response": " hello"},
                                     {"prompt": "q", "responses": ["a", ""]}, {"text": "t"}]})]
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                       max_leaves=8)


@st.composite
def mutated_bodies(draw) -> tuple[str, bytes]:
    """A valid body with bytes changed, or with one value anywhere in it replaced by any JSON value."""
    path, body = draw(st.sampled_from(VALID_BODIES))
    if draw(st.booleans()):
        data = bytearray(json.dumps(body).encode())
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos:pos + 1] = bytes([draw(st.integers(0, 255))]) if draw(st.booleans()) else b""
        return path, bytes(data)
    body = json.loads(json.dumps(body))
    node, key = body, None
    while True:  # walk down to a random value and replace it
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        if not isinstance(node[key], (dict, list)) or not node[key] or draw(st.booleans()):
            break
        node = node[key]
    node[key] = draw(JSONISH)
    return path, json.dumps(body).encode()


@pytest.mark.slow
def test_mutated_request_bodies_get_4xx_naming_the_field_and_the_server_keeps_serving(served, texts):
    """Property (hypothesis): any mutation of a valid body is answered 200, or 400/413/422 with a JSON error
    that names the body or the field (query[i], rows[i]); and every answer after it is still right."""
    out, server = served
    good = texts[0]["prompt"] + texts[0]["chosen"]
    want = load_reward_model(out / "reward.pt").score_texts([good]).tolist()
    seen: dict[int, int] = {}

    async def exchange(path: str, data: bytes):
        async with aiohttp.ClientSession() as s:
            return await post(s, server.url + path, data), await post(s, server.url + "/get_reward", {"query": [good]})

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(mutated_bodies())
    def check(case):
        (code, body), (ok_code, ok) = asyncio.run(exchange(*case))
        seen[code] = seen.get(code, 0) + 1
        assert code in (200, 400, 413, 422), (code, body)
        if code != 200:
            assert re.search(r"^(body|query|rows|labels)\b|--max_", body["error"]), body
        assert ok_code == 200 and torch.allclose(torch.tensor(ok["rewards"]), torch.tensor(want), rtol=1e-5)

    check()
    print(f"rm-serve mutated bodies by status: {seen}")
    assert seen.get(200) and (seen.get(400) or 0) + (seen.get(422) or 0) > 10, seen


@pytest.mark.slow
def test_sigterm_answers_the_queued_requests_then_exits(run, texts):
    server = Server(run("torchrun_z3_w2") / "reward.pt", "--max_wait_ms", "1500")

    async def scenario():
        async with aiohttp.ClientSession() as s:
            calls = [asyncio.ensure_future(post(s, server.url + "/get_reward", {"query": [r["prompt"] + r["chosen"]]}))
                     for r in texts[:6]]
            await asyncio.sleep(0.5)  # the requests are queued, waiting for the batch to fill
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(asyncio.gather(*calls), 60)

    answers = asyncio.run(scenario())
    try:
        code = server.proc.wait(60)  # it exits by itself once the queue is drained
    finally:
        log = server.stop()
    assert [c for c, _ in answers] == [200] * 6, log
    assert code == 0, log


@pytest.mark.slow
def test_a_group_request_shares_its_prompt_and_each_reward_is_the_responses_alone(served, texts):
    """GRPO groups as OpenRLHF and verl send them: /score with one prompt and 8 responses, and /get_reward with
    the group's 8 full texts; rm_forward_tokens_total grows by less than the sequences' tokens."""
    out, server = served
    rm = load_reward_model(out / "reward.pt")
    prompt = texts[0]["prompt"]
    group = [r[k] for r in texts[:4] for k in ("chosen", "rejected")]
    alone = {"/score": torch.cat([rm.score_texts([(prompt, x)], share_prompt="off") for x in group]),
             "/get_reward": torch.cat([rm.score_texts([prompt + x], share_prompt="off") for x in group])}

    async def scenario():
        async with aiohttp.ClientSession() as s:
            results = []
            for path, body in (("/score", {"rows": [{"prompt": prompt, "responses": group}]}),
                               ("/get_reward", {"query": [prompt + x for x in group]})):
                _, before = await server.get("/metrics", AUTH)
                code, got = await post(s, server.url + path, body)
                _, after = await server.get("/metrics", AUTH)
                assert code == 200, got
                rewards = got["results"][0]["rewards"] if path == "/score" else got["rewards"]
                grew = {m: metric(after, m) - metric(before, m) for m in ("rm_forward_tokens_total",
                                                                         "rm_sequence_tokens_total")}
                results.append((path, torch.tensor(rewards), grew))
            return results

    for path, got, grew in asyncio.run(scenario()):
        assert float((got - alone[path]).abs().max()) <= 1e-5 * float(alone[path].abs().max()), path
        assert 0 < grew["rm_forward_tokens_total"] < 0.8 * grew["rm_sequence_tokens_total"], grew
