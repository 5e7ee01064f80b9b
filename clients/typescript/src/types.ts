/** The seed plugin's `textToImage` options; any left out is the model's choice (the model: `default_model`). */
export interface TextToImageOptions {
  width?: number;
  height?: number;
  numInferenceSteps?: number;
  guidanceScale?: number;
  negativePrompt?: string;
  /**
   * Reproduces an image. At most `Number.MAX_SAFE_INTEGER` here (a JavaScript number holds no larger integer
   * exactly); the seeds the server draws when none is given are always below it, so a result's seed can be
   * sent back as is.
   */
  seed?: number;
  modelId?: string;
}

/** A progress report, after each denoising step. `steps` counts the scheduler's passes (SD1.5: steps + 1). */
export interface Progress {
  readonly stepsDone: number;
  readonly steps: number;
  readonly elapsedS: number;
}

/** The stream's first event: the generation's id (what `DELETE /v1/generations/{id}` takes). */
export interface GenerationStarted {
  readonly generation: string;
}

/** What the client adds to the seed's options: progress and cancellation. */
export interface GenerationControls {
  /** Called after every denoising step, in order, before the promise resolves. */
  onProgress?: (progress: Progress) => void;
  /** Called once the generation runs on the server, before its first progress report. */
  onStarted?: (started: GenerationStarted) => void;
  /**
   * Aborting stops the generation on the server after the step it is at and frees the capability's slot; the
   * promise then rejects with `signal.reason` (an `AbortError` DOMException unless the caller chose another).
   */
  signal?: AbortSignal;
  /**
   * Use the streaming endpoint (the model's streaming variant). Default: true when `onProgress`, `onStarted`
   * or `signal` is given, else false. Without it an abort only stops waiting: the server finishes the work.
   */
  stream?: boolean;
}

/** The seed's result, `{image, width, height, format: "png"}`, with the seed and the model used added. */
export interface TextToImageResult {
  /** The PNG, base64-encoded. */
  readonly image: string;
  readonly width: number;
  readonly height: number;
  readonly format: "png";
  readonly seed: number;
  readonly model: string;
}

/** `diffusers.generate` parameters, snake_case as in the seed. */
export interface GenerateParams {
  server_url: string;
  default_model: string;
  /** Absent: every model served at `server_url`. */
  allowed_models?: string[];
  /** Generations at once, for the capability and all its descendants together. */
  max_concurrent?: number;
  max_width?: number;
  max_height?: number;
  max_steps?: number;
}

/** What `mint` takes: the parameters, and an expiry in seconds from now (by the store's clock). */
export interface MintParams extends GenerateParams {
  expires_in?: number;
}

/** What `delegate` takes: each one only narrows the parent's; the server stays the parent's. */
export type DelegateRestrictions = Partial<Omit<MintParams, "server_url">>;

/** A capability as the service shows it. Times are Unix seconds. */
export interface CapabilityRecord {
  readonly id: string;
  /** "diffusers.generate", or "sys.mint" for an authority. */
  readonly type: string;
  readonly owner: string;
  /** For `diffusers.generate`: {@link GenerateParams} and `expires_at`; an authority's are its own. */
  readonly params: Readonly<Partial<GenerateParams>> & Readonly<Record<string, unknown>>;
  readonly parent_id: string | null;
  readonly created_at: number;
  readonly expires_at: number | null;
  /** Revoked itself, or (for `show`) as it stands in the store; an ancestor's revocation disables it too. */
  readonly revoked: boolean;
}

/** Filters of `GET /v1/audit`; `since` and `until` are Unix seconds. */
export interface AuditFilters {
  capability?: string;
  entity?: string;
  action?: string;
  outcome?: string;
  since?: number;
  until?: number;
  /** The most recent that many entries (still returned oldest first). */
  limit?: number;
}

/** One audit record: a use or a refusal. */
export interface AuditEntry {
  readonly id: number;
  /** Unix seconds. */
  readonly at: number;
  readonly entity: string;
  readonly capability_id: string | null;
  readonly action: string;
  readonly outcome: string;
  readonly model: string | null;
  readonly width: number | null;
  readonly height: number | null;
  readonly steps: number | null;
  readonly detail: string | null;
}
