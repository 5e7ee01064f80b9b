/** The stable error codes of the capability service (docs/service.md, "Errors"), plus the client's own. */
export type ServiceErrorCode =
  | "invalid_request"
  | "invalid_option"
  | "invalid_params"
  | "model_not_served"
  | "unauthenticated"
  | "denied"
  | "unknown_capability"
  | "unknown_generation"
  | "not_found"
  | "method_not_allowed"
  | "cancelled"
  | "body_too_large"
  | "unsupported_media_type"
  | "concurrency_limit"
  | "too_many_failed_authentications"
  | "server_not_registered"
  | "internal"
  | "generation_failed"
  | "server_busy"
  | "server_unavailable"
  | "store_unavailable";

/**
 * `unexpected_response`: the answer was not the service's (a proxy's HTML error page, a body that is not JSON,
 * a stream that ended before its result); `status` is the HTTP status that came with it.
 */
export type ClientErrorCode = "unexpected_response";

/**
 * The codes this client knows. A newer service may send a code not listed here: it is passed through as is,
 * which is why {@link CapabilityServiceError.code} also admits any string (a `switch` still narrows).
 */
export type ErrorCode = ServiceErrorCode | ClientErrorCode;

/** The error body the service sends, on a JSON answer or as the data of a stream's `error` event. */
export interface ErrorBody {
  readonly status: number;
  readonly code: string;
  readonly message: string;
  readonly option?: string;
  /** In an event stream's error, where no Retry-After header can be. */
  readonly retryAfterS?: number;
}

/** Every refusal or failure the service reports. Network failures and aborts keep fetch's own errors. */
export class CapabilityServiceError extends Error {
  override readonly name = "CapabilityServiceError";
  /** The HTTP status: 403 for `denied`, 429 for `concurrency_limit`, … (a stream's error carries its own). */
  readonly status: number;
  readonly code: ErrorCode | (string & Record<never, never>);
  /** For `invalid_option`: the option (or "prompt") that broke a rule. */
  readonly option: string | undefined;
  /** Seconds the service asked to wait (`Retry-After`) before trying again; undefined when it said nothing. */
  readonly retryAfterS: number | undefined;

  constructor(status: number, code: ErrorCode | (string & Record<never, never>), message: string,
    details: { option?: string | undefined; retryAfterS?: number | undefined } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.option = details.option;
    this.retryAfterS = details.retryAfterS;
  }
}

/** True when `error` is a {@link CapabilityServiceError}, with that code when one is given. */
export function isCapabilityServiceError(error: unknown, code?: ErrorCode): error is CapabilityServiceError {
  return error instanceof CapabilityServiceError && (code === undefined || error.code === code);
}

/** The error an error body describes; `fallbackStatus` when the body has none. */
export function errorFromBody(body: unknown, fallbackStatus: number, retryAfterS?: number): CapabilityServiceError {
  if (isErrorBody(body)) {
    const status = typeof body.status === "number" ? body.status : fallbackStatus;
    // An event stream's error has no Retry-After header: the service puts it in the body instead.
    const fromBody = typeof body.retryAfterS === "number" ? body.retryAfterS : undefined;
    return new CapabilityServiceError(status, body.code, body.message,
      { option: typeof body.option === "string" ? body.option : undefined, retryAfterS: retryAfterS ?? fromBody });
  }
  return new CapabilityServiceError(fallbackStatus, "unexpected_response",
    `the service answered ${fallbackStatus} without its error body`, { retryAfterS });
}

/** The error of a non-2xx response: the service's JSON body when it sent one, else `unexpected_response`. */
export async function errorFromResponse(response: Response): Promise<CapabilityServiceError> {
  const retryAfterS = parseRetryAfter(response.headers.get("Retry-After"));
  const text = await response.text().catch(() => "");
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    const excerpt = text.trim().slice(0, 200);
    return new CapabilityServiceError(response.status, "unexpected_response",
      `the service answered ${response.status} ${response.statusText} without its error body` +
      (excerpt === "" ? "" : `: ${excerpt}`), { retryAfterS });
  }
  return errorFromBody(body, response.status, retryAfterS);
}

/** `Retry-After` in seconds: a delay, or an HTTP date (counted from now, at least 0). */
export function parseRetryAfter(header: string | null, now: number = Date.now()): number | undefined {
  if (header === null) {
    return undefined;
  }
  const value = header.trim();
  if (/^\d+$/.test(value)) {
    return Number(value);
  }
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, Math.ceil((date - now) / 1000));
}

function isErrorBody(body: unknown): body is ErrorBody {
  if (typeof body !== "object" || body === null) {
    return false;
  }
  const candidate = body as Record<string, unknown>;
  return typeof candidate["code"] === "string" && typeof candidate["message"] === "string";
}
