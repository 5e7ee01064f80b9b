// The client against a scripted fetch: what it sends, how it reads answers and errors, how an abort unfolds.
// The real service's behaviour is checked by service.test.ts; these pin down the client's half on its own.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { CapabilityService, CapabilityServiceError, isCapabilityServiceError, parseRetryAfter } from "../src/index.js";

interface Sent {
  url: string;
  method: string;
  headers: Record<string, string>;
  body: unknown;
  signal: AbortSignal | undefined;
}

type Answer = (sent: Sent) => Response | Promise<Response>;

/** A fetch that records each request and answers with the next scripted answer. */
function scripted(...answers: Answer[]): { fetch: (input: string, init: RequestInit) => Promise<Response>; sent: Sent[] } {
  const sent: Sent[] = [];
  return {
    sent,
    fetch: async (input, init) => {
      const request: Sent = {
        url: input,
        method: init.method ?? "GET",
        headers: { ...(init.headers as Record<string, string>) },
        body: typeof init.body === "string" ? JSON.parse(init.body) : undefined,
        signal: init.signal ?? undefined,
      };
      sent.push(request);
      const answer = answers.shift();
      assert.ok(answer, `no answer scripted for ${request.method} ${request.url}`);
      return await answer(request);
    },
  };
}

function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });
}

const RESULT = { image: "iVBORw0KGgo=", width: 64, height: 64, format: "png", seed: 42, model: "tiny-sd15" };

/** An event stream the test writes to as it goes, which records when the client closes it. */
function liveStream(): {
  response: Response;
  send: (event: string, data: unknown) => void;
  end: () => void;
  fail: (reason: unknown) => void;
  closed: Promise<void>;
} {
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  let markClosed!: () => void;
  const closed = new Promise<void>((resolve) => {
    markClosed = resolve;
  });
  const body = new ReadableStream<Uint8Array>({
    start(c) {
      controller = c;
    },
    cancel() {
      markClosed();
    },
  });
  const encoder = new TextEncoder();
  return {
    response: new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream; charset=utf-8" } }),
    send: (event, data) => controller.enqueue(encoder.encode(`event: ${event}\r\ndata: ${JSON.stringify(data)}\r\n\r\n`)),
    end: () => {
      controller.close();
      markClosed();
    },
    // What fetch does to a body when its request is aborted.
    fail: (reason) => {
      controller.error(reason);
      markClosed();
    },
    closed,
  };
}

describe("requests", () => {
  test("textToImage posts the seed's options with the bearer token, under the base URL's path", async () => {
    const { fetch, sent } = scripted(() => json(200, RESULT));
    const service = new CapabilityService({ baseUrl: "http://service.test/prefix", token: "tok_1_x", fetch });
    const result = await service.capability("cap/1").textToImage("a cat", { width: 64, seed: 42, negativePrompt: undefined });
    assert.deepEqual(result, RESULT);
    assert.equal(sent.length, 1);
    const [request] = sent;
    assert.equal(request?.url, "http://service.test/prefix/v1/capabilities/cap%2F1/text-to-image");
    assert.equal(request?.method, "POST");
    assert.equal(request?.headers["Authorization"], "Bearer tok_1_x");
    assert.equal(request?.headers["Content-Type"], "application/json");
    assert.deepEqual(request?.body, { prompt: "a cat", options: { width: 64, seed: 42 } });
  });

  test("without options textToImage sends empty options", async () => {
    const { fetch, sent } = scripted(() => json(200, RESULT));
    await new CapabilityService({ baseUrl: "http://service.test/", fetch }).capability("c").textToImage("a cat");
    assert.deepEqual(sent[0]?.body, { prompt: "a cat", options: {} });
    assert.equal(sent[0]?.headers["Authorization"], undefined);
  });

  test("audit sends only the filters given", async () => {
    const { fetch, sent } = scripted(() => json(200, { entries: [] }));
    await new CapabilityService({ baseUrl: "http://service.test", fetch }).audit({ capability: "c 1", outcome: "ok", limit: 5 });
    assert.equal(sent[0]?.url, "http://service.test/v1/audit?capability=c+1&outcome=ok&limit=5");
  });

  test("delegate, give and revoke use the documented paths and bodies", async () => {
    const child = { id: "cap_child", type: "diffusers.generate", owner: "alice", params: {}, parent_id: "cap_parent",
      created_at: 1, expires_at: null, revoked: false };
    const { fetch, sent } = scripted(
      () => json(201, child),
      () => json(200, { ...child, owner: "bob" }),
      () => json(200, { revoked: ["cap_parent", "cap_child"] }),
    );
    const parent = new CapabilityService({ baseUrl: "http://service.test", fetch }).capability("cap_parent");
    const delegated = await parent.delegate({ max_width: 128 });
    assert.equal(delegated.id, "cap_child");
    assert.equal((await delegated.give("bob")).owner, "bob");
    assert.deepEqual(await parent.revoke(), ["cap_parent", "cap_child"]);
    assert.deepEqual(sent.map((request) => [request.method, request.url, request.body]), [
      ["POST", "http://service.test/v1/capabilities/cap_parent/delegate", { max_width: 128 }],
      ["POST", "http://service.test/v1/capabilities/cap_child/give", { to: "bob" }],
      ["POST", "http://service.test/v1/capabilities/cap_parent/revoke", undefined],
    ]);
  });

  test("a seed a JavaScript number cannot hold exactly is refused before anything is sent", async () => {
    const { fetch, sent } = scripted();
    const genCap = new CapabilityService({ baseUrl: "http://service.test", fetch }).capability("c");
    await assert.rejects(genCap.textToImage("a cat", { seed: 2 ** 60 }), (error: unknown) =>
      isCapabilityServiceError(error, "invalid_option") && error.option === "seed" && error.status === 400);
    assert.equal(sent.length, 0);
  });
});

