import { CapabilityServiceError, errorFromBody, errorFromResponse } from "./errors.js";
import { readSse, type SseEvent } from "./sse.js";
import type {
  AuditEntry,
  AuditFilters,
  CapabilityRecord,
  DelegateRestrictions,
  GenerationControls,
  GenerationStarted,
  MintParams,
  Progress,
  TextToImageOptions,
  TextToImageResult,
} from "./types.js";

/** The part of `fetch` the client uses; pass your own to add timeouts, logging or a custom agent. */
export type FetchLike = (input: string, init: RequestInit) => Promise<Response>;

export interface CapabilityServiceOptions {
  /** Where the service answers, e.g. "http://127.0.0.1:8080" (a path prefix behind a proxy is kept). */
  baseUrl: string | URL;
  /** The bearer token that names the calling entity (`python -m capability token issue`). */
  token?: string;
  /** Default: the global `fetch`. */
  fetch?: FetchLike;
  /** Sent with every request, e.g. a header an authenticating proxy expects. */
  headers?: Record<string, string>;
  /**
   * After an abort, how long to wait for the service to confirm that the generation stopped (and its slot is
   * free) before the connection is closed anyway. Default 10 000 ms.
   */
  cancelWaitMs?: number;
}

/** Everything `textToImage` takes: the seed's options and the client's controls. */
export type TextToImageCall = TextToImageOptions & GenerationControls;

const DEFAULT_CANCEL_WAIT_MS = 10_000;

/**
 * The capability service for one caller (one token). Nothing is retried: a refusal or failure rejects at once
 * with a {@link CapabilityServiceError} whose `code` and `retryAfterS` say whether and when a retry makes sense
 * (a request without a seed would give another image).
 */
export class CapabilityService {
  readonly baseUrl: URL;
  readonly cancelWaitMs: number;
  private readonly token: string | undefined;
  private readonly extraHeaders: Readonly<Record<string, string>>;
  private readonly fetchImpl: FetchLike;

  constructor(options: CapabilityServiceOptions) {
    const base = new URL(options.baseUrl);
    if (!base.pathname.endsWith("/")) {
      base.pathname += "/"; // so that relative paths resolve under a proxy's prefix instead of replacing it
    }
    this.baseUrl = base;
    this.token = options.token;
    this.extraHeaders = { ...options.headers };
    this.cancelWaitMs = options.cancelWaitMs ?? DEFAULT_CANCEL_WAIT_MS;
    const custom = options.fetch;
    // Called as a plain function: a browser's fetch throws "Illegal invocation" when called as a method of
    // anything but the window, and the global is looked up at call time so that it can be replaced.
    this.fetchImpl = custom === undefined ? (input, init) => globalThis.fetch(input, init) : (input, init) => custom(input, init);
  }

  /** A handle on a capability the caller holds (checked when used, not here). */
  capability(id: string): Capability {
    return new Capability(this, id);
  }

  /** The entity the token names. */
  async me(): Promise<{ entity: string }> {
    return await this.json<{ entity: string }>("GET", "v1/me");
  }

  /** The capabilities the caller holds. */
  async list(): Promise<CapabilityRecord[]> {
    return (await this.json<{ capabilities: CapabilityRecord[] }>("GET", "v1/capabilities")).capabilities;
  }

  /** Mint a `diffusers.generate` capability with an authority the caller holds; the caller owns it. */
  async mint(authorityId: string, params: MintParams): Promise<Capability> {
    const record = await this.json<CapabilityRecord>("POST", `v1/authorities/${segment(authorityId)}/mint`, params);
    return new Capability(this, record.id, record);
  }

  /** Audit entries of the capabilities the caller holds and of everything below them, oldest first. */
  async audit(filters: AuditFilters = {}): Promise<AuditEntry[]> {
    const query = new URLSearchParams();
    for (const [name, value] of Object.entries(filters) as [string, unknown][]) {
      if (value !== undefined) {
        query.set(name, String(value));
      }
    }
    const encoded = query.toString();
    const suffix = encoded === "" ? "" : `?${encoded}`;
    return (await this.json<{ entries: AuditEntry[] }>("GET", `v1/audit${suffix}`)).entries;
  }

