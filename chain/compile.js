// Compiles contracts/*.sol with the pinned solc (package.json) into artifacts/<Name>.json
// (ABI + bytecode), which are committed so `cargo build` needs no Node.
//   node compile.js          write the artifacts
//   node compile.js --check  fail if the committed artifacts differ from a fresh compile
"use strict";
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const here = __dirname;
const contractsDir = path.join(here, "contracts");
const artifactsDir = path.join(here, "artifacts");
const check = process.argv.includes("--check");

const sources = {};
for (const file of fs.readdirSync(contractsDir).sort()) {
  if (file.endsWith(".sol")) {
    sources[file] = { content: fs.readFileSync(path.join(contractsDir, file), "utf8") };
  }
}
const input = {
  language: "Solidity",
  sources,
  settings: {
    evmVersion: "shanghai",
    optimizer: { enabled: true, runs: 200 },
    viaIR: true,
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors || []).filter((e) => e.severity === "error");
for (const e of output.errors || []) console.error(e.formattedMessage);
if (errors.length > 0) process.exit(1);

let differs = [];
fs.mkdirSync(artifactsDir, { recursive: true });
for (const file of Object.keys(output.contracts).sort()) {
  for (const [name, c] of Object.entries(output.contracts[file])) {
    if (!c.evm.bytecode.object) continue; // abstract contracts
    const artifact = JSON.stringify({ contractName: name, compiler: `solc ${solc.version()}`, evmVersion: "shanghai", abi: c.abi, bytecode: "0x" + c.evm.bytecode.object }, null, 2) + "\n";
    const target = path.join(artifactsDir, `${name}.json`);
    if (check) {
      const committed = fs.existsSync(target) ? fs.readFileSync(target, "utf8") : "";
      if (committed !== artifact) differs.push(path.relative(here, target));
    } else {
      fs.writeFileSync(target, artifact);
      console.log(`wrote ${path.relative(here, target)}`);
    }
  }
}
if (check && differs.length > 0) {
  console.error(`the committed artifacts differ from a fresh compile: ${differs.join(", ")}; run \`npm run compile\` in chain/ and commit`);
  process.exit(1);
}
if (check) console.log("chain artifacts match a fresh compile");