describe("errors", () => {
  test("the service's error body becomes a CapabilityServiceError with its code, option and Retry-After", async () => {
    const { fetch } = scripted(
      () => json(400, { status: 400, code: "invalid_option", message: "width=100 is invalid", option: "width" }),
      () => json(429, { status: 429, code: "concurrency_limit", message: "1 already running" }, { "Retry-After": "3" }),
    );
    const genCap = new CapabilityService({ baseUrl: "http://service.test", fetch }).capability("c");
    await assert.rejects(genCap.textToImage("a cat", { width: 100 }), (error: unknown) => {
      assert.ok(error instanceof CapabilityServiceError);
      assert.deepEqual([error.status, error.code, error.option, error.message, error.retryAfterS],
        [400, "invalid_option", "width", "width=100 is invalid", undefined]);
      return true;
    });
    await assert.rejects(genCap.textToImage("a cat"), (error: unknown) =>
      isCapabilityServiceError(error, "concurrency_limit") && error.retryAfterS === 3 && error.status === 429);
  });

  test("an answer that is not the service's is unexpected_response, with the status and an excerpt", async () => {
    const { fetch } = scripted(() => new Response("<html>502 Bad Gateway</html>", { status: 502, statusText: "Bad Gateway" }));
    await assert.rejects(new CapabilityService({ baseUrl: "http://service.test", fetch }).list(), (error: unknown) =>
      isCapabilityServiceError(error, "unexpected_response") && error.status === 502 && error.message.includes("502 Bad Gateway"));
  });

  test("Retry-After is read as seconds or as an HTTP date", () => {
    assert.equal(parseRetryAfter("7"), 7);
    assert.equal(parseRetryAfter("Wed, 21 Oct 2015 07:28:10 GMT", Date.parse("Wed, 21 Oct 2015 07:28:00 GMT")), 10);
    assert.equal(parseRetryAfter("soon"), undefined);
    assert.equal(parseRetryAfter(null), undefined);
  });
});

