// Validate AsyncAPI documents with the official parser (@asyncapi/parser 3.x,
// https://github.com/asyncapi/parser-js): `node validate.mjs FILE...` (YAML or JSON).
//
// Every diagnostic goes to stderr, one line each ("<severity> <code> <path>: <message>").
// stdout gets one JSON line per file: its error/warning counts and, when the document parsed,
// what the parser's own model holds (channel addresses, operations, messages, servers), so a
// caller can check the parser read what was written. Exit status: 0 when no file has an error
// (DiagnosticSeverity.Error, 0), 1 when one does, 2 on a usage error or an unreadable file.
import { readFile } from "node:fs/promises";
import { DiagnosticSeverity, Parser } from "@asyncapi/parser";

const SEVERITY = {
  [DiagnosticSeverity.Error]: "error",
  [DiagnosticSeverity.Warning]: "warning",
  [DiagnosticSeverity.Information]: "info",
  [DiagnosticSeverity.Hint]: "hint",
};

function summary(document) {
  if (!document) return null;
  return {
    version: document.version(),
    title: document.info().title(),
    servers: document.servers().all().map((s) => ({
      id: s.id(),
      host: s.host(),
      protocol: s.protocol(),
      security: s.security().map((req) => req.all().map((r) => r.scheme().type())),
    })),
    channels: document.channels().all().map((c) => ({
      id: c.id(),
      address: c.address(),
      messages: c.messages().all().map((m) => m.id()),
    })),
    operations: document.operations().all().map((o) => ({
      id: o.id(),
      action: o.action(),
      channels: o.channels().all().map((c) => c.id()),
      reply: o.reply()
        ? { address: o.reply().address()?.location() ?? null, channel: o.reply().channel()?.id() ?? null }
        : null,
    })),
    messages: document.allMessages().all().map((m) => ({
      id: m.id(),
      payload: m.hasPayload() ? m.payload().type() ?? null : null,
      headers: m.hasHeaders() ? Object.keys(m.headers().properties() ?? {}) : [],
    })),
    schemas: document.components().schemas().all().map((s) => s.id()),
  };
}

async function check(parser, file) {
  const text = await readFile(file, "utf8");
  const { document, diagnostics } = await parser.parse(text, { source: file });
  let errors = 0;
  let warnings = 0;
  for (const d of diagnostics) {
    if (d.severity === DiagnosticSeverity.Error) errors += 1;
    if (d.severity === DiagnosticSeverity.Warning) warnings += 1;
    const where = (d.path ?? []).join(".") || "(root)";
    console.error(`${SEVERITY[d.severity] ?? d.severity} ${d.code} ${where}: ${d.message}`);
  }
  return { file, errors, warnings, document: errors ? null : summary(document) };
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate.mjs FILE...");
  process.exit(2);
}
const parser = new Parser();
let failed = false;
for (const file of files) {
  let result;
  try {
    result = await check(parser, file);
  } catch (err) {
    console.error(`error: ${file}: ${err.message ?? err}`);
    process.exit(2);
  }
  failed ||= result.errors > 0;
  console.log(JSON.stringify(result));
}
process.exit(failed ? 1 : 0);
