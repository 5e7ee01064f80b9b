/**
 * Server-Sent Events, parsed from a fetch body as the WHATWG HTML standard describes (section 9.2.6): lines
 * end with CRLF, LF or CR; `data` lines of one event are joined with LF; lines starting with `:` are comments;
 * a blank line dispatches the event. fetch gives bytes in arbitrary chunks, so a line, a CRLF pair or a UTF-8
 * character may be split between two of them: the parser keeps the unfinished part until the next chunk.
 */

/** One dispatched event. `event` is "message" when the stream named none. */
export interface SseEvent {
  readonly event: string;
  readonly data: string;
  /** The last event id seen on the stream (the standard keeps it across events), "" when none. */
  readonly id: string;
}

const LINE_BREAK = /[\r\n]/g;

/** Incremental parser: feed it decoded text with {@link push}, in chunks of any size. */
export class SseParser {
  private partialLine = "";
  private started = false;
  /** The previous chunk ended with CR: a LF at the start of the next one belongs to the same line break. */
  private afterCarriageReturn = false;
  private eventType = "";
  private dataLines: string[] = [];
  private lastEventId = "";

  /** Parse the next piece of the stream; returns the events it completed, in order. */
  push(text: string): SseEvent[] {
    const events: SseEvent[] = [];
    if (text.length === 0) {
      return events;
    }
    let start = 0;
    if (!this.started) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) {
        start = 1; // a byte order mark opens the stream only, and is not part of the first field name
      }
    }
    if (this.afterCarriageReturn) {
      this.afterCarriageReturn = false;
      if (text.charCodeAt(start) === 0x0a) {
        start += 1;
      }
    }
    LINE_BREAK.lastIndex = start;
    for (let match = LINE_BREAK.exec(text); match !== null; match = LINE_BREAK.exec(text)) {
      const end = match.index;
      this.line(this.partialLine + text.slice(start, end), events);
      this.partialLine = "";
      start = end + 1;
      if (text.charCodeAt(end) === 0x0d) {
        if (start === text.length) {
          this.afterCarriageReturn = true;
        } else if (text.charCodeAt(start) === 0x0a) {
          start += 1;
        }
      }
      LINE_BREAK.lastIndex = start;
    }
    // A large event (a base64 PNG) arrives in many chunks: one concatenation each, no rescanning.
    this.partialLine += text.slice(start);
    return events;
  }

  /** The stream ended: an event without its closing blank line is discarded, as the standard says. */
  end(): void {
    this.partialLine = "";
    this.dataLines = [];
    this.eventType = "";
  }

  private line(line: string, events: SseEvent[]): void {
    if (line.length === 0) {
      this.dispatch(events);
      return;
    }
    if (line.charCodeAt(0) === 0x3a) {
      return; // ":" opens a comment (the service's keep-alives)
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 0x20) {
      value = value.slice(1); // only the one space after the colon is syntax
    }
    switch (field) {
      case "event":
        this.eventType = value;
        break;
      case "data":
        this.dataLines.push(value);
        break;
      case "id":
        if (!value.includes("\0")) {
          this.lastEventId = value;
        }
        break;
      default:
        break; // "retry" steers reconnection, which a one-shot generation stream never does; others are ignored
    }
  }

  private dispatch(events: SseEvent[]): void {
    if (this.dataLines.length > 0) {
      events.push({ event: this.eventType === "" ? "message" : this.eventType, data: this.dataLines.join("\n"),
        id: this.lastEventId });
    }
    this.dataLines = [];
    this.eventType = "";
  }
}

/**
 * The events of a byte stream (a fetch `Response.body`), as they complete. Leaving the loop early (break, an
 * exception) cancels the stream, which closes the connection.
 */
export async function* readSse(body: ReadableStream<Uint8Array>): AsyncGenerator<SseEvent, void, undefined> {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8"); // strips a leading BOM; {stream: true} keeps split characters whole
  const parser = new SseParser();
  let finished = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        finished = true;
        yield* parser.push(decoder.decode());
        parser.end();
        return;
      }
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
  } finally {
    if (!finished) {
      await reader.cancel().catch(() => undefined);
    }
    reader.releaseLock();
  }
}
