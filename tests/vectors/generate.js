// Regenerates keys.json from the cases below with Node.js, whose JSON.stringify and default
// string sort (UTF-16 code units) are the ECMAScript reference that RFC 8785 is defined by:
//   node tests/vectors/generate.js > tests/vectors/keys.json
// The Rust and Python implementations are then checked against the file; Node is not needed
// to run the tests.
const crypto = require("crypto");

function canonical(value) {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
  return "{" + Object.keys(value).sort().map((k) => JSON.stringify(k) + ":" + canonical(value[k])).join(",") + "}";
}

// [name, arguments as a JSON text (parsed by each implementation's own JSON reader)]
const cases = [
  ["no arguments", "[]"],
  ["addition(3, 4)", "[3,4]"],
  ["addition(3, 7)", "[3,7]"],
  ["multiplication(2, 4)", "[2,4]"],
  ["one string", '["hello"]'],
  ["unicode", '["héllo wörld", "日本語", "emoji 😀"]'],
  ["escapes", '["quote \\" backslash \\\\ slash /", "\\n\\t\\r\\b\\f"]'],
  ["control characters", '["\\u0000\\u0001\\u001f\\u007f"]'],
  ["line and paragraph separators", '["\\u2028\\u2029"]'],
  ["empty and blank strings", '["", " "]'],
  ["nested map with unordered keys", '[{"b": 1, "a": {"d": [1, 2], "c": null}}]'],
  ["keys sorted by UTF-16 code units", '[{"\\ufb33": 3, "😀": 2, "€": 1, "a": 4, "A": 5, "": 6}]'],
  ["numeric-looking keys sort as strings", '[{"10": 1, "9": 2, "1": 3}]'],
  ["simple floats", "[1.5, -0.25, 0.1]"],
  ["1e21 switches to exponent form", "[1e21]"],
  ["1e20 stays fixed", "[1e20]"],
  ["1e-7 switches to exponent form", "[1e-7]"],
  ["1e-6 stays fixed", "[0.000001]"],
  ["exponents with fractions", "[1.5e-7, 1.234e21, 4.35e-5]"],
  ["negative zero is zero", "[-0.0]"],
  ["integral float is an integer", "[3.0, -12.0]"],
  ["smallest subnormal", "[5e-324]"],
  ["largest double", "[1.7976931348623157e308]"],
  ["largest safe integers", "[9007199254740991, -9007199254740991]"],
  ["large integral float", "[1.2345678901234568e20]"],
  ["binary fractions", "[0.1, 0.2, 0.30000000000000004]"],
  ["booleans and null", "[true, false, null]"],
  ["option None then Some(5)", "[null, 5]"],
  ["unit struct", "[null]"],
  ["enum unit variant", '["Red"]'],
  ["enum newtype variant", '[{"Circle": 2.5}]'],
  ["enum tuple variant", '[{"Point": [1, 2]}]'],
  ["enum struct variant", '[{"Rect": {"w": 3, "h": 2}}]'],
  ["struct", '[{"name": "x", "id": 42, "tags": ["a", "b"]}]'],
  ["nested empties", "[[[]], [{}], {}]"],
  ["one list argument", "[[1, 2, 3]]"],
  // A list is one argument in every language: Python's f([3, 4]), Rust's &[3, 4] and &vec![3, 4].
  ["one fixed-size array argument", "[[3, 4]]"],
  ["empty list argument", "[[]]"],
  ["list beside another argument", "[[3, 4], 5]"],
  ["small integers", "[-1, 0, 1]"],
];

// Versioned functions (`version = N`): the digest input is `v{N}:` and the canonical text from
// version 2 on; version 1 is the unversioned digest itself.
// [name, arguments as a JSON text, version]
const versioned = [
  ["addition(3, 4) version 1 is unversioned", "[3,4]", 1],
  ["addition(3, 4) version 2", "[3,4]", 2],
  ["addition(3, 4) version 3", "[3,4]", 3],
  ["no arguments version 2", "[]", 2],
  ["unicode and key order version 2", '["日本語", {"b": 1, "a": [1.5, null]}]', 2],
  ["two-digit version", "[\"x\"]", 10],
];

// Arguments each implementation must refuse (its own reader keeps these exact).
const invalid = [
  ["integer above 2^53 - 1", "[9007199254740992]"],
  ["integer below -(2^53 - 1)", "[-9007199254740993]"],
  ["huge integer", "[18446744073709551615]"],
];

const vectors = cases.map(([name, json]) => {
  const text = canonical(JSON.parse(json));
  return { name, args: json, canonical: text, digest: crypto.createHash("md5").update(text, "utf8").digest("hex") };
});
const md5 = (text) => crypto.createHash("md5").update(text, "utf8").digest("hex");
const versionedVectors = versioned.map(([name, json, version]) => {
  const text = canonical(JSON.parse(json));
  const input = version <= 1 ? text : `v${version}:${text}`;
  return { name, args: json, version, input, digest: md5(input) };
});
process.stdout.write(
  JSON.stringify(
    { vectors, versioned: versionedVectors, invalid: invalid.map(([name, args]) => ({ name, args })) },
    null,
    2,
  ) + "\n",
);