  /** Stop a running generation of the caller's after its current step (its stream then ends `cancelled`). */
  async cancel(generation: string): Promise<void> {
    await this.json<unknown>("DELETE", `v1/generations/${segment(generation)}`);
  }

  /** @internal A request whose answer is JSON. */
  async json<T>(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<T> {
    const response = await this.send(method, path, body, "application/json", signal);
    return parseJson<T>(await response.text(), response.status, `${method} ${path}`);
  }

  /** @internal A request; a non-2xx answer rejects with the service's error. */
  async send(method: string, path: string, body: unknown, accept: string, signal?: AbortSignal): Promise<Response> {
    const headers: Record<string, string> = { ...this.extraHeaders, Accept: accept };
    if (this.token !== undefined) {
      headers["Authorization"] = `Bearer ${this.token}`;
    }
    const init: RequestInit = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (signal !== undefined) {
      init.signal = signal;
    }
    const response = await this.fetchImpl(new URL(path, this.baseUrl).toString(), init);
    if (!response.ok) {
      throw await errorFromResponse(response);
    }
    return response;
  }
}

/** A capability id in the hands of the service's caller: the seed's `genCap`. */
export class Capability {
  readonly service: CapabilityService;
  readonly id: string;
  /** The capability as the service returned it when this handle was made by `mint` or `delegate`. */
  readonly record: CapabilityRecord | undefined;

  constructor(service: CapabilityService, id: string, record?: CapabilityRecord) {
    this.service = service;
    this.id = id;
    this.record = record;
  }

  /**
   * The seed's `textToImage(prompt, options)`: one image, `{image, width, height, format: "png", seed, model}`.
   * With `onProgress`, `onStarted` or `signal` it runs on the streaming endpoint (the model's streaming variant).
   */
  async textToImage(prompt: string, options: TextToImageCall = {}): Promise<TextToImageResult> {
    const { onProgress, onStarted, signal, stream, ...modelOptions } = options;
    checkSeed(modelOptions.seed);
    signal?.throwIfAborted();
    const path = `${this.path()}/text-to-image`;
    const body = { prompt, options: modelOptions };
    if (!(stream ?? (onProgress !== undefined || onStarted !== undefined || signal !== undefined))) {
      return checkResult(await this.service.json<unknown>("POST", path, body, signal), 200);
    }
    return await streamGeneration(this.service, `${path}/stream`, body, { onProgress, onStarted, signal });
  }

  /** A narrower child, held by the caller (give it on after). */
  async delegate(restrictions: DelegateRestrictions = {}): Promise<Capability> {
    const record = await this.service.json<CapabilityRecord>("POST", `${this.path()}/delegate`, restrictions);
    return new Capability(this.service, record.id, record);
  }

  /** Move the capability to `entity`; the caller can no longer use it. Returns it as the service now shows it. */
  async give(entity: string): Promise<CapabilityRecord> {
    return await this.service.json<CapabilityRecord>("POST", `${this.path()}/give`, { to: entity });
  }

  /** Revoke it and everything delegated from it; returns the ids revoked. */
  async revoke(): Promise<string[]> {
    return (await this.service.json<{ revoked: string[] }>("POST", `${this.path()}/revoke`)).revoked;
  }

  async show(): Promise<CapabilityRecord> {
    return await this.service.json<CapabilityRecord>("GET", this.path());
  }

