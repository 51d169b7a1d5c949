// The comparison of bench/webhooks.py: @supabase/stripe-sync-engine processing the same
// signed events on the same PostgreSQL, loaded with `require`, in-process (no HTTP).
//
// Environment: SSE_DIR (a directory where `npm install @supabase/stripe-sync-engine@0.48.5`
// ran), DATABASE_URL, WEBHOOK_SECRET, EVENTS_FILE (one JSON event a line), CONCURRENCY, POOL.
// Prints one JSON line: {rate, p50, p99, ok, errors, cpu_s} (cpu_s: this process's CPU
// time, user and system, over the timed part).
//
// With PORT set instead of EVENTS_FILE it serves the same call over HTTP, as a deployment
// of it would: POST /v1/stripe/webhook with the Stripe-Signature header, answered 200
// {"status": "ok"} or, when processWebhook throws (it rejects types it does not handle),
// 200 {"status": <the error's first 60 characters>}, so the load generator counts each
// outcome. It prints {"port": PORT} once listening and runs until killed.
"use strict";
const path = require("node:path");
const fs = require("node:fs");
const http = require("node:http");

const dir = path.join(process.env.SSE_DIR, "node_modules");
const { StripeSync, runMigrations } = require(path.join(dir, "@supabase/stripe-sync-engine"));
const Stripe = require(path.join(dir, "stripe"));

async function main() {
  const databaseUrl = process.env.DATABASE_URL || undefined; // else PGHOST, PGPORT, ...
  const secret = process.env.WEBHOOK_SECRET;
  const concurrency = Number(process.env.CONCURRENCY || "16");
  await runMigrations({ databaseUrl, schema: "stripe" });
  const sync = new StripeSync({
    poolConfig: { connectionString: databaseUrl, max: Number(process.env.POOL || "24") },
    schema: "stripe",
    stripeSecretKey: "sk_test_bench",
    stripeWebhookSecret: secret,
    backfillRelatedEntities: false,
    autoExpandLists: false,
  });
  if (process.env.PORT) {
    serve(sync, Number(process.env.PORT));
    return;
  }
  const stripe = new Stripe("sk_test_bench");
  const bodies = fs.readFileSync(process.env.EVENTS_FILE, "utf8").split("\n").filter(Boolean);
  const latencies = [];
  let ok = 0;
  const errors = {};
  let next = 0;
  async function worker() {
    while (next < bodies.length) {
      const body = bodies[next++];
      const header = stripe.webhooks.generateTestHeaderString({ payload: body, secret });
      const started = process.hrtime.bigint();
      try {
        await sync.processWebhook(body, header);
        ok++;
      } catch (err) {
        const key = String(err && err.message).slice(0, 60);
        errors[key] = (errors[key] || 0) + 1;
      }
      latencies.push(Number(process.hrtime.bigint() - started) / 1e6);
    }
  }
  const cpuBefore = process.cpuUsage();
  const started = process.hrtime.bigint();
  await Promise.all(Array.from({ length: concurrency }, worker));
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  latencies.sort((a, b) => a - b);
  const result = {
    rate: latencies.length / elapsed,
    p50: latencies[Math.floor(latencies.length / 2)],
    p99: latencies[Math.floor(latencies.length * 0.99)],
    ok,
    errors,
    cpu_s: (cpu.user + cpu.system) / 1e6,
  };
  console.log(JSON.stringify(result));
  await sync.postgresClient.pool.end();
}

function serve(sync, port) {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", async () => {
      let status = "ok";
      try {
        await sync.processWebhook(Buffer.concat(chunks), req.headers["stripe-signature"]);
      } catch (err) {
        status = String(err && err.message).slice(0, 60);
      }
      const answer = JSON.stringify({ status });
      res.writeHead(200, {
        "content-type": "application/json",
        "content-length": Buffer.byteLength(answer),
      });
      res.end(answer);
    });
  });
  server.keepAliveTimeout = 60000;
  server.listen(port, "127.0.0.1", () => console.log(JSON.stringify({ port })));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
