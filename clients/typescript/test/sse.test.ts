// The SSE parser on its own: whatever the chunking, the same events as the whole stream in one piece.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { readSse, SseParser, type SseEvent } from "../src/sse.js";

// Every feature at once: CRLF, CR and LF line ends, comments, multi-line data, a field without its space, an
// empty data line, an event with no data (not dispatched), an id, an unknown field, and an unfinished event.
const STREAM =
  "\uFEFF: keep-alive\r\n" +
  "event: started\r\n" +
  'data: {"generation": "gen_1", "model": "tiny-sd15"}\r\n' +
  "\r\n" +
  "event: progress\r" +
  "data:first line\r" +
  "data: second line\r" +
  "data\r" +
  "id: 7\r" +
  "\r" +
  ":comment without space\n" +
  "event: nothing\n" +
  "retry: 1000\n" +
  "\n" +
  "unknown: field\n" +
  "data:  two spaces keep one\n" +
  "\n" +
  "event: result\n" +
  "data: {\"image\": \"iVBOR\u00e9\u4e2d\"}\n" +
  "\n" +
  "event: lost\n" +
  "data: never dispatched";

const EXPECTED: SseEvent[] = [
  { event: "started", data: '{"generation": "gen_1", "model": "tiny-sd15"}', id: "" },
  { event: "progress", data: "first line\nsecond line\n", id: "7" },
  { event: "message", data: " two spaces keep one", id: "7" },
  { event: "result", data: '{"image": "iVBOR\u00e9\u4e2d"}', id: "7" },
];

function parseChunks(chunks: string[]): SseEvent[] {
  const parser = new SseParser();
  const events = chunks.flatMap((chunk) => parser.push(chunk));
  parser.end();
  return events;
}

function bytesStream(chunks: Uint8Array[]): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    start(controller) {
      for (const chunk of chunks) {
        controller.enqueue(chunk);
      }
      controller.close();
    },
  });
}

async function collect(stream: ReadableStream<Uint8Array>): Promise<SseEvent[]> {
  const events: SseEvent[] = [];
  for await (const event of readSse(stream)) {
    events.push(event);
  }
  return events;
}

describe("SseParser", () => {
  test("parses the whole stream in one chunk", () => {
    assert.deepEqual(parseChunks([STREAM]), EXPECTED);
  });

  test("gives the same events for every split into two chunks", () => {
    for (let at = 0; at <= STREAM.length; at += 1) {
      assert.deepEqual(parseChunks([STREAM.slice(0, at), STREAM.slice(at)]), EXPECTED, `split at ${at}`);
    }
  });

  test("gives the same events one character at a time, with empty chunks between", () => {
    assert.deepEqual(parseChunks([...STREAM].flatMap((character) => [character, ""])), EXPECTED);
  });

  test("takes CR then LF in the next chunk as one line end, not an empty line", () => {
    assert.deepEqual(parseChunks(["data: a\r", "\ndata: b\r", "\n\r", "\n"]), [{ event: "message", data: "a\nb", id: "" }]);
  });

  test("treats two CRs as two line ends even across chunks", () => {
    assert.deepEqual(parseChunks(["data: a\r", "\r"]), [{ event: "message", data: "a", id: "" }]);
  });

  test("dispatches nothing for comments and events without data", () => {
    assert.deepEqual(parseChunks([": ping\n\n: ping\n\nevent: empty\n\n"]), []);
  });

  test("strips a byte order mark only at the start of the stream", () => {
    assert.deepEqual(parseChunks(["\uFEFFdata: x\n\n\uFEFFdata: y\n\n"]), [
      { event: "message", data: "x", id: "" },
    ]);
  });

  test("keeps a large data line whole across many chunks", () => {
    const image = "A".repeat(100_000);
    const text = `event: result\ndata: ${image}\n\n`;
    const chunks: string[] = [];
    for (let at = 0; at < text.length; at += 4093) {
      chunks.push(text.slice(at, at + 4093));
    }
    assert.deepEqual(parseChunks(chunks), [{ event: "result", data: image, id: "" }]);
  });
});

describe("readSse", () => {
  test("decodes UTF-8 characters split between byte chunks", async () => {
    const bytes = new TextEncoder().encode(STREAM);
    for (let at = 0; at <= bytes.length; at += 1) {
      const events = await collect(bytesStream([bytes.slice(0, at), bytes.slice(at)]));
      assert.deepEqual(events, EXPECTED, `split at byte ${at}`);
    }
  });

  test("decodes a stream delivered one byte at a time", async () => {
    const bytes = new TextEncoder().encode(STREAM);
    const events = await collect(bytesStream([...bytes].map((byte) => Uint8Array.of(byte))));
    assert.deepEqual(events, EXPECTED);
  });

  test("cancels the stream when the reader leaves early", async () => {
    let cancelled = false;
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode("data: one\n\ndata: two\n\n"));
      },
      cancel() {
        cancelled = true;
      },
    });
    for await (const event of readSse(stream)) {
      assert.equal(event.data, "one");
      break;
    }
    assert.equal(cancelled, true);
  });
});
