export { Capability, CapabilityService } from "./client.js";
export type { CapabilityServiceOptions, FetchLike, TextToImageCall } from "./client.js";
export { CapabilityServiceError, isCapabilityServiceError, parseRetryAfter } from "./errors.js";
export type { ClientErrorCode, ErrorBody, ErrorCode, ServiceErrorCode } from "./errors.js";
export { readSse, SseParser } from "./sse.js";
export type { SseEvent } from "./sse.js";
export type {
  AuditEntry,
  AuditFilters,
  CapabilityRecord,
  DelegateRestrictions,
  GenerateParams,
  GenerationControls,
  GenerationStarted,
  MintParams,
  Progress,
  TextToImageOptions,
  TextToImageResult,
} from "./types.js";
