//! Python and Rust share one cache: the Python example (stdlib key spec + generated stubs)
//! passes every key vector, reads what the Rust client stored, and stores what Rust reads.
//! Needs the virtualenv that `scripts/test` creates (`.venv`, or `CACHE_MONEY_PYTHON`).

mod common;

use std::{path::PathBuf, process::Command};

use cache_money::{Client, Ttl};
use common::CacheServer;

/// The Python example reads a Rust-stored entry and stores one Rust reads, with the same keys.
#[tokio::test]
async fn python_and_rust_share_entries() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = common::venv_python();
    let stubs = std::env::temp_dir().join(format!("cache-money-py-{}", std::process::id()));
    std::fs::create_dir_all(&stubs).unwrap();
    let generated = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(root.join("proto/cache_money/v1/cache_money.proto"))
        .status()
        .expect("run grpc_tools.protoc");
    assert!(generated.success(), "stub generation failed");

    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let addition = cm.function("__main__", "addition", Ttl::HOUR);
    let sum: i64 = addition.memoize(&(3, 4), || async { 7 }).await.unwrap();
    assert_eq!(sum, 7);

    let output = Command::new(&python)
        .arg(root.join("examples/python/interop.py"))
        .arg(root.join("tests/vectors/keys.json"))
        .arg(server.addr().to_string())
        .env(
            "PYTHONPATH",
            format!(
                "{}:{}",
                stubs.display(),
                root.join("examples/python").display()
            ),
        )
        .output()
        .expect("run interop.py");
    let _ = std::fs::remove_dir_all(&stubs);
    assert!(
        output.status.success(),
        "interop.py failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("\"read_from_rust\": 7"), "{report}");

    let multiplication = cm.function("__main__", "multiplication", Ttl::HOUR);
    let product: i64 = multiplication
        .memoize(&(6, 7), || async {
            unreachable!("Python stored multiplication(6, 7)")
        })
        .await
        .unwrap();
    assert_eq!(product, 42);
}
