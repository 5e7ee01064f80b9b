// The client against the real capability service (python -m capability serve over the tiny Triton models).
// tests/integration/test_typescript_client.py starts both, computes the Python API's results for the seed's
// examples, and writes what these tests need into a JSON file:
//   CAPABILITY_SERVICE_URL    the service's base URL
//   CAPABILITY_TEST_FIXTURE   that file (see the Fixture interface)
// Without them the tests are skipped, so that `npm test` runs the unit tests anywhere.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import {
  Capability,
  CapabilityService,
  isCapabilityServiceError,
  type ErrorCode,
  type MintParams,
  type Progress,
  type TextToImageOptions,
  type TextToImageResult,
} from "../src/index.js";

interface Example {
  name: string;
  /** The seed's line this example runs (with the tiny model names). */
  seed: string;
  /** What the capability is minted with, besides `server_url`. */
  mint: Omit<MintParams, "server_url">;
  prompt: string;
  /** The seed's options; absent when the seed passes none. */
  options?: TextToImageOptions;
  /** The Python API's result for the same capability parameters, prompt and options. */
  python: TextToImageResult;
}

interface Fixture {
  /** The Triton server the capabilities generate on. */
  serverUrl: string;
  /** A sys.mint authority held by `admin`. */
  authority: string;
  tokens: { admin: string; alice: string; bob: string };
  entities: { admin: string; alice: string; bob: string };
  /** alice's: tiny-sd15 with max_concurrent 1, minted by the Python side. */
  single: string;
  examples: Example[];
  progress: { prompt: string; options: TextToImageOptions; stepsDone: number[]; python: TextToImageResult };
}

const url = process.env["CAPABILITY_SERVICE_URL"];
const fixturePath = process.env["CAPABILITY_TEST_FIXTURE"];
const skip = url === undefined || fixturePath === undefined
  ? "CAPABILITY_SERVICE_URL and CAPABILITY_TEST_FIXTURE are not set (tests/integration/test_typescript_client.py sets them)"
  : false;
const fixture = skip === false ? JSON.parse(readFileSync(fixturePath as string, "utf-8")) as Fixture : undefined;

// The seed's 1024x1024 SDXL example takes about two minutes with the tiny model on two busy CPU cores.
const GENERATION_TIMEOUT_MS = 600_000;

function serviceAs(who: "admin" | "alice" | "bob"): CapabilityService {
  assert.ok(url !== undefined && fixture !== undefined);
  return new CapabilityService({ baseUrl: url, token: fixture.tokens[who] });
}

async function mint(params: Omit<MintParams, "server_url">): Promise<Capability> {
  assert.ok(fixture !== undefined);
  return await serviceAs("admin").mint(fixture.authority, { server_url: fixture.serverUrl, ...params });
}

/** Asserts that `promise` rejects with the service's `code` and `status`; returns the error for more checks. */
async function refused(promise: Promise<unknown>, code: ErrorCode, status: number) {
  try {
    await promise;
  } catch (error) {
    if (!isCapabilityServiceError(error)) {
      throw error;
    }
    assert.deepEqual([error.code, error.status], [code, status], `refused as ${error.code}: ${error.message}`);
    return error;
  }
  assert.fail(`expected a refusal with ${code} (${status}), got an answer`);
}

