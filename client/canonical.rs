//! The canonical key of a call: its arguments as one JSON array serialized per RFC 8785 (JSON
//! Canonicalization Scheme), then md5, in lowercase hex. Any language can compute the same
//! digest; `tests/vectors/keys.json` holds the cases both implementations are checked against.
//!
//! # The arguments as JSON
//! - A tuple is the argument list: `&(3, 4)` is `[3,4]`, `&(x,)` is `[x]`, `&()` is `[]`.
//!   Any other value is a single argument: `&5` is `[5]`, and a list is one list argument
//!   whatever its Rust type: `&[1, 2]`, `&[1, 2][..]` and `&vec![1, 2]` are all `[[1,2]]`, as
//!   Python's `f([1, 2])` is. So is a newtype struct around a tuple or an array.
//!   Arrays are told from tuples by their type (serde writes both alike), which works through
//!   references; behind another wrapper (`Box<[T; N]>`) an array reads as a tuple, so write
//!   such an argument as a one-element tuple, `&(x,)`, which is always one argument.
//! - serde's data model maps as serde_json does: `None` and unit structs are `null`, structs
//!   and maps are objects, unit enum variants are `"Variant"`, other variants
//!   `{"Variant": …}`, bytes are arrays of numbers.
//! - What JSON cannot carry faithfully is refused, never approximated into a key that could
//!   collide: NaN and infinite floats, integers beyond ±(2^53 − 1) (send them as strings),
//!   and map keys that are not strings.
//!
//! # The serialization (RFC 8785)
//! No whitespace; object members sorted by their keys' UTF-16 code units; strings escape only
//! `"`, `\` and control characters (`\b \f \n \r \t`, others as `\u00xx`); numbers in the
//! ECMAScript format (`1e+21`, `1e-7`, `0.000001`, `-0` as `0`, `3.0` as `3`).

use std::fmt::{self, Write as _};

use serde::{Serialize, ser};
use serde_json::{Map, Number, Value};

/// The largest integer every JSON implementation reads exactly: 2^53 − 1.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why arguments cannot make a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgsError(String);

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "arguments cannot make a cache key: {}", self.0)
    }
}

impl std::error::Error for ArgsError {}

impl ser::Error for ArgsError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        ArgsError(message.to_string())
    }
}

/// The arguments as the JSON array they are keyed by, with every value checked.
///
/// # Errors
/// On NaN or infinite floats, integers beyond ±(2^53 − 1), non-string map keys, or a
/// `Serialize` implementation that fails.
pub fn args_value<A: Serialize + ?Sized>(args: &A) -> Result<Value, ArgsError> {
    if is_array::<A>() {
        return Ok(Value::Array(vec![args.serialize(Strict::NESTED)?]));
    }
    args.serialize(Strict { top: true })
}

/// Whether `A` is a fixed-size array or a slice, possibly behind references. serde writes
/// `[T; N]` exactly as it writes an N-tuple, so the serializer cannot tell `&[3, 4]` (one
/// argument) from `&(3, 4)` (two); the type can.
fn is_array<A: ?Sized>() -> bool {
    let mut name = std::any::type_name::<A>();
    while let Some(referent) = name
        .strip_prefix("&mut ")
        .or_else(|| name.strip_prefix('&'))
    {
        name = referent;
    }
    name.starts_with('[')
}

/// The canonical JSON text of the arguments (RFC 8785).
///
/// # Errors
/// As [`args_value`].
pub fn canonical_json<A: Serialize + ?Sized>(args: &A) -> Result<String, ArgsError> {
    Ok(canonical_text(&args_value(args)?))
}

/// The digest of the arguments: md5 of their canonical JSON, 32 lowercase hex characters.
///
/// # Errors
/// As [`args_value`].
pub fn digest<A: Serialize + ?Sized>(args: &A) -> Result<String, ArgsError> {
    Ok(digest_of(&args_value(args)?))
}

/// Checks what a key function made of the arguments against the rules the arguments obey, so
/// a key function cannot key what arguments could not (a value built as `Value` can hold
/// integers beyond ±(2^53 − 1)).
///
/// # Errors
/// As [`args_value`], with a message that names the key function.
pub fn check_key_fn_output(value: &Value) -> Result<(), ArgsError> {
    match value.serialize(Strict::NESTED) {
        Ok(_) => Ok(()),
        Err(ArgsError(why)) => Err(ArgsError(format!("key_fn's result: {why}"))),
    }
}