describe("streaming", () => {
  test("progress arrives in order before the result, after started", async () => {
    const stream = liveStream();
    const { fetch, sent } = scripted(() => stream.response);
    const genCap = new CapabilityService({ baseUrl: "http://service.test", fetch }).capability("c");
    const seen: string[] = [];
    const pending = genCap.textToImage("a cat", {
      seed: 42,
      onStarted: (started) => seen.push(`started ${started.generation}`),
      onProgress: (progress) => seen.push(`${progress.stepsDone}/${progress.steps}`),
    });
    stream.send("started", { generation: "gen_1", model: "tiny-sd15" });
    for (let step = 1; step <= 3; step += 1) {
      stream.send("progress", { stepsDone: step, steps: 3, elapsedS: step / 10 });
    }
    stream.send("result", RESULT);
    stream.end();
    assert.deepEqual(await pending, RESULT);
    assert.deepEqual(seen, ["started gen_1", "1/3", "2/3", "3/3"]);
    assert.equal(sent[0]?.url, "http://service.test/v1/capabilities/c/text-to-image/stream");
    assert.equal(sent[0]?.headers["Accept"], "text/event-stream");
    assert.deepEqual(sent[0]?.body, { prompt: "a cat", options: { seed: 42 } });
  });

  test("an error event rejects with its code", async () => {
    const stream = liveStream();
    const { fetch } = scripted(() => stream.response);
    const pending = new CapabilityService({ baseUrl: "http://service.test", fetch }).capability("c")
      .textToImage("a cat", { onProgress: () => undefined });
    stream.send("error", { status: 502, code: "generation_failed", message: "the model failed" });
    stream.end();
    await assert.rejects(pending, (error: unknown) =>
      isCapabilityServiceError(error, "generation_failed") && error.status === 502);
  });

  test("a stream that ends without its result rejects as unexpected_response", async () => {
    const stream = liveStream();
    const { fetch } = scripted(() => stream.response);
    const pending = new CapabilityService({ baseUrl: "http://service.test", fetch }).capability("c")
      .textToImage("a cat", { stream: true });
    stream.send("started", { generation: "gen_1", model: "tiny-sd15" });
    stream.end();
    await assert.rejects(pending, (error: unknown) => isCapabilityServiceError(error, "unexpected_response"));
  });

  test("an abort sends DELETE for the generation and settles once the stream confirms", async () => {
    const stream = liveStream();
    const { fetch, sent } = scripted(() => stream.response, () => json(202, { cancelled: "gen_1" }));
    const controller = new AbortController();
    let steps = 0;
    const pending = new CapabilityService({ baseUrl: "http://service.test", fetch }).capability("c")
      .textToImage("a cat", { signal: controller.signal, onProgress: () => (steps += 1) });
    stream.send("started", { generation: "gen_1", model: "tiny-sd15" });
    stream.send("progress", { stepsDone: 1, steps: 50, elapsedS: 0.1 });
    await new Promise((resolve) => setTimeout(resolve, 20));
    controller.abort();
    stream.send("progress", { stepsDone: 2, steps: 50, elapsedS: 0.2 }); // in flight when the abort came
    let settled = false;
    void pending.catch(() => undefined).finally(() => (settled = true));
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(settled, false, "settled before the service confirmed the cancellation");
    assert.deepEqual([sent[1]?.method, sent[1]?.url], ["DELETE", "http://service.test/v1/generations/gen_1"]);
    stream.send("error", { status: 409, code: "cancelled", message: "cancelled by the caller after step 2" });
    await assert.rejects(pending, (error: unknown) => error instanceof Error && error.name === "AbortError");
    assert.equal(steps, 1, "a progress report after the abort reached the callback");
    await stream.closed;
  });

  test("an abort before the generation's id is known cancels it as soon as the id arrives", async () => {
    const stream = liveStream();
    const { fetch, sent } = scripted(() => stream.response, () => json(202, { cancelled: "gen_2" }));
    const controller = new AbortController();
    const reason = new Error("user left");
    const pending = new CapabilityService({ baseUrl: "http://service.test", fetch }).capability("c")
      .textToImage("a cat", { signal: controller.signal });
    controller.abort(reason);
    stream.send("started", { generation: "gen_2", model: "tiny-sd15" });
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.deepEqual([sent[1]?.method, sent[1]?.url], ["DELETE", "http://service.test/v1/generations/gen_2"]);
    stream.send("error", { status: 409, code: "cancelled", message: "cancelled" });
    await assert.rejects(pending, (error: unknown) => error === reason);
  });

  for (const [why, deleteAnswer, cancelWaitMs] of [
    ["the service does not confirm within cancelWaitMs", { status: 202, code: "", message: "" }, 50],
    ["the DELETE is refused (another instance)", { status: 404, code: "unknown_generation", message: "not here" }, 60_000],
  ] as const) {
    test(`an abort closes the connection when ${why}`, async () => {
      const stream = liveStream();
      const { fetch, sent } = scripted((request) => {
        request.signal?.addEventListener("abort", () => stream.fail(new DOMException("aborted", "AbortError")));
        return stream.response;
      }, () => (deleteAnswer.status === 202 ? json(202, { cancelled: "gen_3" }) : json(404, deleteAnswer)));
      const controller = new AbortController();
      const service = new CapabilityService({ baseUrl: "http://service.test", fetch, cancelWaitMs });
      const pending = service.capability("c").textToImage("a cat", { signal: controller.signal });
      stream.send("started", { generation: "gen_3", model: "tiny-sd15" });
      await new Promise((resolve) => setTimeout(resolve, 20));
      const abortedAt = Date.now();
      controller.abort();
      await assert.rejects(pending, (error: unknown) => error instanceof Error && error.name === "AbortError");
      assert.ok(Date.now() - abortedAt < 5_000, "waited for a confirmation that could not come");
      assert.equal(sent[1]?.method, "DELETE");
      assert.equal(sent[0]?.signal?.aborted, true, "the connection was left open");
      await stream.closed;
    });
  }

  test("an already aborted signal rejects before anything is sent", async () => {
    const { fetch, sent } = scripted();
    await assert.rejects(new CapabilityService({ baseUrl: "http://service.test", fetch }).capability("c")
      .textToImage("a cat", { signal: AbortSignal.abort() }), { name: "AbortError" });
    assert.equal(sent.length, 0);
  });
});