function assertPng(result: TextToImageResult): void {
  assert.equal(result.format, "png");
  const png = Uint8Array.from(atob(result.image.slice(0, 32)), (character) => character.charCodeAt(0));
  assert.deepEqual([...png.slice(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], "not a PNG");
  assert.deepEqual([png[16], png[17], png[18], png[19]], [0, 0, result.width >> 8, result.width & 0xff], "IHDR width");
  assert.deepEqual([png[20], png[21], png[22], png[23]], [0, 0, result.height >> 8, result.height & 0xff], "IHDR height");
}

function assertSameImage(actual: TextToImageResult, python: TextToImageResult): void {
  const { image: actualImage, ...actualRest } = actual;
  const { image: pythonImage, ...pythonRest } = python;
  assert.deepEqual(actualRest, pythonRest);
  // Not assert.equal: its diff of two megabytes of base64 would bury the report.
  assert.ok(actualImage === pythonImage, `the image differs from the Python API's (${actualImage.length} ` +
    `against ${pythonImage.length} base64 characters)`);
}

describe("the seed's examples against the real service", { skip }, () => {
  for (const example of fixture?.examples ?? []) {
    test(`${example.name}: ${example.seed} gives the Python API's image for the same seed`, { timeout: GENERATION_TIMEOUT_MS }, async () => {
      const genCap = await mint(example.mint);
      assert.equal(genCap.record?.params.default_model, example.mint.default_model);
      // The seed's call, with the seed the Python API drew when the example names none: the same image.
      const result = await genCap.textToImage(example.prompt, { ...example.options, seed: example.python.seed });
      assertPng(result);
      assertSameImage(result, example.python);
    });
  }

  test("the simple example runs exactly as the seed writes it: no options, the default model",
    { timeout: GENERATION_TIMEOUT_MS }, async () => {
      const example = fixture?.examples[0];
      assert.ok(example !== undefined && example.options === undefined);
      const genCap = await mint(example.mint);
      const result = await genCap.textToImage(example.prompt);
      assertPng(result);
      assert.deepEqual([result.width, result.height, result.model], [example.python.width, example.python.height,
        example.python.model]);
      assert.ok(Number.isSafeInteger(result.seed) && result.seed >= 0, `seed ${result.seed}`);
    });

  test("a restricted capability refuses a model outside its allowlist", async () => {
    const restricted = await mint({ default_model: "tiny-sdxl", allowed_models: ["tiny-sdxl", "tiny-sd15"] });
    const error = await refused(restricted.textToImage("a cat", { modelId: "tiny-flux" }), "denied", 403);
    assert.match(error.message, /tiny-flux/);
  });
});

describe("progress and cancellation against the real service", { skip }, () => {
  test("progress arrives step by step, in order, then the result: the Python API's steps and image",
    { timeout: GENERATION_TIMEOUT_MS }, async () => {
      assert.ok(fixture !== undefined);
      const genCap = await mint({ default_model: "tiny-sd15" });
      const events: (Progress | string)[] = [];
      const result = await genCap.textToImage(fixture.progress.prompt, {
        ...fixture.progress.options,
        onStarted: (started) => {
          assert.match(started.generation, /^gen_/);
          events.push("started");
        },
        onProgress: (progress) => events.push(progress),
      });
      assert.equal(events[0], "started");
      const progress = events.slice(1) as Progress[];
      assert.deepEqual(progress.map((p) => p.stepsDone), fixture.progress.stepsDone);
      const last = progress.at(-1);
      assert.ok(last !== undefined && last.stepsDone === last.steps, "the last report is not the last step");
      assert.ok(progress.every((p, index) => p.steps === last.steps && (index === 0 || p.elapsedS >= (progress[index - 1]?.elapsedS ?? 0))));
      assertSameImage(result, fixture.progress.python);
    });

  test("an abort mid-generation rejects with AbortError and frees the slot of a max_concurrent=1 capability",
    { timeout: GENERATION_TIMEOUT_MS }, async () => {
      assert.ok(fixture !== undefined);
      const alice = serviceAs("alice");
      const single = alice.capability(fixture.single);
      const controller = new AbortController();
      let reports = 0;
      let running!: () => void;
      const started = new Promise<void>((resolve) => {
        running = resolve;
      });
      const long = single.textToImage("a long walk", {
        width: 256, height: 256, numInferenceSteps: 100, seed: 3, signal: controller.signal,
        onProgress: () => {
          reports += 1;
          running();
        },
      });
      void long.catch(() => undefined); // awaited below; this keeps an early rejection from going unhandled
      await started;
      // The one slot is taken: a second generation is refused at once, with a time to wait.
      const busy = await refused(single.textToImage("meanwhile", { width: 64, height: 64, numInferenceSteps: 1 }),
        "concurrency_limit", 429);
      assert.ok(typeof busy.retryAfterS === "number" && busy.retryAfterS >= 0, `Retry-After ${busy.retryAfterS}`);
      controller.abort();
      await assert.rejects(long, (error: unknown) => error instanceof Error && error.name === "AbortError");
      assert.ok(reports < 101, `all ${reports} steps ran: the abort came too late to show anything`);
      // The promise settled once the service confirmed: the slot is free for the next generation at once.
      const next = await single.textToImage("after the abort", { width: 64, height: 64, numInferenceSteps: 2, seed: 1 });
      assert.deepEqual([next.width, next.height, next.seed], [64, 64, 1]);
      const cancelled = await alice.audit({ capability: fixture.single, outcome: "cancelled" });
      assert.ok(cancelled.length >= 1, "the cancelled generation is not in the audit log");
    });

  test("DELETE /v1/generations/{id} from elsewhere ends the stream with code cancelled",
    { timeout: GENERATION_TIMEOUT_MS }, async () => {
      assert.ok(fixture !== undefined);
      const alice = serviceAs("alice");
      const genCap = await mint({ default_model: "tiny-sd15" });
      await genCap.give(fixture.entities.alice);
      let cancelling: Promise<void> | undefined;
      const generation = alice.capability(genCap.id).textToImage("a long walk", {
        width: 256, height: 256, numInferenceSteps: 100, seed: 4,
        onStarted: (started) => {
          cancelling = alice.cancel(started.generation);
        },
      });
      await refused(generation, "cancelled", 409);
      await cancelling;
      await refused(serviceAs("bob").cancel("gen_made_up"), "unknown_generation", 404);
    });
});

describe("capabilities and refusals against the real service", { skip }, () => {
  test("the token names its entity", async () => {
    assert.ok(fixture !== undefined);
    assert.deepEqual(await serviceAs("alice").me(), { entity: fixture.entities.alice });
  });

  test("a delegated capability is narrower: a request beyond its limits is denied (403)", { timeout: GENERATION_TIMEOUT_MS }, async () => {
    const genCap = await mint({ default_model: "tiny-sd15" });
    const narrow = await genCap.delegate({ max_width: 128, max_height: 128, max_steps: 4 });
    assert.equal(narrow.record?.parent_id, genCap.id);
    const error = await refused(narrow.textToImage("a cat", { width: 256, height: 128, numInferenceSteps: 2 }), "denied", 403);
    assert.match(error.message, /width=256/);
    const within = await narrow.textToImage("a cat", { width: 128, height: 64, numInferenceSteps: 2, seed: 5 });
    assert.deepEqual([within.width, within.height], [128, 64]);
    await refused(narrow.delegate({ max_width: 512 }), "invalid_params", 400);
  });

  test("an invalid option is refused as invalid_option naming it (400)", async () => {
    const genCap = await mint({ default_model: "tiny-sd15" });
    const error = await refused(genCap.textToImage("a cat", { width: 100, height: 64 }), "invalid_option", 400);
    assert.equal(error.option, "width");
  });

  test("an unknown capability and another entity's get the same 404 unknown_capability", async () => {
    assert.ok(fixture !== undefined);
    const bob = serviceAs("bob");
    await refused(bob.capability("cap_thisIdWasMadeUpAndIsNotInTheStore").textToImage("a cat"), "unknown_capability", 404);
    await refused(bob.capability(fixture.single).show(), "unknown_capability", 404);
    await refused(bob.capability(fixture.single).textToImage("a cat"), "unknown_capability", 404);
  });

  test("a bad token or none is refused as unauthenticated (401)", async () => {
    assert.ok(url !== undefined);
    const forged = new CapabilityService({ baseUrl: url, token: `tok_0123456789abcdef_${"A".repeat(43)}` });
    await refused(forged.list(), "unauthenticated", 401);
    await refused(new CapabilityService({ baseUrl: url }).me(), "unauthenticated", 401);
  });

  test("give moves the capability: the old owner gets 404, the new one holds it", async () => {
    assert.ok(fixture !== undefined);
    const genCap = await mint({ default_model: "tiny-sd15" });
    const given = await genCap.give(fixture.entities.alice);
    assert.equal(given.owner, fixture.entities.alice);
    await refused(genCap.show(), "unknown_capability", 404);
    await refused(genCap.textToImage("a cat"), "unknown_capability", 404);
    const held = await serviceAs("alice").list();
    assert.ok(held.some((capability) => capability.id === genCap.id), "alice does not list it");
  });

  test("revoke disables the capability and everything delegated from it", { timeout: GENERATION_TIMEOUT_MS }, async () => {
    const genCap = await mint({ default_model: "tiny-sd15" });
    const child = await genCap.delegate({ max_steps: 8 });
    const revoked = await genCap.revoke();
    assert.deepEqual([...revoked].sort(), [genCap.id, child.id].sort());
    await refused(child.textToImage("a cat", { width: 64, height: 64, numInferenceSteps: 2 }), "denied", 403);
    const shown = await child.show();
    assert.equal(shown.revoked, true);
  });

  test("the audit log records uses and refusals of the caller's capabilities", { timeout: GENERATION_TIMEOUT_MS }, async () => {
    const admin = serviceAs("admin");
    const genCap = await mint({ default_model: "tiny-sd15", max_width: 64, max_height: 64, max_steps: 2 });
    await genCap.textToImage("a cat", { width: 64, height: 64, numInferenceSteps: 1, seed: 6 });
    await refused(genCap.textToImage("a cat", { width: 128, height: 64, numInferenceSteps: 1 }), "denied", 403);
    const entries = await admin.audit({ capability: genCap.id, action: "generate" });
    assert.deepEqual(entries.map((entry) => entry.outcome), ["ok", "denied"]);
    assert.deepEqual(await admin.audit({ capability: genCap.id, action: "generate", limit: 1 }), entries.slice(1));
  });
});
