//! The canonical key spec against the shared test vectors (`tests/vectors/keys.json`, made by
//! Node.js's ECMAScript JSON): every vector read as JSON, and the typed Rust values they stand
//! for (options, unit structs, enums, structs), give the recorded canonical text and digest.

use std::collections::BTreeMap;

use cache_money::{
    Client, Ttl,
    canonical::{args_value, canonical_text, digest, digest_of, versioned_digest_of},
};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, serde::Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
    versioned: Vec<Versioned>,
    invalid: Vec<Invalid>,
}

#[derive(Debug, serde::Deserialize)]
struct Versioned {
    name: String,
    args: String,
    version: u32,
    /// The text that is hashed: `v{version}:` and the canonical arguments (from version 2).
    input: String,
    digest: String,
}

#[derive(Debug, serde::Deserialize)]
struct Vector {
    name: String,
    args: String,
    canonical: String,
    digest: String,
}

#[derive(Debug, serde::Deserialize)]
struct Invalid {
    name: String,
    args: String,
}

fn vectors() -> Vectors {
    serde_json::from_str(include_str!("vectors/keys.json")).expect("keys.json parses")
}

/// At least 30 vectors, each reproduced exactly from its JSON arguments.
#[test]
fn every_vector_reproduces() {
    let vectors = vectors();
    assert!(
        vectors.vectors.len() >= 30,
        "only {} vectors",
        vectors.vectors.len()
    );
    for vector in &vectors.vectors {
        let args: Value = serde_json::from_str(&vector.args).expect(&vector.name);
        let value = args_value(&args).expect(&vector.name);
        // A JSON array given as arguments is a single (list) argument; the vectors' `args`
        // is the argument list itself.
        let Value::Array(mut wrapped) = value else {
            panic!("{}", vector.name)
        };
        let list = wrapped.remove(0);
        assert_eq!(canonical_text(&list), vector.canonical, "{}", vector.name);
        assert_eq!(digest_of(&list), vector.digest, "{}", vector.name);
    }
}

/// Each versioned vector's digest input and digest, from the canonical functions and from a
/// `Function` handle with `.version(n)`; version 1 is the unversioned digest.
#[tokio::test]
async fn versioned_vectors_reproduce() {
    // Connecting is lazy and a digest needs no server: nothing listens on port 1.
    let cm = Client::connect("http://127.0.0.1:1").await.unwrap();
    let vectors = vectors().versioned;
    assert!(
        vectors.len() >= 5,
        "only {} versioned vectors",
        vectors.len()
    );
    for vector in &vectors {
        let args: Value = serde_json::from_str(&vector.args).expect(&vector.name);
        let text = canonical_text(&args);
        let input = if vector.version <= 1 {
            text
        } else {
            format!("v{}:{text}", vector.version)
        };
        assert_eq!(input, vector.input, "{}", vector.name);
        assert_eq!(
            versioned_digest_of(&args, vector.version),
            vector.digest,
            "{}",
            vector.name
        );
        let Value::Array(list) = args else {
            panic!("{}: args is an argument list", vector.name)
        };
        let handle = cm.function("ns", "f", Ttl::MINUTE).version(vector.version);
        // A Vec of arguments is one list argument; a tuple is the list itself, so the
        // vector's arguments go through the key function's path, which hashes them as given.
        let handle = handle.with_key_fn(move |_| Value::Array(list.clone()));
        assert_eq!(
            handle.digest(&()).unwrap(),
            vector.digest,
            "{}",
            vector.name
        );
    }
    let addition_v2 = vectors
        .iter()
        .find(|vector| vector.name == "addition(3, 4) version 2")
        .expect("the addition(3, 4) version 2 vector");
    let unversioned = cm.function("ns", "f", Ttl::MINUTE);
    assert_eq!(
        unversioned.clone().version(2).digest(&(3, 4)).unwrap(),
        addition_v2.digest
    );
    assert_eq!(
        unversioned.clone().version(1).digest(&(3, 4)).unwrap(),
        unversioned.digest(&(3, 4)).unwrap()
    );
}

/// The invalid vectors are refused rather than keyed.
#[test]
fn invalid_vectors_are_refused() {
    for invalid in vectors().invalid {
        let args: Value = serde_json::from_str(&invalid.args).expect(&invalid.name);
        assert!(args_value(&args).is_err(), "{} was keyed", invalid.name);
    }
}

#[derive(Serialize)]
struct Unit;

#[derive(Serialize)]
#[allow(dead_code)]
enum Shape {
    Red,
    Circle(f64),
    Point(i32, i32),
    Rect { w: u32, h: u32 },
}

#[derive(Serialize)]
struct Item {
    name: &'static str,
    id: u32,
    tags: Vec<&'static str>,
}

/// A newtype around an array: one argument, as the array alone is.
#[derive(Serialize)]
struct Pair([i32; 2]);

/// Typed Rust arguments key exactly as the vector that describes them; a list (array, slice,
/// `Vec`) alone is one argument, as in Python.
#[test]
fn typed_arguments_match_their_vectors() {
    let by_name: BTreeMap<String, String> = vectors()
        .vectors
        .into_iter()
        .map(|vector| (vector.name, vector.digest))
        .collect();
    let check = |name: &str, actual: String| assert_eq!(&actual, &by_name[name], "{name}");
    check("no arguments", digest(&()).unwrap());
    check("addition(3, 4)", digest(&(3, 4)).unwrap());
    check("one string", digest(&("hello",)).unwrap());
    check(
        "option None then Some(5)",
        digest(&(None::<i32>, Some(5))).unwrap(),
    );
    check("unit struct", digest(&(Unit,)).unwrap());
    check("enum unit variant", digest(&(Shape::Red,)).unwrap());
    check(
        "enum newtype variant",
        digest(&(Shape::Circle(2.5),)).unwrap(),
    );
    check(
        "enum tuple variant",
        digest(&(Shape::Point(1, 2),)).unwrap(),
    );
    check(
        "enum struct variant",
        digest(&(Shape::Rect { w: 3, h: 2 },)).unwrap(),
    );
    check(
        "struct",
        digest(&(Item {
            name: "x",
            id: 42,
            tags: vec!["a", "b"],
        },))
        .unwrap(),
    );
    check("one list argument", digest(&(vec![1, 2, 3],)).unwrap());
    check("one list argument", digest(&vec![1, 2, 3]).unwrap());
    check("one fixed-size array argument", digest(&[3, 4]).unwrap());
    check(
        "one fixed-size array argument",
        digest(&[3, 4][..]).unwrap(),
    );
    check(
        "one fixed-size array argument",
        digest(&Pair([3, 4])).unwrap(),
    );
    check("empty list argument", digest(&[0i32; 0]).unwrap());
    check("empty list argument", digest(&Vec::<i32>::new()).unwrap());
    check(
        "list beside another argument",
        digest(&([3, 4], 5)).unwrap(),
    );
    check("negative zero is zero", digest(&(-0.0f64,)).unwrap());
    check(
        "integral float is an integer",
        digest(&(3.0f64, -12.0f32)).unwrap(),
    );
    check("1e21 switches to exponent form", digest(&(1e21,)).unwrap());
    check(
        "largest safe integers",
        digest(&(9_007_199_254_740_991u64, -9_007_199_254_740_991i64)).unwrap(),
    );
    check("small integers", digest(&(-1i8, 0u16, 1i128)).unwrap());
}
