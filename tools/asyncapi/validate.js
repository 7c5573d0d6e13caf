#!/usr/bin/env node
// Validates AsyncAPI documents (JSON or YAML files, or "-" for stdin) with
// the official parser, @asyncapi/parser (its spectral ruleset included).
// Prints every diagnostic; exits 1 when any is an error (severity 0), 2 on
// bad usage. Used by tests/tests/asyncapi.rs:
//   node tools/asyncapi/validate.js spec.json [more.yaml ...]
'use strict';
const fs = require('fs');
const { Parser, DiagnosticSeverity } = require('@asyncapi/parser');

async function main() {
  const files = process.argv.slice(2);
  if (files.length === 0) {
    console.error('usage: validate.js <spec.json|spec.yaml|-> ...');
    process.exit(2);
  }
  const parser = new Parser();
  let errors = 0;
  for (const file of files) {
    const text = fs.readFileSync(file === '-' ? 0 : file, 'utf8');
    const { document, diagnostics } = await parser.parse(text);
    const errs = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
    for (const d of diagnostics) {
      const sev = ['error', 'warning', 'info', 'hint'][d.severity] || String(d.severity);
      console.log(`${file}: ${sev}: ${d.code}: ${d.message} at /${(d.path || []).join('/')}`);
    }
    if (!document || errs.length > 0) {
      errors += Math.max(errs.length, 1);
      console.log(`${file}: INVALID (${errs.length} errors)`);
    } else {
      console.log(`${file}: valid AsyncAPI ${document.version()}, ${document.channels().length} channels, ${document.operations().length} operations, ${document.allMessages().length} messages`);
    }
  }
  process.exit(errors > 0 ? 1 : 0);
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(2);
});
