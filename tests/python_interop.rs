//! Python and Rust share one cache: the Python example (stdlib key spec + generated stubs)
//! passes every key vector (versioned ones too), reads what the Rust client stored, and
//! stores what Rust reads, for an unversioned and a versioned function; and a tag written by
//! either side is busted by the other, across functions.
//! Leases hold across languages: a Python caller waits for a Rust lease holder's value, and
//! a Rust caller for a Python one's.
//! Needs the virtualenv that `scripts/test` creates (`.venv`, or `CACHE_MONEY_PYTHON`).

mod common;

use std::{path::PathBuf, process::Command};

use cache_money::{Client, Ttl};
use common::CacheServer;

/// Generates the Python stubs into a fresh temporary folder named after `name`.
fn python_stubs(python: &std::path::Path, name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let stubs = std::env::temp_dir().join(format!("cache-money-py-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&stubs).unwrap();
    let generated = Command::new(python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(root.join("proto/cache_money/v1/cache_money.proto"))
        .status()
        .expect("run grpc_tools.protoc");
    assert!(generated.success(), "stub generation failed");
    stubs
}

/// The Python example reads a Rust-stored entry and stores one Rust reads, with the same keys,
/// also for a function at version 2 (Python's `@cached(version=2)`, Rust's `.version(2)`).
#[tokio::test]
async fn python_and_rust_share_entries() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = common::venv_python();
    let stubs = python_stubs(&python, "share");

    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();
    let addition = cm.function("__main__", "addition", Ttl::HOUR);
    let sum: i64 = addition.memoize(&(3, 4), || async { 7 }).await.unwrap();
    assert_eq!(sum, 7);
    let price = cm.function("__main__", "price", Ttl::HOUR).version(2);
    let stored: String = price
        .memoize(&("abc",), || async { "300 cents".to_owned() })
        .await
        .unwrap();
    assert_eq!(stored, "300 cents");
    // An unversioned entry of the same call, which neither side's version 2 may read.
    let unversioned: String = cm
        .function("__main__", "price", Ttl::HOUR)
        .memoize(&("abcd",), || async { "stale: version 1".to_owned() })
        .await
        .unwrap();
    assert_eq!(unversioned, "stale: version 1");
    let profile = cm.function("__main__", "profile", Ttl::HOUR);
    let name: String = profile
        .tagged(["user:7"])
        .memoize(&(7,), || async { "Ada".to_owned() })
        .await
        .unwrap();
    assert_eq!(name, "Ada");

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
    assert!(
        report.contains("\"versioned_read_from_rust\": \"300 cents\""),
        "{report}"
    );
    let from_python: String = price
        .memoize(&("abcd",), || async {
            unreachable!("Python stored price('abcd') at version 2")
        })
        .await
        .unwrap();
    assert_eq!(from_python, "400 cents");

    // Tags: Python's BustTag removed Rust's profile(7) with its own orders(7) (2 entries);
    // its orders(8) survived, and its avatar(7), written after, is Rust's to bust.
    assert!(report.contains("\"tag_busted_from_python\": 2"), "{report}");
    let recomputed: String = profile
        .memoize(&(7,), || async { "recomputed".to_owned() })
        .await
        .unwrap();
    assert_eq!(
        recomputed, "recomputed",
        "profile(7) survived Python's BustTag"
    );
    let orders = cm.function("__main__", "orders", Ttl::HOUR);
    let kept: Vec<u64> = orders
        .memoize(&(8,), || async {
            unreachable!("orders(8) is not tagged user:7")
        })
        .await
        .unwrap();
    assert_eq!(kept, [8, 1]);
    assert_eq!(
        cm.bust_tag("__main__", "user:7").await.unwrap(),
        1,
        "avatar(7)"
    );
    assert_eq!(
        cm.bust_tag("__main__", "user:8").await.unwrap(),
        1,
        "orders(8)"
    );
}

/// Python's lease loop and Rust's memoize share leases: while Rust computes slow_square(9),
/// Python is told to wait and gets Rust's value without computing; while Python computes
/// cube(3), Rust's memoize waits and gets Python's value without computing.
#[tokio::test]
async fn python_and_rust_share_leases() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = common::venv_python();
    let stubs = python_stubs(&python, "lease");
    let server = CacheServer::memory(&[]);
    let cm = Client::connect(server.url()).await.unwrap();

    let square = cm.function("__main__", "slow_square", Ttl::HOUR);
    let (started, computing) = tokio::sync::oneshot::channel();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let rust_holder = tokio::spawn(async move {
        square
            .memoize(&(9,), || async {
                started.send(()).unwrap();
                finished.await.unwrap();
                81_i64
            })
            .await
            .unwrap()
    });
    computing.await.unwrap();

    let mut child = tokio::process::Command::new(&python)
        .arg(root.join("examples/python/lease_interop.py"))
        .arg(server.addr().to_string())
        .env(
            "PYTHONPATH",
            format!(
                "{}:{}",
                stubs.display(),
                root.join("examples/python").display()
            ),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run lease_interop.py");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("lease_interop.py went quiet")
            .unwrap()
            .expect("lease_interop.py ended early")
    };
    assert_eq!(next_line().await, "WAITING", "Python was not told to wait");
    finish.send(()).unwrap();
    assert_eq!(rust_holder.await.unwrap(), 81);

    assert_eq!(next_line().await, "COMPUTING");
    let cube = cm.function("__main__", "cube", Ttl::HOUR);
    let rust_waiter = tokio::spawn(async move {
        cube.memoize(&(3,), || async {
            unreachable!("Python holds cube(3)'s lease")
        })
        .await
        .unwrap()
    });
    let waiting = common::eventually(std::time::Duration::from_secs(10), || async {
        cm.metrics().lease_waits == 1
    })
    .await;
    assert!(waiting, "Rust's caller did not wait for Python's lease");
    stdin.write_all(b"go\n").await.unwrap();
    stdin.flush().await.unwrap();
    let cubed: i64 = rust_waiter.await.unwrap();
    assert_eq!(cubed, 27);
    let report = next_line().await;
    assert!(report.contains("\"waited_for_rust\": 81"), "{report}");
    assert!(report.contains("\"computed_for_rust\": 27"), "{report}");
    assert!(child.wait().await.unwrap().success());
    let _ = std::fs::remove_dir_all(&stubs);
    assert_eq!(cm.metrics().leases_won, 1, "Rust won slow_square(9) only");
}

/// The fenced blocks tagged `lang` (`""` for untagged ones) in the README section whose
/// heading starts with `heading`.
fn readme_blocks(heading: &str, lang: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .expect("read README.md");
    let mut lines = readme
        .lines()
        .skip_while(|line| !line.starts_with(heading))
        .skip(1)
        .take_while(|line| !line.starts_with("## "));
    let mut blocks = Vec::new();
    while let Some(line) = lines.next() {
        let Some(tag) = line.strip_prefix("```") else {
            continue;
        };
        let block: Vec<&str> = lines.by_ref().take_while(|line| *line != "```").collect();
        if tag.trim() == lang {
            blocks.push(block.join("\n") + "\n");
        }
    }
    blocks
}

/// The README's Python shell commands, run as written in a copy of the files they use,
/// generate the stubs and run the walkthrough against a real server, printing what the README
/// says they print.
#[test]
fn readme_python_commands_work_as_written() {
    let commands = readme_blocks("## Python", "sh");
    assert!(
        !commands.is_empty(),
        "the README's Python section has no sh block"
    );
    // A fresh clone's files, and the virtualenv scripts/test made (its packages already in).
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let clone = std::env::temp_dir().join(format!("cache-money-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&clone);
    std::fs::create_dir_all(clone.join("examples")).unwrap();
    let python = common::venv_python();
    let venv = python
        .parent()
        .and_then(|bin| bin.parent())
        .filter(|venv| venv.join("pyvenv.cfg").exists())
        .unwrap_or_else(|| panic!("{} is not a virtualenv's python", python.display()));
    for (from, to) in [
        (root.join("proto"), clone.join("proto")),
        (root.join("examples/python"), clone.join("examples/python")),
        (venv.to_owned(), clone.join(".venv")),
    ] {
        let copied = Command::new("cp").arg("-a").arg(&from).arg(&to).status();
        assert!(
            copied.is_ok_and(|status| status.success()),
            "cp -a {}",
            from.display()
        );
    }

    let server = CacheServer::memory(&[]);
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &commands.concat()])
        .current_dir(&clone)
        .env("CACHE_MONEY_SERVER", format!("http://{}", server.addr()))
        // The requirements are installed already: pip must find them without an index.
        .env("PIP_NO_INDEX", "1")
        .env_remove("PYTHONPATH")
        .output()
        .expect("run bash");
    let _ = std::fs::remove_dir_all(&clone);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the README's Python commands failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = readme_blocks("## Python", "");
    let expected = expected
        .first()
        .expect("the README's Python section shows the output in an untagged block");
    assert!(
        stdout.ends_with(expected.as_str()),
        "printed:\n{stdout}\nthe README shows:\n{expected}"
    );
}