  private path(): string {
    return `v1/capabilities/${segment(this.id)}`;
  }
}

interface StreamControls {
  onProgress: ((progress: Progress) => void) | undefined;
  onStarted: ((started: GenerationStarted) => void) | undefined;
  signal: AbortSignal | undefined;
}

/**
 * One generation on the streaming endpoint. An abort asks the service to stop (DELETE, once the generation's id
 * is known) and keeps reading until the stream confirms, so that the capability's slot is free when the promise
 * settles; if the DELETE is refused, or no confirmation comes within `cancelWaitMs`, the connection is closed,
 * which stops it too.
 */
async function streamGeneration(service: CapabilityService, path: string, body: unknown,
  controls: StreamControls): Promise<TextToImageResult> {
  const { signal } = controls;
  const connection = new AbortController();
  let generation: string | undefined;
  let cancelSent = false;
  let giveUp: ReturnType<typeof setTimeout> | undefined;
  const sendCancel = (): void => {
    if (generation !== undefined && !cancelSent) {
      cancelSent = true;
      // Refused (a 404 from another instance behind a load balancer, or it has just finished): close the
      // connection instead, which stops the work on the instance that runs it, though without a confirmation.
      service.cancel(generation).catch(() => connection.abort());
    }
  };
  const onAbort = (): void => {
    sendCancel();
    giveUp = setTimeout(() => connection.abort(), service.cancelWaitMs);
  };
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    const response = await service.send("POST", path, body, "text/event-stream", connection.signal);
    const type = response.headers.get("Content-Type") ?? "";
    if (!type.toLowerCase().startsWith("text/event-stream") || response.body === null) {
      await response.body?.cancel().catch(() => undefined);
      throw new CapabilityServiceError(response.status, "unexpected_response",
        `the service answered ${path} with ${type === "" ? "no content type" : type}, not an event stream`);
    }
    for await (const event of readSse(response.body)) {
      const aborted = signal?.aborted === true;
      switch (event.event) {
        case "started": {
          const started = eventData<GenerationStarted>(event, response.status);
          generation = started.generation;
          if (aborted) {
            sendCancel(); // aborted before the id was known
          } else {
            controls.onStarted?.(started);
          }
          break;
        }
        case "progress":
          if (!aborted) {
            controls.onProgress?.(eventData<Progress>(event, response.status));
          }
          break;
        case "result": {
          const result = checkResult(eventData<unknown>(event, response.status), response.status);
          if (!aborted) {
            return result;
          }
          throw abortReason(signal); // finished while the abort was on its way: the caller asked for an abort
        }
        case "error":
          throw errorFromBody(eventData<unknown>(event, response.status), response.status);
        default:
          break; // an event this client does not know yet
      }
    }
    throw new CapabilityServiceError(response.status, "unexpected_response", "the event stream ended before its result");
  } catch (error) {
    if (signal?.aborted === true) {
      throw abortReason(signal); // whatever ended the stream (the cancelled event, the closed connection)
    }
    throw error;
  } finally {
    clearTimeout(giveUp);
    signal?.removeEventListener("abort", onAbort);
  }
}

function abortReason(signal: AbortSignal | undefined): unknown {
  return signal?.reason ?? new DOMException("The generation was aborted.", "AbortError");
}

function eventData<T>(event: SseEvent, status: number): T {
  return parseJson<T>(event.data, status, `the stream's ${event.event} event`);
}

function parseJson<T>(text: string, status: number, what: string): T {
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new CapabilityServiceError(status, "unexpected_response", `${what}: the answer is not JSON: ${text.slice(0, 200)}`);
  }
}

function checkResult(value: unknown, status: number): TextToImageResult {
  const result = value as Partial<Record<keyof TextToImageResult, unknown>> | null;
  if (typeof result !== "object" || result === null || typeof result.image !== "string" ||
    typeof result.width !== "number" || typeof result.height !== "number" || typeof result.seed !== "number") {
    throw new CapabilityServiceError(status, "unexpected_response", "the answer is not a textToImage result");
  }
  return value as TextToImageResult;
}

/** A seed past 2^53 - 1 would be sent rounded, and silently give another image: refused here instead. */
function checkSeed(seed: unknown): void {
  if (typeof seed === "number" && Number.isInteger(seed) && !Number.isSafeInteger(seed)) {
    throw new CapabilityServiceError(400, "invalid_option",
      `seed=${seed} is invalid: a JavaScript number holds integers up to ${Number.MAX_SAFE_INTEGER} exactly ` +
      "(checked by the client)", { option: "seed" });
  }
}

function segment(id: string): string {
  return encodeURIComponent(id);
}