/// The digest of an already-built JSON value (e.g. one a key function returned).
pub fn digest_of(value: &Value) -> String {
    md5_hex(canonical_text(value))
}

/// md5 of `input` in lowercase hex. Written out by hand: `format!("{:x}", …)` goes through
/// the formatter once per byte and took 350 ns, twice the md5 itself, on every call's key
/// (it dominated a near cache hit).
fn md5_hex(input: impl AsRef<[u8]>) -> String {
    hex(md5::compute(input))
}

/// A digest in lowercase hex, as `format!("{:x}", digest)` writes it.
fn hex(digest: md5::Digest) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * digest.0.len());
    for byte in digest.0 {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

/// The digest of a keyed argument list in a function's key space `version`: for version 1
/// (every function until its meaning changes) exactly [`digest_of`]; from version 2 on, md5 of
/// `v{version}:` followed by the canonical text, e.g. `md5("v2:[3,4]")`. No JSON text starts
/// with `v`, so a versioned digest input never equals an unversioned one, and the version
/// stays out of the names: `BustFunction` removes the entries of every version.
pub fn versioned_digest_of(value: &Value, version: u32) -> String {
    if version <= 1 {
        return digest_of(value);
    }
    let input = format!("v{version}:{}", canonical_text(value));
    md5_hex(input)
}

/// [`versioned_digest_of`] for a `#[memoize]` method whose `Self` type has type arguments
/// (`Wrap<u64>`): `type_args` (`<u64>`, from [`type_args`]) and `:` go after the version
/// prefix and before the canonical text, e.g. `md5("<u64>:[7]")`, so each instantiation of a
/// generic `impl` has entries of its own. No JSON text starts with `<`, so a scoped input never
/// equals an unscoped one; `None` is exactly [`versioned_digest_of`].
pub(crate) fn scoped_digest_of(value: &Value, version: u32, type_args: Option<&str>) -> String {
    let Some(type_args) = type_args else {
        return versioned_digest_of(value, version);
    };
    let version = if version <= 1 {
        String::new()
    } else {
        format!("v{version}:")
    };
    let input = format!("{version}{type_args}:{}", canonical_text(value));
    md5_hex(input)
}

/// The type arguments of a type name from [`core::any::type_name`] (`<u64>` of
/// `app::Wrap<u64>`), or `None` when it has none but lifetimes (`app::Parser<'_>`): those
/// are erased at run time, and a type without type arguments keeps its unscoped keys.
pub(crate) fn type_args(type_name: &str) -> Option<&str> {
    let args = &type_name[type_name.find('<')?..];
    let without_lifetimes = args.replace("'_, ", "").replace("'_", "");
    (without_lifetimes
        .chars()
        .any(|c| c != '<' && c != '>' && c != ',' && c != ' '))
    .then_some(args)
}

/// Writes a JSON value per RFC 8785. Values built by [`args_value`] are always representable;
/// a float that is not finite (only possible in a hand-built `Value`) is written as `null`, as
/// ECMAScript's `JSON.stringify` does.
pub fn canonical_text(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(number) => write_number(out, number),
        Value::String(text) => write_string(out, text),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(members) => {
            let mut members: Vec<(&String, &Value)> = members.iter().collect();
            members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, (name, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, name);
                out.push(':');
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

fn write_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_number(out: &mut String, number: &Number) {
    if let Some(n) = number.as_u64() {
        let _ = write!(out, "{n}");
    } else if let Some(n) = number.as_i64() {
        let _ = write!(out, "{n}");
    } else {
        out.push_str(&es_number(number.as_f64().unwrap_or(f64::NAN)));
    }
}

/// Formats a float as ECMAScript's `Number.prototype.toString` does, which RFC 8785 adopts:
/// the shortest digits that read back to the same float, in fixed notation for exponents from
/// -7 to 20 and in exponential notation (`1e+21`, `1.5e-7`) beyond.
pub fn es_number(x: f64) -> String {
    if !x.is_finite() {
        return "null".to_owned();
    }
    if x == 0.0 {
        return "0".to_owned(); // -0 too
    }
    let sign = if x < 0.0 { "-" } else { "" };
    // ryu gives the shortest round-trip digits; only their layout differs from ECMAScript's.
    let mut buffer = ryu::Buffer::new();
    let shortest = buffer.format_finite(x.abs());
    let (mantissa, exponent) = match shortest.split_once('e') {
        Some((mantissa, exponent)) => (mantissa, exponent.parse::<i32>().unwrap_or(0)),
        None => (shortest, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all: String = [whole, fraction].concat();
    let leading_zeros = all.len() - all.trim_start_matches('0').len();
    let digits = all.trim_start_matches('0').trim_end_matches('0');
    // value = 0.DIGITS × 10^n
    let n = whole.len() as i32 - leading_zeros as i32 + exponent;
    let k = digits.len() as i32;
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat(-n as usize))
    } else {
        let e = n - 1;
        let e_sign = if e < 0 { '-' } else { '+' };
        let (first, rest) = digits.split_at(1);
        let rest = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        format!("{first}{rest}e{e_sign}{}", e.abs())
    };
    format!("{sign}{body}")
}

/// Serializes into a checked `Value`. At the top (`top`), a tuple is the argument list, `()`
/// is no arguments, and anything else is one argument.
#[derive(Debug, Clone, Copy)]
struct Strict {
    top: bool,
}

impl Strict {
    const NESTED: Strict = Strict { top: false };

    fn done(self, value: Value) -> Result<Value, ArgsError> {
        Ok(if self.top {
            Value::Array(vec![value])
        } else {
            value
        })
    }

    fn integer(self, n: i128) -> Result<Value, ArgsError> {
        if n.unsigned_abs() > u128::from(MAX_SAFE_INTEGER) {
            return Err(ArgsError(format!(
                "integer {n} is beyond ±(2^53 - 1), which JSON readers cannot all hold exactly; \
                 pass it as a string"
            )));
        }
        let number = if n < 0 {
            Number::from(n as i64)
        } else {
            Number::from(n as u64)
        };
        self.done(Value::Number(number))
    }

    fn float(self, x: f64) -> Result<Value, ArgsError> {
        let Some(number) = Number::from_f64(x) else {
            return Err(ArgsError(format!(
                "{x} has no JSON form; NaN and infinities cannot be keyed"
            )));
        };
        // Integral floats key like integers (JSON has one number type), e.g. 3.0 as 3.
        self.done(Value::Number(number))
    }
}

/// Collects the elements of a sequence, tuple or tuple variant.
#[derive(Debug)]
struct SeqBuilder {
    items: Vec<Value>,
    wrap: bool,
    variant: Option<&'static str>,
}

/// Puts a finished compound value inside its enum variant (`{"Variant": …}`), if any, and
/// then inside the argument list when it stands alone at the top.
fn enclose(mut value: Value, variant: Option<&'static str>, wrap: bool) -> Value {
    if let Some(variant) = variant {
        value = Value::Object(Map::from_iter([(variant.to_owned(), value)]));
    }
    if wrap {
        Value::Array(vec![value])
    } else {
        value
    }
}

impl SeqBuilder {
    fn finish(self) -> Result<Value, ArgsError> {
        Ok(enclose(Value::Array(self.items), self.variant, self.wrap))
    }
}

/// Collects the members of a map, struct or struct variant.
#[derive(Debug)]
struct MapBuilder {
    members: Map<String, Value>,
    next_key: Option<String>,
    wrap: bool,
    variant: Option<&'static str>,
}

impl MapBuilder {
    fn finish(self) -> Result<Value, ArgsError> {
        Ok(enclose(
            Value::Object(self.members),
            self.variant,
            self.wrap,
        ))
    }
}

impl ser::Serializer for Strict {
    type Ok = Value;
    type Error = ArgsError;
    type SerializeSeq = SeqBuilder;
    type SerializeTuple = SeqBuilder;
    type SerializeTupleStruct = SeqBuilder;
    type SerializeTupleVariant = SeqBuilder;
    type SerializeMap = MapBuilder;
    type SerializeStruct = MapBuilder;
    type SerializeStructVariant = MapBuilder;

    fn serialize_bool(self, v: bool) -> Result<Value, ArgsError> {
        self.done(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, ArgsError> {
        self.integer(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<Value, ArgsError> {
        self.integer(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<Value, ArgsError> {
        self.integer(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<Value, ArgsError> {
        self.integer(v.into())
    }
    fn serialize_i128(self, v: i128) -> Result<Value, ArgsError> {
        self.integer(v)
    }
    fn serialize_u8(self, v: u8) -> Result<Value, ArgsError> {
        self.integer(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<Value, ArgsError> {
        self.integer(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<Value, ArgsError> {
        self.integer(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<Value, ArgsError> {
        self.integer(v.into())
    }
    fn serialize_u128(self, v: u128) -> Result<Value, ArgsError> {
        self.integer(i128::try_from(v).unwrap_or(i128::MAX))
    }
    fn serialize_f32(self, v: f32) -> Result<Value, ArgsError> {
        // Through its shortest decimal form, so 0.1f32 keys as 0.1 and not 0.10000000149011612.
        let mut buffer = ryu::Buffer::new();
        let shortest = if v.is_finite() {
            buffer.format_finite(v).parse().unwrap_or(f64::NAN)
        } else {
            f64::from(v)
        };
        self.float(shortest)
    }
    fn serialize_f64(self, v: f64) -> Result<Value, ArgsError> {
        self.float(v)
    }
    fn serialize_char(self, v: char) -> Result<Value, ArgsError> {
        self.done(Value::String(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, ArgsError> {
        self.done(Value::String(v.to_owned()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ArgsError> {
        self.done(Value::Array(v.iter().map(|&b| Value::from(b)).collect()))
    }
    fn serialize_none(self) -> Result<Value, ArgsError> {
        self.done(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ArgsError> {
        self.done(value.serialize(Strict::NESTED)?)
    }
    fn serialize_unit(self) -> Result<Value, ArgsError> {
        // `()` at the top means a call without arguments.
        Ok(if self.top {
            Value::Array(Vec::new())
        } else {
            Value::Null
        })
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Value, ArgsError> {
        self.done(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Value, ArgsError> {
        self.done(Value::String(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<Value, ArgsError> {
        // One argument even when it wraps a tuple: only a tuple itself is an argument list.
        self.done(value.serialize(Strict::NESTED)?)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, ArgsError> {
        let inner = value.serialize(Strict::NESTED)?;
        self.done(Value::Object(Map::from_iter([(variant.to_owned(), inner)])))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqBuilder, ArgsError> {
        Ok(SeqBuilder {
            items: Vec::with_capacity(len.unwrap_or(0)),
            wrap: self.top,
            variant: None,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqBuilder, ArgsError> {
        // A tuple at the top is the argument list itself, never wrapped.
        Ok(SeqBuilder {
            items: Vec::with_capacity(len),
            wrap: false,
            variant: None,
        })
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<SeqBuilder, ArgsError> {
        Ok(SeqBuilder {
            items: Vec::with_capacity(len),
            wrap: self.top,
            variant: None,
        })
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<SeqBuilder, ArgsError> {
        Ok(SeqBuilder {
            items: Vec::with_capacity(len),
            wrap: self.top,
            variant: Some(variant),
        })
    }
    fn serialize_map(self, _: Option<usize>) -> Result<MapBuilder, ArgsError> {
        Ok(MapBuilder {
            members: Map::new(),
            next_key: None,
            wrap: self.top,
            variant: None,
        })
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<MapBuilder, ArgsError> {
        self.serialize_map(None)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<MapBuilder, ArgsError> {
        Ok(MapBuilder {
            members: Map::new(),
            next_key: None,
            wrap: self.top,
            variant: Some(variant),
        })
    }
}

impl ser::SerializeSeq for SeqBuilder {
    type Ok = Value;
    type Error = ArgsError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ArgsError> {
        self.items.push(value.serialize(Strict::NESTED)?);
        Ok(())
    }
    fn end(self) -> Result<Value, ArgsError> {
        self.finish()
    }
}

/// Tuples, tuple structs and tuple variants collect their elements as a sequence does.
macro_rules! elements_as_seq {
    ($($serialize:ident :: $method:ident),* $(,)?) => {$(
        impl ser::$serialize for SeqBuilder {
            type Ok = Value;
            type Error = ArgsError;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ArgsError> {
                ser::SerializeSeq::serialize_element(self, value)
            }
            fn end(self) -> Result<Value, ArgsError> {
                self.finish()
            }
        }
    )*};
}

elements_as_seq!(
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

impl ser::SerializeMap for MapBuilder {
    type Ok = Value;
    type Error = ArgsError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ArgsError> {
        match key.serialize(Strict::NESTED)? {
            Value::String(key) => {
                self.next_key = Some(key);
                Ok(())
            }
            other => Err(ArgsError(format!(
                "map key {other} is not a string; JSON objects have string keys only, so \
                 convert the keys (or use a list of pairs)"
            ))),
        }
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ArgsError> {
        let key = self
            .next_key
            .take()
            .ok_or_else(|| ArgsError("map value without a key".to_owned()))?;
        self.members.insert(key, value.serialize(Strict::NESTED)?);
        Ok(())
    }
    fn end(self) -> Result<Value, ArgsError> {
        self.finish()
    }
}

impl ser::SerializeStruct for MapBuilder {
    type Ok = Value;
    type Error = ArgsError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), ArgsError> {
        self.members
            .insert(name.to_owned(), value.serialize(Strict::NESTED)?);
        Ok(())
    }
    fn end(self) -> Result<Value, ArgsError> {
        self.finish()
    }
}

impl ser::SerializeStructVariant for MapBuilder {
    type Ok = Value;
    type Error = ArgsError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), ArgsError> {
        ser::SerializeStruct::serialize_field(self, name, value)
    }
    fn end(self) -> Result<Value, ArgsError> {
        self.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    /// ECMAScript's number layout, at each boundary of its rules.
    #[test]
    fn numbers_follow_ecmascript() {
        let cases = [
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (1e-7, "1e-7"),
            (1e-6, "0.000001"),
            (-0.0, "0"),
            (3.0, "3"),
            (0.1, "0.1"),
            (-1.5e-7, "-1.5e-7"),
            (123.456, "123.456"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (4.35e-5, "0.0000435"),
        ];
        for (x, expected) in cases {
            assert_eq!(es_number(x), expected, "{x:e}");
        }
    }

    /// Tuples are the argument list; `()` is none; anything else is one argument.
    #[test]
    fn argument_lists() {
        assert_eq!(canonical_json(&()).unwrap(), "[]");
        assert_eq!(canonical_json(&(3, 4)).unwrap(), "[3,4]");
        assert_eq!(canonical_json(&(5,)).unwrap(), "[5]");
        assert_eq!(canonical_json(&5).unwrap(), "[5]");
        assert_eq!(canonical_json(&vec![1, 2]).unwrap(), "[[1,2]]");
        assert_eq!(canonical_json(&[1, 2]).unwrap(), "[[1,2]]");
        assert_eq!(canonical_json(&None::<i32>).unwrap(), "[null]");
        assert_eq!(canonical_json(&((), 1)).unwrap(), "[null,1]");
        assert_eq!(canonical_json("s").unwrap(), "[\"s\"]");
    }

    /// A list is one argument whatever its Rust type: array (also behind references or
    /// inside a newtype), slice or `Vec`; only a tuple is the argument list.
    #[test]
    fn lists_are_one_argument() {
        #[derive(Serialize)]
        struct Pair([i32; 2]);
        #[derive(Serialize)]
        struct Wrapped((i32, i32));
        let one_list = "[[3,4]]";
        assert_eq!(canonical_json(&[3, 4]).unwrap(), one_list);
        assert_eq!(canonical_json(&&[3, 4]).unwrap(), one_list);
        assert_eq!(canonical_json(&&mut [3, 4]).unwrap(), one_list);
        assert_eq!(canonical_json(&[3, 4][..]).unwrap(), one_list);
        assert_eq!(canonical_json(&vec![3, 4]).unwrap(), one_list);
        assert_eq!(canonical_json(&Pair([3, 4])).unwrap(), one_list);
        assert_eq!(canonical_json(&Wrapped((3, 4))).unwrap(), one_list);
        assert_eq!(canonical_json(&[[1], [2]]).unwrap(), "[[[1],[2]]]");
        assert_eq!(canonical_json(&[0u8; 0]).unwrap(), "[[]]");
        assert_eq!(canonical_json(&([3, 4], 5)).unwrap(), "[[3,4],5]");
        assert_eq!(canonical_json(&(3, 4)).unwrap(), "[3,4]");
    }

    /// Maps are objects with sorted keys whatever their source order.
    #[test]
    fn maps_are_sorted() {
        let map: HashMap<&str, i32> = [("b", 2), ("a", 1), ("c", 3)].into_iter().collect();
        assert_eq!(canonical_json(&(map,)).unwrap(), r#"[{"a":1,"b":2,"c":3}]"#);
    }

    /// What JSON cannot carry faithfully is refused, with a message saying what to do.
    #[test]
    fn unrepresentable_arguments_are_refused() {
        let nan = canonical_json(&(f64::NAN,)).unwrap_err();
        assert!(nan.to_string().contains("NaN"), "{nan}");
        assert!(canonical_json(&(f64::INFINITY,)).is_err());
        assert!(canonical_json(&(f32::NEG_INFINITY,)).is_err());
        let big = canonical_json(&(9_007_199_254_740_992u64,)).unwrap_err();
        assert!(big.to_string().contains("pass it as a string"), "{big}");
        assert!(canonical_json(&(-9_007_199_254_740_992i64,)).is_err());
        assert!(canonical_json(&(u128::MAX,)).is_err());
        assert_eq!(
            canonical_json(&(9_007_199_254_740_991u64,)).unwrap(),
            "[9007199254740991]"
        );
        let keys: BTreeMap<i32, i32> = [(1, 2)].into_iter().collect();
        let err = canonical_json(&(keys,)).unwrap_err();
        assert!(err.to_string().contains("not a string"), "{err}");
    }

    /// A key function's result obeys the arguments' rules, and its error names the key
    /// function.
    #[test]
    fn key_fn_output_is_checked() {
        let fine = serde_json::json!([9_007_199_254_740_991u64, {"a": [1.5, null]}]);
        assert_eq!(check_key_fn_output(&fine), Ok(()));
        for beyond in [
            serde_json::json!(9_007_199_254_740_992u64),
            serde_json::json!({"id": [u64::MAX]}),
            serde_json::json!(i64::MIN),
        ] {
            let err = check_key_fn_output(&beyond).unwrap_err();
            assert!(
                err.to_string().contains("key_fn's result: integer"),
                "{err}"
            );
        }
    }

    /// f32 keys by its shortest decimal, as a JavaScript caller would write the same number.
    #[test]
    fn f32_uses_its_shortest_decimal() {
        assert_eq!(canonical_json(&(0.1f32,)).unwrap(), "[0.1]");
    }

    /// The digest is md5 of the canonical text, lowercase hex.
    #[test]
    fn digest_is_md5_hex() {
        assert_eq!(digest(&(3, 4)).unwrap(), "b814fa889082069ffb727ee1623c0944");
    }

    /// The hand-written hex is the formatter's, for every byte value.
    #[test]
    fn md5_hex_is_the_formatters() {
        for input in ["", "[3,4]", "v2:[\"\\u0000\"]"] {
            assert_eq!(md5_hex(input), format!("{:x}", md5::compute(input)));
        }
        let every_byte: Vec<u8> = (0..=255).collect();
        for chunk in every_byte.chunks(16) {
            let digest = md5::Digest(chunk.try_into().expect("16 bytes"));
            assert_eq!(hex(digest), format!("{digest:x}"));
        }
    }

    /// Version 1 is the unversioned digest; version 2 hashes `v2:` and the canonical text.
    #[test]
    fn versions_prefix_the_digest_input() {
        let args = args_value(&(3, 4)).unwrap();
        assert_eq!(versioned_digest_of(&args, 1), digest_of(&args));
        assert_eq!(
            versioned_digest_of(&args, 2),
            format!("{:x}", md5::compute("v2:[3,4]"))
        );
        assert_ne!(versioned_digest_of(&args, 2), versioned_digest_of(&args, 3));
    }

    /// A method's `Self` type arguments go between the version and the canonical text; a
    /// type without them (or with lifetimes only) keys as before.
    #[test]
    fn type_arguments_prefix_the_digest_input() {
        let args = args_value(&(7,)).unwrap();
        assert_eq!(type_args("app::Wrap<u64>"), Some("<u64>"));
        assert_eq!(type_args("app::Two<'_, u8>"), Some("<'_, u8>"));
        assert_eq!(type_args("app::Parser<'_>"), None);
        assert_eq!(type_args("app::Plain"), None);
        assert_eq!(scoped_digest_of(&args, 1, None), digest_of(&args));
        assert_eq!(
            scoped_digest_of(&args, 1, Some("<u64>")),
            format!("{:x}", md5::compute("<u64>:[7]"))
        );
        assert_eq!(
            scoped_digest_of(&args, 2, Some("<i64>")),
            format!("{:x}", md5::compute("v2:<i64>:[7]"))
        );
    }
}
